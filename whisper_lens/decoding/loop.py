"""The generate loop: prefill, then select and step until every row is done, then the results.

``generate`` checks its options once (``options.py``), encodes the audio, fills the caches and
runs the prompts (``prefill``), then alternates ``select`` (the filters and the search choose each
row's token) and ``step`` (each row's token through the decoder at its position). A step is one
function, ``forward``: the decoder's final stream (``TextDecoder.stream``), unembedded by the
call's ``Kernels``. What varies wraps it (``step_function``): a recorder per step when tracing,
``torch.compile``, or row compaction (``rows.py``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..inputs import check_audio_features, check_mel
from ..model import Whisper
from ..trace import IDLE, Edits, Recorder, Trace, TraceRequest
from . import speculative as speculation
from .cache import DecoderCache, new_cache
from .depths import rows_per_block, stream_at_depths
from .filters import filter_logits, nonfinite
from .options import DecodingOptions, Plan, make_plan
from .packed import Kernels
from .results import DecodingResult, finish
from .rows import compacted, drops_done_rows
from .search import Search, new_search, select_beams, select_greedy, stop_at_limits
from .traces import check_step_edits, pass_recorder

CUDA_CHECK_EVERY = 8  # on CUDA, look at the "all finished" flag every 8 steps (on CPU, every step)


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
    broken: Tensor  # () bool on the device: did any logits computed so far hold NaN or inf (read once, at the end)
    live: Tensor | None = None  # (L,) the rows the cache holds and a step computes (None: all N, fixed shapes)
    step: Callable[[Tensor, Tensor], Tensor] | None = None  # (tokens (N, 1), pos) -> logits (N, V): step_function

    @property
    def tracing(self) -> bool:
        return bool(self.rec.keep)


@dataclass
class Clips:
    """What each clip's prompt pass found: the language (given or identified) and p(<|nospeech|>) at sot."""

    languages: list[str | None]
    language_probs: list[dict[str, float] | None]  # None where the language was given
    no_speech: list[float]


def prefill(model: Whisper, plan: Plan, options: DecodingOptions, xa: Tensor, rec: Recorder) -> Decoding:
    """Everything before the first selection: caches, language identification, the prompts in one pass."""
    G, K, dev = len(plan.prompts), options.beam_size or 1, xa.device
    lengths = [len(p) for p in plan.prompts]
    length = max(n + m for n, m in zip(lengths, plan.max_new, strict=True))  # the call's longest sequence
    ops = Kernels() if options.compile else Kernels.for_decoding(model.decoder, G * K)
    rows = None if plan.depth is None else rows_per_block(plan.depth, model.dims.n_text_layer)
    clips = None if options.clips is None else torch.tensor(options.clips, device=dev)  # (G,): each row's clip
    cache = new_cache(model.decoder, xa, length, rec.child("decoder"), rows, clips)  # audio k/v once per clip
    languages, language_probs, prompts = identify_languages(model, plan, cache, ops, rec.edits)
    r = pass_recorder(rec)
    tokens = torch.tensor(prompts, device=dev)  # (G, T0): each prompt padded at its end to the longest
    ends = [n - 1 for n in lengths]  # a prompt's last position predicts the first token
    at = None if r.wants("logits") else torch.tensor([plan.sot_index, ends], device=dev).T  # (G, 2): only those read
    logits = forward(model.decoder, ops, tokens, all_positions(tokens), cache, r, at)  # (G, T0 or 2, V)
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
    d = Decoding(model, plan, options, rec, ops, cache, search, start, last, clips,
                 steps=[r.trace] if rec.keep else [], generator=gen,
                 vocab=torch.arange(model.dims.n_vocab, device=dev), broken=nonfinite(last), live=live)  # fmt: skip
    d.step = step_function(d)
    return d


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
        logits = forward(model.decoder, ops, sot, all_positions(sot), cache, r)[:, 0]  # (G, V)
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


