"""Exact speculative greedy decoding: a low-precision draft proposes, the fp32 model decides.

Why it is exact
---------------
Greedy decoding emits, at each position, the argmax of the fp32 model's filtered logits. A step
reads every decoder weight once (at batch 1, ~108 MiB for tiny) to produce one token per row,
and reading more positions in the same pass costs little more: the weights are read once for
all of them. So a cheap *draft* guesses the next ``k`` tokens, and one fp32 pass over the last
committed token and the ``k`` guesses gives the fp32 logits at all ``k + 1`` positions at once.
Walking along them in order, each position's token is chosen exactly as the plain loop chooses
it (the logit filters applied to the fp32 logits, with the history up to that position): while
the choice equals the guess, the next position's logits are valid too (they were computed after
the right token) and the walk goes on; at the first disagreement the fp32 token is emitted and
the rest is thrown away. Every emitted token, its log-probability, ``sum_logprob`` and the
stopping rules (EOT, ``max_new_tokens``) are therefore the fp32 model's own; the draft decides
only how many of them one pass yields (between 1 and ``k + 1``). The numbers differ from the
plain loop's only by float rounding: k + 1 rows in a product instead of one (~1e-6).

The draft
---------
Two kinds (``Draft``): a *copy* of the decoder with its weights cast to bfloat16, with its own
keys/values cache (the prompt's and the audio's cast from the fp32 cache after the prompt's
pass); or the *head*: the fp32 blocks themselves, run one position at a time as in the plain
loop, with only the unembedding (the step's one big product) in bfloat16, so that the check is
one fp32 unembedding of the k + 1 final streams. Both are the same network, so they almost
always pick the fp32 token. A draft is made once per model and kept outside the model, in a weak
map (nothing is set on the modules); a weight changed in place since it was made is noticed
(``Tensor._version``) and the draft is made again. Which kind runs, or none, is decided by a
one-off timing per device, shape and row count (``chosen_draft``, ``calibrate``), kept and logged
by ``whisper_lens.fastpaths`` (listed by ``whisper-lens info``).

Caches and positions
--------------------
Token ``j`` of a row (selection ``j``) sits at position ``start + j``. Before a round with ``m``
tokens chosen, the fp32 cache holds every position before the last chosen token's; the round
feeds that token and the guesses at positions ``start + m - 1 ...``: their keys and values are
written into the static cache there, and those of rejected guesses are simply overwritten by a
later round (the mask keeps a query from reading positions after its own). The draft's cache
is kept the same way, one or two positions behind. Rows accept different counts: each row has
its own positions (the cache and the mask take them per row), and rows that are done leave the
batch on the CPU (as in the plain loop).

How many guesses
----------------
``Pace`` chooses ``k`` each round from what it has measured in this call: the draft's
agreement rate a (accepted guesses over accepted + rejected ones), the time of a draft pass and
of an fp32 pass of ``k + 1`` positions. It picks the ``k`` (0 to ``MAX_GUESSES``) with the most
expected tokens, (1 - a^(k+1)) / (1 - a), per second; ``k = 0`` is the plain step, so drafting
switches itself off when it does not pay (a slow bf16 product on a machine without bf16
instructions, a draft that disagrees). The first round is a plain step, which measures what
drafting has to beat.

Applies to greedy decoding (temperature 0, no beams) without traces, edits or per-clip depths;
everything else runs the plain loop.
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import fastpaths
from ..model import TEXTBOOK
from ..trace import IDLE
from .cache import DecoderCache, KVCache, new_cache
from .filters import nonfinite
from .packed import DEFAULT, Kernels, onednn_available, onednn_linear, onednn_pack, packing_pays

if TYPE_CHECKING:
    from ..model import TextDecoder, Whisper
    from ..trace import Recorder
    from .loop import Decoding
    from .options import DecodingOptions, Plan
    from .results import DecodingResult

LOG = logging.getLogger(__name__)
KINDS = ("copy", "head", "int8")  # the drafts (``Draft``)
MAX_GUESSES = 8  # the most tokens the draft proposes per round
FIRST_GUESSES = 4  # the proposals of the first drafting round, before anything is measured


# ----------------------------------------------------------------------------- the draft


@dataclass
class Draft:
    """What proposes the guesses, made from a model's decoder, and the weight versions it was made from.

    Three kinds. ``decoder`` set ("copy"): a copy of the whole decoder in ``dtype``, with its own
    cache; one fp32 pass over k + 1 positions verifies. ``head`` set ("head"): only the
    unembedding in bfloat16 (the step's one big product: 80 of tiny's 108 MiB); the guesses come
    from the fp32 blocks' own final stream, step by step, and verifying them is one fp32
    unembedding of the k + 1 streams. "int8" is the head kind with the unembedding in int8
    (``int8_head``: a quarter of the bytes, through torch's dynamically quantised linear layer).
    The head kinds read the blocks' weights at every position but write the fp32 cache as the
    plain loop does; the copy kind reads half the bytes per guess but its small low-precision
    products cost more per call on a CPU.
    """

    decoder: TextDecoder | None  # "copy": the same modules, weights in ``dtype``
    dtype: torch.dtype
    made_from: tuple[tuple[int, int], ...]  # (data pointer, version) of each source parameter
    head: Tensor | torch.nn.Module | None = None  # the head kinds: the unembedding (V, D) in ``dtype``, or int8's layer
    verifying: dict[int, Kernels] = field(default_factory=dict)  # rows -> kernels of the fp32 verification pass

    @property
    def kind(self) -> str:
        return "copy" if self.decoder is not None else "int8" if self.dtype == torch.qint8 else "head"

    def head_logits(self, x: Tensor) -> Tensor:
        """A head kind's guessing logits (L, V), fp32, of final streams ``x`` (L, D)."""
        if isinstance(self.head, Tensor):
            return F.linear(x.to(self.dtype), self.head).float()  # (L, V)
        return self.head(x.float()).float()  # (L, V)

    @staticmethod
    def stamp(decoder: TextDecoder) -> tuple[tuple[int, int], ...]:
        """What identifies the source weights as they are now: a parameter replaced or edited in place changes it."""
        return tuple((p.data_ptr(), p._version) for p in decoder.parameters())


_DRAFTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {dtype: Draft}


def draft_for(model: Whisper, kind: str = "copy", dtype: torch.dtype = torch.bfloat16) -> Draft | None:
    """``model``'s draft of ``kind`` ("copy" or "head" in ``dtype``, or "int8"), made at first use and kept
    (outside the model, while it lives); made again when the decoder's weights have changed. None for "int8"
    where this build or device has no int8 linear layer."""
    if kind not in KINDS:
        raise ValueError(f"a draft is a 'copy' of the decoder, its 'head' (the unembedding) or its 'int8' head, "
                         f"got {kind!r}")  # fmt: skip
    if kind == "int8":
        dtype = torch.qint8
    drafts = _DRAFTS.setdefault(model, {})
    stamp = Draft.stamp(model.decoder)
    draft = drafts.get((kind, dtype))
    if draft is None or draft.made_from != stamp:
        if kind == "copy":
            draft = Draft(cast_copy(model.decoder, dtype), dtype, stamp)
        elif kind == "int8":
            head = int8_head(model.decoder.token_embedding.weight)
            if head is None:
                return None
            draft = Draft(None, dtype, stamp, head=head)
        else:
            draft = Draft(None, dtype, stamp, head=model.decoder.token_embedding.weight.detach().to(dtype))
        drafts[(kind, dtype)] = draft
    return draft


def int8_head(weight: Tensor) -> torch.nn.Module | None:
    """The unembedding ``weight`` (V, D) as an int8 linear layer: weights quantised per row (one scale per
    token), activations quantised on the fly (torch's dynamic quantisation, x86's fbgemm or oneDNN). Only
    its argmax is used, as a guess. None where this build or device lacks it (it is CPU-only, and torch
    marks the API deprecated: a torch without it leaves the other kinds)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(weight.detach(), requires_grad=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            head = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8)[0]  # fmt: skip
            y = head(torch.ones(2, weight.shape[1]))  # (2, V): it runs here
    except (ImportError, AttributeError, RuntimeError, NotImplementedError):
        return None
    return head if y.shape == (2, weight.shape[0]) else None


class AnyRows(Kernels):
    """Kernels whose packed unembedding serves every product of at most ``rows`` rows, not only ``rows``.

    A verification pass has L * (k + 1) rows, k changing from round to round. oneDNN's copy of
    the unembedding packed for the most rows runs fewer at nearly the speed of a copy packed for
    them, and 1.5x-2.7x ``F.linear``'s speed from 2 to 9 rows (F.linear's fp32 product of a few
    rows does not reach the memory's speed); one copy per model and row bound is kept.
    """

    def linear(self, x: Tensor, layer: torch.nn.Module) -> Tensor:
        packed = self.packed.get(layer)
        weight = layer.weight
        if packed is None or TEXTBOOK.get() or x.dtype != torch.float32 or x.numel() > self.rows * weight.shape[1]:
            return super().linear(x, layer)
        return onednn_linear(x, packed, getattr(layer, "bias", None))


def verifying_kernels(model: Whisper, draft: Draft, rows: int) -> Kernels:
    """The kernels of a verification pass of at most ``rows`` rows: the fp32 unembedding packed for them (kept in
    the draft, which is made again when the weights change), or plain ones where packing does not apply or does
    not pay for ``rows`` rows on this machine (``packing_pays``)."""
    W = model.decoder.token_embedding.weight
    if not (W.device.type == "cpu" and W.dtype == torch.float32 and onednn_available() and not TEXTBOOK.get()):
        return DEFAULT
    if rows not in draft.verifying and not packing_pays(W, rows):
        return DEFAULT
    if rows not in draft.verifying:
        draft.verifying[rows] = AnyRows({model.decoder.token_embedding: onednn_pack(W, rows)}, rows)
    return draft.verifying[rows]


def cast_copy(decoder: TextDecoder, dtype: torch.dtype) -> TextDecoder:
    """A copy of ``decoder`` with every parameter cast to ``dtype`` (the fp32 weights are not copied first)."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in decoder.parameters()}
    return copy.deepcopy(decoder, memo)


def cast_cache(cache: DecoderCache, dtype: torch.dtype) -> DecoderCache:
    """A ``dtype`` copy of a decoding cache, in the same layouts (the audio's keys stay stored transposed)."""
    attn = [KVCache(c.k.to(dtype), c.v.to(dtype)) for c in cache.attn]
    cross = [KVCache(c.k.mT.to(dtype).mT, c.v.to(dtype), c.owner, c.audio) for c in cache.cross_attn]
    return DecoderCache(attn, cross)


# ----------------------------------------------------------------------------- the logit filters, per row


def filter_rows(logits: Tensor, sampled: Tensor, n: Tensor, plan: Plan, tok, vocab: Tensor) -> Tensor:
    """``filters.filter_logits`` for rows that have each sampled their own number of tokens.

    ``logits`` (M, V); ``sampled`` (M, W): row r's tokens so far are ``sampled[r, :n[r]]``; ``n``
    (M,). Each row is filtered exactly as ``filter_logits`` filters it with those ``n[r]`` tokens;
    ``logits`` is changed in place and returned.
    """
    first = n == 0  # (M,)
    if plan.blank:
        logits[:, list(plan.blank)] = logits[:, list(plan.blank)].masked_fill(first[:, None], -math.inf)
    logits[:, list(plan.suppress)] = -math.inf
    if not plan.timestamps:
        return logits
    ts = tok.timestamp_begin
    stamps, text = logits[:, ts:], logits[:, : tok.eot]  # views: (M, V - ts) timestamps, (M, eot) text tokens
    logits[:, tok.no_timestamps] = -math.inf
    W = sampled.shape[1]
    if W:
        col = torch.arange(W, device=sampled.device)  # (W,)
        last_ts = (sampled.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0] >= ts) & (n >= 1)  # (M,)
        pen_ts = (sampled.gather(1, (n - 2).clamp(min=0)[:, None])[:, 0] >= ts) | (n < 2)  # (M,)
        closes_pair = last_ts & pen_ts  # two timestamps in a row: text (or EOT) must follow
        opens_pair = last_ts & ~pen_ts  # a lone timestamp: another timestamp or EOT must follow
        where_ts = (sampled >= ts) & (col < n[:, None])  # (M, W)
        any_ts = where_ts.any(dim=1)  # (M,)
        last_idx = (where_ts * (col + 1)).argmax(dim=1)  # (M,)
        last_value = sampled.gather(1, last_idx[:, None])[:, 0]  # (M,)
        bound = torch.where(opens_pair, last_value, last_value + 1)  # (M,) first allowed timestamp id
        early = any_ts[:, None] & (vocab[ts:] < bound[:, None])  # (M, V - ts)
        stamps.masked_fill_(closes_pair[:, None] | early, -math.inf)
        text.masked_fill_(opens_pair[:, None], -math.inf)
    # the first token is a timestamp, and not later than max_initial_timestamp
    logits[:, :ts].masked_fill_(first[:, None], -math.inf)
    if plan.max_initial_index is not None:
        logits[:, ts + plan.max_initial_index + 1 :].masked_fill_(first[:, None], -math.inf)
    # force a timestamp when timestamps together are likelier than any single text token
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (M, V)
    ts_mass = logprobs[:, ts:].logsumexp(dim=-1)  # (M,)
    best_text = logprobs[:, :ts].amax(dim=-1)  # (M,)
    logits[:, :ts].masked_fill_((ts_mass > best_text)[:, None], -math.inf)
    return logits


