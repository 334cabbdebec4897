"""The logit filters: what the rules forbid before each choice (openai-whisper's, as tensor operations over rows)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .options import Plan


def nonfinite(logits: Tensor) -> Tensor:
    """Whether ``logits`` hold NaN or inf anywhere: a bool on the device (no host sync).

    One sum rather than ``isfinite(...).all()``: a sum is NaN or inf where any term is, and it is
    one vectorised pass (``isfinite`` over the vocabulary costs a step ~0.2 ms at batch 1). A sum
    can overflow only where some logit is past ~1e33, itself out of any model's range.
    """
    return ~logits.sum().isfinite()


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
    best_text = logprobs[:, :ts].amax(dim=-1)  # (N,)
    logits[:, :ts].masked_fill_((ts_mass > best_text)[:, None], -math.inf)
    return logits
