"""Batched decoding for Whisper: greedy, temperature sampling and beam search over a static KV cache.

How Whisper decodes
-------------------
The decoder is a language model conditioned on the audio. It is started with a short *prompt*
of special tokens, the "start of transcript" (sot) sequence, which tells it what to do::

    [<|startofprev|> previous text ...]  <|startoftranscript|> <|fr|> <|transcribe|> [<|notimestamps|>] [prefix ...]

- ``<|startofprev|>`` + text (optional): the transcript of the previous 30 s window, so that the
  model keeps names and style consistent. It may use at most half the text context.
- ``<|startoftranscript|>`` (sot): where the transcript begins. The token predicted *at* sot is the
  language token, so the distribution there, restricted to language tokens, is Whisper's language
  identification; the probability of ``<|nospeech|>`` there is its voice-activity detector
  (``no_speech_prob``).
- the language and the task (``<|transcribe|>`` or ``<|translate|>`` into English); English-only
  models (``*.en``) have neither slot.
- ``<|notimestamps|>`` asks for text only. Without it the model writes segment timestamps
  ``<|1.24|>`` (20 ms steps) around pieces of text.
- a prefix (optional): text the transcript is forced to begin with.

Then tokens are chosen one by one until ``<|endoftext|>`` (EOT). Before choosing, *logit filters*
forbid tokens the model must not emit:

- suppress tokens: special tokens that are prompts, not outputs (sot, the task tokens, startofprev,
  startoflm, nospeech), and with ``"-1"`` the non-speech symbols (speaker tags, music notes,
  brackets) so that only what is said is written.
- suppress blank: at the first step, a lone space or EOT. A transcript that is empty or starts with
  a bare space is a degenerate answer the model gives a high probability to on hard audio.
- timestamp rules (timestamp mode): timestamps come in pairs (end of one segment, start of the next)
  except directly before EOT, so after one timestamp that closes a pair no second may follow, and
  after a lone timestamp only another timestamp or EOT may follow; timestamps never decrease and a
  segment cannot be empty; the first token must be a timestamp no later than
  ``max_initial_timestamp``; and when the total probability of all timestamps exceeds that of the
  single most likely text token, a timestamp is forced (the model is sure a segment ends even if
  it spreads its belief over many times).

Greedy takes the argmax; sampling draws from softmax(logits / temperature); beam search keeps the
``beam_size`` most probable sequences, collects finished ones until it has ``beam_size * patience``
of them, and returns the best by sum of log-probabilities divided by the length (or by the
Google NMT length penalty ((5 + length) / 6) ** alpha). These are the rules of openai-whisper's
``whisper.decoding``, reproduced from its documented behaviour; its tokens are matched exactly in
tests/test_decoding.py.

How this implementation runs
----------------------------
``generate`` checks its options once (``DecodingOptions``, ``make_plan``), then:

1. prefill: the audio is encoded once and every decoder layer's cross-attention keys/values are
   computed once (``TextDecoder.new_cache``); the language is identified where it is not given;
   the prompts run in one pass. Self-attention keys/values go into a static ``KVCache`` per
   layer, ``prompt + max_new_tokens`` positions long, written in place: every step has one shape
   and takes its positions as a tensor (torch.compile and CUDA graphs can capture it).
2. select: the logit filters and the choice (greedy, sampled, or beams) as tensor operations over
   all rows, so the host waits on the device only for the "is everything finished?" check.
3. step: each row's new token through the decoder at its position.
4. finish: the search comes to the host once; each clip's best sequence and its result.

Beams are rows of the batch (``batch * beam_size`` rows). A clip's beams, and the rows of a clip
decoded several times (``clips=``), share its audio keys and values. Clips may have prompts of different
lengths (``prompt=`` and ``language=`` take one entry per clip): each row's tokens then sit at
its own positions (the prompt first, padded at the end to the longest), and the mask lets each
query see only its own row's positions so far. A row (or a clip's group of beams) that has
finished stops changing, so decoding clips together gives each the tokens it gets alone. All of
this state belongs to one call (``Decoding``), so threads may share a model. On the CPU, the
unembedding is used in oneDNN's packed layout, copied for the call (``Kernels``), and rows that
are done leave the cache (``drop_done_rows``), so a batch costs what its unfinished rows read.

With ``trace=`` the activations of each step are recorded and, at the end, stitched along the
positions of the chosen sequence (following a beam's ancestry back through the reorderings), so
``results[i].trace`` equals ``model.run(mel[i], prompt + tokens, trace=...)``: the trace of the
final sequence run teacher-forced.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import speculative as speculation
from .audio import TIME_PRECISION
from .inputs import check_audio_features, check_mel
from .kernels import Kernels
from .trace import IDLE, Edits, Recorder, Trace, TraceRequest

if TYPE_CHECKING:
    from .model import DecoderCache, Whisper

DEFAULT_MAX_NEW = 224  # openai-whisper's sample_len for every official model (n_text_ctx // 2)
CUDA_CHECK_EVERY = 8  # on CUDA, look at the "all finished" flag every 8 steps (on CPU, every step)

Prompt = str | Sequence[int] | None  # text, or token ids


@dataclass
class DecodingResult:
    """One clip's decoded transcript, as openai-whisper's ``DecodingResult``.

    ``tokens`` are the sampled tokens only: no prompt, no prefix, no final EOT. ``avg_logprob`` is
    the sum of their log-probabilities (EOT included) divided by ``len(tokens) + 1``.
    ``token_logprobs[j]`` is the log-probability of ``tokens[j]`` under the (filtered)
    distribution it was chosen from: the terms of ``sum_logprob``, but for EOT's.
    """

    tokens: list[int]
    text: str
    language: str | None
    language_probs: dict[str, float] | None
    avg_logprob: float
    sum_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    token_logprobs: list[float] = field(default_factory=list)
    trace: Trace | None = None


def compression_ratio(text: str) -> float:
    """UTF-8 size of ``text`` over its zlib-compressed size: high (> 2.4) for repetitive loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


# ----------------------------------------------------------------------------- options and plan


