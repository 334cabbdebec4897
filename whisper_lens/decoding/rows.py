"""Row compaction: on the CPU, rows that are done leave the batch, so a step costs what its unfinished rows read.

A done row's token and score no longer change, but in a fixed-shape batch it is still computed,
and its share of a step's reads (its audio keys/values, 17.6 MiB per clip for tiny) is wasted.
``compacted`` wraps the step function: before each step, rows that are done leave the cache (a
clip's beams finish together), the step runs on the rows left, and their logits go back into the
(N, V) logits the selection reads; a done row's stay as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..trace import Recorder
from .packed import Kernels

if TYPE_CHECKING:
    from .loop import Decoding
    from .options import DecodingOptions

Step = Callable[..., Tensor]  # (decoder, ops, tokens, pos, cache) -> logits (N, T, V)


def drops_done_rows(options: DecodingOptions, rec: Recorder, device: torch.device) -> bool:
    """Whether steps leave out the rows that are done: on the CPU, untraced, uncompiled.

    On CUDA the shapes stay fixed (no host sync, capturable steps), and a trace needs every row
    of every step.
    """
    return device.type == "cpu" and not options.compile and not rec.active


def compacted(d: Decoding, forward: Step) -> Callable[[Tensor, Tensor], Tensor]:
    """The step (tokens (N, 1), pos (N or 1, 1)) -> logits (N, V) that runs ``forward`` on the live rows only."""

    def step(tokens: Tensor, pos: Tensor) -> Tensor:
        drop_done_rows(d)
        rows, p = d.live, pos[d.live] if len(pos) > 1 else pos  # (L,), (L or 1, 1)
        n = int(p.max()) + 1  # the positions written so far: no attention over the empty ones after them
        logits = forward(d.model.decoder, d.ops, tokens[rows], p, d.cache.upto(n))[:, 0]  # (L, V)
        if len(rows) == len(d.last):  # no row done yet
            return logits
        d.last[rows] = logits  # into (N, V); a done row's stay as they were
        return d.last

    return step


def drop_done_rows(d: Decoding) -> None:
    """Rows that are done leave the cache (a clip's beams finish together).
    Once half the rows have left, the unembedding is packed again for the rows left (packing costs ~30 ms)."""
    keep = ~d.search.done[d.live]  # (L,)
    if bool(keep.all()):
        return
    d.live = d.live[keep]
    d.cache = d.cache.take_rows(keep.nonzero()[:, 0])
    if d.ops.rows and 2 * len(d.live) <= d.ops.rows:  # the unembedding packed again, for the rows left
        d.ops = Kernels.for_decoding(d.model.decoder, len(d.live))
