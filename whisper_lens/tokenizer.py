"""Whisper's tokenizer: GPT-2 style byte-level BPE plus a block of special tokens.

Text is split by a regex into words, numbers and punctuation runs, each piece is turned into
UTF-8 bytes, and the bytes are merged pairwise in order of rank (the lowest-ranked known byte
string first) until no known merge is left. The ranks are the token ids of ordinary text.

After the ranks, Whisper appends special tokens in a fixed order, so their ids follow from the
vocabulary size alone:

    <|endoftext|> <|startoftranscript|> <|en|> <|zh|> ... (99 or 100 languages)
    <|translate|> <|transcribe|> <|startoflm|> <|startofprev|> <|nospeech|> <|notimestamps|>
    <|0.00|> <|0.02|> ... <|30.00|>   (1501 timestamps, 20 ms apart)

That is 1509 specials plus the languages, hence num_languages = n_vocab - n_ranks - 1509.
A decoder prompt starts with the "start of transcript" sequence, e.g.
<|startoftranscript|><|fr|><|transcribe|>, optionally followed by <|notimestamps|>.

The ranks come from a tiktoken rank file (lines "base64(token bytes) rank", the format
openai-whisper ships) or from a Hugging Face vocab.json (token strings in GPT-2's byte-to-unicode
spelling, ids as ranks). tiktoken does the actual BPE.
"""

from __future__ import annotations

import base64
import difflib
import json
import numbers
import os
import string
from collections.abc import Iterable, Sequence

import tiktoken

# Whisper's languages in token order: the k-th entry is the language token sot + 1 + k.
# Models with 99 languages use the first 99; large-v3 (n_vocab 51866) adds Cantonese.
LANGUAGES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",
}

# Other names people use for some of the languages above.
LANGUAGE_ALIASES: dict[str, str] = {
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}

TASKS = ("transcribe", "translate")

# GPT-2's pre-tokenizer: English contractions, letter runs, digit runs and runs of other
# symbols, each optionally led by one space, then whitespace. BPE never merges across pieces.
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in 0.02 s steps
MULTILINGUAL_RANKS = 50257  # multilingual.tiktoken: GPT-2's 50256 ranks plus one
N_SPECIALS_WITHOUT_LANGUAGES = 2 + 6 + N_TIMESTAMPS  # eot, sot; task/lm/prev/nospeech/notimestamps; times

# Languages written without spaces between words: word boundaries are taken at every point
# where the tokens so far decode to complete characters.
LANGUAGES_WITHOUT_SPACES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})

# Speaker tags, sound descriptions and music notes that suppress_tokens="-1" forbids, so that
# the model writes only what is said. Ordinary punctuation (, . ? ! and in-word - ') is allowed.
_NON_SPEECH_SYMBOLS = (
    list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
    + "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
)
# Music symbols (U+2669..U+266F) whose UTF-8 forms share their first two bytes with other
# symbols of the same Unicode block; their first token is suppressed even when split.
_MUSIC_SYMBOLS = "♩♪♫♬♭♮♯"


