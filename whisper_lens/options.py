"""Every option of ``transcribe`` and of the ``transcribe`` command, defined once: name, default, check, docstring.

One ``Option`` per name. ``transcribe``'s signature and docstring, the checks its arguments go
through and the command line's flags are all made from the table below, so an option's default
or meaning cannot differ between the Python call and the command line (where the command line
deliberately differs, as openai-whisper's does: beam search by default, ``cli_default`` says so).

The names are openai-whisper's (``transcribe``'s keywords and its ``DecodingOptions``), and the
command line accepts each under openai-whisper's spelling (``--beam_size 5``,
``--word_timestamps True``) as well as the usual one (``--beam-size 5``, ``--word-timestamps``).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from .alignment import APPEND_PUNCTUATIONS, PREPEND_PUNCTUATIONS
from .decoding.options import DecodingOptions

# generate's options (decoding/options.py's DecodingOptions): the defaults transcribe passes through are its own,
# and the values are checked by building one DecodingOptions (``decoding_options``), so neither is restated here.
GENERATE = {f.name: f.default for f in fields(DecodingOptions)}
# openai-whisper's DecodingOptions names that generate spells otherwise
TO_GENERATE = {"sample_len": "max_new_tokens"}

SAME = object()  # cli_default: the command line's default is the Python default


# ----------------------------------------------------------------------------- checks (each returns the value)


def anything(name: str, value):
    return value


def boolean(name: str, value):
    if not isinstance(value, bool | int) or value not in (0, 1):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def boolean_or_none(name: str, value):
    return None if value is None else boolean(name, value)


def number(low: float = -math.inf, high: float = math.inf, optional: bool = False, integer: bool = False):
    """A check for a finite number in [low, high] (an int if ``integer``), or None if ``optional``: NaN, inf
    and numbers written as text ("0.5") are refused, never compared or used."""

    def check(name: str, value):
        if value is None and optional:
            return None
        kinds = int if integer else int | float
        finite = isinstance(value, kinds) and not isinstance(value, bool) and abs(value) < math.inf  # not NaN or inf
        if not (finite and low <= value <= high):
            what = "an int" if integer else "a finite number"
            span = f" from {low} to {high}" if high < math.inf else f" >= {low}" if low > -math.inf else ""
            raise ValueError(f"{name} must be {what}{span}{' or None' if optional else ''}, got {value!r}")
        return value if integer else float(value)

    return check


def text(optional: bool = True):
    def check(name: str, value):
        if value is None and optional:
            return None
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text{' or None' if optional else ''}, got {value!r}")
        return value

    return check


def choice(*values):
    def check(name: str, value):
        if value not in values:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, values))}, got {value!r}")
        return value

    return check


def temperatures(name: str, value) -> tuple[float, ...]:
    found = (value,) if isinstance(value, int | float) and not isinstance(value, bool) else value
    try:
        found = tuple(found)
    except TypeError:
        found = ()
    if not found or any(isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t < math.inf for t in found):
        raise ValueError(f"{name} must be a number >= 0 or a non-empty sequence of them, got {value!r}")
    return tuple(float(t) for t in found)


def clip_timestamps(name: str, value) -> tuple[float, ...]:
    """openai-whisper's form: "start,end,start,end,..." in seconds (or a list of numbers); "0": everything."""
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()] if value.strip() else []
        try:
            value = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{name} must be comma-separated seconds like '0,10,20,30', got {value!r}") from None
    if not isinstance(value, Sequence) or any(isinstance(t, bool) or not isinstance(t, int | float) for t in value):
        raise ValueError(f"{name} must be a list of seconds or text like '0,10,20,30', got {value!r}")
    if any(not 0 <= t < math.inf for t in value) or any(b < a for a, b in zip(value, value[1:], strict=False)):
        raise ValueError(f"{name} must be increasing seconds >= 0, got {list(value)}")
    return tuple(float(t) for t in value)


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Option:
    """One option: its name (openai-whisper's where it has one), default, check and docstring.

    ``cli``: how the command line takes it: "value" (``--name VALUE``), "bool" (``--name True|False``
    as openai-whisper, and ``--name`` / ``--no-name`` as flags), or None (Python only).
    ``parse``: the command line's conversion of VALUE. ``cli_default``: the command line's default,
    where it deliberately differs from the Python call's (``SAME`` otherwise).
    """

    name: str
    default: object
    doc: str
    check: Callable = anything
    cli: str | None = "value"
    parse: Callable | None = str
    cli_default: object = SAME
    choices: tuple | None = None

    @property
    def command_line_default(self):
        return self.default if self.cli_default is SAME else self.cli_default


