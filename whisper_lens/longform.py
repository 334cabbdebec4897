"""Long-form transcription: openai-whisper's sequential algorithm, run on many recordings at once.

How Whisper transcribes a long recording
----------------------------------------
The model reads one window of audio at a time (30 s for the official models: ``n_audio_ctx``
positions of 20 ms). openai-whisper's ``transcribe`` walks through a recording like this:

1. The log-mel of the whole file is computed once, floored 80 dB below the *file's* peak.
2. At ``seek`` (a mel frame, 10 ms each) it cuts a window, pads it to the model's length and
   decodes it with timestamps: ``<|0.00|> text <|2.40|><|2.40|> text <|5.12|> ...``. A pair of
   timestamps closes one segment and opens the next.
3. If the decoding looks wrong (too repetitive: compression ratio above 2.4; too unsure: mean
   log-probability below -1) it is decoded again at the next temperature (0.2, 0.4, ...,
   sampling instead of greedy), unless the window is silence: ``<|nospeech|>`` above 0.6 at the
   start of transcript *and* a low log-probability. Silence is skipped.
4. It cuts the text into segments at the timestamp pairs. If the window ended inside a sentence
   (no lone final timestamp), the unfinished part is dropped and the next window starts at the
   last complete timestamp; otherwise at the window's end.
5. The text so far (up to 223 tokens) is given as the next window's prompt after
   ``<|startofprev|>``, so names and style carry over, unless a window needed a temperature
   above 0.5 (its text is not trusted as a prompt).
6. With word timestamps, each window's words are timed from the cross-attention of the
   alignment heads (``alignment.py``), and the next window starts after the last word
   (unless the window's text runs to the end of the recording: see below).

How this module runs it
-----------------------
Every recording keeps its own state (``Stream``: seek, tokens so far, ...). Each round takes
the next window of every recording still running (at most ``batch_size`` at once; a finished
one makes room for the next), encodes them as one batch, and decodes them together
(``decode_windows``), so many recordings cost little more than one. A recording's result
does not depend on what it is batched with: it equals transcribing it alone, token for token.

The mel of a window is computed from its own samples (``audio.mel_frames``) after one pass for
the file's peak (``audio.mel_peak``): the numbers of openai-whisper's whole-file mel, with
memory bounded by the batch, not the length of the audio. The audio is encoded once per
window, whatever the number of fallback temperatures, and the word-timing pass reuses the
encoder's output, so only the decoder runs again.

One deliberate difference: a window whose spectrogram is flat (nothing in it within 80 dB of
the recording's peak: digital silence) holds no information at all and is skipped as silence
without decoding, where openai-whisper decodes it and may write "you" (``skip_silence=False``
restores its behaviour). And with word timestamps, a window whose kept text runs to the end of
the recording (or of a ``clip_timestamps`` stretch) ends it: openai-whisper starts one more
window after the last word and reads the audio already transcribed a second time (the tail of
the last word: "... three stones" + "es").
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .alignment import (
    APPEND_PUNCTUATIONS,
    PREPEND_PUNCTUATIONS,
    Alignment,
    ReadsLikeADict,
    Word,
    align,
    align_recorded,
    clip_long_words,
    merge_punctuations,
    recorded_names,
    split_into_segments,
)
from .audio import HOP_LENGTH, SAMPLE_RATE, TIME_PRECISION, load_audio, mel_frames, mel_peak, pad_or_trim
from .audio import _regular_file as regular_file
from .decoding import DecodingResult, rank_score
from .options import check_together, checked, decoding_options, docs, signature
from .tokenizer import normalize_language
from .trace import Edits, Trace, TraceRequest, check_trace_budget, select_names

if TYPE_CHECKING:
    from .model import Whisper

FRAMES_PER_POSITION = 2  # mel frames per encoder position (the second convolution has stride 2)
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
AudioLike = str | os.PathLike | np.ndarray | Tensor


@dataclass
class Segment(ReadsLikeADict):
    """A stretch of transcript between two timestamps, as openai-whisper's segment dicts (read as one, too)."""

    KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob", "compression_ratio",
            "no_speech_prob", "words")  # fmt: skip

    id: int
    seek: int  # the mel frame (10 ms) where the window it came from starts
    start: float  # seconds from the recording's start
    end: float
    text: str  # with its leading space, as decoded
    tokens: list[int]  # its tokens, timestamps included
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] = field(default_factory=list)

    def to_dict(self, words: bool = True) -> dict:
        """openai-whisper's segment dict: its keys and types; "words" with word timestamps, or when emptied."""
        out = {"id": self.id, "seek": int(self.seek), "start": float(self.start), "end": float(self.end),
               "text": self.text, "tokens": [int(t) for t in self.tokens], "temperature": float(self.temperature),
               "avg_logprob": float(self.avg_logprob), "compression_ratio": float(self.compression_ratio),
               "no_speech_prob": float(self.no_speech_prob)}  # fmt: skip
        if words or not self.tokens:  # openai-whisper gives an emptied segment "words": [] in any case
            out["words"] = [w.to_dict() for w in self.words]
        return out