# ----------------------------------------------------------------------------- pace: how many guesses


@dataclass
class Pace:
    """Chooses the number of guesses per round from this call's measurements (see the module's docstring)."""

    accepted: int = 0  # guesses accepted so far
    rejected: int = 0  # guesses rejected (at most one per row and round)
    draft_s: float | None = None  # seconds of one draft pass (the latest)
    verify_s: dict[int, float] = field(default_factory=dict)  # k -> seconds of an fp32 pass of k + 1 positions
    rounds: int = 0
    passes: int = 0  # fp32 passes
    emitted: int = 0  # tokens emitted by them (all rows)
    drafted: int = 0  # draft passes (guesses per row), over all rounds

    def next_k(self, room: int) -> int:
        """Guesses for the next round, at most ``room`` (the most tokens a row may still take, minus one)."""
        self.rounds += 1
        if room <= 0 or self.rounds == 1:
            return 0  # nothing to guess, or the first round: a plain step, to measure what drafting must beat
        if self.draft_s is None:
            return min(FIRST_GUESSES, room)
        a = (self.accepted + 0.5) / (self.accepted + self.rejected + 1)  # agreement, with a weak prior of 1/2
        best, best_rate = 0, 1 / self.verify_s[0]
        for k in range(1, min(MAX_GUESSES, room) + 1):
            tokens = sum(a**i for i in range(k + 1))  # expected tokens per row: 1 + a + ... + a^k
            rate = tokens / (k * self.draft_s + self.verify_time(k))
            if rate > best_rate:
                best, best_rate = k, rate
        return best

    def verify_time(self, k: int) -> float:
        """Seconds of an fp32 pass of k + 1 positions: measured, or on the line through the measured ones."""
        if k in self.verify_s:
            return self.verify_s[k]
        ks = sorted(self.verify_s)
        lo, hi = ks[0], ks[-1]
        if lo == hi:
            return self.verify_s[lo]
        slope = max(0.0, (self.verify_s[hi] - self.verify_s[lo]) / (hi - lo))
        return self.verify_s[lo] + slope * (k - lo)

    def record(self, k: int, draft_s: float, verify_s: float, accepted: Tensor, emitted: Tensor) -> None:
        """One round's measurements: ``accepted`` (L,) guesses accepted per row, ``emitted`` (L,) tokens per row."""
        self.drafted += k
        if k:
            self.draft_s = draft_s / k
            full = int((accepted == k).sum())
            self.accepted += int(accepted.sum())
            self.rejected += len(accepted) - full
        old = self.verify_s.get(k)
        self.verify_s[k] = verify_s if old is None else 0.5 * (old + verify_s)
        self.passes += 1
        self.emitted += int(emitted.sum())