def step(d: Decoding, i: int) -> None:
    """Feed each row's token of selection ``i`` at its position; keep the next logits (and the step's trace)."""
    tokens = d.search.tokens[:, i : i + 1]  # (N, 1)
    pos = (d.start + i).clamp(max=d.cache.length - 1)  # (N or 1, 1): a row done at its limit goes no further
    d.last = d.step(tokens, pos)  # (N, V)


def forward(decoder, ops: Kernels, tokens: Tensor, pos: Tensor, cache: DecoderCache, rec: Recorder = IDLE,
            at: Tensor | None = None) -> Tensor:  # fmt: skip
    """The one step of decoding: ``tokens`` (N, T) at positions ``pos`` (N or 1, T) through the decoder over
    ``cache``, then the unembedding by ``ops``: logits (N, T, V). ``at`` (N, P): only those positions' logits."""
    stream = decoder.stream if not cache.depths else functools.partial(stream_at_depths, decoder)
    x, _ = stream(tokens, rec.child("decoder"), cache=cache, pos=pos)  # (N, T, D)
    if at is not None:  # a prompt's pass reads the logits at two positions: only those are unembedded
        x = x[torch.arange(len(x), device=x.device)[:, None], at]  # (N, P, D)
    logits = ops.linear(x, decoder.token_embedding).float() if ops.packed else decoder.unembed(x)  # (N, T or P, V)
    return rec("logits", logits)  # (N, T or P, V)


