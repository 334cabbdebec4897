"""The tokenizer against openai-whisper's: identical ids, special tokens, prompts and word splits."""

from __future__ import annotations

import base64
import json
import os
import string

import pytest
import torch
import whisper
import whisper.tokenizer as openai_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from whisper_lens.tokenizer import LANGUAGES, Tokenizer, bytes_to_unicode, load_tokenizer

ASSETS = os.path.join(os.path.dirname(whisper.__file__), "assets")
GPT2 = os.path.join(ASSETS, "gpt2.tiktoken")
MULTILINGUAL = os.path.join(ASSETS, "multilingual.tiktoken")

# (our n_vocab, rank file, openai multilingual flag, openai num_languages)
VOCABS = {
    "english-51864": (51864, GPT2, False, 99),
    "multilingual-51865": (51865, MULTILINGUAL, True, 99),
    "v3-51866": (51866, MULTILINGUAL, True, 100),
}

TEXTS = [
    "Hello world",
    " Hello world",
    "Hello world ",
    "  leading and trailing spaces  ",
    "I'm sure they'll say it's fine, isn't it?",
    "Привет, мир! Как дела?",
    "你好，世界。今天天气很好。",
    "こんにちは世界、カタカナとひらがな。",
    "안녕하세요 세계",
    "مرحبا بالعالم",
    "שלום עולם",
    "Ελληνικά κείμενα",
    "ไม่มีช่องว่างระหว่างคำ",
    "emoji 🎉👍🏽 👨‍👩‍👧 🇫🇷 ♪♪ ♫",
    "Numbers: 3.14159, 1,000,000 and 42nd; 2024-06-01 12:30",
    "Punctuation!?... — «quotes» \"double\" 'single' (parens) [brackets] {braces} <angle>",
    "tabs\tand\nnewlines\r\n and    runs of   spaces",
    "Ünïcödé àccents çà et là, Straße, ﬁ ligature",
    "<|endoftext|> written as plain text",
    "",
    " ",
]


@pytest.fixture(scope="module")
def tokenizers():
    """Ours and openai-whisper's, one per vocabulary, built once for the module."""
    pairs = {}
    for key, (n_vocab, path, multilingual, num_languages) in VOCABS.items():
        ours = load_tokenizer(path, n_vocab)
        theirs = openai_tokenizer.get_tokenizer(multilingual, num_languages=num_languages)
        pairs[key] = (ours, theirs)
    return pairs


@pytest.fixture(scope="module")
def ranks():
    def read(path):
        with open(path) as file:
            return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in file if line)}

    return {"gpt2": read(GPT2), "multilingual": read(MULTILINGUAL)}


def test_language_table_equals_openai():
    assert list(LANGUAGES.items()) == list(openai_tokenizer.LANGUAGES.items())
    assert len(LANGUAGES) == 100 and list(LANGUAGES)[-1] == "yue"


@pytest.mark.parametrize("key", list(VOCABS))
def test_encode_ids_identical(tokenizers, key):
    ours, theirs = tokenizers[key]
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encoding.encode_ordinary(text), text
        if "<|" not in text:
            assert ids == theirs.encode(text), text
        assert ours.decode(ids) == text
        assert ours.decode(ids) == theirs.decode(ids)


@pytest.mark.parametrize("key", list(VOCABS))
def test_special_tokens_identical(tokenizers, key):
    ours, theirs = tokenizers[key]
    n_vocab = VOCABS[key][0]
    names = ["eot", "sot", "translate", "transcribe", "sot_lm", "sot_prev", "no_speech", "no_timestamps"]
    names.append("timestamp_begin")
    for name in names:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.n_vocab == n_vocab == theirs.encoding.n_vocab
    assert ours.timestamp_begin + 1501 == n_vocab
    assert ours.num_languages == VOCABS[key][3]
    assert ours.multilingual == VOCABS[key][2]
    # openai-whisper lists the language tokens in set order; ours are in id order.
    assert ours.all_language_tokens == tuple(sorted(theirs.all_language_tokens))
    assert set(ours.all_language_codes) == set(theirs.all_language_codes)
    assert ours.all_language_codes == tuple(LANGUAGES)[: ours.num_languages]
    for code, token in zip(ours.all_language_codes, ours.all_language_tokens, strict=True):
        assert token == theirs.to_language_token(code)
        assert ours.language_token(code) == token
        assert ours.language_code(token) == code


@pytest.mark.parametrize("key", list(VOCABS))
def test_non_speech_tokens_identical(tokenizers, key):
    ours, theirs = tokenizers[key]
    assert ours.non_speech_tokens == theirs.non_speech_tokens
    assert len(ours.non_speech_tokens) > 50