def normalize_language(language: str) -> str:
    """A language code from a code, an English name or an alias ("French", "fr", "mandarin")."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    by_name = {name: code for code, name in LANGUAGES.items()} | LANGUAGE_ALIASES
    if key in by_name:
        return by_name[key]
    close = difflib.get_close_matches(key, list(LANGUAGES) + list(by_name), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown language {language!r}{hint} (use a code such as 'en' or a name such as 'english')")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (vocab.json keys).

    Bytes that are printable Latin-1 characters ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for
    themselves; the other 68 (control bytes, space, soft hyphen, ...) are given the code points
    256, 257, ... in byte order, so every token is a string without spaces or control characters.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    next_code = 256
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(next_code)
            next_code += 1
    return mapping


def _timestamp_text(index: int) -> str:
    seconds, hundredths = divmod(index * 2, 100)
    return f"<|{seconds}.{hundredths:02d}|>"


def _special_token_names(num_languages: int) -> list[str]:
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *(f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]),
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *(_timestamp_text(i) for i in range(N_TIMESTAMPS)),
    ]


class Tokenizer:
    """Whisper's tokenizer for one vocabulary, language and task.

    Holds plain ints for the special tokens (eot, sot, translate, transcribe, sot_lm, sot_prev,
    no_speech, no_timestamps, timestamp_begin) and the language tables; build it with
    `load_tokenizer`. Treat it as immutable: for a different language or task call
    `sot_sequence_for` or load another.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        n_vocab: int,
        *,
        multilingual: bool | None = None,
        language: str | None = None,
        task: str | None = None,
        name: str = "whisper",
    ):
        n_ranks = len(ranks)
        num_languages = n_vocab - n_ranks - N_SPECIALS_WITHOUT_LANGUAGES
        if num_languages not in (99, 100):
            raise ValueError(
                f"n_vocab={n_vocab} does not fit a vocabulary of {n_ranks} ranks: Whisper adds "
                f"{N_SPECIALS_WITHOUT_LANGUAGES} special tokens plus 99 or 100 language tokens, so n_vocab "
                f"should be {n_ranks + N_SPECIALS_WITHOUT_LANGUAGES + 99} or "
                f"{n_ranks + N_SPECIALS_WITHOUT_LANGUAGES + 100} (pass the model's dims.n_vocab)"
            )
        if num_languages == 100 and n_ranks != MULTILINGUAL_RANKS:  # only large-v3's layout has 100 languages
            raise ValueError(
                f"n_vocab={n_vocab} means large-v3's layout (100 languages) over the multilingual vocabulary "
                f"of {MULTILINGUAL_RANKS} ranks, but this one has {n_ranks} (an English-only vocabulary goes with "
                f"n_vocab={n_ranks + N_SPECIALS_WITHOUT_LANGUAGES + 99}; pass the model's dims.n_vocab)"
            )
        specials = _special_token_names(num_languages)
        self._encoding = tiktoken.Encoding(
            name=name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={text: n_ranks + i for i, text in enumerate(specials)},
            explicit_n_vocab=n_vocab,
        )
        self.n_vocab = n_vocab
        self.num_languages = num_languages
        self.multilingual = n_vocab >= 51865 if multilingual is None else bool(multilingual)

        self.eot = n_ranks
        self.sot = n_ranks + 1
        self.all_language_codes = tuple(LANGUAGES)[:num_languages]
        self.all_language_tokens = tuple(range(self.sot + 1, self.sot + 1 + num_languages))
        self.translate = self.sot + 1 + num_languages
        self.transcribe = self.translate + 1
        self.sot_lm = self.translate + 2
        self.sot_prev = self.translate + 3
        self.no_speech = self.translate + 4
        self.no_timestamps = self.translate + 5
        self.timestamp_begin = self.translate + 6
        assert self.timestamp_begin + N_TIMESTAMPS == n_vocab

        if self.multilingual:
            # As openai-whisper: a multilingual tokenizer defaults to English transcription.
            language = self._check_language(language or "en")
            task = self._check_task(task or "transcribe")
        else:
            self._check_english_only(language, task)
            language, task = None, None
        self.language: str | None = language
        self.task: str | None = task
        self.sot_sequence: tuple[int, ...] = self.sot_sequence_for(language, task)
        self.sot_sequence_including_notimestamps: tuple[int, ...] = (*self.sot_sequence, self.no_timestamps)
        self.non_speech_tokens: tuple[int, ...] = self._non_speech_tokens()

    def __repr__(self) -> str:
        return (
            f"Tokenizer(n_vocab={self.n_vocab}, multilingual={self.multilingual}, "
            f"language={self.language!r}, task={self.task!r})"
        )

    # ----- languages and prompts -----

    def _check_language(self, language: str) -> str:
        code = normalize_language(language)
        if code not in self.all_language_codes:
            raise ValueError(
                f"language {code!r} is not in this vocabulary ({self.num_languages} languages; "
                "Cantonese 'yue' needs the large-v3 vocabulary, n_vocab=51866)"
            )
        return code

    @staticmethod
    def _check_task(task: str) -> str:
        if task not in TASKS:
            raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
        return task

    @staticmethod
    def _check_english_only(language: str | None, task: str | None) -> None:
        if language is not None and normalize_language(language) != "en":
            raise ValueError(f"this tokenizer is English-only; it cannot be set to language {language!r}")
        if task is not None and Tokenizer._check_task(task) != "transcribe":
            raise ValueError("this tokenizer is English-only; it can only transcribe, not translate")

    def language_token(self, code: str) -> int:
        """The id of the language token for a code or name: language_token("fr") -> sot + 7."""
        return self.all_language_tokens[self.all_language_codes.index(self._check_language(code))]

    def language_code(self, token: int) -> str:
        """The language code of a language token id: the inverse of `language_token`."""
        index = int(token) - (self.sot + 1)
        if not 0 <= index < self.num_languages:
            raise ValueError(
                f"token {token} is not a language token (those are {self.all_language_tokens[0]}.."
                f"{self.all_language_tokens[-1]})"
            )
        return self.all_language_codes[index]

    def sot_sequence_for(self, language: str | None = None, task: str | None = None) -> tuple[int, ...]:
        """The decoder prompt start: (sot, language token, task token), omitting what is None.

        English-only tokenizers have no language or task slots and always give (sot,).
        """
        if not self.multilingual:
            self._check_english_only(language, task)
            return (self.sot,)
        sequence = [self.sot]
        if language is not None:
            sequence.append(self.language_token(language))
        if task is not None:
            sequence.append(self.transcribe if self._check_task(task) == "transcribe" else self.translate)
        return tuple(sequence)

    # ----- text -----

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; "<|endoftext|>" written in the text is just characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self._encoding.encode_ordinary(text)

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        tolist = getattr(ids, "tolist", None)  # torch tensors and numpy arrays
        if tolist is None and not isinstance(ids, Iterable) or isinstance(ids, str | bytes):
            raise TypeError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
        values = tolist() if tolist is not None else list(ids)
        if not isinstance(values, list):  # a 0-d tensor
            values = [values]
        checked = []
        for value in values:
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"token ids must be integers, got {value!r} ({type(value).__name__})")
            token = int(value)
            if not 0 <= token < self.n_vocab:
                raise ValueError(f"token id {value} is outside the vocabulary [0, {self.n_vocab})")
            checked.append(token)
        return checked

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids; timestamp tokens are dropped, other special tokens are shown as <|...|>.

        Byte sequences that are not valid UTF-8 (a character cut between tokens) become U+FFFD.
        """
        return self._encoding.decode([t for t in self._checked_ids(ids) if t < self.timestamp_begin])

    def decode_with_timestamps(self, ids: Iterable[int]) -> str:
        """Like `decode` but timestamp tokens are kept, written as <|1.24|>."""
        return self._encoding.decode(self._checked_ids(ids))

    # ----- words -----

    def split_to_word_tokens(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Group tokens into words: (words, tokens of each word), used for word-level timing.

        Words start at a token beginning with a space, at punctuation and at special tokens;
        for languages written without spaces (zh, ja, th, lo, my, yue) every complete
        character sequence is its own "word".
        """
        if self.language in LANGUAGES_WITHOUT_SPACES:
            return self._split_on_unicode(tokens)
        return self._split_on_spaces(tokens)

    def _split_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        # A group of tokens ends as soon as it decodes to whole characters. A U+FFFD in the
        # group's text means an unfinished character, unless the full text has U+FFFD at that
        # spot too (truly invalid bytes, which waiting for more tokens will not fix).
        full_text = self.decode_with_timestamps(tokens)
        words: list[str] = []
        groups: list[list[int]] = []
        current: list[int] = []
        offset = 0  # characters of full_text already assigned to words
        for token in tokens:
            current.append(token)
            text = self.decode_with_timestamps(current)
            broken_at = text.find("\ufffd")
            if broken_at < 0 or full_text[offset + broken_at] == "\ufffd":
                words.append(text)
                groups.append(current)
                current = []
                offset += len(text)
        return words, groups

    def _split_on_spaces(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        words: list[str] = []
        groups: list[list[int]] = []
        for piece, piece_tokens in zip(*self._split_on_unicode(tokens), strict=True):
            starts_word = (
                not words or piece_tokens[0] >= self.eot or piece.startswith(" ") or piece.strip() in string.punctuation
            )
            if starts_word:
                words.append(piece)
                groups.append(piece_tokens)
            else:
                words[-1] += piece
                groups[-1].extend(piece_tokens)
        return words, groups

    def _non_speech_tokens(self) -> tuple[int, ...]:
        # A hyphen or apostrophe is fine inside a word but not at its start.
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in _NON_SPEECH_SYMBOLS + list(_MUSIC_SYMBOLS):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in _MUSIC_SYMBOLS:
                    result.add(tokens[0])
        # A bare space is never non-speech: in a byte-level vocabulary " -" and " ♪" start with it.
        result.discard(self.encode(" ")[0])
        return tuple(sorted(result))


def _read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Ranks of a tiktoken file: one ``base64(token bytes) rank`` per line."""
    ranks: dict[bytes, int] = {}
    first_line: dict[bytes, int] = {}
    for line_number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            piece = base64.b64decode(token)  # as tiktoken reads it (openai's files hold "=", the empty token)
            ranks[piece] = int(rank)
        except ValueError:
            raise ValueError(
                f"{path}:{line_number} is not a tiktoken rank line ('base64token rank'): {line.strip()[:80]!r}"
            ) from None
        if piece in first_line:
            raise ValueError(f"{path}:{line_number}: token {piece!r} already has a rank (line {first_line[piece]})")
        first_line[piece] = line_number
    return ranks


def _text(path: str) -> str:
    """A UTF-8 text file's contents; a binary file (a wav, a .pt) is a ValueError naming it."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a text file (byte {e.start} is not UTF-8), so not a vocabulary") from None


# Files that spell every token in GPT-2's byte-to-unicode alphabet with its id: HF's vocab.json
# ({token: id}) and tokenizer.json (the same map under "model" / "vocab"), CTranslate2's
# vocabulary.json / vocabulary.txt (faster-whisper's folders: the tokens in id order).
VOCABULARY_FILES = ("vocab.json", "tokenizer.json", "vocabulary.json", "vocabulary.txt")


def _token_ids(path: str):
    """The {token: id} map of one of VOCABULARY_FILES (or what the file holds instead, for the caller to refuse)."""
    text = _text(path)
    if path.endswith(".txt"):
        lines = text.split("\n")  # one token per line (newlines were translated on reading)
        return {token: i for i, token in enumerate(lines[:-1] if text.endswith("\n") else lines)}
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    if os.path.basename(path) == "tokenizer.json" and isinstance(vocab, dict):
        model = vocab.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
    if os.path.basename(path) == "vocabulary.json" and isinstance(vocab, list):  # the tokens in id order
        return {token: i for i, token in enumerate(vocab) if isinstance(token, str)}
    return vocab


def _read_vocab_json(path: str) -> tuple[dict[bytes, int], dict[str, int]]:
    """Ranks from a vocabulary file (vocab.json, tokenizer.json, vocabulary.*), and the special tokens (<|...|>) it
    lists, by id."""
    vocab = _token_ids(path)
    if not isinstance(vocab, dict):
        raise ValueError(f"{path} should map token strings to ids, got a JSON {type(vocab).__name__}")
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for token, token_id in vocab.items():
        if isinstance(token_id, bool) or not isinstance(token_id, int):
            raise ValueError(f"{path}: token {token[:40]!r} has the id {token_id!r}, not an integer")
        if token.startswith("<|") and token.endswith("|>"):
            specials[token] = token_id  # placed by the Whisper layout; checked against it later
            continue
        try:
            ranks[bytes(byte_of[char] for char in token)] = token_id
        except KeyError:
            raise ValueError(
                f"{path}: token {token[:40]!r} uses characters outside GPT-2's byte-to-unicode alphabet"
            ) from None
    return ranks, specials


def _check_ranks(ranks: dict[bytes, int], path: str) -> None:
    """Ranks must number the tokens 0..n-1, each once, and every single byte must be a token."""
    owner: dict[int, bytes] = {}
    for piece, rank in ranks.items():
        if rank in owner:
            raise ValueError(f"{path}: rank {rank} is given to two tokens, {owner[rank]!r} and {piece!r}")
        owner[rank] = piece
    outside = [r for r in owner if not 0 <= r < len(ranks)]
    if outside:
        gap = min(set(range(len(ranks))) - set(owner))
        raise ValueError(
            f"{path}: {len(ranks)} tokens must have the ranks 0..{len(ranks) - 1}, but rank {gap} is missing "
            f"and {min(outside, key=abs)} is given"
        )
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} single bytes have no token (e.g. {missing[:5]}); "
            "a byte-level BPE vocabulary needs all 256"
        )