def step_function(d: Decoding) -> Callable[[Tensor, Tensor], Tensor]:
    """The call's step (tokens (N, 1), pos (N or 1, 1)) -> logits (N, V): ``forward`` over the call's cache,
    wrapped as the call asks: a recorder per step (traced or edited), compiled (one fixed shape), or on
    the rows not done yet (``rows.compacted``). Whichever it is, the logits it computes are checked for
    NaN and inf into ``d.broken`` (on the device, read once when the loop ends)."""

    def checked(compute: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def step(*args, **kwargs) -> Tensor:
            logits = compute(*args, **kwargs)  # (N, T, V): fresh, before any filter writes -inf into them
            d.broken |= nonfinite(logits)
            return logits

        return step

    if d.rec.active:
        recorded = checked(forward)

        def traced(tokens: Tensor, pos: Tensor) -> Tensor:
            r = pass_recorder(d.rec)
            logits = recorded(d.model.decoder, d.ops, tokens, pos, d.cache, r)[:, 0]  # (N, V)
            if d.tracing:
                d.steps.append(r.trace)
            return logits

        return traced
    if d.live is not None:
        return compacted(d, checked(forward))
    plain = checked(torch.compile(forward, dynamic=False) if d.options.compile else forward)
    return lambda tokens, pos: plain(d.model.decoder, d.ops, tokens, pos, d.cache)[:, 0]  # (N, V)


def checked_audio(model: Whisper, mel: Tensor | None, audio_features: Tensor | None) -> Tensor:
    """The mel (G, n_mels, frames) or the encoder output (G, S, D) to decode, checked and on the model."""
    if mel is not None:
        return check_mel(mel, model.dims, model.device, model.dtype)
    return check_audio_features(audio_features, model.dims, model.device, model.dtype)


@torch.no_grad()
def generate(
    model: Whisper,
    mel: Tensor | None = None,
    *,
    audio_features: Tensor | None = None,
    trace: TraceRequest = None,
    edits: Edits | None = None,
    **options,
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
    speculative: greedy decoding (temperature 0, no beams, traces, edits or depths) where a bf16 or int8 draft's
        guesses are checked by the fp32 model, several tokens per fp32 pass, when a one-off timing on this
        machine says it pays (``speculative.py``); the results are the plain loop's (up to float rounding).
    Returns one ``DecodingResult`` per clip (per row with ``clips``).
    """
    options = decoding_options(options)  # the keywords are DecodingOptions' fields: defined, defaulted, checked there
    decoder_blocks, clips = options.decoder_blocks, options.clips
    if (mel is None) == (audio_features is None):
        raise ValueError("give either mel or audio_features (the encoder's output), not both or neither")
    rec = model.recorder(trace, edits, encoder=mel is not None)
    if decoder_blocks is not None and rec.keep:
        raise ValueError("decoder_blocks cannot be traced (clips at different depths): trace each depth in its own "
                         "call, with Edits().skip")  # fmt: skip
    check_step_edits(model, edits)
    audio = checked_audio(model, mel, audio_features)  # (C, n_mels, frames) or (C, S, D)
    if clips is not None and max(clips) >= len(audio):
        raise ValueError(f"clips has {max(clips)}, but the batch has {len(audio)} clips (0-{len(audio) - 1})")
    plan = make_plan(model, options, n_clips=audio.shape[0] if clips is None else len(clips))
    if edits is not None and edits.counts_generated:  # Edits.generated(k): positions after the prompt
        lengths = {len(p) for p in plan.prompts}
        if len(lengths) > 1:
            raise ValueError("Edits.generated(k) needs prompts of one length; with prompts of several lengths "
                             "give absolute positions")  # fmt: skip
        rec = model.recorder(trace, edits.after_prompt(lengths.pop()), encoder=mel is not None)
    xa = model.encoder(audio, rec.child("encoder")) if mel is not None else audio  # (C, S, D)
    if mel is not None and not bool(torch.isfinite(xa).all()):
        raise non_finite(model, edits, "the encoder's output")
    d = prefill(model, plan, options, xa, rec)
    draft = speculative_draft(d)
    if draft is not None:  # several tokens per fp32 pass, the same results
        if bool(d.broken):
            raise non_finite(model, edits, "the decoder's logits")
        n_sel, _ = speculation.speculate(d, draft)
        if bool(d.broken):
            raise non_finite(model, edits, "the decoder's logits")
        return finish(d, n_sel=n_sel)
    check_every = 1 if xa.device.type == "cpu" else CUDA_CHECK_EVERY
    steps = d.search.tokens.shape[1]
    for i in range(steps):
        select(d, i)
        finished = i + 1 == steps or ((i + 1) % check_every == 0 and bool(d.search.done.all()))
        if finished and not d.tracing:
            break
        step(d, i)
        if finished:  # the last step only recorded the final token's activations
            break
    if bool(d.broken):  # a token chosen from NaN logits is noise: no result rather than a silently wrong one
        raise non_finite(model, edits, "the decoder's logits")
    return finish(d, n_sel=i + 1)


def decoding_options(options: dict) -> DecodingOptions:
    """``DecodingOptions(**options)``, with an unknown keyword named beside the closest option."""
    names = [f.name for f in dataclasses.fields(DecodingOptions)]
    for name in options:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; the options are {', '.join(names)}"
            raise TypeError(f"generate() got an unexpected keyword argument {name!r}{hint}")
    return DecodingOptions(**options)


def non_finite(model: Whisper, edits: Edits | None, what: str) -> ValueError:
    """The error for NaN or infinite values met while decoding, naming their source: weights, edits, or audio."""
    weight = next((n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if weight is not None:
        return ValueError(f"{what} became NaN or infinite: the weight {weight} holds NaN or infinite values (the "
                          "weights; reload the model)")  # fmt: skip
    if edits:
        names = ", ".join(list(edits.ops)[:3]) or "skipped blocks"
        return ValueError(f"{what} became NaN or infinite under the edits ({names}): an edit drives the activations "
                          "out of range")  # fmt: skip
    return ValueError(f"{what} became NaN or infinite from the audio: values out of the model's range (samples far "
                      f"outside [-1, 1]?) in {model.dtype}")  # fmt: skip


def speculative_draft(d: Decoding) -> speculation.Draft | None:
    """The draft speculation decodes this call with, or None: not asked for, not greedy, or none pays here."""
    if not (d.options.speculative and speculation.applies(d.options, d.rec)):
        return None
    return speculation.chosen_draft(d.model, len(d.search.tokens))


generate.__signature__ = inspect.signature(generate).replace(
    parameters=[
        *list(inspect.signature(generate).parameters.values())[:-1],
        *(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in dataclasses.fields(DecodingOptions)
        ),
    ]
)