def now(device: torch.device) -> float:
    """The wall clock, once the device has finished what was queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


# ----------------------------------------------------------------------------- the loop


@dataclass
class Rows:
    """Where each row stands: ``m`` tokens chosen; the draft's cache valid before position ``draft_next``."""

    m: Tensor  # (N,) long
    draft_next: Tensor  # (N,) long: the first position the draft's cache does not hold right
    live: Tensor  # (L,) the rows still decoding, which the caches hold
    start: Tensor  # (N, 1) each row's first sampled position


def speculate(d: Decoding, draft: Draft, guesses: int | None = None) -> tuple[int, Pace]:
    """Decode ``d`` (prefilled) greedily to the end with ``draft``'s proposals; return the selections made (for
    ``results.finish``) and the measurements. The search state ends as the plain loop leaves it.

    ``guesses``: propose that many tokens every round (tests), instead of what ``Pace`` chooses."""
    s, dev = d.search, d.last.device
    N = s.tokens.shape[0]
    start = d.start.expand(N, 1)  # (N, 1)
    rows = Rows(torch.zeros(N, dtype=torch.long, device=dev), start[:, 0].clone(), torch.arange(N, device=dev), start)
    pace = Pace()
    dcache = cast_cache(d.cache, draft.dtype) if draft.kind == "copy" else None
    ops = verifying_kernels(d.model, draft, N * (MAX_GUESSES + 1))
    compact = dev.type == "cpu"  # on the CPU rows that are done leave the caches; on CUDA shapes stay fixed
    # selection 0: from the prompt's pass
    accept(d, rows, d.last[:, None], torch.empty(N, 0, dtype=torch.long, device=dev))
    pace.passes, pace.emitted = 1, N  # the prompts' pass gave each row its first token
    while True:
        keep = ~s.done[rows.live]  # (L,)
        if not bool(keep.any()):
            break
        if compact and not bool(keep.all()):
            idx = keep.nonzero()[:, 0]  # (L',)
            rows.live = rows.live[idx]
            d.cache = d.cache.take_rows(idx)
            dcache = dcache.take_rows(idx) if dcache is not None else None
        live = rows.live if compact else torch.arange(N, device=dev)
        room = int((s.limit[live] - rows.m[live]).max()) - 1  # tokens a row may still take after the next one
        k = pace.next_k(room) if guesses is None else max(0, min(guesses, room))
        last = rows.start[live, 0] + rows.m[live] - 1  # (L,) each row's last chosen token's position
        if dcache is None:  # the head kind: guesses from the fp32 stream, verified by the fp32 unembedding
            proposed, logits, (t0, t1, t2) = guess_from_streams(d, draft, rows, live, k, ops)  # (L, k), (L, k+1, V)
        else:
            t0 = now(dev)
            proposed = propose(d, draft, dcache, rows, live, k)  # (L, k)
            t1 = now(dev)
            logits = verify(d, rows, live, proposed, ops)  # (L, k + 1, V)
            t2 = now(dev)
        d.broken |= nonfinite(logits)  # checked as the plain loop checks each step's logits
        accepted, emitted = accept(d, rows, logits, proposed, live)
        if k:  # the draft fed positions last .. last + k - 1; those after the accepted guesses hold wrong tokens
            rows.draft_next[live] = torch.minimum(last + k, last + 1 + accepted)
        pace.record(k, t1 - t0, t2 - t1, accepted, emitted)
    s.hist_src[:] = torch.arange(N, device=dev)  # greedy: every row continues itself
    return int(rows.m.max()), pace