@dataclass(frozen=True)
class DecodingOptions:
    """``generate``'s options, checked when made (what needs the model is checked by ``make_plan``)."""

    beam_size: int | None = None
    patience: float | None = None
    length_penalty: float | None = None
    temperature: float = 0.0
    seed: int | None = None
    max_new_tokens: int | None = None
    language: str | Sequence[str | None] | None = None
    task: str = "transcribe"
    timestamps: bool = False
    prompt: Prompt | Sequence[Prompt] = None
    prefix: Prompt = None
    suppress_tokens: str | Iterable[int] | None = "-1"
    suppress_blank: bool = True
    max_initial_timestamp: float | None = 1.0
    compile: bool = False
    decoder_blocks: int | Sequence[int] | None = None
    clips: Sequence[int] | None = None
    speculative: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_size", "max_new_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        if self.beam_size is not None and self.beam_size < 1:
            raise ValueError(f"beam_size must be a positive int or None, got {self.beam_size!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        check_number("temperature", self.temperature, low=0.0)
        if self.beam_size is not None and self.temperature > 0:
            raise ValueError("beam search is deterministic: give beam_size or temperature > 0, not both")
        if self.patience is not None:
            if self.beam_size is None:
                raise ValueError("patience only applies to beam search: give beam_size too")
            check_number("patience", self.patience, low=0.0, open_low=True)
        if self.length_penalty is not None:
            check_number("length_penalty (alpha)", self.length_penalty, low=0.0, high=1.0)
        if self.max_initial_timestamp is not None:
            check_number("max_initial_timestamp", self.max_initial_timestamp, low=0.0)
        if self.clips is not None:
            check_clips(self.clips)

    @property
    def capacity(self) -> int:
        """Beam search: how many finished sequences a clip collects before it stops (``beam_size * patience``)."""
        return round(self.beam_size * (self.patience or 1.0)) if self.beam_size else 0


def check_clips(clips: object) -> None:
    """``clips``: a non-empty list of clip indices (ints >= 0); their upper bound is checked against the batch."""
    if not isinstance(clips, list | tuple | range):
        raise TypeError(f"clips must be a list of clip indices (ints), got {type(clips).__name__}")
    if not clips:
        raise ValueError("clips is empty: give the index of at least one clip to decode")
    bad = [c for c in clips if not isinstance(c, numbers.Integral) or isinstance(c, bool) or c < 0]
    if bad:
        raise ValueError(f"clips must be indices of clips in the batch (ints >= 0), got {bad[0]!r}")


def check_number(name: str, value: object, low: float, high: float = math.inf, open_low: bool = False) -> None:
    """A finite real number in [low, high] (or (low, high] when ``open_low``), else a one-line error."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or value > high or (open_low and value == low):
        bound = f"in ({low}, {high}]" if open_low else f"in [{low}, {high}]" if high < math.inf else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first step: each clip's prompt and limit, and the filters' token sets."""

    prompts: tuple[tuple[int, ...], ...]  # per clip: the tokens fed before sampling (language slot filled later)
    sot_index: tuple[int, ...]  # per clip: where <|startoftranscript|> sits in its prompt
    languages: tuple[str | None, ...]  # per clip: the language, or None to identify it from the audio
    max_new: tuple[int, ...]  # per clip: the most tokens sampled (EOT included)
    suppress: tuple[int, ...]  # always forbidden
    blank: tuple[int, ...]  # forbidden at the first step (empty when suppress_blank is off)
    timestamps: bool
    max_initial_index: int | None  # last timestamp index allowed first, or None for any
    depth: tuple[int, ...] | None = None  # per clip: decoder blocks run (None: all), never increasing


def make_plan(model: Whisper, options: DecodingOptions, n_clips: int) -> Plan:
    """Build each clip's prompt, its token limit and the token sets of the logit filters, checking every option."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(
            "this model has no tokenizer; load it with load_model(..., tokenizer=path to a .tiktoken file or HF dir)"
        )
    if options.beam_size is not None and options.beam_size >= model.dims.n_vocab:
        raise ValueError(f"beam_size={options.beam_size} must be smaller than the vocabulary ({model.dims.n_vocab})")
    if options.beam_size is not None and options.capacity < 1:
        raise ValueError(f"beam_size {options.beam_size} with patience {options.patience} keeps no finished sequence")
    languages = per_clip("language", options.language, n_clips, single=lambda x: x is None or isinstance(x, str))
    texts = per_clip("prompt", options.prompt, n_clips, single=is_single_prompt)
    prefix = as_tokens(tok, options.prefix, "prefix") if options.prefix is not None and len(options.prefix) else []
    prompts, sot_index = [], []
    for g, (language, text) in enumerate(zip(languages, texts, strict=True)):
        prompt = clip_prompt(model, options, language, text, prefix)
        prompts.append(tuple(prompt))
        sot_index.append(prompt.index(tok.sot))
        if len(prompt) >= model.dims.n_text_ctx:
            raise ValueError(f"the prompt of clip {g} ({len(prompt)} tokens) fills the whole "
                             f"{model.dims.n_text_ctx}-token context")  # fmt: skip
    return Plan(
        prompts=tuple(prompts),
        sot_index=tuple(sot_index),
        languages=languages if tok.multilingual else ("en",) * n_clips,
        max_new=tuple(max_new_for(model, options, len(p), g) for g, p in enumerate(prompts)),
        suppress=suppressed(model, options.suppress_tokens),
        blank=tuple(tok.encode(" ") + [tok.eot]) if options.suppress_blank else (),
        timestamps=options.timestamps,
        max_initial_index=max_initial_index(model, options),
        depth=clip_depths(model, options.decoder_blocks, n_clips),
    )


def clip_depths(model: Whisper, blocks: int | Sequence[int] | None, n_clips: int) -> tuple[int, ...] | None:
    """``decoder_blocks`` checked: per clip, how many of the first decoder blocks run (None: every block)."""
    if blocks is None:
        return None
    L = model.dims.n_text_layer
    depth = per_clip("decoder_blocks", blocks, n_clips, single=lambda x: isinstance(x, numbers.Integral))
    for d in depth:
        if not isinstance(d, numbers.Integral) or isinstance(d, bool) or not 0 <= d <= L:
            raise ValueError(f"decoder_blocks must be ints from 0 to {L} (the decoder's blocks), got {d!r}")
    if list(depth) != sorted(depth, reverse=True):
        raise ValueError(f"decoder_blocks must not increase from clip to clip (order the clips deepest first), "
                         f"got {list(depth)}")  # fmt: skip
    return tuple(int(d) for d in depth)


def is_single_prompt(x: object) -> bool:
    """A prompt for every clip (text or token ids), rather than one entry per clip."""
    if x is None or isinstance(x, str | Tensor | np.ndarray):
        return True
    return isinstance(x, Sequence) and all(isinstance(t, int | np.integer) for t in x)


def per_clip(name: str, value: object, n_clips: int, single) -> tuple:
    """``value`` for each clip: repeated when it is one value for all (``single(value)``), else checked as a list."""
    if single(value):
        return (value,) * n_clips
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be one value for all clips or a list of one per clip, got {type(value).__name__}")
    if len(value) != n_clips:
        raise ValueError(f"{name} has {len(value)} entries for {n_clips} clips: give one per clip, or one for all")
    bad = [x for x in value if not single(x)]
    if bad:
        raise TypeError(f"{name} entries must each be what {name}= takes for one clip, got {bad[0]!r}")
    return tuple(value)


def as_tokens(tok, x: str | Sequence[int], what: str) -> list[int]:
    """Token ids of a text (encoded as openai-whisper does, after a space) or of given ids, checked to be text."""
    ids = tok.encode(" " + x.strip()) if isinstance(x, str) else [int(t) for t in x]
    if what == "prompt":  # a previous transcript, timestamps included (as openai-whisper's transcribe passes it)
        bad = [t for t in ids if not 0 <= t < tok.n_vocab]
        if bad:
            raise ValueError(f"prompt token {bad[0]} is outside the vocabulary [0, {tok.n_vocab})")
        return ids
    bad = [t for t in ids if not 0 <= t < tok.eot]
    if bad:
        raise ValueError(f"{what} token {bad[0]} is not a text token (text tokens are 0..{tok.eot - 1})")
    return ids


def clip_prompt(model: Whisper, options: DecodingOptions, language: str | None, text: Prompt,
                prefix: list[int]) -> list[int]:  # fmt: skip
    """One clip's prompt: [<|startofprev|> text] sot [language task] [<|notimestamps|>] [prefix]."""
    tok, n_ctx = model.tokenizer, model.dims.n_text_ctx
    if tok.multilingual:
        sot_seq = tok.sot_sequence_for(language or "en", options.task)
    else:
        sot_seq = tok.sot_sequence_for(language, options.task if options.task != "transcribe" else None)
    prompt = [*sot_seq, *([] if options.timestamps else [tok.no_timestamps]), *prefix]
    if text is not None and len(text):
        previous = as_tokens(tok, text, "prompt")
        limit = n_ctx // 2 - 1
        if len(previous) > limit:
            raise ValueError(
                f"the prompt has {len(previous)} tokens; at most {limit} fit (Whisper gives previous text half "
                f"of its {n_ctx}-token context): pass only its last {limit} tokens"
            )
        prompt = [tok.sot_prev, *previous, *prompt]
    return prompt


def max_new_for(model: Whisper, options: DecodingOptions, prompt_length: int, clip: int) -> int:
    """The most tokens clip ``clip`` may sample: ``max_new_tokens``, or by default 224 (what its context leaves)."""
    n_ctx = model.dims.n_text_ctx
    room = n_ctx - prompt_length
    if options.max_new_tokens is None:  # openai-whisper's n_text_ctx // 2 = 224; a smaller context uses what is left
        return min(max(n_ctx // 2, DEFAULT_MAX_NEW), room)
    if options.max_new_tokens > room:
        raise ValueError(
            f"max_new_tokens={options.max_new_tokens} does not fit: the prompt of clip {clip} uses {prompt_length} "
            f"of the model's {n_ctx} text positions, leaving {room}"
        )
    return options.max_new_tokens


def suppressed(model: Whisper, suppress_tokens: str | Iterable[int] | None) -> tuple[int, ...]:
    """The tokens always forbidden: those asked for (``-1``: the non-speech symbols) and the prompt-only specials."""
    tok = model.tokenizer
    if isinstance(suppress_tokens, str):
        try:
            ids = [int(t) for t in suppress_tokens.split(",") if t.strip()]
        except ValueError:
            raise ValueError(
                f"suppress_tokens must be comma-separated ints like '-1,220', got {suppress_tokens!r}"
            ) from None
    else:
        ids = [int(t) for t in (suppress_tokens or ())]
    suppress = {t for t in ids if t != -1}
    bad = [t for t in suppress if not 0 <= t < model.dims.n_vocab]
    if bad:
        raise ValueError(f"suppress_tokens has {bad[0]}, outside the vocabulary [0, {model.dims.n_vocab})")
    if -1 in ids:
        suppress.update(tok.non_speech_tokens)
    suppress.update([tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech])
    return tuple(sorted(suppress))


def max_initial_index(model: Whisper, options: DecodingOptions) -> int | None:
    """The last timestamp index the first token may be (``max_initial_timestamp`` in 20 ms steps), or None."""
    if not options.timestamps or options.max_initial_timestamp is None:
        return None
    return round(options.max_initial_timestamp / TIME_PRECISION)


# ----------------------------------------------------------------------------- logit filters


def filter_logits(logits: Tensor, sampled: Tensor, plan: Plan, tok, vocab: Tensor) -> Tensor:
    """Forbid (set to -inf) what the rules forbid next. ``logits`` (N, V); ``sampled`` (N, n): each row's tokens so far.

    ``vocab`` is ``arange(V)`` on the device. All rules are tensor operations over the rows (no
    loop, no host sync); ``logits`` is changed in place and returned.
    """
    n = sampled.shape[1]  # tokens sampled so far (the same for every row)
    if n == 0 and plan.blank:
        logits[:, list(plan.blank)] = -math.inf
    logits[:, list(plan.suppress)] = -math.inf
    if not plan.timestamps:
        return logits
    ts = tok.timestamp_begin
    stamps, text = logits[:, ts:], logits[:, : tok.eot]  # views: (N, V - ts) timestamps, (N, eot) text tokens
    logits[:, tok.no_timestamps] = -math.inf
    if n >= 1:
        last_ts = sampled[:, -1] >= ts  # (N,)
        pen_ts = sampled[:, -2] >= ts if n >= 2 else torch.ones_like(last_ts)  # (N,)
        closes_pair = last_ts & pen_ts  # two timestamps in a row: text (or EOT) must follow
        opens_pair = last_ts & ~pen_ts  # a lone timestamp: another timestamp or EOT must follow
        # timestamps never decrease; a new segment must be longer than zero
        where_ts = sampled >= ts  # (N, n)
        any_ts = where_ts.any(dim=1)  # (N,)
        last_idx = (where_ts * torch.arange(1, n + 1, device=sampled.device)).argmax(dim=1)  # (N,)
        last_value = sampled.gather(1, last_idx[:, None])[:, 0]  # (N,)
        bound = torch.where(opens_pair, last_value, last_value + 1)  # (N,) first allowed timestamp id
        early = any_ts[:, None] & (vocab[ts:] < bound[:, None])  # (N, V - ts)
        stamps.masked_fill_(closes_pair[:, None] | early, -math.inf)
        text.masked_fill_(opens_pair[:, None], -math.inf)
    else:  # the first token is a timestamp, and not later than max_initial_timestamp
        logits[:, :ts] = -math.inf
        if plan.max_initial_index is not None:
            logits[:, ts + plan.max_initial_index + 1 :] = -math.inf
    # force a timestamp when timestamps together are likelier than any single text token
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    ts_mass = logprobs[:, ts:].logsumexp(dim=-1)  # (N,)
    best_text = logprobs[:, :ts].max(dim=-1).values  # (N,)
    logits[:, :ts].masked_fill_((ts_mass > best_text)[:, None], -math.inf)
    return logits


# ----------------------------------------------------------------------------- search state


@dataclass
class Search:
    """The state of one batched search on the device. N rows = G clips * K rows per clip (beams)."""

    tokens: Tensor  # (N, max_new) long: each row's sampled tokens so far (column i: selection i)
    sum_logprobs: Tensor  # (N,) float32
    done: Tensor  # (N,) bool: greedy, the row wrote EOT; beam, its clip has enough finished beams; or its limit
    done_at: Tensor  # (N,) long: selections when done (greedy: tokens before EOT; beam: time of the beams)
    limit: Tensor  # (N,) long: the most tokens the row samples (its clip's max_new)
    hist_tok: Tensor  # (max_new, N) long: the token each row got at each selection
    hist_src: Tensor  # (max_new, N) long: the row each row came from at each selection
    hist_lp: Tensor  # (max_new, N) float32: the log-probability of that token
    # beam search only: the finished sequences of each clip (slot C is a scratch slot)
    fin_score: Tensor | None = None  # (G, C + 1) float32
    fin_row: Tensor | None = None  # (G, C + 1) long: the row that wrote EOT
    fin_time: Tensor | None = None  # (G, C + 1) long: the selection index of that EOT
    n_fin: Tensor | None = None  # (G,) long


def new_search(limit: Tensor, n_clips: int, capacity: int, beams: bool) -> Search:
    """An empty search of ``len(limit)`` rows that sample at most ``limit`` (N,) tokens each."""
    N, steps, dev = len(limit), int(limit.max()), limit.device
    s = Search(
        tokens=torch.zeros(N, steps, dtype=torch.long, device=dev),
        sum_logprobs=torch.zeros(N, device=dev),
        done=torch.zeros(N, dtype=torch.bool, device=dev),
        done_at=limit.clone(),
        limit=limit,
        hist_tok=torch.zeros(steps, N, dtype=torch.long, device=dev),
        hist_src=torch.zeros(steps, N, dtype=torch.long, device=dev),
        hist_lp=torch.zeros(steps, N, device=dev),
    )
    if beams:
        s.fin_score = torch.zeros(n_clips, capacity + 1, device=dev)
        s.fin_row = torch.zeros(n_clips, capacity + 1, dtype=torch.long, device=dev)
        s.fin_time = torch.zeros(n_clips, capacity + 1, dtype=torch.long, device=dev)
        s.n_fin = torch.zeros(n_clips, dtype=torch.long, device=dev)
    return s


def select_greedy(s: Search, logits: Tensor, i: int, eot: int, temperature: float, gen,
                  rows: Tensor | None = None) -> Tensor:  # fmt: skip
    """Greedy or sampled choice for every row; a row that is done keeps writing EOT. Returns (N,) sources.

    ``rows`` (L,): ``logits`` (L, V) are those rows' only, every other row being done (greedy).
    """
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N or L, V)
    if temperature == 0:
        nxt = logits.argmax(dim=-1)  # (N or L,)
    else:
        probs = F.softmax(logits.float() / temperature, dim=-1)  # (N, V)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (N,)
    lp = logprobs.gather(1, nxt[:, None])[:, 0]  # (N or L,)
    if rows is not None:  # the done rows: EOT at log-probability 0, as below
        nxt = torch.full_like(s.done_at, eot).index_copy_(0, rows, nxt)  # (N,)
        lp = torch.zeros_like(s.sum_logprobs).index_copy_(0, rows, lp)  # (N,)
    active = ~s.done
    lp = torch.where(active, lp, 0.0)  # (N,)
    s.sum_logprobs += lp
    nxt = torch.where(active, nxt, eot)
    ended = active & (nxt == eot)
    s.done_at = torch.where(ended, i, s.done_at)
    s.done |= ended
    s.tokens[:, i] = nxt
    src = torch.arange(len(nxt), device=nxt.device)
    s.hist_tok[i], s.hist_src[i], s.hist_lp[i] = nxt, src, lp
    return src


def select_beams(s: Search, logits: Tensor, i: int, eot: int, beam: int, capacity: int) -> Tensor:
    """One beam-search selection for every clip at once. Returns (N,) the source row of each new row.

    Each of a clip's ``beam`` rows proposes its ``beam + 1`` best continuations (at least ``beam``
    of them are not EOT). All proposals are ranked by total log-probability; walking down the
    ranking, EOT proposals go to the clip's finished list and the others become the new beams
    until ``beam`` are kept. At the first selection the beams are all the same prompt, so only
    the first row's proposals count. A clip whose finished list holds ``capacity`` sequences
    (``beam * patience``) is done and its rows stop changing.
    """
    N, V = logits.shape
    G, K = N // beam, beam + 1
    dev = logits.device
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    top_lp, top_tok = logprobs.topk(K, dim=-1)  # (N, K)
    scores = (s.sum_logprobs[:, None] + top_lp).view(G, beam * K)  # (G, M)
    if i == 0:
        scores[:, K:] = -math.inf
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (G, M)
    s_score, s_tok = scores.gather(1, order), top_tok.view(G, beam * K).gather(1, order)  # (G, M)
    s_lp = top_lp.view(G, beam * K).gather(1, order)  # (G, M)
    s_row = order // K + torch.arange(G, device=dev)[:, None] * beam  # (G, M) global source row
    is_eot = s_tok == eot
    text_rank = (~is_eot).cumsum(dim=1)  # (G, M) non-EOT proposals up to and including this one
    kept = ~is_eot & (text_rank <= beam)
    walked = text_rank - (~is_eot).long() < beam  # reached before the beam-th kept one
    M = s_tok.shape[1]
    slots = torch.arange(M, device=dev).expand(G, M)
    pick = torch.where(kept, slots, slots + M).argsort(dim=1)[:, :beam]  # (G, beam) kept, in rank order

    active_g = ~s.done.view(G, beam)[:, 0]  # (G,)
    active = active_g.repeat_interleave(beam)  # (N,)
    src = torch.where(active, s_row.gather(1, pick).flatten(), torch.arange(N, device=dev))  # (N,)
    nxt = torch.where(active, s_tok.gather(1, pick).flatten(), eot)  # (N,)
    lp = torch.where(active, s_lp.gather(1, pick).flatten(), 0.0)  # (N,)
    s.sum_logprobs = torch.where(active, s_score.gather(1, pick).flatten(), s.sum_logprobs)

    # finished proposals of clips still searching fill the free slots in rank order
    new_fin = is_eot & walked & active_g[:, None]  # (G, M)
    slot = s.n_fin[:, None] + new_fin.long().cumsum(dim=1) - 1  # (G, M)
    slot = torch.where(new_fin & (slot < capacity), slot, capacity)
    s.fin_score.scatter_(1, slot, s_score)
    s.fin_row.scatter_(1, slot, s_row)
    s.fin_time.scatter_(1, slot, torch.full_like(slot, i))
    s.n_fin = (s.n_fin + new_fin.sum(dim=1)).clamp(max=capacity)

    s.tokens = s.tokens.index_select(0, src)
    s.tokens[:, i] = torch.where(active, nxt, s.tokens[:, i])
    now_done = (s.n_fin >= capacity).repeat_interleave(beam) & active  # (N,)
    s.done_at = torch.where(now_done, i + 1, s.done_at)
    s.done |= now_done
    s.hist_tok[i], s.hist_src[i], s.hist_lp[i] = nxt, src, lp
    return src


def stop_at_limits(s: Search, i: int) -> None:
    """Rows that have sampled their clip's ``max_new`` tokens without finishing are done now."""
    full = ~s.done & (s.limit <= i + 1)  # (N,)
    s.done_at = torch.where(full, i + 1, s.done_at)
    s.done |= full


# ----------------------------------------------------------------------------- one call's state


@dataclass
class Decoding:
    """One ``generate`` call's state: made per call and passed explicitly; nothing is stored on the model."""

    model: Whisper
    plan: Plan
    options: DecodingOptions
    rec: Recorder  # the call's recorder: names to keep, edits, and the trace of what is computed once
    ops: Kernels  # the products of a step (on the CPU, the unembedding packed for N rows)
    cache: DecoderCache  # per layer: the N rows' self-attention keys/values, the audio's
    search: Search
    start: Tensor  # (N, 1), or (1, 1) when every prompt has one length: each row's first sampled position
    last: Tensor  # (N, V): the logits the next selection chooses from
    clips: Clips  # per clip: language, its probabilities, no-speech probability
    steps: list[Trace]  # when tracing: the prompts' pass, then each step's
    generator: torch.Generator | None  # sampling with a seed
    vocab: Tensor  # (V,) arange(V) on the device, for the filters
    live: Tensor | None = None  # (L,) the rows the cache holds and a step computes (None: all N, fixed shapes)

    @property
    def tracing(self) -> bool:
        return bool(self.rec.keep)


@dataclass
class Clips:
    """What each clip's prompt pass found: the language (given or identified) and p(<|nospeech|>) at sot."""

    languages: list[str | None]
    language_probs: list[dict[str, float] | None]  # None where the language was given
    no_speech: list[float]


def pass_recorder(rec: Recorder) -> Recorder:
    """A recorder for one decoder pass: the call's names and edits, a trace of its own."""
    return Recorder(rec.keep, rec.edits, Trace()) if rec.active else IDLE


def prefill(model: Whisper, plan: Plan, options: DecodingOptions, xa: Tensor, rec: Recorder) -> Decoding:
    """Everything before the first selection: caches, language identification, the prompts in one pass."""
    G, K, dev = len(plan.prompts), options.beam_size or 1, xa.device
    lengths = [len(p) for p in plan.prompts]
    length = max(n + m for n, m in zip(lengths, plan.max_new, strict=True))  # the call's longest sequence
    ops = Kernels() if options.compile else Kernels.for_decoding(model.decoder, G * K)
    rows = None if plan.depth is None else [sum(d > i for d in plan.depth) for i in range(model.dims.n_text_layer)]
    clips = None if options.clips is None else torch.tensor(options.clips, device=dev)  # (G,): each row's clip
    cache = model.decoder.new_cache(xa, length, rec.child("decoder"), ops, rows, clips)  # audio k/v once per clip
    languages, language_probs, prompts = identify_languages(model, plan, cache, ops, rec.edits)
    r = pass_recorder(rec)
    tokens = torch.tensor(prompts, device=dev)  # (G, T0): each prompt padded at its end to the longest
    ends = [n - 1 for n in lengths]  # a prompt's last position predicts the first token
    at = None if r.wants("logits") else torch.tensor([plan.sot_index, ends], device=dev).T  # (G, 2): only those read
    logits = r("logits", model.decoder(tokens, r.child("decoder"), ops, cache=cache, pos=all_positions(tokens), at=at))
    sot, end = (plan.sot_index, ends) if at is None else ([0] * G, [1] * G)  # where they are in (G, T0 or 2, V)
    no_speech = logits[range(G), sot].softmax(dim=-1)[:, model.tokenizer.no_speech]  # (G,)
    last = logits[range(G), end]  # (G, V)
    start = torch.tensor(lengths if len(set(lengths)) > 1 else lengths[:1], device=dev)[:, None]  # (G or 1, 1)
    if K > 1:  # every beam starts as its clip
        cache, last = cache.repeat_rows(K), last.repeat_interleave(K, dim=0)  # (N, ...)
        start = start.repeat_interleave(K, dim=0) if len(start) > 1 else start  # (N or 1, 1)
    limit = torch.tensor(plan.max_new, device=dev).repeat_interleave(K)  # (N,)
    search = new_search(limit, G, options.capacity, beams=options.beam_size is not None)
    gen = None if options.seed is None else torch.Generator(device=dev).manual_seed(options.seed)
    clips = Clips(languages, language_probs, no_speech.tolist())
    live = torch.arange(G * K, device=dev) if drops_done_rows(options, rec, dev) else None
    return Decoding(model, plan, options, rec, ops, cache, search, start, last, clips,
                    steps=[r.trace] if rec.keep else [], generator=gen,
                    vocab=torch.arange(model.dims.n_vocab, device=dev), live=live)  # fmt: skip


def drops_done_rows(options: DecodingOptions, rec: Recorder, device: torch.device) -> bool:
    """Whether steps leave out the rows that are done: on the CPU, untraced, uncompiled.

    A done row's token and score no longer change, but in a fixed-shape batch it is still
    computed, and its share of a step's reads (its audio keys/values, 17.6 MiB per clip for tiny)
    is wasted. On the CPU, where the host sees every step anyway, the cache drops such rows as
    they finish. On CUDA the shapes stay fixed (no host sync, capturable steps), and a trace needs
    every row of every step.
    """
    return device.type == "cpu" and not options.compile and not rec.active


def all_positions(tokens: Tensor) -> Tensor:
    """(1, T): positions 0..T-1, the same for every row."""
    return torch.arange(tokens.shape[1], device=tokens.device)[None]


def identify_languages(model: Whisper, plan: Plan, cache: DecoderCache, ops: Kernels,
                       edits: Edits | None) -> tuple[list, list, list[list[int]]]:  # fmt: skip
    """Each clip's language (given, or read at sot alone: position 0, no prompt, as openai-whisper) and prompt.

    Returns the languages, the identification's probabilities (None where given) and the
    prompts with the language slot filled, padded at the end to one length.
    """
    tok, G = model.tokenizer, len(plan.prompts)
    languages, probs = list(plan.languages), [None] * G
    prompts = [list(p) for p in plan.prompts]
    if tok.multilingual and None in languages:
        sot = torch.full((G, 1), tok.sot, device=model.device)  # (G, 1)
        r = Recorder(frozenset(), edits, None) if edits else IDLE
        logits = model.decoder(sot, r.child("decoder"), ops, cache=cache, pos=all_positions(sot))[:, 0]  # (G, V)
        p = logits[:, list(tok.all_language_tokens)].softmax(dim=-1).cpu()  # (G, n_languages)
        for g in [g for g in range(G) if languages[g] is None]:
            probs[g] = dict(zip(tok.all_language_codes, p[g].tolist(), strict=True))
            languages[g] = tok.all_language_codes[int(p[g].argmax())]
            prompts[g][plan.sot_index[g] + 1] = tok.language_token(languages[g])
    longest = max(map(len, prompts))
    return languages, probs, [p + [tok.eot] * (longest - len(p)) for p in prompts]


def select(d: Decoding, i: int) -> None:
    """Selection ``i``: filter the logits, choose every row's token, let beams take their histories."""
    s, o, tok = d.search, d.options, d.model.tokenizer
    if o.beam_size is None and o.temperature == 0 and d.live is not None and len(d.live) < len(d.last):
        rows = d.live  # greedy with rows done: only the live rows are filtered and scored
        filtered = filter_logits(d.last[rows].float(), s.tokens[rows, :i], d.plan, tok, d.vocab)  # (L, V)
    else:  # the filters write in place: into a copy when the step's logits are kept in a trace
        rows = None
        filtered = filter_logits(d.last.to(torch.float32, copy=d.tracing), s.tokens[:, :i], d.plan, tok, d.vocab)
    if o.beam_size is None:
        select_greedy(s, filtered, i, tok.eot, o.temperature, d.generator, rows)
    else:
        src = select_beams(s, filtered, i, tok.eot, o.beam_size, o.capacity)
        if d.live is not None:  # the cache holds live rows only; a beam's source is a live row of its clip
            where = torch.full_like(src, -1)
            where[d.live] = torch.arange(len(d.live), device=src.device)
            src = where[src[d.live]]  # (L,) cache rows
        for c in d.cache.attn:  # each beam's self-attention history follows it (within the rows the layer runs)
            c.take_rows(src[: c.rows], upto=max(map(len, d.plan.prompts)) + i)
    stop_at_limits(s, i)


def step(d: Decoding, i: int, forward) -> None:
    """Feed each row's token of selection ``i`` at its position; keep the next logits (and the step's trace)."""
    tokens = d.search.tokens[:, i : i + 1]  # (N, 1)
    end = d.cache.attn[0].keys().shape[2] - 1  # the cache's last position
    pos = (d.start + i).clamp(max=end)  # (N or 1, 1): a row done at its limit goes no further
    if d.rec.active:
        r = pass_recorder(d.rec)
        d.last = r("logits", d.model.decoder(tokens, r.child("decoder"), d.ops, cache=d.cache, pos=pos))[:, 0]
        if d.tracing:
            d.steps.append(r.trace)
    elif d.live is not None:
        drop_done_rows(d)
        rows, p = d.live, pos[d.live] if len(pos) > 1 else pos  # (L,), (L or 1, 1)
        n = int(p.max()) + 1  # the positions written so far: no attention over the empty ones after them
        cache = dataclasses.replace(d.cache, attn=[c.upto(n) for c in d.cache.attn])
        logits = d.model.decoder(tokens[rows], IDLE, d.ops, cache=cache, pos=p)[:, 0]  # (L, V)
        if len(rows) == len(d.last):  # no row done yet
            d.last = logits
        else:
            d.last[rows] = logits  # into (N, V); a done row's stay as they were
    else:
        d.last = forward(tokens, pos)[:, 0]  # (N, V)


def drop_done_rows(d: Decoding) -> None:
    """Rows that are done leave the cache (a clip's beams finish together); their logits stay as they were.
    Once half the rows have left, the unembedding is packed again for the rows left (packing costs ~30 ms)."""
    keep = ~d.search.done[d.live]  # (L,)
    if bool(keep.all()):
        return
    d.live = d.live[keep]
    d.cache = d.cache.take_rows(keep.nonzero()[:, 0])
    if d.ops.rows and 2 * len(d.live) <= d.ops.rows:  # the unembedding packed again, for the rows left
        d.ops = Kernels.for_decoding(d.model.decoder, len(d.live))


def step_function(d: Decoding):
    """The untraced step (tokens, pos) -> logits (N, 1, V); compiled (one fixed shape) when asked for."""

    def forward(tokens: Tensor, pos: Tensor) -> Tensor:
        return d.model.decoder(tokens, IDLE, d.ops, cache=d.cache, pos=pos)  # (N, 1, V)

    return torch.compile(forward, dynamic=False) if d.options.compile and not d.rec.active else forward


# ----------------------------------------------------------------------------- results


def finish(d: Decoding, n_sel: int) -> list[DecodingResult]:
    """Bring the search to the host once and build each clip's result (openai-whisper's final ranking)."""
    s, tok = d.search, d.model.tokenizer
    host = History(s.hist_tok[:n_sel].tolist(), s.hist_src[:n_sel].tolist(), s.hist_lp[:n_sel].tolist())
    sums, done_at = s.sum_logprobs.cpu(), [min(t, n_sel) for t in s.done_at.tolist()]
    order = traced_names(d)
    results = []
    for g in range(len(d.plan.prompts)):
        cands = candidates(d, g, sums, done_at)
        scores = [rank_score(sum_lp, time, d.options.length_penalty) for _, time, sum_lp in cands]
        row, time, sum_lp = cands[int(np.argmax(scores))]  # the first of equals
        tokens, lps, rows = host.ancestry(row, time)
        text = tok.decode(tokens).strip()
        length = len(d.plan.prompts[g]) + len(tokens)
        trace = stitch_trace(order, d, g, rows, length) if d.tracing else None
        results.append(DecodingResult(
            tokens=tokens, text=text, language=d.clips.languages[g], language_probs=d.clips.language_probs[g],
            avg_logprob=sum_lp / (len(tokens) + 1), sum_logprob=sum_lp, no_speech_prob=d.clips.no_speech[g],
            compression_ratio=compression_ratio(text), temperature=d.options.temperature, token_logprobs=lps,
            trace=trace,
        ))  # fmt: skip
    return results


@dataclass
class History:
    """The selections on the host: per selection and row, the token, the row it came from, its log-probability."""

    tok: list[list[int]]
    src: list[list[int]]
    lp: list[list[float]]

    def ancestry(self, row: int, time: int) -> tuple[list[int], list[float], list[int]]:
        """The sampled tokens of the sequence in ``row`` after ``time`` selections, their log-probabilities,
        and the row the sequence was in at each step (1..time)."""
        tokens, lps, rows = [], [], [row]
        for t in range(time - 1, -1, -1):
            tokens.append(self.tok[t][row])
            lps.append(self.lp[t][row])
            row = self.src[t][row]
            rows.append(row)
        return tokens[::-1], lps[::-1], rows[::-1][1:]


def candidates(d: Decoding, g: int, sums: Tensor, done_at: list[int]) -> list[tuple[int, int, float]]:
    """Clip ``g``'s candidate sequences as (row, selections, sum of log-probabilities)."""
    s, beam = d.search, d.options.beam_size
    if beam is None:
        return [(g, done_at[g], float(sums[g]))]
    n = int(s.n_fin[g])
    rows, times, scores = s.fin_row[g, :n].tolist(), s.fin_time[g, :n].tolist(), s.fin_score[g, :n].tolist()
    cands = list(zip(rows, times, scores, strict=True))
    if len(cands) < beam:  # not enough finished: the live beams, best first, with an EOT added
        live = range(g * beam, (g + 1) * beam)
        for j in np.argsort(sums[live.start : live.stop].numpy())[::-1][: beam - len(cands)]:
            cands.append((live[j], done_at[live.start], float(sums[live[j]])))
    return cands


def rank_score(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """How candidates are ranked: log-probability per token, or over Google NMT's ((5 + length) / 6) ** alpha."""
    penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
    return sum_logprob / max(penalty, 1e-9)


# ----------------------------------------------------------------------------- traces and edits


def traced_names(d: Decoding) -> list[str]:
    """The names a result's trace holds, in the model's order; a skipped block keeps only its stream."""
    rec, dims = d.rec, d.model.dims
    blocks = [f"encoder.blocks.{i}" for i in range(dims.n_audio_layer)]
    blocks += [f"decoder.blocks.{i}" for i in range(dims.n_text_layer)]
    skipped = tuple(f"{block}." for block in blocks if rec.skips(block))
    inside = [n for n in rec.keep if n.startswith(skipped) and not n.endswith(("resid_pre", "resid_post"))]
    return [n for n in d.model.names() if n in rec.keep and n not in inside]


def stitch_trace(order: list[str], d: Decoding, g: int, rows: list[int], length: int) -> Trace:
    """Clip ``g``'s trace: names computed once from the call's trace (its clip's row), decoder names from
    the prompts' pass (row g, its prompt's positions) then from step s at row ``rows[s - 1]``, joined along
    positions; self-attention scores/patterns are cut to the final ``length`` keys."""
    once, prompts, steps = d.rec.trace, d.steps[0], d.steps[1:]
    T0, c = len(d.plan.prompts[g]), g if d.options.clips is None else d.options.clips[g]
    out = Trace()
    for name in order:
        if name in once:  # the encoder's and the audio's keys and values: one row per clip
            out.put(name, once[name][c : c + 1])
            continue
        axis = 2 if name.endswith(("scores", "pattern")) else 1  # heads come before positions there
        parts = [prompts[name][g : g + 1].narrow(axis, 0, T0)] + [steps[s][name][r : r + 1] for s, r in enumerate(rows)]
        x = torch.cat(parts, dim=axis)
        if name.endswith((".attn.scores", ".attn.pattern")) and ".cross_attn." not in name:
            x = x[..., :length]
        out.put(name, x)
    return out


def check_step_edits(model: Whisper, edits: Edits | None) -> None:
    """Decoder edits must act on each position alone: a step sees one position at a time."""
    if edits is None:
        return
    step_shapes = model.shapes(batch=1, n_tokens=1)
    for name, ops in edits.ops.items():
        if name.startswith("encoder.") or name.endswith(("cross_attn.k", "cross_attn.v")):
            continue  # computed once, not per step
        for op in ops:
            if op.positions is not None:
                raise ValueError(
                    f"edit at {name!r} names positions; generate runs the decoder one position at a time, so "
                    "decoder edits must apply to every position (use run() for position-specific edits)"
                )
            if op.kind == "mean" and op.mean is None:
                raise ValueError(f"mean-ablation at {name!r} in generate needs mean= (the run's mean is unknown)")
            if op.kind in ("replace", "add") and not fits(tuple(op.value.shape), step_shapes[name]):
                raise ValueError(
                    f"{op.kind} at {name!r} in generate needs a value that fits one position of one clip, "
                    f"{list(step_shapes[name])} (size 1 or absent at the batch and position axes), "
                    f"got shape {tuple(op.value.shape)}"
                )


def fits(value: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Does a value of shape ``value`` broadcast to ``shape`` without changing it?"""
    try:
        return torch.broadcast_shapes(value, shape) == shape
    except RuntimeError:
        return False


# ----------------------------------------------------------------------------- generate


def checked_audio(model: Whisper, mel: Tensor | None, audio_features: Tensor | None, rec: Recorder) -> Tensor:
    """The mel (G, n_mels, frames) or the encoder output (G, S, D) to decode, checked and on the model."""
    if (mel is None) == (audio_features is None):
        raise ValueError("give either mel or audio_features (the encoder's output), not both or neither")
    if mel is not None:
        return check_mel(mel, model.dims, model.device, model.dtype)
    e = rec.edits
    asked = [*rec.keep, *(e.ops if e else ()), *(e.skipped if e else ())]
    encoder = sorted(n for n in asked if n.startswith("encoder."))
    if e is not None and e.window is not None:
        encoder.append("encoder local_window")
    if encoder:
        raise ValueError(f"{encoder[0]!r} is in the encoder, but audio_features skip the encoder: pass the mel "
                         "to trace or edit the encoder")  # fmt: skip
    return check_audio_features(audio_features, model.dims, model.device, model.dtype)


@torch.no_grad()
def generate(
    model: Whisper,
    mel: Tensor | None = None,
    *,
    audio_features: Tensor | None = None,
    beam_size: int | None = None,
    max_new_tokens: int | None = None,
    language: str | Sequence[str | None] | None = None,
    task: str = "transcribe",
    timestamps: bool = False,
    trace: TraceRequest = None,
    edits: Edits | None = None,
    patience: float | None = None,
    length_penalty: float | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    prompt: Prompt | Sequence[Prompt] = None,
    prefix: Prompt = None,
    suppress_tokens: str | Iterable[int] | None = "-1",
    suppress_blank: bool = True,
    max_initial_timestamp: float | None = 1.0,
    compile: bool = False,
    decoder_blocks: int | Sequence[int] | None = None,
    clips: Sequence[int] | None = None,
    speculative: bool = False,
) -> list[DecodingResult]:
    """Decode a batch of 30 s log-mel windows ``mel`` [B, n_mels, 2 * n_audio_ctx] (or one [n_mels, frames]).

    audio_features: instead of ``mel``, the encoder's output [B, n_audio_ctx, n_audio_state] (as
        openai-whisper's decode accepts): decoding starts from it and the encoder does not run.
    beam_size: None for greedy (or sampling when temperature > 0), else beam search with that many beams.
    max_new_tokens: the most tokens to sample (default 224 = half the official 448-token context, as
        openai-whisper; for a model with a smaller context, what its context has left after the prompt).
    language: a code or name; None detects it per clip (multilingual models) from the sot position;
        or a list with one entry per clip (None entries detected).
    task: "transcribe" or "translate" (into English). timestamps: write segment timestamps.
    trace / edits: record activations (as ``model.run``) / apply interventions at every step.
    patience, length_penalty: beam search's stopping and ranking rules (openai-whisper's meaning).
    temperature, seed: sample from softmax(logits / temperature), reproducibly with a seed.
    prompt: previous text (str or token ids) after <|startofprev|>, for every clip, or a list with one
        per clip (None: no prompt for that clip). prefix: forced start of the transcript.
    suppress_tokens: ids or "1,2,3"; "-1" adds the non-speech symbols. suppress_blank: no blank first token.
    max_initial_timestamp: latest first timestamp in seconds (None: any). compile: torch.compile the step.
    decoder_blocks: run only the first n decoder blocks (the rest skipped, as ``Edits().skip``), for
        every clip, or one n per clip, never increasing from clip to clip: clips at different depths
        decode in one batch (a block runs on the clips that use it). Not with ``trace``.
    clips: decode these clips, one row each (default: every clip once, in order), e.g.
        ``clips=[0, 1, 0, 1]`` decodes two clips twice, under settings given per row. Rows of one
        clip share its audio: it is encoded once and its keys and values are computed and read once
        per step, not once per row. The per-clip options above (language, prompt, decoder_blocks)
        then take one entry per row, and one result is returned per row.
    speculative: greedy decoding (temperature 0, no beams, no trace or edits) with a bf16 draft's guesses
        checked by the fp32 model, several tokens per fp32 pass where a one-off timing on this machine says
        it pays (``speculative.py``); the results are the plain loop's (up to float rounding, ~1e-6).
    Returns one ``DecodingResult`` per clip (per row with ``clips``).
    """
    options = DecodingOptions(
        beam_size=beam_size, patience=patience, length_penalty=length_penalty, temperature=temperature, seed=seed,
        max_new_tokens=max_new_tokens, language=language, task=task, timestamps=timestamps, prompt=prompt,
        prefix=prefix, suppress_tokens=suppress_tokens, suppress_blank=suppress_blank,
        max_initial_timestamp=max_initial_timestamp, compile=compile, decoder_blocks=decoder_blocks, clips=clips,
        speculative=speculative,
    )  # fmt: skip
    rec = model.recorder(trace, edits)
    if decoder_blocks is not None and rec.keep:
        raise ValueError("decoder_blocks cannot be traced (clips at different depths): trace each depth in its own "
                         "call, with Edits().skip")  # fmt: skip
    check_step_edits(model, edits)
    audio = checked_audio(model, mel, audio_features, rec)  # (C, n_mels, frames) or (C, S, D)
    if clips is not None and max(clips) >= len(audio):
        raise ValueError(f"clips has {max(clips)}, but the batch has {len(audio)} clips (0-{len(audio) - 1})")
    plan = make_plan(model, options, n_clips=audio.shape[0] if clips is None else len(clips))
    xa = model.encoder(audio, rec.child("encoder")) if mel is not None else audio  # (C, S, D)
    d = prefill(model, plan, options, xa, rec)
    draft = speculative_draft(d)
    if draft is not None:  # several tokens per fp32 pass, the same results
        return finish(d, n_sel=speculation.speculate(d, draft)[0])
    forward = step_function(d)
    check_every = 1 if xa.device.type == "cpu" else CUDA_CHECK_EVERY
    steps = d.search.tokens.shape[1]
    for i in range(steps):
        select(d, i)
        finished = i + 1 == steps or ((i + 1) % check_every == 0 and bool(d.search.done.all()))
        if finished and not d.tracing:
            break
        step(d, i, forward)
        if finished:  # the last step only recorded the final token's activations
            break
    return finish(d, n_sel=i + 1)


def speculative_draft(d: Decoding) -> speculation.Draft | None:
    """The draft that speculation uses for this call, or None: not asked for, not greedy, or not paying here."""
    if not (d.options.speculative and speculation.applies(d.options, d.rec)):
        return None
    return speculation.chosen_draft(d.model, len(d.search.tokens))


def segments(
    tokens: Sequence[int], tokenizer, n_audio_ctx: int = 1500, duration: float | None = None
) -> list[tuple[float, float, str]]:
    """Split timestamped tokens into (start s, end s, text) segments: text between a pair of timestamps.

    A timestamp token counts 20 ms steps (``TIME_PRECISION``: one encoder position) from the start
    of the window, whatever the window's length; the window holds ``n_audio_ctx`` positions
    (30 s for the official models, 4 s for the shipped toy). A trailing lone timestamp (the
    model's "the rest continues later") closes no segment; text after the last timestamp becomes
    a segment ending where the audio ends: ``duration`` seconds, or the end of the window.
    """
    end_of_audio = n_audio_ctx * TIME_PRECISION if duration is None else min(duration, n_audio_ctx * TIME_PRECISION)
    ts = tokenizer.timestamp_begin
    out: list[tuple[float, float, str]] = []
    start, text_ids = None, []
    for t in tokens:
        if t >= ts:
            time = (t - ts) * TIME_PRECISION
            if start is None:
                start = time
            else:
                out.append((start, time, tokenizer.decode(text_ids).strip()))
                start, text_ids = None, []
        else:
            text_ids.append(t)
    if text_ids:
        out.append((start or 0.0, end_of_audio, tokenizer.decode(text_ids).strip()))
    return out