def optional(kind):
    """A command-line parser for openai-whisper's optional values: "None" -> None."""

    def parse(value: str):
        return None if value == "None" else kind(value)

    parse.__name__ = f"optional {kind.__name__}"
    return parse


FALLBACK = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)

TRANSCRIBE: tuple[Option, ...] = (
    Option(
        "verbose",
        None,
        "True: print each segment as it is decoded; False: a progress bar; None: nothing.",
        anything,
        cli=None,
    ),
    Option(
        "temperature",
        FALLBACK,
        "The temperatures tried in turn on a window whose decoding fails the "
        "thresholds (0: greedy or beam search; above 0: sampling, best_of samples, seeded by seed).",
        temperatures,
        cli=None,
    ),
    Option(
        "compression_ratio_threshold",
        2.4,
        "A decoding whose gzip compression ratio is above this is too "
        "repetitive: decode again at the next temperature (None: never).",
        number(0, optional=True),
        parse=optional(float),
    ),
    Option(
        "logprob_threshold",
        -1.0,
        "A decoding whose mean log-probability is below this is too unsure: decode "
        "again at the next temperature (None: never).",
        number(optional=True),
        parse=optional(float),
    ),
    Option(
        "no_speech_threshold",
        0.6,
        "A window whose <|nospeech|> probability is above this, and whose decoding "
        "is below logprob_threshold, is silence: skipped (None: never).",
        number(0, 1, optional=True),
        parse=optional(float),
    ),
    Option(
        "condition_on_previous_text",
        None,
        "Give each window the text so far as prompt (not after a decoding above temperature 0.5); None: the "
        "model's default (True; False for the shipped toy, by its config).",
        boolean_or_none,
        cli="bool",
    ),
    Option("initial_prompt", None, "Text given as the prompt of the first window (names, spelling, style).", text()),
    Option(
        "carry_initial_prompt",
        False,
        "Put initial_prompt before the prompt of every window, not only the "
        "first; the previous text is cut from its start to leave it room.",
        boolean,
        cli="bool",
    ),
    Option(
        "word_timestamps",
        False,
        "Time every word from the alignment heads' cross-attention (DTW); segments "
        "get words, and their bounds follow them.",
        boolean,
        cli="bool",
    ),
    Option(
        "prepend_punctuations",
        PREPEND_PUNCTUATIONS,
        "With word_timestamps: these join the word after them.",
        text(False),
    ),
    Option(
        "append_punctuations",
        APPEND_PUNCTUATIONS,
        "With word_timestamps: these join the word before them.",
        text(False),
    ),
    Option(
        "clip_timestamps",
        "0",
        "Only these stretches: 'start,end,start,end,...' in seconds (or a list); a "
        "missing last end is the end of the recording.",
        clip_timestamps,
    ),
    Option(
        "hallucination_silence_threshold",
        None,
        "With word_timestamps: where a segment looks hallucinated "
        "(improbable, too short or too long words), skip silences longer than this many seconds around it.",
        number(0, optional=True),
        parse=optional(float),
    ),
    # openai-whisper's DecodingOptions, passed through
    Option(
        "language",
        GENERATE["language"],
        "Language code or name; None: detected once per recording from its first window "
        "(English for English-only models).",
        text(),
    ),
    Option(
        "task",
        GENERATE["task"],
        "transcribe, or translate (into English).",
        choice("transcribe", "translate"),
        choices=("transcribe", "translate"),
    ),
    Option(
        "beam_size",
        GENERATE["beam_size"],
        "Beam search with this many beams at temperature 0 (None: greedy); refused where no temperature is 0.",
        number(1, optional=True, integer=True),
        parse=optional(int),
        cli_default=5,
    ),
    Option(
        "best_of",
        None,
        "Samples drawn at each temperature above 0; the likeliest is kept (None: 1).",
        number(1, optional=True, integer=True),
        parse=optional(int),
        cli_default=5,
    ),
    Option(
        "patience",
        GENERATE["patience"],
        "Beam search's patience (openai-whisper's meaning; None: 1.0).",
        number(0, optional=True),
        parse=optional(float),
    ),
    Option(
        "length_penalty",
        GENERATE["length_penalty"],
        "Beam ranking's length penalty alpha (None: the mean log-probability).",
        number(0, 1, optional=True),
        parse=optional(float),
    ),
    Option(
        "sample_len",
        GENERATE["max_new_tokens"],
        "The most tokens a window may take (None: 224, half the context).",
        number(1, optional=True, integer=True),
        parse=optional(int),
    ),
    Option("prefix", GENERATE["prefix"], "Text forced at the start of every window's transcript.", text()),
    Option(
        "suppress_tokens",
        GENERATE["suppress_tokens"],
        "Token ids never sampled, as '1,2,3' or a list; '-1' adds the non-speech symbols.",
        anything,
    ),
    Option("suppress_blank", GENERATE["suppress_blank"], "Never start a transcript with a blank.", boolean, cli="bool"),
    Option(
        "without_timestamps",
        None,
        "Decode text only: each window is one segment and the next starts where it ends; None: the model's "
        "default (False; True for the shipped toy, trained without timestamps, by its config).",
        boolean_or_none,
        cli="bool",
    ),
    Option(
        "max_initial_timestamp",
        GENERATE["max_initial_timestamp"],
        "The first timestamp of a window is at most this many seconds.",
        number(0, optional=True),
        parse=optional(float),
    ),
    Option(
        "fp16",
        None,
        "Half precision: on the CPU, True warns and runs fp32 (as openai-whisper); None: the "
        "model's dtype. Load the model in float16 on CUDA for fp16.",
        boolean_or_none,
        cli="bool",
        cli_default=True,
    ),
    # ours
    Option(
        "word_timing",
        "pass",
        "'pass': one decoder pass per window over its text, openai-whisper's numbers; "
        "'decoding': the patterns recorded while decoding (no extra pass; the words differ slightly).",
        choice("pass", "decoding"),
        choices=("pass", "decoding"),
    ),
    Option(
        "alignment_heads", None, "(layer, head) pairs to time words with (default: the model's).", anything, cli=None
    ),
    Option(
        "skip_silence",
        True,
        "Skip windows with nothing within 80 dB of the peak (digital silence) undecoded, "
        "where openai-whisper decodes them and may write 'you'.",
        boolean,
        cli=None,
    ),
    Option("batch_size", 8, "Recordings decoded together (a list of audio).", number(1, integer=True), parse=int),
    Option(
        "seed",
        0,
        "Seed of the sampling above temperature 0: a window's samples depend only on it and the window's position "
        "(None: unseeded, as generate's seed=None: each run samples anew).",
        number(integer=True, optional=True),
        parse=optional(int),
    ),
    Option(
        "trace",
        None,
        "Activations to record in every window (Transcript.windows[k].trace): True or glob patterns.",
        anything,
        cli=None,
    ),
    Option("edits", None, "Interventions (wl.Edits) applied in every window.", anything, cli=None),
    Option("progress", False, "A progress bar over the audio (stderr).", boolean, cli=None),
    Option(
        "speculative",
        False,
        "The greedy (temperature 0) passes decode speculatively, as generate(speculative=True): the same results.",
        boolean,
        cli=None,
    ),
)
BY_NAME = {o.name: o for o in TRANSCRIBE}