def positions(rows: Rows, live: Tensor, first: Tensor, count: int, end: int) -> Tensor:
    """(L, count) positions ``first`` (L,) onwards, clamped to the cache's last position ``end``."""
    return (first[:, None] + torch.arange(count, device=first.device)).clamp(max=end)  # (L, count)


def tokens_at(d: Decoding, rows: Rows, live: Tensor, pos: Tensor) -> Tensor:
    """The chosen tokens of rows ``live`` at positions ``pos`` (L, T), all at or after each row's start."""
    s = d.search
    cols = (pos - rows.start[live]).clamp(0, s.tokens.shape[1] - 1)  # (L, T)
    return s.tokens[live].gather(1, cols)  # (L, T)


def history(d: Decoding, rows: Rows, live: Tensor, guesses: Tensor) -> Tensor:
    """(L, W): each row's chosen tokens followed by ``guesses`` (L, j) at the next columns, W = max m + j."""
    m = rows.m[live]  # (L,)
    W = int(m.max()) + guesses.shape[1]
    hist = d.search.tokens[live, : min(W, d.search.tokens.shape[1])]  # (L, <= W)
    if hist.shape[1] < W:
        hist = torch.cat([hist, hist.new_zeros(len(hist), W - hist.shape[1])], dim=1)  # (L, W)
    if guesses.shape[1]:
        hist = hist.scatter(1, m[:, None] + torch.arange(guesses.shape[1], device=m.device), guesses)
    return hist