@dataclass
class Window:
    """One step of the walk through a recording: the window decoded at ``seek`` and what came of it.

    ``result``: the decoding that was kept (after any temperature fallback), None for a flat
    window skipped without decoding. ``no_speech``: nothing was kept from it. ``trace``: the
    activations asked for with ``trace=`` (encoder and decoder names; the decoder's over the
    kept decoding's tokens, prompt included).
    """

    seek: int
    frames: int  # mel frames holding audio; the rest of the window is padding
    result: DecodingResult | None
    no_speech: bool
    trace: Trace | None = None

    @property
    def start(self) -> float:
        return self.seek * HOP_LENGTH / SAMPLE_RATE

    @property
    def end(self) -> float:
        return (self.seek + self.frames) * HOP_LENGTH / SAMPLE_RATE


@dataclass
class Transcript(ReadsLikeADict):
    """The transcription of one recording: text, language, segments (with words) and the windows decoded.

    It reads as openai-whisper's result dict (``t["text"]``, ``t["segments"][0]["words"][0]["start"]``),
    and ``to_dict()`` is that dict exactly: the same keys and types (``json.dumps`` writes its file).
    """

    KEYS = ("text", "segments", "language")

    text: str
    language: str | None
    segments: list[Segment]
    windows: list[Window]
    word_timestamps: bool = False  # the segments were given words (their dicts have "words")

    def to_dict(self) -> dict:
        return {"text": self.text, "segments": [s.to_dict(self.word_timestamps) for s in self.segments],
                "language": self.language}  # fmt: skip


@dataclass(frozen=True)
class Options:
    """Every option of one ``transcribe`` call, checked once (``options.TRANSCRIBE`` defines them)."""

    language: str | None
    task: str
    temperatures: tuple[float, ...]
    compression_ratio_threshold: float | None
    logprob_threshold: float | None
    no_speech_threshold: float | None
    condition_on_previous_text: bool
    initial_prompt: str | None
    carry_initial_prompt: bool
    clip_timestamps: tuple[float, ...]
    hallucination_silence_threshold: float | None
    timestamps: bool
    word_timestamps: bool
    word_timing: str  # "pass" (a decoder-only pass, openai-whisper's numbers) or "decoding" (recorded patterns)
    heads: tuple[tuple[int, int], ...]
    prepend_punctuations: str
    append_punctuations: str
    beam_size: int | None
    best_of: int | None
    patience: float | None
    length_penalty: float | None
    sample_len: int | None
    prefix: str | None
    suppress_tokens: str | Sequence[int] | None
    suppress_blank: bool
    max_initial_timestamp: float | None
    skip_silence: bool
    seed: int | None  # None: unseeded
    verbose: bool | None
    encoder_edits: Edits | None  # applied where the windows are encoded
    decoder_edits: Edits | None  # applied at every decoding step and in the word-timing pass
    encoder_trace: tuple[str, ...]  # encoder names asked for, recorded once per window
    decoder_trace: tuple[str, ...]  # decoder names asked for, recorded while decoding
    recorded: tuple[str, ...]  # every decoder name recorded while decoding (those asked for, and word timing's)
    speculative: bool = False  # greedy passes: a bf16 draft's guesses checked by the fp32 model (generate's option)


@dataclass
class Stream:
    """One recording on its way through its windows: openai-whisper's loop variables, one set per recording."""

    audio: Tensor  # (N,) float32 samples at 16 kHz
    peak: float  # the whole file's loudest log10 mel value
    n_frames: int  # mel frames of audio (N // HOP_LENGTH)
    language: str | None
    prompt_tokens: list[int]  # the initial prompt's tokens
    tokens: list[int]  # every token kept so far, the initial prompt first (the source of the prompts)
    clips: list[tuple[int, int]]  # the stretches to transcribe, (start, end) in mel frames (clip_timestamps)
    clip: int = 0  # the stretch ``seek`` is in
    prompt_from: int = 0  # tokens before this index are no longer given as prompt
    seek: int = 0
    last_speech: float = 0.0  # where speech last ended (s), for trimming words after a pause
    segments: list[Segment] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.clip >= len(self.clips)

    def settle(self) -> None:
        """Move ``seek`` into the current stretch, or on to the next one once it has passed the end of this one."""
        while not self.done:
            start, end = self.clips[self.clip]
            self.seek = max(self.seek, start)
            if self.seek < end:
                return
            self.clip += 1

    def window_frames(self, window: int) -> int:
        """Mel frames of audio in the window at ``seek``: to the window's, the stretch's or the audio's end."""
        return min(window, self.n_frames - self.seek, self.clips[self.clip][1] - self.seek)


# ----------------------------------------------------------------------------- the public call