def _find_vocabulary(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer file or directory not found: {path}")
    if os.path.isdir(path):
        path = _vocabulary_in(path)
    if not os.path.isfile(path):  # a named pipe or a device would block or never end
        raise ValueError(f"{path} is not a regular file (a named pipe, socket or device); give a tokenizer file")
    return path


def _vocabulary_in(folder: str) -> str:
    for name in VOCABULARY_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    candidates = sorted(name for name in os.listdir(folder) if name.endswith(".tiktoken"))
    if len(candidates) == 1:
        return os.path.join(folder, candidates[0])
    found = f"several .tiktoken files ({', '.join(candidates)})" if candidates else "neither"
    raise FileNotFoundError(
        f"{folder} should contain one of {', '.join(VOCABULARY_FILES)} or exactly one *.tiktoken file, found "
        f"{found}; pass the file itself"
    )


def load_tokenizer(
    path: str | os.PathLike,
    n_vocab: int = 51865,
    *,
    multilingual: bool | None = None,
    language: str | None = None,
    task: str | None = None,
) -> Tokenizer:
    """Build Whisper's tokenizer from a vocabulary file and the model's vocabulary size.

    path: a tiktoken rank file (openai-whisper's gpt2.tiktoken / multilingual.tiktoken), a vocabulary
        file (HF vocab.json or tokenizer.json, CTranslate2 vocabulary.json or vocabulary.txt), or a
        directory holding one of those (in that order) or exactly one *.tiktoken file.
    n_vocab: the model's output size (dims.n_vocab): 51864 for English-only models, 51865 for
        multilingual ones, 51866 for large-v3; it fixes where the special tokens sit.
    multilingual: whether prompts carry language and task tokens; by default n_vocab >= 51865.
    language, task: for multilingual tokenizers, default "en" and "transcribe".
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"load_tokenizer takes a path to a vocabulary, got {type(path).__name__}")
    if isinstance(n_vocab, bool) or not isinstance(n_vocab, int):
        raise TypeError(f"n_vocab must be an integer (the model's dims.n_vocab), got {n_vocab!r}")
    file = _find_vocabulary(os.fspath(path))
    if file.endswith(".json") or os.path.basename(file) in VOCABULARY_FILES:
        ranks, listed_specials = _read_vocab_json(file)
    else:
        ranks, listed_specials = _read_tiktoken_ranks(file), {}
    _check_ranks(ranks, file)
    tokenizer = Tokenizer(
        ranks,
        n_vocab,
        multilingual=multilingual,
        language=language,
        task=task,
        name=os.path.basename(file),
    )
    # vocab.json files often list <|endoftext|> and friends; they must agree with the layout.
    layout = {text: tokenizer.eot + i for i, text in enumerate(_special_token_names(tokenizer.num_languages))}
    for text, token_id in listed_specials.items():
        if text in layout and layout[text] != token_id:
            raise ValueError(
                f"{file} gives {text} the id {token_id}, but Whisper's layout for n_vocab={n_vocab} "
                f"puts it at {layout[text]}; is n_vocab right?"
            )
    return tokenizer