def propose(d: Decoding, draft: Draft, dcache: DecoderCache, rows: Rows, live: Tensor, k: int) -> Tensor:
    """The draft's ``k`` guesses (L, k) after each row's chosen tokens (its own greedy choices, filtered)."""
    L, dev = len(live), rows.m.device
    guesses = torch.empty(L, 0, dtype=torch.long, device=dev)
    if k == 0:
        return guesses
    end = d.cache.length - 1
    m = rows.m[live]  # (L,)
    last = rows.start[live, 0] + m - 1  # (L,) the last chosen token's position
    lag = int((last - rows.draft_next[live]).max()) + 1  # positions to feed first: 1, or 2 after a full accept
    first = torch.maximum(last - lag + 1, rows.draft_next[live])  # (L,) rows one behind repeat their first
    pos = torch.maximum(positions(rows, live, last - lag + 1, lag, end), first[:, None].clamp(max=end))  # (L, lag)
    tokens = tokens_at(d, rows, live, pos)  # (L, lag)
    for j in range(k):
        n = int(pos.max()) + 1  # attend over the positions written so far only
        x = stream(draft.decoder, tokens, pos, dcache.upto(n))  # (L, T, D)
        logits = draft.decoder.unembed(x[:, -1])  # (L, V): only the last position's logits
        hist = history(d, rows, live, guesses)  # (L, W)
        logits = filter_rows(logits, hist, m + j, d.plan, d.model.tokenizer, d.vocab)  # (L, V)
        guess = logits.argmax(dim=-1)  # (L,)
        guesses = torch.cat([guesses, guess[:, None]], dim=1)  # (L, j + 1)
        tokens, pos = guess[:, None], (last + j + 1).clamp(max=end)[:, None]  # (L, 1)
    return guesses  # the draft fed positions up to last + k - 1 (the last guess is not fed)


