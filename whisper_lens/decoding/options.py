"""``generate``'s options, checked once (``DecodingOptions``), and the plan made from them with the model (``Plan``)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..audio import TIME_PRECISION

if TYPE_CHECKING:
    from ..model import Whisper

DEFAULT_MAX_NEW = 224  # openai-whisper's sample_len for every official model (n_text_ctx // 2)

Prompt = str | Sequence[int] | None  # text, or token ids


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
    speculative: bool = False  # greedy: a bf16 or int8 draft's guesses checked by the fp32 model (speculative.py)

    def __post_init__(self) -> None:
        for name in ("beam_size", "max_new_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool)):
                raise TypeError(f"{name} must be an int or None, got {value!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:  # what torch.Generator takes
            raise ValueError(f"seed must be an int from -2**63 to 2**64 - 1 or None, got {self.seed!r}")
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
        if not isinstance(self.suppress_tokens, Iterator):  # (an iterator is read once, by make_plan)
            suppress_ids(self.suppress_tokens)  # their form (their range needs the model: make_plan)

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
    from .depths import clip_depths  # (depths.py reads per_clip from here)

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


def suppress_ids(suppress_tokens: object) -> list[int]:
    """``suppress_tokens`` as token ids: text like '-1,220', a list of ints, or None (none); else a one-line error."""
    if suppress_tokens is None:
        return []
    if isinstance(suppress_tokens, str):
        try:
            return [int(t) for t in suppress_tokens.split(",") if t.strip()]
        except ValueError:
            raise ValueError(
                f"suppress_tokens must be comma-separated ints like '-1,220', got {suppress_tokens!r}"
            ) from None
    ids = list(suppress_tokens) if isinstance(suppress_tokens, Iterable) else None
    if ids is None or any(isinstance(t, bool) or not isinstance(t, int | np.integer) for t in ids):
        raise ValueError(f"suppress_tokens must be token ids (a list of ints, or text like '-1,220'), "
                         f"got {suppress_tokens!r}")  # fmt: skip
    return [int(t) for t in ids]


def suppressed(model: Whisper, suppress_tokens: str | Iterable[int] | None) -> tuple[int, ...]:
    """The tokens always forbidden: those asked for (``-1``: the non-speech symbols) and the prompt-only specials."""
    tok = model.tokenizer
    ids = suppress_ids(suppress_tokens)
    suppress = {t for t in ids if t != -1}
    bad = [t for t in suppress if not 0 <= t < model.dims.n_vocab]
    if bad:
        raise ValueError(f"suppress_tokens has {bad[0]}, outside the vocabulary [0, {model.dims.n_vocab})")
    if -1 in ids:
        suppress.update(tok.non_speech_tokens)
    suppress.update([tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech])
    if len(suppress) >= model.dims.n_vocab:  # every step would choose among -inf: token 0, for ever, as NaN
        raise ValueError(f"suppress_tokens leaves no token of the {model.dims.n_vocab} to decode: suppress fewer")
    return tuple(sorted(suppress))


def max_initial_index(model: Whisper, options: DecodingOptions) -> int | None:
    """The last timestamp index the first token may be (``max_initial_timestamp`` in 20 ms steps), or None."""
    if not options.timestamps or options.max_initial_timestamp is None:
        return None
    return round(options.max_initial_timestamp / TIME_PRECISION)