def transcribe(model: Whisper, audio: AudioLike | Sequence[AudioLike], **options) -> Transcript | list[Transcript]:
    """Transcribe recordings of any length with openai-whisper's algorithm (see the module's docstring).

    ``wl.transcribe(model, audio, **options)`` is openai-whisper's ``whisper.transcribe`` call: the
    same options (its ``DecodingOptions`` included) with the same defaults, and a result that reads
    as its dict (``to_dict()`` returns that dict). ``model.transcribe(audio, **options)`` is the same.

    audio: a path, 16 kHz float samples (numpy or torch), or a list of them: a list gives a
        list of ``Transcript``, its recordings decoded together, ``batch_size`` at a time. A
        recording's result does not depend on what it is batched with.

    Options (``whisper_lens.options.TRANSCRIBE``, where each is defined once):
    """
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer; load it with load_model(..., tokenizer=...)")
    o = checked(options)
    own = {"without_timestamps": False, "condition_on_previous_text": True} | {  # a model's own (the toy's config)
        ("without_timestamps" if k == "timestamps" else k): (not v if k == "timestamps" else v)
        for k, v in model.transcribe_defaults.items() if k in ("timestamps", "condition_on_previous_text")
    }  # fmt: skip
    for name in own:  # None: the model's default
        o[name] = own[name] if o[name] is None else o[name]
    decoding_options(o)  # generate's own checks of the options passed through to it
    check_together(o)
    check_decoding(model, o["beam_size"], o["best_of"])
    if o["fp16"] and model.device.type == "cpu":
        warnings.warn("FP16 is not supported on CPU; using FP32 instead", stacklevel=2)  # openai-whisper's words
    language = check_language(model, o["language"], o["task"])
    words = o["word_timestamps"]
    heads = check_heads(model, o["alignment_heads"]) if words else ()
    encoder_trace, decoder_trace = check_trace_and_edits(model, o["trace"], o["edits"])
    timing = recorded_names(heads) if words and o["word_timing"] == "decoding" else ()
    same = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold", "condition_on_previous_text",
            "initial_prompt", "carry_initial_prompt", "clip_timestamps", "hallucination_silence_threshold",
            "word_timestamps", "word_timing", "prepend_punctuations", "append_punctuations", "beam_size", "best_of",
            "patience", "length_penalty", "sample_len", "prefix", "suppress_tokens", "suppress_blank",
            "max_initial_timestamp", "skip_silence", "seed", "verbose", "task", "speculative")  # fmt: skip
    opts = Options(
        language=language, temperatures=o["temperature"], timestamps=not o["without_timestamps"], heads=heads,
        encoder_edits=stack_edits(o["edits"], "encoder"), decoder_edits=stack_edits(o["edits"], "decoder"),
        encoder_trace=encoder_trace, decoder_trace=decoder_trace, recorded=tuple(dict.fromkeys(decoder_trace + timing)),
        **{name: o[name] for name in same},
    )  # fmt: skip
    single = not isinstance(audio, list | tuple)
    items = [audio] if single else list(audio)
    for item in items:
        check_audio_input(item)
    transcripts = run_streams(model, items, opts, o["batch_size"], o["progress"] or o["verbose"] is False)
    return transcripts[0] if single else transcripts


transcribe.__signature__ = signature(list(inspect.signature(transcribe).parameters.values())[:2])
transcribe.__doc__ += docs()


def run_streams(model: Whisper, items: list, opts: Options, batch_size: int, progress: bool) -> list[Transcript]:
    """Walk every recording through its windows, ``batch_size`` recordings at a time.

    A recording joins the batch when a place is free: it is read, its peak found and (for a
    multilingual model given no language) its language detected; it leaves when its ``seek``
    passes its end.
    """
    from tqdm import tqdm

    waiting, active, done = deque(range(len(items))), [], {}
    with torch.no_grad(), tqdm(total=0, unit="audio s", disable=not progress, delay=0.5) as bar:
        while waiting or active:
            joining = []
            while waiting and len(active) + len(joining) < batch_size:
                i = waiting.popleft()
                joining.append((i, open_stream(items[i], model, opts)))
            detect_languages(model, [s for _, s in joining], opts)
            bar.total += sum(s.n_frames for _, s in joining) / FRAMES_PER_SECOND
            active += joining
            running = [s for _, s in active if not s.done]
            before = [s.seek for s in running]
            if running:
                advance(model, running, opts)
            bar.update(sum(min(s.seek, s.n_frames) - seek for s, seek in zip(running, before, strict=True))
                       / FRAMES_PER_SECOND)  # fmt: skip
            if opts.encoder_trace or opts.decoder_trace:  # the traces are kept: refuse before they outgrow memory
                budget([s for _, s in active], list(done.values()), 2 * model.dims.n_audio_ctx)
            for i, s in active:
                if s.done:
                    done[i] = finish(model, s, opts)
            active = [(i, s) for i, s in active if not s.done]
    return [done[i] for i in range(len(items))]