def stream(decoder: TextDecoder, tokens: Tensor, pos: Tensor, cache: DecoderCache) -> Tensor:
    """The decoder's final stream (L, T, D) of ``tokens`` (L, T) at positions ``pos``, writing their keys and values."""
    return decoder.stream(tokens, IDLE, cache=cache, pos=pos)[0]  # (L, T, D)


def unembed(decoder: TextDecoder, x: Tensor, ops: Kernels) -> Tensor:
    """The fp32 logits (..., V) of the final stream ``x`` (..., D), by the packed product where there is one."""
    return ops.linear(x, decoder.token_embedding).float() if ops.packed else decoder.unembed(x)  # (..., V)


def guess_from_streams(d: Decoding, draft: Draft, rows: Rows, live: Tensor, k: int, ops: Kernels) -> tuple:
    """The head kind's round: the fp32 blocks fed the last chosen token and then each guess, one position per
    pass (writing the fp32 cache as the plain loop does); a guess is the argmax of the low-precision head on
    the stream, filtered; the fp32 logits (L, k + 1, V) are one unembedding of the k + 1 streams.
    Returns (guesses (L, k), logits, (t0, t1, t2)): t1 - t0 the guessing, t2 - t1 the last pass and the check."""
    dev, decoder = rows.m.device, d.model.decoder
    end = d.cache.length - 1
    m = rows.m[live]  # (L,)
    last = rows.start[live, 0] + m - 1  # (L,)
    tokens, pos = tokens_at(d, rows, live, last[:, None]), last[:, None]  # (L, 1)
    streams, guesses = [], torch.empty(len(live), 0, dtype=torch.long, device=dev)
    t0 = t1 = now(dev)
    for j in range(k + 1):
        if j == k:
            t1 = now(dev)
        x = stream(decoder, tokens, pos, d.cache.upto(int(pos.max()) + 1))  # (L, 1, D): the final stream
        streams.append(x)
        if j < k:
            logits = draft.head_logits(x[:, 0])  # (L, V)
            hist = history(d, rows, live, guesses)  # (L, W)
            guess = filter_rows(logits, hist, m + j, d.plan, d.model.tokenizer, d.vocab).argmax(dim=-1)  # (L,)
            guesses = torch.cat([guesses, guess[:, None]], dim=1)  # (L, j + 1)
            tokens, pos = guess[:, None], (last + j + 1).clamp(max=end)[:, None]  # (L, 1)
    logits = unembed(decoder, torch.cat(streams, dim=1), ops)  # (L, k + 1, V)
    return guesses, logits, (t0, t1, now(dev))


def verify(d: Decoding, rows: Rows, live: Tensor, guesses: Tensor, ops: Kernels) -> Tensor:
    """One fp32 pass over each row's last chosen token and its guesses: the logits (L, k + 1, V) after each."""
    end = d.cache.length - 1
    m = rows.m[live]  # (L,)
    last = rows.start[live, 0] + m - 1  # (L,)
    pos = positions(rows, live, last, guesses.shape[1] + 1, end)  # (L, k + 1)
    tokens = torch.cat([tokens_at(d, rows, live, last[:, None]), guesses], dim=1)  # (L, k + 1)
    n = int(pos.max()) + 1
    return unembed(d.model.decoder, stream(d.model.decoder, tokens, pos, d.cache.upto(n)), ops)  # (L, k + 1, V)