@pytest.mark.parametrize("key", ["multilingual-51865", "v3-51866"])
@pytest.mark.parametrize(
    "language,task",
    [("en", "transcribe"), ("fr", "translate"), ("ja", "transcribe"), ("su", "translate"), ("de", None), (None, None)],
)
def test_sot_sequence_identical(key, language, task):
    n_vocab, path, multilingual, num_languages = VOCABS[key]
    theirs = openai_tokenizer.Tokenizer(
        encoding=openai_tokenizer.get_encoding("multilingual", num_languages),
        num_languages=num_languages,
        language=language,
        task=task,
    )
    ours = load_tokenizer(path, n_vocab, language=language, task=task)
    assert ours.sot_sequence_for(language, task) == theirs.sot_sequence
    assert ours.sot_sequence_for(language, task) == ours.sot_sequence_for(
        LANGUAGES[language] if language else None, task
    )
    if language is not None and task is not None:
        assert ours.sot_sequence == theirs.sot_sequence
        assert ours.sot_sequence_including_notimestamps == theirs.sot_sequence_including_notimestamps
        assert (ours.language, ours.task) == (language, task)


def test_defaults_follow_openai(tokenizers):
    multilingual, theirs = tokenizers["multilingual-51865"]
    # openai-whisper: a multilingual tokenizer defaults to English transcription
    assert (multilingual.language, multilingual.task) == ("en", "transcribe")
    assert multilingual.sot_sequence == theirs.sot_sequence == (50258, 50259, 50359)
    english, theirs = tokenizers["english-51864"]
    assert english.sot_sequence == theirs.sot_sequence == (english.sot,)
    assert english.sot_sequence_for(None, "transcribe") == (english.sot,)
    assert english.sot_sequence_including_notimestamps == (english.sot, english.no_timestamps)
    assert (english.language, english.task) == (None, None)


def test_cantonese_only_in_v3(tokenizers):
    v3, _ = tokenizers["v3-51866"]
    assert v3.language_token("yue") == v3.language_token("cantonese") == v3.all_language_tokens[-1]
    with pytest.raises(ValueError, match="yue"):
        tokenizers["multilingual-51865"][0].language_token("yue")


def test_language_errors(tokenizers):
    ours, _ = tokenizers["multilingual-51865"]
    with pytest.raises(ValueError, match="did you mean"):
        ours.language_token("frenc")
    with pytest.raises(ValueError, match="not a language token"):
        ours.language_code(ours.eot)
    with pytest.raises(ValueError, match="task"):
        ours.sot_sequence_for("en", "summarize")
    with pytest.raises(ValueError, match="English-only"):
        load_tokenizer(GPT2, 51864, language="fr")
    with pytest.raises(ValueError, match="English-only"):
        tokenizers["english-51864"][0].sot_sequence_for(None, "translate")
    assert load_tokenizer(GPT2, 51864, language="en").sot_sequence == (50257,)
    assert ours.language_token("Mandarin") == ours.language_token("zh")


@pytest.mark.parametrize("key", list(VOCABS))
def test_timestamps_decode_like_openai(tokenizers, key):
    ours, theirs = tokenizers[key]
    text_ids = ours.encode(" Hello there. How are you?")
    ids = [ours.sot, ours.timestamp_begin, *text_ids, ours.timestamp_begin + 62, ours.timestamp_begin + 1500, ours.eot]
    assert ours.decode(ids) == theirs.decode(ids)
    assert "<|0.00|>" not in ours.decode(ids)
    assert ours.decode_with_timestamps(ids) == theirs.decode_with_timestamps(ids)
    assert "<|1.24|>" in ours.decode_with_timestamps(ids) and "<|30.00|>" in ours.decode_with_timestamps(ids)


@pytest.mark.parametrize(
    "key,language,text",
    [
        ("multilingual-51865", "en", " Hello, world! It's a nice-looking day, isn't it? 3.5 km."),
        ("english-51864", None, " The cat (meowing) sat on the mat."),
        ("multilingual-51865", "zh", "你好，世界。今天天气很好🎉。"),
        ("v3-51866", "ja", "こんにちは、世界！"),
        ("v3-51866", "th", "สวัสดีครับ ชาวโลก"),
        ("multilingual-51865", "ru", " Привет, мир! Как дела?"),
    ],
)
def test_split_to_word_tokens_identical(key, language, text):
    n_vocab, path, multilingual, num_languages = VOCABS[key]
    ours = load_tokenizer(path, n_vocab, language=language)
    theirs = openai_tokenizer.get_tokenizer(multilingual, num_languages=num_languages, language=language)
    tokens = ours.encode(text)
    with_specials = [ours.timestamp_begin, *tokens, ours.timestamp_begin + 50, ours.eot]
    for ids in (tokens, with_specials):
        words, groups = ours.split_to_word_tokens(ids)
        assert (words, groups) == theirs.split_to_word_tokens(ids)
        assert [t for group in groups for t in group] == ids
        assert "".join(words) == ours.decode_with_timestamps(ids)


