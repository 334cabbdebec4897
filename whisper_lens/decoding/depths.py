"""Per-clip depths: clips decoded in one batch while each runs only its first n decoder blocks (``decoder_blocks=``).

The clips come deepest first, so decoder block i runs on the first rows (the clips at least i + 1
blocks deep) and the other rows pass it by, as ``Edits().skip`` of the blocks past their depth
would make them. Each layer's cache holds only the rows that run it (``new_cache(rows=...)``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..trace import IDLE, Recorder
from .options import per_clip

if TYPE_CHECKING:
    from ..model import TextDecoder, Whisper
    from .cache import DecoderCache


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


def rows_per_block(depth: tuple[int, ...], n_layer: int) -> list[int]:
    """Per decoder block, how many rows (the first: clips come deepest first) run it."""
    return [sum(d > i for d in depth) for i in range(n_layer)]


def stream_at_depths(decoder: TextDecoder, tokens: Tensor, rec: Recorder = IDLE, *, cache: DecoderCache,
                     pos: Tensor) -> tuple[Tensor, list]:  # fmt: skip
    """``TextDecoder.stream`` of a decoding step where block i runs on the first ``cache.attn[i].rows`` rows only.

    ``tokens`` (B, T) at positions ``pos`` (B or 1, T); returns the final stream (B, T, D) and the caches.
    """
    mask = (torch.arange(cache.length, device=tokens.device) <= pos[..., None])[:, None]  # (B or 1, 1, T, S)
    x = rec("embed", decoder.token_embedding(tokens) + decoder.positional_embedding[pos])  # (B, T, D)
    layers = cache.layers()
    for i, block in enumerate(decoder.blocks):
        brec = rec.child(f"blocks.{i}")
        x = brec("resid_pre", x)  # (B, T, D)
        n = layers[i][0].rows  # the rows that run this block
        if n and not rec.skips(f"blocks.{i}"):
            m, p = (mask[:n] if len(mask) > 1 else mask), (pos[:n] if len(pos) > 1 else pos)
            y, layers[i] = block(x[:n], brec, mask=m, cache=layers[i], pos=p)  # (n, T, D)
            x = y if n == len(x) else torch.cat([y, x[n:]])  # (B, T, D): the other rows pass through
        x = brec("resid_post", x)  # (B, T, D)
    return rec("ln", decoder.ln(x)), layers  # (B, T, D)