def accept(d: Decoding, rows: Rows, logits: Tensor, guesses: Tensor, live: Tensor | None = None) -> tuple:
    """Choose each row's tokens from the fp32 ``logits`` (L, k + 1, V) in order, as the plain loop would, while
    they agree with ``guesses`` (L, k); record them in the search. Returns (accepted guesses, tokens emitted),
    each (L,)."""
    s, tok = d.search, d.model.tokenizer
    live = rows.live if live is None else live
    L, K, V = logits.shape
    steps = s.tokens.shape[1]
    m = rows.m[live]  # (L,)
    hist = history(d, rows, live, guesses).repeat_interleave(K, dim=0)  # (L*K, W)
    n = (m[:, None] + torch.arange(K, device=m.device)).flatten()  # (L*K,)
    filtered = filter_rows(logits.reshape(L * K, V).float(), hist, n, d.plan, tok, d.vocab)  # (L*K, V)
    choice = filtered.argmax(dim=-1)  # (L*K,)
    lp = F.log_softmax(filtered, dim=-1).gather(1, choice[:, None])[:, 0].view(L, K)  # (L, K)
    choice = choice.view(L, K)  # (L, K)
    agree = (choice[:, : K - 1] == guesses).long().cumprod(dim=1)  # (L, K - 1)
    accepted = agree.sum(dim=1)  # (L,)
    # tokens emitted: the accepted guesses and the fp32 token after them, up to EOT and the row's limit
    is_eot = choice == tok.eot  # (L, K)
    eot_at = torch.where(is_eot.any(dim=1), is_eot.long().argmax(dim=1), K)  # (L,)
    emitted = torch.minimum(torch.minimum(accepted + 1, eot_at + 1), s.limit[live] - m)  # (L,)
    emitted = torch.where(s.done[live], 0, emitted)  # a row done (fixed shapes on CUDA) takes nothing
    total = s.sum_logprobs[live]  # (L,)
    for j in range(K):  # in order, so that the sum is the plain loop's sum, term by term
        take = j < emitted  # (L,)
        col = (m + j).clamp(max=steps - 1)  # (L,)
        s.tokens[live, col] = torch.where(take, choice[:, j], s.tokens[live, col])
        s.hist_tok[col, live] = torch.where(take, choice[:, j], s.hist_tok[col, live])
        s.hist_lp[col, live] = torch.where(take, lp[:, j], s.hist_lp[col, live])
        total = total + torch.where(take, lp[:, j], 0.0)
    s.sum_logprobs[live] = total
    ended = (eot_at < emitted) & ~s.done[live]  # the row wrote EOT: its tokens are those before it
    full = ~ended & ~s.done[live] & (m + emitted >= s.limit[live])  # the row reached its limit
    s.done_at[live] = torch.where(ended, m + eot_at, torch.where(full, s.limit[live], s.done_at[live]))
    s.done[live] = s.done[live] | ended | full
    rows.m[live] = m + emitted
    return accepted, emitted


# ----------------------------------------------------------------------------- which draft, measured here

AGREEMENT = 0.95  # the agreement rate a calibration assumes (bf16 copies agree with fp32 at ~99 % on speech)


def chosen_draft(model: Whisper, rows: int) -> Draft | None:
    """The draft that pays for ``rows`` rows of ``model`` on this machine, or None where none does.

    Decided by timing (``calibrate``) once per machine, device, shape and row count, never from
    the name of the machine, and kept by ``fastpaths`` (in memory and in the user cache folder;
    logged, listed by ``fastpaths.choices("draft")`` and ``whisper-lens info``). Either way the
    numbers are the plain loop's: the choice only changes how many tokens a pass yields.
    """
    d, dtype = model.dims, str(model.dtype).removeprefix("torch.")
    key = fastpaths.shape(rows=rows, vocab=d.n_vocab, state=d.n_text_state, heads=d.n_text_head,
                          layers=d.n_text_layer, audio_ctx=d.n_audio_ctx, dtype=dtype)  # fmt: skip
    kind = fastpaths.choose("draft", model.device, key, lambda: calibrate(model, rows))
    return None if kind == fastpaths.PLAIN else draft_for(model, kind)