def test_decode_rejects_ids_outside_vocabulary(tokenizers):
    ours, _ = tokenizers["multilingual-51865"]
    with pytest.raises(ValueError, match="51865"):
        ours.decode([1, 2, 51865])
    with pytest.raises(ValueError, match="-1"):
        ours.decode([-1])
    with pytest.raises(ValueError, match="99999"):
        ours.decode_with_timestamps([99999])
    ids = ours.encode(" tensors work too")
    assert ours.decode(torch.tensor(ids)) == " tensors work too"
    assert ours.decode([]) == ""


def test_bytes_to_unicode_equals_gpt2_mapping():
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


def write_vocab_json(folder, ranks: dict[bytes, int], extra: dict[str, int]) -> None:
    """An HF-style vocab.json built from tiktoken ranks with GPT-2's byte-to-unicode spelling."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    spell = reference()
    vocab = {"".join(spell[b] for b in token): rank for token, rank in ranks.items()}
    assert len(vocab) == len(ranks)
    vocab.update(extra)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))


@pytest.mark.parametrize("key", list(VOCABS))
def test_vocab_json_directory_gives_same_ids(tmp_path, tokenizers, ranks, key):
    ours, theirs = tokenizers[key]
    n_vocab, path = VOCABS[key][:2]
    source = ranks["gpt2" if path == GPT2 else "multilingual"]
    write_vocab_json(tmp_path, source, {"<|endoftext|>": len(source), "<|startoftranscript|>": len(source) + 1})
    from_json = load_tokenizer(tmp_path, n_vocab)
    for text in TEXTS:
        assert from_json.encode(text) == theirs.encoding.encode_ordinary(text)
    assert from_json.sot_sequence == ours.sot_sequence
    assert from_json.non_speech_tokens == ours.non_speech_tokens
    assert from_json.timestamp_begin == ours.timestamp_begin


def test_vocab_json_special_ids_are_checked(tmp_path, ranks):
    source = ranks["multilingual"]
    write_vocab_json(tmp_path, source, {"<|endoftext|>": len(source) + 5})
    with pytest.raises(ValueError, match="n_vocab"):
        load_tokenizer(tmp_path, 51865)


def test_directory_with_one_tiktoken_file(tmp_path):
    (tmp_path / "vocab.tiktoken").write_bytes(open(GPT2, "rb").read())
    assert load_tokenizer(tmp_path, 51864).encode(" Hello") == [18435]
    (tmp_path / "other.tiktoken").write_text("")
    with pytest.raises(FileNotFoundError, match="several"):
        load_tokenizer(tmp_path, 51864)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.tiktoken")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="51865 or 51866"):
        load_tokenizer(MULTILINGUAL, 51870)
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("aGVsbG8= 0\nnot a rank line at all\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_tokenizer(bad, 1864)
    few = tmp_path / "few.tiktoken"
    few.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(200)))
    with pytest.raises(ValueError, match="256"):
        load_tokenizer(few, 200 + 1608)


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("bytes") / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return load_tokenizer(path, 256 + 1608)


def test_byte_only_vocabulary(byte_tokenizer):
    tok = byte_tokenizer
    assert (tok.n_vocab, tok.num_languages, tok.multilingual) == (1864, 99, False)
    assert (tok.eot, tok.sot) == (256, 257)
    assert tok.all_language_tokens[0] == 258 and tok.translate == 258 + 99
    assert tok.timestamp_begin == 1864 - 1501
    assert tok.sot_sequence == (257,)
    text = " Héllo, wörld! 你好 🎉"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.timestamp_begin + 3]) == text
    assert tok.decode_with_timestamps([tok.timestamp_begin + 3]) == "<|0.06|>"
    # the non-speech set is built from the same rules: single-byte symbols such as '"' and '#'
    assert {ord('"'), ord("#"), ord("(")} <= set(tok.non_speech_tokens)
    assert ord(" ") not in tok.non_speech_tokens  # else decoding could never emit a space
    assert ord(",") not in tok.non_speech_tokens and ord("?") not in tok.non_speech_tokens
    words, groups = tok.split_to_word_tokens(tok.encode(" Hi there, you"))
    assert words == [" Hi", " there", ",", " you"]


# ----- properties -----

unicode_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=unicode_text)
def test_random_unicode_round_trips(tokenizers, text):
    ours, theirs = tokenizers["v3-51866"]
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ids == theirs.encoding.encode_ordinary(text)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=string.printable + "éü你好🎉", max_size=40))
def test_random_text_round_trips_english(tokenizers, text):
    ours, theirs = tokenizers["english-51864"]
    ids = ours.encode(text)
    assert ours.decode(ids) == text
    assert ids == theirs.encoding.encode_ordinary(text)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_valid_ids_decode(tokenizers, data):
    key = data.draw(st.sampled_from(list(VOCABS)))
    ours, theirs = tokenizers[key]
    ids = data.draw(st.lists(st.integers(0, ours.n_vocab - 1), max_size=30))
    text = ours.decode(ids)
    assert isinstance(text, str)
    assert text == theirs.decode(ids)
    assert ours.decode_with_timestamps(ids) == theirs.decode_with_timestamps(ids)
