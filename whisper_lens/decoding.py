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
The audio is encoded once and every decoder layer's cross-attention keys/values are computed once
(``TextDecoder.new_cache``). Self-attention keys/values go into static buffers
``[layers, batch, heads, length, Dh]`` (the values stored transposed, ``[..., Dh, length]``, as the
audio's: ``KVCache``), ``length`` = prompt + max_new_tokens (the longest sequence the call can
produce, at most ``n_text_ctx``); each step writes its position in place and attends over the
buffer under a mask, so the step has one fixed shape and takes its position as a tensor
(torch.compile and CUDA graphs can capture it). On the CPU, while a batch of 2 to 64 rows decodes,
the decoder's weights are used in oneDNN's packed layout (``packed_weights``), copied for the call.
Beams are rows of the batch (``batch * beam_size`` rows); the logit filters and beam bookkeeping
are tensor operations, so the host waits on the device only for the "is everything finished?"
check. A row (or an audio's group of beams) that has finished stops changing, so decoding clips
together gives each clip the tokens it gets alone.

With ``trace=`` the activations of each step are recorded and, at the end, stitched along the
positions of the chosen sequence (following a beam's ancestry back through the reorderings), so
``results[i].trace`` equals ``model.run(mel[i], initial + tokens, trace=...)``: the trace of the
final sequence run teacher-forced.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio import TIME_PRECISION
from .model import IDLE, KVCache, Whisper, packed_weights
from .trace import Edits, Recorder, Trace, TraceRequest

DEFAULT_MAX_NEW = 224  # openai-whisper's sample_len for every official model (n_text_ctx // 2)
CUDA_CHECK_EVERY = 8  # on CUDA, look at the "all finished" flag every 8 steps (on CPU, every step)


@dataclass
class DecodingResult:
    """One clip's decoded transcript, as openai-whisper's ``DecodingResult``.

    ``tokens`` are the sampled tokens only: no prompt, no prefix, no final EOT. ``avg_logprob`` is
    the sum of their log-probabilities (EOT included) divided by ``len(tokens) + 1``.
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
    trace: Trace | None = None


def compression_ratio(text: str) -> float:
    """UTF-8 size of ``text`` over its zlib-compressed size: high (> 2.4) for repetitive loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Plan:
    """Everything decided before the first step: the prompt and the filters."""

    initial: tuple[int, ...]  # the prompt fed before sampling (language slot filled in per clip if detected)
    sot_index: int  # where <|startoftranscript|> sits in it
    detect_language: bool  # fill initial[sot_index + 1] from the language identification
    language: str | None
    max_new: int  # the most tokens sampled (EOT included)
    suppress: tuple[int, ...]  # always forbidden
    blank: tuple[int, ...]  # forbidden at the first step (empty when suppress_blank is off)
    timestamps: bool
    max_initial_index: int | None  # last timestamp index allowed first, or None for any


def make_plan(
    model: Whisper,
    *,
    max_new_tokens: int | None,
    language: str | None,
    task: str,
    timestamps: bool,
    prompt: str | Sequence[int] | None,
    prefix: str | Sequence[int] | None,
    suppress_tokens: str | Iterable[int] | None,
    suppress_blank: bool,
    max_initial_timestamp: float | None,
) -> Plan:
    """Build the prompt and the token sets of the logit filters, checking every option."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(
            "this model has no tokenizer; load it with load_model(..., tokenizer=path to a .tiktoken file or HF dir)"
        )
    n_ctx = model.dims.n_text_ctx
    detect = tok.multilingual and language is None
    if tok.multilingual:
        sot_seq = tok.sot_sequence_for(language or "en", task)
    else:
        sot_seq = tok.sot_sequence_for(language, task if task != "transcribe" else None)
        language = "en"
    if not timestamps:
        sot_seq = (*sot_seq, tok.no_timestamps)

    def as_tokens(x: str | Sequence[int], what: str) -> list[int]:
        ids = tok.encode(" " + x.strip()) if isinstance(x, str) else [int(t) for t in x]
        top = tok.n_vocab if what == "prompt" else tok.eot  # a prompt is a previous transcript, whatever it holds
        bad = [t for t in ids if not 0 <= t < top]
        if bad:
            raise ValueError(
                f"{what} token {bad[0]} is not a text token (text tokens are 0..{tok.eot - 1})"
                if what != "prompt"
                else f"prompt token {bad[0]} is outside the vocabulary [0, {top})"
            )
        return ids

    initial = list(sot_seq)
    if prefix:
        initial += as_tokens(prefix, "prefix")
    if prompt:
        prompt_ids = as_tokens(prompt, "prompt")
        limit = n_ctx // 2 - 1
        if len(prompt_ids) > limit:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; at most {limit} fit (Whisper gives previous text half "
                f"of its {n_ctx}-token context): pass only its last {limit} tokens"
            )
        initial = [tok.sot_prev, *prompt_ids, *initial]

    room = n_ctx - len(initial)
    if max_new_tokens is None:  # openai-whisper's n_text_ctx // 2 = 224; a smaller context may use what is left
        max_new = min(max(n_ctx // 2, DEFAULT_MAX_NEW), room)
    else:
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if max_new_tokens > room:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} does not fit: the prompt uses {len(initial)} of the model's "
                f"{n_ctx} text positions, leaving {room}"
            )
        max_new = max_new_tokens
    if max_new < 1:
        raise ValueError(f"the prompt and prefix ({len(initial)} tokens) fill the whole {n_ctx}-token context")

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

    max_initial_index = None
    if timestamps and max_initial_timestamp:
        max_initial_index = round(max_initial_timestamp / TIME_PRECISION)
    return Plan(
        initial=tuple(initial),
        sot_index=initial.index(tok.sot),
        detect_language=detect,
        language=language,
        max_new=max_new,
        suppress=tuple(sorted(suppress)),
        blank=tuple(tok.encode(" ") + [tok.eot]) if suppress_blank else (),
        timestamps=timestamps,
        max_initial_index=max_initial_index,
    )


# ----------------------------------------------------------------------------- logit filters


def filter_logits(logits: Tensor, tokens: Tensor, cur: int, plan: Plan, tok, vocab: Tensor) -> Tensor:
    """Forbid (set to -inf) what the rules forbid at position ``cur``. ``logits`` (N, V), ``tokens`` (N, n_ctx).

    ``tokens[:, :cur]`` holds each row's sequence so far; ``vocab`` is ``arange(V)`` on the device.
    All rules are tensor operations over the rows (no loop, no host sync).
    """
    start = len(plan.initial)
    first = cur == start
    if first and plan.blank:
        logits[:, list(plan.blank)] = -math.inf
    logits[:, list(plan.suppress)] = -math.inf
    if not plan.timestamps:
        return logits

    ts = tok.timestamp_begin
    is_ts_token = vocab >= ts  # (V,)
    logits[:, tok.no_timestamps] = -math.inf
    n = cur - start  # tokens sampled so far (the same for every row)
    if n >= 1:
        sampled = tokens[:, start:cur]  # (N, n)
        last_ts = sampled[:, -1] >= ts  # (N,)
        pen_ts = sampled[:, -2] >= ts if n >= 2 else torch.ones_like(last_ts)  # (N,)
        closes_pair = last_ts & pen_ts  # two timestamps in a row: text (or EOT) must follow
        opens_pair = last_ts & ~pen_ts  # a lone timestamp: another timestamp or EOT must follow
        forbid = (closes_pair[:, None] & is_ts_token) | (opens_pair[:, None] & (vocab < tok.eot))  # (N, V)
        # timestamps never decrease; a new segment must be longer than zero
        where_ts = sampled >= ts  # (N, n)
        any_ts = where_ts.any(dim=1)  # (N,)
        last_idx = (where_ts * torch.arange(1, n + 1, device=tokens.device)).argmax(dim=1)  # (N,)
        last_value = sampled.gather(1, last_idx[:, None])[:, 0]  # (N,)
        bound = torch.where(opens_pair, last_value, last_value + 1)  # (N,) first allowed timestamp id
        forbid |= any_ts[:, None] & is_ts_token & (vocab < bound[:, None])
        logits.masked_fill_(forbid, -math.inf)
    else:  # the first token is a timestamp, and not later than max_initial_timestamp
        logits[:, :ts] = -math.inf
        if plan.max_initial_index is not None:
            logits[:, ts + plan.max_initial_index + 1 :] = -math.inf
    # force a timestamp when timestamps together are likelier than any single text token
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    ts_mass = logprobs[:, ts:].logsumexp(dim=-1)  # (N,)
    best_text = logprobs[:, :ts].max(dim=-1).values  # (N,)
    logits.masked_fill_((ts_mass > best_text)[:, None] & ~is_ts_token, -math.inf)
    return logits


# ----------------------------------------------------------------------------- search state


@dataclass
class Search:
    """The state of one batched search on the device. N rows = G clips * K rows per clip (beams)."""

    tokens: Tensor  # (N, n_ctx) long: each row's sequence so far
    sum_logprobs: Tensor  # (N,) float32
    done: Tensor  # (N,) bool: greedy, the row wrote EOT; beam, the row's clip has enough finished beams
    done_at: Tensor  # (N,) long: selection index when done (greedy: tokens before EOT; beam: time of the beams)
    hist_tok: Tensor  # (max_new, N) long: the token each row got at each selection
    hist_src: Tensor  # (max_new, N) long: the row each row came from at each selection
    # beam search only: the finished sequences of each clip (slot C is a scratch slot)
    fin_score: Tensor | None = None  # (G, C + 1) float32
    fin_row: Tensor | None = None  # (G, C + 1) long: the row that wrote EOT
    fin_time: Tensor | None = None  # (G, C + 1) long: the selection index of that EOT
    n_fin: Tensor | None = None  # (G,) long


def new_search(N: int, G: int, n_ctx: int, plan: Plan, beam: int | None, capacity: int, device) -> Search:
    tokens = torch.zeros(N, n_ctx, dtype=torch.long, device=device)
    tokens[:, : len(plan.initial)] = torch.tensor(plan.initial, device=device)
    s = Search(
        tokens=tokens,
        sum_logprobs=torch.zeros(N, device=device),
        done=torch.zeros(N, dtype=torch.bool, device=device),
        done_at=torch.full((N,), plan.max_new, dtype=torch.long, device=device),
        hist_tok=torch.zeros(plan.max_new, N, dtype=torch.long, device=device),
        hist_src=torch.zeros(plan.max_new, N, dtype=torch.long, device=device),
    )
    if beam is not None:
        s.fin_score = torch.zeros(G, capacity + 1, device=device)
        s.fin_row = torch.zeros(G, capacity + 1, dtype=torch.long, device=device)
        s.fin_time = torch.zeros(G, capacity + 1, dtype=torch.long, device=device)
        s.n_fin = torch.zeros(G, dtype=torch.long, device=device)
    return s


def select_greedy(s: Search, logits: Tensor, i: int, cur: int, eot: int, temperature: float, gen) -> Tensor:
    """Greedy or sampled choice for every row; a row that wrote EOT keeps writing EOT. Returns (N,) sources."""
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    if temperature == 0:
        nxt = logits.argmax(dim=-1)  # (N,)
    else:
        probs = F.softmax(logits.float() / temperature, dim=-1)  # (N, V)
        nxt = torch.multinomial(probs, 1, generator=gen)[:, 0]  # (N,)
    active = ~s.done
    s.sum_logprobs += torch.where(active, logprobs.gather(1, nxt[:, None])[:, 0], 0.0)
    nxt = torch.where(active, nxt, eot)
    ended = active & (nxt == eot)
    s.done_at = torch.where(ended, i, s.done_at)
    s.done |= ended
    s.tokens[:, cur] = nxt
    src = torch.arange(len(nxt), device=nxt.device)
    s.hist_tok[i], s.hist_src[i] = nxt, src
    return src


def select_beams(s: Search, logits: Tensor, i: int, cur: int, eot: int, beam: int, capacity: int) -> Tensor:
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
    cand_tok = top_tok.view(G, beam * K)  # (G, M)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # (G, M)
    s_score, s_tok = scores.gather(1, order), cand_tok.gather(1, order)  # (G, M)
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
    identity = torch.arange(N, device=dev)
    src = torch.where(active, s_row.gather(1, pick).flatten(), identity)  # (N,)
    nxt = torch.where(active, s_tok.gather(1, pick).flatten(), eot)  # (N,)
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
    s.tokens[:, cur] = torch.where(active, nxt, s.tokens[:, cur])
    now_done = (s.n_fin >= capacity).repeat_interleave(beam) & active  # (N,)
    s.done_at = torch.where(now_done, i + 1, s.done_at)
    s.done |= now_done
    s.hist_tok[i], s.hist_src[i] = nxt, src
    return src


# ----------------------------------------------------------------------------- trace stitching


def position_dim(name: str) -> int:
    """The text-position axis of a decoder activation: 2 for per-head q/k/v/scores/pattern, else 1."""
    return 2 if name.rsplit(".", 1)[-1] in ("q", "k", "v", "scores", "pattern") else 1


def stitch_trace(order: list[str], once: Trace, steps: list[Trace], g: int, rows: list[int], length: int) -> Trace:
    """One clip's trace: encoder/cross k,v from ``once`` (row g), decoder names from the prefill
    (row g) and from step s at row ``rows[s]``, concatenated along positions; self-attention
    scores/patterns are cut to the final ``length`` keys."""
    out = Trace()
    for name in order:
        if name in once:
            out.put(name, once[name][g : g + 1])
        elif name in steps[0]:
            parts = [steps[0][name][g : g + 1]] + [steps[s][name][r : r + 1] for s, r in enumerate(rows, start=1)]
            x = torch.cat(parts, dim=position_dim(name))
            if name.endswith((".attn.scores", ".attn.pattern")) and ".cross_attn." not in name:
                x = x[..., :length]
            out.put(name, x)
    return out


def check_step_edits(model: Whisper, edits: Edits | None) -> None:
    """Decoder edits must act on each position alone: a step sees one position at a time."""
    if edits is None:
        return
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
            if op.kind in ("replace", "add"):
                pdim = position_dim(name) if name != "logits" else 1
                rank = 4 if pdim == 2 or name.endswith(".z") else 3
                shape = (1,) * (rank - op.value.dim()) + tuple(op.value.shape)
                if len(shape) > rank or shape[0] != 1 or shape[pdim] != 1:
                    raise ValueError(
                        f"{op.kind} at {name!r} in generate needs a value without batch or position axes "
                        f"(size 1 there), got shape {tuple(op.value.shape)}"
                    )


# ----------------------------------------------------------------------------- generate


def check_mel(model: Whisper, mel: Tensor) -> Tensor:
    mel = model.check_mel(mel)  # (B, n_mels, 2 * n_audio_ctx)
    if mel.shape[0] == 0:
        raise ValueError("mel is an empty batch: nothing to decode")
    return mel


def check_audio_features(model: Whisper, xa: Tensor, rec: Recorder) -> Tensor:
    """Validate encoder output given in place of the mel: [B, n_audio_ctx, n_audio_state] (or unbatched)."""
    d = model.dims
    xa = torch.as_tensor(xa)
    if xa.dim() == 2:
        xa = xa[None]
    if xa.dim() != 3 or xa.shape[1:] != (d.n_audio_ctx, d.n_audio_state):
        raise ValueError(f"audio_features must be [batch, {d.n_audio_ctx}, {d.n_audio_state}] (the encoder's "
                         f"output) for this model, got {list(xa.shape)}")  # fmt: skip
    if xa.shape[0] == 0:
        raise ValueError("audio_features is an empty batch: nothing to decode")
    e = rec.edits
    encoder = sorted(
        n for n in [*rec.keep, *(e.ops if e else ()), *(e.skipped if e else ())] if n.startswith("encoder.")
    )
    if e is not None and e.window is not None:
        encoder.append("encoder local_window")
    if encoder:
        raise ValueError(f"{encoder[0]!r} is in the encoder, but audio_features skip the encoder: pass the mel "
                         "to trace or edit the encoder")  # fmt: skip
    return xa.to(model.device, model.dtype)


@torch.no_grad()
def generate(
    model: Whisper,
    mel: Tensor | None = None,
    *,
    audio_features: Tensor | None = None,
    beam_size: int | None = None,
    max_new_tokens: int | None = None,
    language: str | None = None,
    task: str = "transcribe",
    timestamps: bool = False,
    trace: TraceRequest = None,
    edits: Edits | None = None,
    patience: float | None = None,
    length_penalty: float | None = None,
    temperature: float = 0.0,
    seed: int | None = None,
    prompt: str | Sequence[int] | None = None,
    prefix: str | Sequence[int] | None = None,
    suppress_tokens: str | Iterable[int] | None = "-1",
    suppress_blank: bool = True,
    max_initial_timestamp: float | None = 1.0,
    compile: bool = False,
) -> list[DecodingResult]:
    """Decode a batch of 30 s log-mel windows ``mel`` [B, n_mels, 2 * n_audio_ctx] (or one [n_mels, frames]).

    audio_features: instead of ``mel``, the encoder's output [B, n_audio_ctx, n_audio_state] (as
        openai-whisper's decode accepts): decoding starts from it and the encoder does not run.

    beam_size: None for greedy (or sampling when temperature > 0), else beam search with that many beams.
    max_new_tokens: the most tokens to sample (default 224 = half the official 448-token context, as
        openai-whisper; for a model with a smaller context, what its context has left after the prompt).
    language: a code or name; None detects it per clip (multilingual models) from the sot position.
    task: "transcribe" or "translate" (into English). timestamps: write segment timestamps.
    trace / edits: record activations (as ``model.run``) / apply interventions at every step.
    patience, length_penalty: beam search's stopping and ranking rules (openai-whisper's meaning).
    temperature, seed: sample from softmax(logits / temperature), reproducibly with a seed.
    prompt: previous text (str or token ids) after <|startofprev|>. prefix: forced start of the transcript.
    suppress_tokens: ids or "1,2,3"; "-1" adds the non-speech symbols. suppress_blank: no blank first token.
    max_initial_timestamp: latest first timestamp in seconds (None: any). compile: torch.compile the step.
    Returns one ``DecodingResult`` per clip.
    """
    if beam_size is not None and (not isinstance(beam_size, int) or beam_size < 1):
        raise ValueError(f"beam_size must be a positive int or None, got {beam_size!r}")
    if beam_size is not None and temperature > 0:
        raise ValueError("beam search is deterministic: give beam_size or temperature > 0, not both")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if patience is not None and beam_size is None:
        raise ValueError("patience only applies to beam search: give beam_size too")
    if patience is not None and patience <= 0:
        raise ValueError(f"patience must be > 0, got {patience}")
    if length_penalty is not None and not 0 <= length_penalty <= 1:
        raise ValueError(f"length_penalty (alpha) must be between 0 and 1, got {length_penalty}")
    plan = make_plan(model, max_new_tokens=max_new_tokens, language=language, task=task, timestamps=timestamps,
                     prompt=prompt, prefix=prefix, suppress_tokens=suppress_tokens, suppress_blank=suppress_blank,
                     max_initial_timestamp=max_initial_timestamp)  # fmt: skip
    if (mel is None) == (audio_features is None):
        raise ValueError("give either mel or audio_features (the encoder's output), not both or neither")
    rec = model.recorder(trace, edits)
    check_step_edits(model, edits)
    tok, dev = model.tokenizer, model.device
    # 1. the audio, once: encoder output and every layer's cross-attention keys/values
    if audio_features is None:
        xa = model.encoder(check_mel(model, mel), rec.child("encoder"))  # (G, S, D)
    else:
        xa = check_audio_features(model, audio_features, rec)  # (G, S, D)
    G, T0 = xa.shape[0], len(plan.initial)
    cache = model.decoder.new_cache(xa, rec.child("decoder"), length=T0 + plan.max_new)  # self k/v (L, G, H, T, Dh)
    K = beam_size or 1
    N = G * K
    capacity = round(K * (patience or 1.0)) if beam_size is not None else 0
    if beam_size is not None and capacity < 1:
        raise ValueError(f"beam_size {beam_size} with patience {patience} keeps no finished sequence")
    tracing = bool(rec.keep)

    def step_recorder() -> Recorder:
        return Recorder(rec.keep, edits, Trace()) if rec.active else IDLE

    def forward(tokens: Tensor, pos: Tensor, r: Recorder, c: KVCache) -> Tensor:
        return r("logits", model.decoder(tokens, r.child("decoder"), cache=c, pos=pos))  # (N, t, V)

    # oneDNN copies of the weights for N-row steps on the CPU, dropped after (torch.compile traces the plain ones)
    with packed_weights(model.decoder, N) if not compile else contextlib.nullcontext():
        # 2. language identification: the distribution at sot (alone, at position 0) over language tokens
        initial = torch.tensor(plan.initial, device=dev).repeat(G, 1)  # (G, T0)
        languages, language_probs = [plan.language] * G, None
        if plan.detect_language:
            er = Recorder(frozenset(), edits, None) if edits else IDLE
            logits = forward(torch.full((G, 1), tok.sot, device=dev), torch.zeros(1, dtype=torch.long, device=dev), er,
                             cache)[:, 0]  # fmt: skip
            lang_ids = torch.tensor(tok.all_language_tokens, device=dev)
            probs = logits[:, lang_ids].float().softmax(dim=-1)  # (G, n_languages)
            initial[:, plan.sot_index + 1] = lang_ids[probs.argmax(dim=-1)]
            host = probs.cpu().tolist()
            language_probs = [dict(zip(tok.all_language_codes, p, strict=True)) for p in host]
            languages = [tok.all_language_codes[int(np.argmax(p))] for p in host]

        # 3. the prompt in one pass; no_speech_prob is read at sot
        r0 = step_recorder()
        logits = forward(initial, torch.arange(T0, device=dev), r0, cache)  # (G, T0, V)
        no_speech = logits[:, plan.sot_index].float().softmax(dim=-1)[:, tok.no_speech].tolist()
        last = logits[:, -1]  # (G, V)
        steps = [r0.trace] if tracing else []
        if K > 1:  # every beam starts as the clip's prompt
            cache = KVCache(
                *(x.repeat_interleave(K, dim=1) for x in (cache.k, cache.vt, cache.cross_k, cache.cross_vt))
            )
            last = last.repeat_interleave(K, dim=0)  # (N, V)

        s = new_search(N, G, model.dims.n_text_ctx, plan, beam_size, capacity, dev)
        s.tokens[:, :T0] = initial.repeat_interleave(K, dim=0)
        vocab = torch.arange(model.dims.n_vocab, device=dev)
        gen = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
        check_every = 1 if dev.type == "cpu" else CUDA_CHECK_EVERY

        def plain_step(tokens: Tensor, pos: Tensor) -> Tensor:
            return model.decoder(tokens, IDLE, cache=cache, pos=pos)  # (N, 1, V)

        fast_step = torch.compile(plain_step, dynamic=False) if compile and not rec.active else plain_step

        # 4. one token per step
        n_sel = 0
        for i in range(plan.max_new):
            cur = T0 + i
            # the filters write in place: into a copy when the step's logits are kept in a trace
            filtered = filter_logits(last.to(torch.float32, copy=tracing), s.tokens, cur, plan, tok, vocab)  # (N, V)
            if beam_size is None:
                src = select_greedy(s, filtered, i, cur, tok.eot, temperature, gen)
            else:
                src = select_beams(s, filtered, i, cur, tok.eot, beam_size, capacity)
                cache.k[:, :, :, :cur] = cache.k[:, :, :, :cur].index_select(1, src)  # the beams' histories follow them
                cache.vt[..., :cur] = cache.vt[..., :cur].index_select(1, src)
            n_sel = i + 1
            finished = (i + 1) % check_every == 0 and bool(s.done.all())
            if (finished or n_sel == plan.max_new) and not tracing:
                break
            pos = torch.full((1,), cur, dtype=torch.long, device=dev)
            if rec.active:
                r = step_recorder()
                last = forward(s.tokens[:, cur : cur + 1], pos, r, cache)[:, 0]  # (N, V)
                if tracing:
                    steps.append(r.trace)
            else:
                last = fast_step(s.tokens[:, cur : cur + 1], pos)[:, 0]  # (N, V)
            if finished or n_sel == plan.max_new:  # the last step only recorded the final token's activations
                break

    return finish(model, plan, s, rec, steps, beam_size, capacity, length_penalty, n_sel, languages,
                  language_probs, no_speech, temperature, edits)  # fmt: skip


def finish(model, plan, s, rec, steps, beam_size, capacity, length_penalty, n_sel, languages, language_probs,
           no_speech, temperature, edits) -> list[DecodingResult]:  # fmt: skip
    """Bring the search state to the host once and build each clip's result (openai-whisper's final ranking)."""
    tok, T0 = model.tokenizer, len(plan.initial)
    hist_tok, hist_src = s.hist_tok[:n_sel].cpu().tolist(), s.hist_src[:n_sel].cpu().tolist()
    sums, done_at = s.sum_logprobs.cpu(), s.done_at.cpu().tolist()
    G = len(no_speech)
    K = beam_size or 1

    def ancestry(row: int, time: int) -> tuple[list[int], list[int]]:
        """The sampled tokens of the sequence in ``row`` after ``time`` selections, and its row at each time."""
        tokens, rows = [], [row]
        for t in range(time - 1, -1, -1):
            tokens.append(hist_tok[t][row])
            row = hist_src[t][row]
            rows.append(row)
        return tokens[::-1], rows[::-1][1:]  # rows[s - 1] = the row at time s, s = 1..time

    order = [n for n in model.names() if n in rec.keep]
    skipped = {f"decoder.blocks.{i}." for i in range(model.dims.n_text_layer) if rec.skips(f"decoder.blocks.{i}")}
    order = [n for n in order if not any(n.startswith(p) and not n.endswith(("resid_pre", "resid_post"))
                                         for p in skipped)]  # fmt: skip
    results = []
    for g in range(G):
        if beam_size is None:
            row = g
            time = min(done_at[row], n_sel)
            cands = [(row, time, float(sums[row]))]
        else:
            n = int(s.n_fin[g])
            fin_row, fin_time, fin_score = s.fin_row[g, :n].tolist(), s.fin_time[g, :n].tolist(), s.fin_score[g, :n]
            cands = [(fin_row[c], fin_time[c], float(fin_score[c])) for c in range(n)]
            if len(cands) < beam_size:  # not enough finished: the live beams, best first, with an EOT added
                rows = range(g * K, (g + 1) * K)
                time = min(done_at[g * K], n_sel)
                for j in np.argsort(sums[g * K : (g + 1) * K].numpy())[::-1]:
                    cands.append((rows[j], time, float(sums[rows[j]])))
                    if len(cands) >= beam_size:
                        break
        seqs = [ancestry(row, time) for row, time, _ in cands]

        scores = [
            rank_score(sum_lp, len(toks), length_penalty) for (_, _, sum_lp), (toks, _) in zip(cands, seqs, strict=True)
        ]
        best = int(np.argmax(scores))  # the first of equals
        (row, time, sum_lp), (tokens, rows) = cands[best], seqs[best]
        text = tok.decode(tokens).strip()
        result_trace = None
        if rec.keep:
            result_trace = stitch_trace(order, rec.trace, steps, g, rows, T0 + len(tokens))
        results.append(DecodingResult(
            tokens=tokens, text=text, language=languages[g],
            language_probs=language_probs[g] if language_probs else None,
            avg_logprob=sum_lp / (len(tokens) + 1), sum_logprob=sum_lp, no_speech_prob=no_speech[g],
            compression_ratio=compression_ratio(text), temperature=temperature, trace=result_trace,
        ))  # fmt: skip
    return results


def rank_score(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """How candidates are ranked: log-probability per token, or over Google NMT's ((5 + length) / 6) ** alpha."""
    penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
    return sum_logprob / max(penalty, 1e-9)


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