def checked(options: dict, table: dict[str, Option] = BY_NAME, what: str = "transcribe") -> dict:
    """Every option of the table with its value: given (checked), else its default. Unknown names are refused."""
    for name in options:
        if name not in table:
            close = difflib.get_close_matches(name, list(table), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{what}() got an unexpected keyword argument {name!r}{hint}")
    return {name: o.check(name, options.get(name, o.default)) for name, o in table.items()}


def check_together(values: dict) -> None:
    """Options that contradict each other, refused before any work as ``generate`` refuses them.

    ``beam_size`` acts only at temperature 0: given with temperatures none of which is 0, it would
    be ignored without a word (``generate(beam_size=5, temperature=0.5)`` is refused too).
    """
    temps, beam = values["temperature"], values["beam_size"]
    if beam is not None and min(temps) > 0:
        shown = ", ".join(f"{t:g}" for t in temps)
        shown = shown if len(temps) == 1 else f"({shown})"
        raise ValueError(f"beam_size={beam} is used only at temperature 0, and temperature={shown} has no 0: give a "
                         "temperature of 0 (beam search, sampling as the fallback) or leave out beam_size")  # fmt: skip


def decoding_options(values: dict) -> DecodingOptions:
    """The options of ``values`` that ``generate`` takes, checked by ``DecodingOptions`` itself (at temperature 0,
    beam search's options included: transcribe uses them there)."""
    shared = {TO_GENERATE.get(name, name): value for name, value in values.items()}
    return DecodingOptions(**{name: shared[name] for name in GENERATE if name in shared and name != "temperature"})


def signature(prefix: list[inspect.Parameter], table: tuple[Option, ...] = TRANSCRIBE) -> inspect.Signature:
    """A function's signature: ``prefix`` then every option of ``table`` as a keyword with its default."""
    kw = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in table]
    return inspect.Signature(prefix + kw)


def docs(table: tuple[Option, ...] = TRANSCRIBE) -> str:
    """The options' part of a docstring: one paragraph per option."""
    return "\n".join(f"    {o.name} (default {o.default!r}): {o.doc}" for o in table)