@torch.no_grad()
def calibrate(model: Whisper, rows: int, k: int = 4, repeats: int = 5, budget: float = 0.05) -> dict[str, float]:
    """Time a plain step, each kind's guess and an fp32 check of k + 1 positions on ``rows`` rows of silence-like
    input (best of ``repeats``, fewer past ``budget`` seconds each); return the seconds per token of the plain
    step ("plain", with the plain loop's kernels) and of each kind ("copy", "head"), expected at agreement
    ``AGREEMENT``."""
    decoder, dev = model.decoder, model.device
    d = model.dims
    xa = torch.zeros(1, d.n_audio_ctx, d.n_audio_state, device=dev, dtype=model.dtype)  # (1, S, D)
    length = 64 + k + 2
    one = new_cache(decoder, xa, min(length, d.n_text_ctx))  # one clip's audio keys/values, copied for each row:
    cache = DecoderCache([c.repeat_rows(rows) for c in one.attn],  # a step reads every row's, as in decoding
                         [KVCache(c.k.mT.repeat(rows, 1, 1, 1).mT, c.v.repeat(rows, 1, 1, 1), None, c.audio)
                          for c in one.cross_attn])  # fmt: skip
    n = min(32, d.n_text_ctx - k - 2)  # attend over a typical number of positions
    pos1 = torch.full((rows, 1), n, device=dev)  # (R, 1)
    posk = (n + torch.arange(k + 1, device=dev)).expand(rows, k + 1)  # (R, k + 1)
    tok1 = torch.zeros(rows, 1, dtype=torch.long, device=dev)
    tokk = torch.zeros(rows, k + 1, dtype=torch.long, device=dev)
    copy_draft, head_draft, int8_draft = draft_for(model, "copy"), draft_for(model, "head"), draft_for(model, "int8")
    ops = verifying_kernels(model, head_draft, rows * (MAX_GUESSES + 1))
    plain_ops = Kernels.for_decoding(decoder, rows)  # the plain loop's
    dcache = cast_cache(cache, copy_draft.dtype)

    def best(fn) -> float:
        return fastpaths.best_of(fn, dev, repeats, budget)

    def head_guess(draft: Draft):
        x = stream(decoder, tok1, pos1, cache)  # (R, 1, D)
        draft.head_logits(x[:, 0]).argmax(dim=-1)

    plain = best(lambda: unembed(decoder, stream(decoder, tok1, pos1, cache), plain_ops))
    check = best(lambda: unembed(decoder, stream(decoder, tokk, posk, cache), ops))
    streams = torch.zeros(rows, k + 1, d.n_text_state, device=dev)  # (R, k + 1, D)
    unembed_k = best(lambda: ops.linear(streams, decoder.token_embedding))  # the check of the head kind
    unembed1 = best(lambda: plain_ops.linear(streams[:, :1], decoder.token_embedding))  # a plain step's
    copy_s = best(lambda: copy_draft.decoder.unembed(stream(copy_draft.decoder, tok1, pos1, dcache)))
    head_s = best(lambda: head_guess(head_draft))
    int8_s = best(lambda: head_guess(int8_draft)) if int8_draft is not None else None
    tokens = sum(AGREEMENT**i for i in range(k + 1))

    def head_kind(guess: float) -> float:  # k guesses, then the plain step with a (k + 1)-row unembedding
        return (k * guess + plain - unembed1 + unembed_k) / tokens

    seconds = {fastpaths.PLAIN: plain, "copy": (k * copy_s + check) / tokens, "head": head_kind(head_s)}
    if int8_s is not None:
        seconds["int8"] = head_kind(int8_s)
    LOG.debug("calibration, %d rows: plain %.4f s, check %.4f, unembeddings %.4f / %.4f, copy guess %.4f, "
              "head guess %.4f, int8 guess %s", rows, plain, check, unembed_k, unembed1, copy_s, head_s,
              "n/a" if int8_s is None else f"{int8_s:.4f}")  # fmt: skip
    return seconds


# ----------------------------------------------------------------------------- entry


def applies(options: DecodingOptions, rec: Recorder) -> bool:
    """Whether speculation decodes a call: greedy (temperature 0, no beams), no trace or edits, every block run."""
    return (options.beam_size is None and options.temperature == 0 and not options.compile
            and options.decoder_blocks is None and not rec.active)  # fmt: skip


@torch.no_grad()
def decode(model: Whisper, mel: Tensor | None = None, *, audio_features: Tensor | None = None,
           draft: Draft | None = None, guesses: int | None = None,
           **options) -> tuple[list[DecodingResult], Pace]:  # fmt: skip
    """``model.generate(mel, **options)`` (greedy) decoded speculatively with ``draft`` (default: the bf16 copy);
    returns the results and the call's measurements (``Pace``: acceptance, passes, tokens). ``guesses``: a fixed
    number of proposals per round (default: chosen from measurements)."""
    from .loop import checked_audio, prefill
    from .options import DecodingOptions, make_plan
    from .results import finish

    opts = DecodingOptions(**options)
    if (mel is None) == (audio_features is None):
        raise ValueError("give either mel or audio_features (the encoder's output), not both or neither")
    rec = model.recorder(None, None)
    if not applies(opts, rec):
        raise ValueError("speculative decoding is greedy only: no beam_size, temperature, compile or decoder_blocks")
    audio = checked_audio(model, mel, audio_features)  # (C, n_mels, frames) or (C, S, D)
    if opts.clips is not None and max(opts.clips) >= len(audio):
        raise ValueError(f"clips has {max(opts.clips)}, but the batch has {len(audio)} clips (0-{len(audio) - 1})")
    plan = make_plan(model, opts, n_clips=audio.shape[0] if opts.clips is None else len(opts.clips))
    xa = model.encoder(audio) if mel is not None else audio  # (C, S, D)
    d = prefill(model, plan, opts, xa, rec)
    draft = draft if draft is not None else chosen_draft(model, len(d.search.tokens))
    if draft is None:  # no draft pays here: the plain step, through the same loop (k = 0 every round)
        draft, guesses = draft_for(model, "head"), 0
    n_sel, pace = speculate(d, draft, guesses)
    return finish(d, n_sel), pace