def budget(active: list[Stream], done: list[Transcript], frames: int) -> None:
    """Check the traces kept so far, and those the active recordings' remaining windows will add, against the limit."""
    windows = [w for s in active for w in s.windows if w.trace is not None]
    windows += [w for t in done for w in t.windows if w.trace is not None]
    if windows:
        kept = sum(w.trace.nbytes for w in windows)
        left = sum(-(-max(0, s.n_frames - s.seek) // frames) for s in active)  # ceil: at least this many windows
        check_trace_budget(kept, kept / len(windows), left)


def finish(model: Whisper, s: Stream, opts: Options) -> Transcript:
    """A finished recording's transcript: its text is every kept token after the initial prompt, decoded."""
    text = model.tokenizer.decode(s.tokens[len(s.prompt_tokens) :])
    return Transcript(text, s.language, s.segments, s.windows, opts.word_timestamps)


# ----------------------------------------------------------------------------- options and inputs


def check_language(model: Whisper, language: str | None, task: str) -> str | None:
    """The language as a code (or None: detect it), checked with the task against the model's vocabulary."""
    tok = model.tokenizer
    if tok.multilingual:
        language = None if language is None else normalize_language(language)
        tok.sot_sequence_for(language, task)
    else:
        tok.sot_sequence_for(language, task if task != "transcribe" else None)  # English only: refuses the rest
    return language


def check_decoding(model: Whisper, beam_size: int | None, best_of: int | None = None) -> None:
    """What ``generate`` would only check after the first window was encoded: the beam against the vocabulary,
    and the samples drawn together (as many decoder rows as a beam of that width) likewise."""
    for name, value in (("beam_size", beam_size), ("best_of", best_of)):
        if value is not None and value >= model.dims.n_vocab:
            raise ValueError(f"{name}={value!r}: it must be None or an int from 1 to {model.dims.n_vocab - 1} "
                             "(below the vocabulary size)")  # fmt: skip


def check_trace_and_edits(model: Whisper, trace: TraceRequest, edits: Edits | None) -> tuple[tuple[str, ...], ...]:
    """The encoder names and the decoder names ``trace`` asks for, once ``trace`` and ``edits`` are checked."""
    model.recorder(trace, edits)  # checks the trace patterns and the edits against the model's names
    for name, ops in (edits.ops if edits else {}).items():
        if name.startswith("encoder.") and any(op.kind == "mean" and op.mean is None for op in ops):
            raise ValueError(f"mean-ablation at {name!r} in transcribe needs mean= (a batch's mean would mix "
                             "recordings)")  # fmt: skip
    names = select_names(trace, model.names())
    asked = [n for n in model.names() if n in names]
    encoder = tuple(n for n in asked if n.startswith("encoder."))
    return encoder, tuple(n for n in asked if n not in encoder)


def check_heads(model: Whisper, heads: Sequence[tuple[int, int]] | None) -> tuple[tuple[int, int], ...]:
    """The alignment heads to time words with: given, else the model's; each (layer, head) in range."""
    if heads is None:
        heads = model.alignment_heads
    if heads is None:
        raise ValueError("word timestamps need alignment heads and this model has none: pass alignment_heads= "
                         "(e.g. find_alignment_heads(model, clips).heads)")  # fmt: skip
    d = model.dims
    if isinstance(heads, str) or not isinstance(heads, Sequence | np.ndarray | Tensor):
        raise TypeError(f"alignment_heads={heads!r}: give a list of (layer, head) pairs of ints, such as [(2, 0)]")
    pairs = []
    for pair in heads:
        if isinstance(pair, str) or not isinstance(pair, Sequence | np.ndarray | Tensor) or len(pair) != 2:
            raise ValueError(f"alignment_heads: {pair!r} is not a (layer, head) pair; give pairs of ints, such as "
                             "[(2, 0)]")  # fmt: skip
        values = [x.item() if isinstance(x, np.generic | Tensor) else x for x in pair]
        if any(isinstance(x, bool) or not isinstance(x, int) for x in values):  # 0.9 was truncated to 0
            raise ValueError(f"alignment_heads: {tuple(values)} must be whole numbers (layer, head), such as (2, 0)")
        layer, head = values
        if not (0 <= layer < d.n_text_layer and 0 <= head < d.n_text_head):
            raise ValueError(f"alignment_heads: {tuple(values)} is outside this model's decoder "
                             f"({d.n_text_layer} layers of {d.n_text_head} heads: layer 0 to {d.n_text_layer - 1}, "
                             f"head 0 to {d.n_text_head - 1})")  # fmt: skip
        pairs.append((layer, head))
    if not pairs:
        raise ValueError("alignment_heads is empty: word timestamps need at least one (layer, head)")
    return tuple(pairs)


def stack_edits(edits: Edits | None, stack: str) -> Edits | None:
    """The part of ``edits`` that acts in one stack ("encoder", or "decoder" with the logits)."""
    if not edits:
        return None
    mine = ("encoder.",) if stack == "encoder" else ("decoder.", "logits")
    part = Edits(
        ops={n: ops for n, ops in edits.ops.items() if n.startswith(mine)},
        skipped={b for b in edits.skipped if b.startswith(mine)},
        window=edits.window if stack == "encoder" else None,
        window_layers=edits.window_layers if stack == "encoder" else None,
        window_heads=edits.window_heads if stack == "encoder" else None,
    )
    return part if part else None


def check_audio_input(item) -> None:
    """Fail before any work on an input that cannot be audio (files are read when their turn comes)."""
    if isinstance(item, str | os.PathLike):
        regular_file(item)  # exists, is a regular file (a named pipe would block for ever), is readable
        return
    if not isinstance(item, np.ndarray | Tensor):
        raise TypeError(f"audio must be a path or 16 kHz samples (numpy or torch), got {type(item).__name__}")
    if item.ndim != 1:
        raise ValueError(f"audio samples must be one channel [N], got shape {tuple(item.shape)}; average the "
                         "channels first")  # fmt: skip
    array = torch.as_tensor(item) if isinstance(item, np.ndarray) else item
    if not array.dtype.is_floating_point:
        raise TypeError(f"audio samples must be float in [-1, 1], got {array.dtype}")
    if not torch.isfinite(array).all():
        raise ValueError("audio contains NaN or infinite samples")


def open_stream(item: AudioLike, model: Whisper, opts: Options) -> Stream:
    """Read a recording and find its peak: the state before its first window."""
    audio = load_audio(item) if isinstance(item, str | os.PathLike) else item
    audio = torch.as_tensor(audio).float()  # (N,)
    prompt = model.tokenizer.encode(" " + opts.initial_prompt.strip()) if opts.initial_prompt is not None else []
    n_frames = len(audio) // HOP_LENGTH
    s = Stream(
        audio=audio, peak=mel_peak(audio, model.dims.n_mels), n_frames=n_frames,
        language=opts.language if model.tokenizer.multilingual else "en", prompt_tokens=prompt, tokens=list(prompt),
        clips=stretches(opts.clip_timestamps, n_frames),
    )  # fmt: skip
    s.settle()
    return s


def stretches(clip_timestamps: tuple[float, ...], n_frames: int) -> list[tuple[int, int]]:
    """``clip_timestamps`` (start, end, start, ... s) as (start, end) mel frames; a lone last start runs to the end.

    Stretches are cut at the end of the audio (openai-whisper would decode an empty window at
    a start past the end for ever).
    """
    points = [round(t * FRAMES_PER_SECOND) for t in clip_timestamps] or [0]
    if len(points) % 2:
        points.append(n_frames)
    pairs = [(a, min(b, n_frames)) for a, b in zip(points[::2], points[1::2], strict=True)]
    return [(a, b) for a, b in pairs if a < b]


def detect_languages(model: Whisper, streams: list[Stream], opts: Options) -> None:
    """Each recording's language from its first window (multilingual models given no language)."""
    todo = [s for s in streams if s.language is None and s.n_frames > 0]
    if not todo:
        return
    frames = 2 * model.dims.n_audio_ctx
    mels = torch.stack([mel_frames(s.audio, 0, frames, model.dims.n_mels, s.peak) for s in todo])  # (B, n_mels, W)
    xa, _ = encode(model, mels, opts, traced=False)
    for s, r in zip(todo, model.generate(audio_features=xa, max_new_tokens=1, edits=opts.decoder_edits), strict=True):
        s.language = r.language


# ----------------------------------------------------------------------------- one round: a window of each


@dataclass
class Decoded:
    """A window whose decoding was kept: its segments, before words are timed and they join the transcript."""

    row: int  # its row in the round's batch of encoded windows
    stream: Stream
    seek: int  # where the window starts
    frames: int  # mel frames holding audio
    result: DecodingResult
    segments: list[Segment]
    lone_end: bool  # ended with a lone timestamp: the model saw speech end, the whole window is done
    read_to_end: bool = False  # its kept text runs to the end of the audio (or of the stretch): nothing is left
    dropped: bool = False  # its text looked hallucinated after a silence: nothing of it is kept


def advance(model: Whisper, streams: list[Stream], opts: Options) -> None:
    """Decode the next window of every stream and move each to where its next window starts."""
    W = 2 * model.dims.n_audio_ctx
    sizes = [s.window_frames(W) for s in streams]
    mels = [window_mel(model, s.audio, s.seek, n, s.peak) for s, n in zip(streams, sizes, strict=True)]
    flat = [opts.skip_silence and bool(m[:, :n].amax() == m[:, :n].amin()) for m, n in zip(mels, sizes, strict=True)]
    for s, n, f in zip(streams, sizes, flat, strict=True):
        if f:  # nothing above the floor: no sound to decode
            s.windows.append(Window(s.seek, n, None, no_speech=True))
            s.seek += n
            s.settle()
    live = [i for i, f in enumerate(flat) if not f]
    if not live:
        return
    streams, sizes = [streams[i] for i in live], [sizes[i] for i in live]
    xa, enc_trace = encode(model, torch.stack([mels[i] for i in live]), opts, traced=True)  # (B, S, D)
    results = decode_with_fallback(model, xa, streams, opts)
    kept = []
    for b, (s, n, r) in enumerate(zip(streams, sizes, results, strict=True)):
        window = Window(s.seek, n, r, no_speech=is_silence(r, opts), trace=window_trace(enc_trace, b, r, opts))
        s.windows.append(window)
        if window.no_speech:
            s.seek += n
            continue
        segments, advance_by, lone_end = cut_segments(r, s, n, model.tokenizer)
        read_to_end = s.seek + advance_by >= s.clips[s.clip][1]
        kept.append(Decoded(b, s, s.seek, n, r, segments, lone_end, read_to_end))
        s.seek += advance_by
    if opts.word_timestamps:
        time_words(model, xa, kept, opts)
    for d in kept:
        if not d.dropped:
            keep_segments(d.stream, d.segments, d.result, opts)
    for s in streams:
        s.settle()


def window_mel(model: Whisper, audio: Tensor, seek: int, frames: int, peak: float) -> Tensor:
    """The log-mel of the window at ``seek`` holding ``frames`` frames of audio, padded to the model's window.

    Whisper's own models get openai-whisper's padding: the frames past the audio are zeros (its
    ``transcribe`` pads the mel). A model trained on clips padded with *silence*, as the shipped toy
    (``"pad_with_silence": true`` in its config, ``model.transcribe_defaults``), gets the mel of
    silence there, as ``audio.load_windows`` (the lens, ``generate`` on a clip) gives it: so a clip
    of one window is read alike by ``transcribe`` and the lens. [n_mels, 2 * n_audio_ctx]
    """
    W, n_mels = 2 * model.dims.n_audio_ctx, model.dims.n_mels
    silence = bool(model.transcribe_defaults.get("pad_with_silence", False))
    return pad_or_trim(mel_frames(audio, seek, W if silence else frames, n_mels, peak), W)  # (n_mels, W)


def encode(model: Whisper, mels: Tensor, opts: Options, traced: bool) -> tuple[Tensor, Trace | None]:
    """The encoder's output for a batch of windows [B, n_mels, W] -> [B, S, D], with the encoder's edits (and trace)."""
    names = list(opts.encoder_trace) if traced else []
    rec = model.recorder(names or None, opts.encoder_edits)
    xa = model.encoder(mels.to(model.device, model.dtype), rec.child("encoder"))  # (B, S, D)
    return xa, (rec.trace if names else None)


def window_trace(enc_trace: Trace | None, b: int, result: DecodingResult, opts: Options) -> Trace | None:
    """One window's trace: row ``b`` of the batch's encoder names, then the kept decoding's decoder names."""
    if not (opts.encoder_trace or opts.decoder_trace):
        return None
    out = Trace()
    for name, x in (enc_trace or {}).items():
        out.put(name, x[b : b + 1])
    for name in opts.decoder_trace:  # what was asked for (not what word timing recorded for itself)
        if name in result.trace:
            out.put(name, result.trace[name])
    return out


# ----------------------------------------------------------------------------- decoding with fallback


def decode_with_fallback(model: Whisper, xa: Tensor, streams: list[Stream], opts: Options) -> list[DecodingResult]:
    """Decode each window, retrying those that fail the thresholds at the next temperature."""
    prompts = [prompt_of(s, opts, model.dims.n_text_ctx // 2 - 1) for s in streams]
    results: list[DecodingResult | None] = [None] * len(streams)
    todo = list(range(len(streams)))
    for k, t in enumerate(opts.temperatures):
        # a window's own seed, whatever its batch (torch takes seeds below 2**64); None: unseeded
        seeds = [None if opts.seed is None else (opts.seed + 7919 * streams[i].seek + k) % 2**64 for i in todo]
        found = decode_windows(model, xa[todo], [prompts[i] for i in todo], [streams[i].language for i in todo], t,
                               seeds, opts)  # fmt: skip
        for i, r in zip(todo, found, strict=True):
            results[i] = r
        todo = [i for i in todo if needs_fallback(results[i], opts)]
        if not todo:
            break
    return results  # type: ignore[return-value]


def prompt_of(s: Stream, opts: Options, limit: int) -> list[int]:
    """A window's prompt: the text kept since the last reset, at most ``limit`` tokens (half the context).

    With ``carry_initial_prompt``, the initial prompt comes first in every window, and the text
    kept since is cut from its start to leave it room.
    """
    if not opts.carry_initial_prompt:
        return s.tokens[s.prompt_from :][-limit:]
    initial = s.prompt_tokens
    since = s.tokens[max(len(initial), s.prompt_from) :]
    room = limit - len(initial)
    return (initial + (since[len(since) - room :] if room > 0 else []))[-limit:]


def decode_windows(model: Whisper, xa: Tensor, prompts: list[list[int]], languages: list[str | None],
                   temperature: float, seeds: list[int | None], opts: Options) -> list[DecodingResult]:  # fmt: skip
    """Decode a batch of encoded windows [B, S, D], each after its own prompt and in its own language.

    At temperature 0 (greedy, or beam search) the batch is one ``generate`` call with one prompt
    and one language per window; a window's tokens do not depend on the others in the call.
    Above 0 each window draws ``best_of`` samples in a call of its own, seeded with its own seed
    (``generate`` takes one seed per call), so its samples do not depend on the batch either, and
    keeps the likeliest.
    """
    common = dict(task=opts.task, timestamps=opts.timestamps, suppress_tokens=opts.suppress_tokens,
                  suppress_blank=opts.suppress_blank, prefix=opts.prefix, max_new_tokens=opts.sample_len,
                  max_initial_timestamp=opts.max_initial_timestamp, trace=list(opts.recorded) or None,
                  edits=opts.decoder_edits)  # fmt: skip
    if temperature == 0:
        return model.generate(audio_features=xa, prompt=list(prompts), language=list(languages),
                              beam_size=opts.beam_size, patience=opts.patience, length_penalty=opts.length_penalty,
                              speculative=opts.speculative, **common)  # fmt: skip
    n, out = opts.best_of or 1, []
    for i, (p, lang) in enumerate(zip(prompts, languages, strict=True)):
        found = model.generate(audio_features=xa[i : i + 1], clips=[0] * n, prompt=p, language=lang,
                               temperature=temperature, seed=seeds[i], **common)  # fmt: skip
        out.append(max(found, key=lambda r: rank_score(r.sum_logprob, len(r.tokens), opts.length_penalty)))
    return out


def needs_fallback(r: DecodingResult, opts: Options) -> bool:
    """Too repetitive or too unsure, and not silence: worth decoding again at a higher temperature."""
    ratio, logprob, no_speech = opts.compression_ratio_threshold, opts.logprob_threshold, opts.no_speech_threshold
    repetitive = ratio is not None and r.compression_ratio > ratio
    unsure = logprob is not None and r.avg_logprob < logprob
    silent = unsure and no_speech is not None and r.no_speech_prob > no_speech
    return (repetitive or unsure) and not silent


def is_silence(r: DecodingResult, opts: Options) -> bool:
    """openai-whisper's no-speech rule: <|nospeech|> likely, unless the text is confident anyway."""
    if opts.no_speech_threshold is None or r.no_speech_prob <= opts.no_speech_threshold:
        return False
    return opts.logprob_threshold is None or r.avg_logprob <= opts.logprob_threshold


# ----------------------------------------------------------------------------- from tokens to segments


def cut_segments(r: DecodingResult, s: Stream, frames: int, tok) -> tuple[list[Segment], int, bool]:
    """Cut a window's tokens into segments at timestamp pairs.

    Returns the segments, how many frames to move ``seek`` on, and whether the window ended
    with a lone timestamp (the model saw the end of speech: the whole window is done).
    """
    tokens, ts = r.tokens, tok.timestamp_begin
    offset = s.seek * HOP_LENGTH / SAMPLE_RATE
    is_ts = [t >= ts for t in tokens]
    lone_end = is_ts[-2:] == [False, True]
    pairs = [k + 1 for k in range(len(tokens) - 1) if is_ts[k] and is_ts[k + 1]]  # where a pair is split

    def segment(start: float, end: float, part: list[int]) -> Segment:
        text = tok.decode([t for t in part if t < tok.eot])
        return Segment(0, s.seek, start, end, text, part, r.temperature, r.avg_logprob, r.compression_ratio,
                       r.no_speech_prob)  # fmt: skip

    if not pairs:  # one segment: the whole window, or up to its last timestamp
        duration = frames * HOP_LENGTH / SAMPLE_RATE
        stamps = [t for t in tokens if t >= ts]
        if stamps and stamps[-1] != ts:
            duration = (stamps[-1] - ts) * TIME_PRECISION
        return [segment(offset, offset + duration, list(tokens))], frames, lone_end
    cuts = pairs + [len(tokens)] if lone_end else pairs
    segments, last = [], 0
    for cut in cuts:
        part = list(tokens[last:cut])
        segments.append(segment(offset + (part[0] - ts) * TIME_PRECISION, offset + (part[-1] - ts) * TIME_PRECISION,
                                part))  # fmt: skip
        last = cut
    advance_by = frames if lone_end else (tokens[last - 1] - ts) * FRAMES_PER_POSITION
    return segments, advance_by, lone_end


def time_words(model: Whisper, xa: Tensor, kept: list[Decoded], opts: Options) -> None:
    """Time the words of every kept window, then let the last word move ``seek`` (openai-whisper's rules).

    The last word moves ``seek`` only where the window leaves audio unread: not after a lone final
    timestamp (the model saw speech end), nor where the kept text runs to the end of the audio (or
    of the stretch), which would decode what was already transcribed a second time.
    """
    tok = model.tokenizer
    texts = [[t for seg in d.segments for t in seg.tokens if t < tok.eot] for d in kept]
    if opts.word_timing == "decoding":
        alignments = [align_recorded(model, d.result, text, d.frames, opts.heads) if text else None
                      for d, text in zip(kept, texts, strict=True)]  # fmt: skip
    else:
        alignments = align_kept(model, xa, kept, texts, opts)
    for d, a in zip(kept, alignments, strict=True):
        words = a.words if a is not None else []
        offset = d.seek * HOP_LENGTH / SAMPLE_RATE
        median = clip_long_words(words)
        merge_punctuations(words, opts.prepend_punctuations, opts.append_punctuations)
        split_into_segments(d.segments, words, tok.eot, offset, d.stream.last_speech, median)
        end = last_end(d.segments)
        if not (d.lone_end or d.read_to_end) and end is not None and end > offset:  # next: after the last word
            d.stream.seek = round(end * FRAMES_PER_SECOND)
        if opts.hallucination_silence_threshold is not None:
            skip_hallucinations(d, 2 * model.dims.n_audio_ctx, opts.hallucination_silence_threshold)
            if d.dropped:
                continue
        end = last_end(d.segments)
        if end is not None:
            d.stream.last_speech = end


PUNCTUATION = PREPEND_PUNCTUATIONS + APPEND_PUNCTUATIONS  # not counted when judging a segment's words


def word_anomaly(w: Word) -> float:
    """How unlike a real word: improbable (below 0.15), too short (under 0.133 s) or too long (over 2 s)."""
    duration = w.end - w.start
    return (w.probability < 0.15) + max(0.0, 0.133 - duration) * 15 + max(0.0, duration - 2.0)


def looks_hallucinated(segment: Segment | None) -> bool:
    """A segment whose first eight words (punctuation aside) score as anomalous as one point each, or 3 in all."""
    if segment is None or not segment.words:
        return False
    words = [w for w in segment.words if w.word not in PUNCTUATION][:8]
    score = sum(word_anomaly(w) for w in words)
    return score >= 3 or score + 0.01 >= len(words)


def skip_hallucinations(d: Decoded, window: int, threshold: float) -> None:
    """openai-whisper's ``hallucination_silence_threshold`` rules for one window, after its words are timed.

    1. Where the window did not end with a lone timestamp, the next one starts after the last word
       only if more than ``threshold`` seconds are left after it; else at this window's end.
    2. If the first segment with words looks hallucinated and starts more than ``threshold``
       after the window's start, the whole window is dropped and the next starts at that segment.
    3. A segment that looks hallucinated, with silence (or hallucinations) before and after it,
       is dropped with everything after it; the next window starts at it (or, within
       ``threshold`` of the recording's end, the recording is done).
    """
    s = d.stream
    offset = d.seek * HOP_LENGTH / SAMPLE_RATE
    window_end = (d.seek + window) * HOP_LENGTH / SAMPLE_RATE
    audio_end = d.seek * HOP_LENGTH / SAMPLE_RATE + d.frames * HOP_LENGTH / SAMPLE_RATE
    if not (d.lone_end or d.read_to_end):
        end = last_end(d.segments)
        if end is not None and end > offset:
            s.seek = round(end * FRAMES_PER_SECOND) if window_end - end > threshold else d.seek + d.frames
    first = next((seg for seg in d.segments if seg.words), None)
    if looks_hallucinated(first) and first.start - offset > threshold:
        s.seek = d.seek + round((first.start - offset) * FRAMES_PER_SECOND)
        d.dropped = True
        return
    previous_end = s.last_speech
    for k, seg in enumerate(d.segments):
        if not seg.words:
            continue
        if looks_hallucinated(seg):
            after = next((x for x in d.segments[k + 1 :] if x.words), None)
            next_start = after.words[0].start if after is not None else audio_end
            silence_before = seg.start - previous_end > threshold or seg.start < threshold or seg.start - offset < 2.0
            silence_after = next_start - seg.end > threshold or looks_hallucinated(after) or window_end - seg.end < 2.0
            if silence_before and silence_after:
                s.seek = round(max(offset + 1, seg.start) * FRAMES_PER_SECOND)
                if s.n_frames * HOP_LENGTH / SAMPLE_RATE - seg.end < threshold:
                    s.seek = s.n_frames
                del d.segments[k:]
                return
        previous_end = seg.end


def align_kept(model: Whisper, xa: Tensor, kept: list[Decoded], texts: list[list[int]], opts: Options) -> list:
    """The decoder-only pass of ``alignment.align`` for every window with text, one pass per start-of-transcript."""
    tok = model.tokenizer
    out = [None] * len(kept)
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, (d, text) in enumerate(zip(kept, texts, strict=True)):
        if text:
            language = d.stream.language
            sot = tok.sot_sequence_for(language, opts.task) if tok.multilingual else tok.sot_sequence
            groups.setdefault(tuple(sot), []).append(k)
    for sot, ks in groups.items():
        found = align(model, xa[[kept[k].row for k in ks]], [texts[k] for k in ks], [kept[k].frames for k in ks],
                      opts.heads, sot, opts.decoder_edits)  # fmt: skip
        for k, a in zip(ks, found, strict=True):
            out[k] = a
    return out


def clock(seconds: float) -> str:
    """MM:SS.mmm (HH:MM:SS.mmm from an hour on), as openai-whisper's verbose lines."""
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    return (f"{hours:02d}:" if hours else "") + f"{ms // 60_000:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def last_end(segments: list[Segment]) -> float | None:
    """Where the last word ends, else the last segment's end (None without segments)."""
    for seg in reversed(segments):
        if seg.words:
            return seg.words[-1].end
    return segments[-1].end if segments else None


def keep_segments(s: Stream, segments: list[Segment], r: DecodingResult, opts: Options) -> None:
    """Append a window's segments to the stream (empty or instantaneous ones emptied) and update the prompt."""
    if opts.verbose:
        for seg in segments:
            print(f"[{clock(seg.start)} --> {clock(seg.end)}] {seg.text}")
    for seg in segments:
        if seg.start == seg.end or seg.text.strip() == "":
            seg.text, seg.tokens, seg.words = "", [], []
        seg.id = len(s.segments)
        s.segments.append(seg)
        s.tokens.extend(seg.tokens)
    if not opts.condition_on_previous_text or r.temperature > 0.5:  # do not prompt with uncertain text
        s.prompt_from = len(s.tokens)


# ----------------------------------------------------------------------------- looking at one window again


@torch.no_grad()
def window_alignment(
    model: Whisper,
    audio: AudioLike,
    transcript: Transcript,
    index: int,
    alignment_heads: Sequence[tuple[int, int]] | None = None,
) -> tuple[Tensor, Alignment]:
    """The log-mel of window ``index`` of ``transcript`` (of ``audio``) and how its words were timed.

    Recomputes the window's mel [n_mels, 2 * n_audio_ctx] and the decoder-only alignment of the
    text kept from it (``alignment.align``), for a picture (``plot.word_alignment``) or a closer look.
    """
    check_audio_input(audio)
    if not 0 <= index < len(transcript.windows):
        raise IndexError(f"window {index} out of range: the transcript has {len(transcript.windows)} windows")
    window, tok = transcript.windows[index], model.tokenizer
    text = [t for s in transcript.segments if s.seek == window.seek for t in s.tokens if t < tok.eot]
    if not text:
        raise ValueError(f"window {index} kept no text (no speech): there are no words to align")
    samples = torch.as_tensor(load_audio(audio) if isinstance(audio, str | os.PathLike) else audio).float()
    mel = window_mel(model, samples, window.seek, window.frames, mel_peak(samples, model.dims.n_mels))  # (n_mels, W)
    xa = model.encoder(mel[None].to(model.device, model.dtype))  # (1, S, D)
    sot = tok.sot_sequence_for(transcript.language, "transcribe") if tok.multilingual else tok.sot_sequence
    return mel, align(model, xa, [text], [window.frames], check_heads(model, alignment_heads), sot)[0]
