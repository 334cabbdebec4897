"""The search on the device: greedy, sampled and beam selections over all rows at once (``Search``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


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
