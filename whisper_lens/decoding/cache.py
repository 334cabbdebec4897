"""The keys and values a ``generate`` call attends over: a ``KVCache`` per attention layer, a ``DecoderCache`` in all.

The model (``model.py``) is handed each layer's cache and hands it back: self-attention writes a
step's keys and values into it (``write``) and reads them (``keys``, ``values``); cross-attention
reads the audio's. Rows of the batch that decode the same clip (a clip's beams, or the rows of
``generate(clips=...)``) share that clip's audio keys and values, stored once and read once per
step (``attend``). Storage layout, sharing between rows, beam reordering and rows leaving the
batch are this file's business alone.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..trace import IDLE, Recorder

if TYPE_CHECKING:
    from ..model import TextDecoder


class KVCache:
    """The keys and values an attention layer attends over, and the operations on them.

    Decoding, self-attention: an empty cache of ``length`` positions (``KVCache.empty``); each step
    writes its keys and values at its positions (``write``) and its queries attend over all of it
    under a mask. Cross-attention: the audio's keys and values, computed once (``KVCache.holding``).
    ``Attention.forward`` (model.py) reads them with ``keys()`` and ``values()`` and attends. Values
    (C, H, S, Dh) are stored contiguous, and self-attention's keys too: the layout the fused
    attention kernel reads fastest. The audio's keys are stored transposed, (C, H, Dh, S)
    (``audio``), and model.py attends over them with the two products written out: a step reads
    them at 1.05x-1.2x the fused kernel's speed, since the scores of a few queries are then one pass
    over contiguous memory (``bench_products.py``).

    ``owner``: the cache row each query row reads, when rows share one. A clip's beams, or the
    rows decoding one clip under several settings, attend over the same audio: its keys and values
    are stored once, and the queries of all the rows that read them attend in one go (as extra
    query positions, ``attend``), so a step reads each clip's audio once, not once per row.
    """

    def __init__(self, k: Tensor, v: Tensor, owner: Tensor | None = None, audio: bool = False) -> None:
        self.k = k  # (C, H, S, Dh); with ``audio``, a view of keys stored (C, H, Dh, S)
        self.v = v  # (C, H, S, Dh)
        self.audio = audio
        if owner is not None and torch.equal(owner, torch.arange(len(k), device=owner.device)):
            owner = None
        self.owner = owner  # (N,) the cache row query row n reads; None: query row n reads row n
        self.grid = None if owner is None else grid_of(owner, len(k))  # see ``grid_of``

    @property
    def rows(self) -> int:
        """How many query rows attend over the cache."""
        return len(self.k) if self.owner is None else len(self.owner)

    @classmethod
    def empty(cls, batch: int, heads: int, length: int, head_dim: int, like: Tensor) -> KVCache:
        """A cache of ``length`` positions of zeros (finite: masked positions get weight 0, and 0 * NaN is NaN)."""
        k = like.new_zeros(batch, heads, length, head_dim)  # (B, H, S, Dh)
        return cls(k, torch.zeros_like(k))

    @classmethod
    def holding(cls, k: Tensor, v: Tensor, owner: Tensor | None = None) -> KVCache:
        """A cache holding the keys and values k, v (C, S, H, Dh) (the audio's, for cross-attention), for
        query rows that read rows ``owner`` (N,) of them (None: query row n reads row n). Rows of k and v
        that no query row reads are left out."""
        if owner is not None:
            used, owner = owner.unique(return_inverse=True)  # (C',) the rows read; (N,) which each query row reads
            if len(used) < len(k):
                k, v = k.index_select(0, used), v.index_select(0, used)  # (C', S, H, Dh)
        kt = k.permute(0, 2, 3, 1).contiguous()  # (C, H, Dh, S): the keys stored transposed
        return cls(kt.mT, v.transpose(1, 2).contiguous(), owner, audio=True)

    def write(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, T, H, Dh) at positions ``pos`` (B, T), or (1, T) when every row is at the same ones."""
        rows = torch.arange(self.k.shape[0], device=self.k.device)[:, None]  # (B, 1): row b writes into row b
        self.k[rows, :, pos] = k  # k[b, :, pos[b, t]] = k[b, t]
        self.v[rows, :, pos] = v

    def keys(self) -> Tensor:
        """The keys, one row per query row (N, H, S, Dh): a copy when rows are shared."""
        return self.k if self.owner is None else self.k.index_select(0, self.owner)

    def values(self) -> Tensor:
        """The values, one row per query row (N, H, S, Dh): a copy when rows are shared."""
        return self.v if self.owner is None else self.v.index_select(0, self.owner)

    def attend(self, q: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) v for queries q (N, H, T, Dh) over the cache: (N, H, T, Dh)."""
        if self.owner is None:
            return self.product(q, mask)  # (N, H, T, Dh)
        if mask is not None:
            raise ValueError("a cache shared by several query rows attends without a mask")
        (_, H, T, Dh), C, (place, M) = q.shape, len(self.k), self.grid
        if place is not None:  # rows into their cache row's slots; empty slots attend too, and are dropped
            q = q.new_zeros(C * M, H, T, Dh).index_copy_(0, place, q)  # (C*M, H, T, Dh)
        q = q.view(C, M, H, T, Dh).transpose(1, 2).reshape(C, H, M * T, Dh)  # a cache row's M rows as M*T queries
        z = self.product(q, None)  # (C, H, M*T, Dh)
        z = z.view(C, H, M, T, Dh).transpose(1, 2).reshape(C * M, H, T, Dh)  # (C*M, H, T, Dh)
        return z if place is None else z.index_select(0, place)  # (N, H, T, Dh)

    def product(self, q: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) v for queries q (C, H, T, Dh), row c over cache row c: (C, H, T, Dh).
        The fused kernel, or for the audio's keys (stored transposed) the two products written out."""
        if not self.audio:
            return F.scaled_dot_product_attention(q, self.k, self.v, attn_mask=mask)  # (C, H, T, Dh)
        scores = (q * q.shape[-1] ** -0.5) @ self.k.mT  # (C, H, T, S): one pass over keys stored (Dh, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1) @ self.v  # (C, H, T, Dh)

    def upto(self, n: int) -> KVCache:
        """The same cache seen through its first ``n`` positions (views: writes go through)."""
        view = copy.copy(self)
        view.k, view.v = self.k[:, :, :n], self.v[:, :, :n]
        return view

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated ``n`` times (row b becomes rows b*n .. b*n + n-1): a clip's beams' histories, copied."""
        return KVCache(self.keys().repeat_interleave(n, dim=0), self.values().repeat_interleave(n, dim=0))

    def shared_by(self, n: int) -> KVCache:
        """The same keys and values, each query row becoming ``n`` consecutive ones (a clip's beams); no copy."""
        owner = self.owner if self.owner is not None else torch.arange(len(self.k), device=self.k.device)
        return KVCache(self.k, self.v, owner.repeat_interleave(n), self.audio)

    def select_rows(self, rows: Tensor) -> KVCache:
        """A new cache of the query rows ``rows`` (L,), in that order (copies); a shared cache row that no
        query row reads any more leaves it."""
        if self.owner is None:
            return self.rows_of(rows, None)
        used, owner = self.owner[rows].unique(return_inverse=True)  # (C',) cache rows still read; (L,) which
        if len(used) == len(self.k):
            return KVCache(self.k, self.v, owner, self.audio)
        return self.rows_of(used, owner)

    def rows_of(self, rows: Tensor, owner: Tensor | None) -> KVCache:
        """A new cache of the cache rows ``rows`` (copies, in the same layout), read by query rows ``owner``."""
        k = self.k.mT.index_select(0, rows).mT if self.audio else self.k.index_select(0, rows)
        return KVCache(k, self.v.index_select(0, rows), owner, self.audio)

    def take_rows(self, rows: Tensor, upto: int) -> None:
        """Row b takes the first ``upto`` positions of row ``rows[b]`` (beam search: a beam's history follows it)."""
        self.k[:, :, :upto] = self.k[:, :, :upto].index_select(0, rows)
        self.v[:, :, :upto] = self.v[:, :, :upto].index_select(0, rows)


def grid_of(owner: Tensor, C: int) -> tuple[Tensor | None, int]:
    """Where each query row goes when the rows sharing a cache row attend together: (place, M).

    The queries are laid out on a grid of the ``C`` cache rows by M slots, M the most rows reading
    one cache row; query row n goes to slot ``place[n]`` = owner * M + (how many rows before it
    read the same cache row). ``place`` is None when that is every slot in order (a clip's beams).
    """
    rows = owner.tolist()
    M = max(collections.Counter(rows).values(), default=1)
    seen: collections.Counter = collections.Counter()
    place = []
    for c in rows:
        place.append(c * M + seen[c])
        seen[c] += 1
    return (None, M) if place == list(range(C * M)) else (torch.tensor(place, device=owner.device), M)


@dataclass
class DecoderCache:
    """The keys and values one generation attends over, per decoder layer (``new_cache``)."""

    attn: list[KVCache]  # self-attention: written at each step's positions
    cross_attn: list[KVCache]  # the audio's, computed once
    depths: bool = False  # the layers hold different numbers of rows (per-clip depths: ``depths.py``)

    @property
    def length(self) -> int:
        """The positions the self-attention caches hold (the model masks the ones after each query's own)."""
        return self.attn[0].k.shape[2]

    def layers(self) -> list[tuple[KVCache, KVCache]]:
        """Per decoder block, (self-attention cache, cross-attention cache): what ``TextDecoder.stream`` reads."""
        return list(zip(self.attn, self.cross_attn, strict=True))

    def upto(self, n: int) -> DecoderCache:
        """The same cache seen through its first ``n`` positions (views: a step's writes go through)."""
        return dataclasses.replace(self, attn=[c.upto(n) for c in self.attn])

    def repeat_rows(self, n: int) -> DecoderCache:
        """Each row repeated ``n`` times (row b becomes rows b*n .. b*n + n-1): every beam starts as its clip.
        Self-attention histories are copied (beams diverge); the audio's keys and values are shared."""
        attn, cross = [c.repeat_rows(n) for c in self.attn], [c.shared_by(n) for c in self.cross_attn]
        return DecoderCache(attn, cross, self.depths)

    def take_rows(self, rows: Tensor) -> DecoderCache:
        """A cache of only the rows ``rows`` (L,), ascending: rows that are done leave a generation. A layer
        whose cache holds only the first n rows (per-clip depths) keeps those of ``rows`` below n."""
        kept = [[c.select_rows(rows[rows < c.rows]) for c in caches] for caches in (self.attn, self.cross_attn)]
        return DecoderCache(*kept, self.depths)


def new_cache(decoder: TextDecoder, xa: Tensor, length: int, rec: Recorder = IDLE, rows: list[int] | None = None,
              clips: Tensor | None = None) -> DecoderCache:  # fmt: skip
    """Empty self-attention caches of ``length`` positions and, computed once, every layer's keys and values
    of the audio ``xa`` (C, S, D). ``clips`` (N,): the clip each row decodes (None: row n, clip n); rows of a
    clip share its keys and values. ``rows``: per block, how many rows (the first) run it (per-clip depths)."""
    n_ctx, D = decoder.positional_embedding.shape
    if not 0 < length <= n_ctx:
        raise ValueError(f"cache length must be between 1 and n_text_ctx={n_ctx}, got {length}")
    H, depths = decoder.blocks[0].attn.n_head, rows is not None
    rows = rows or [len(xa) if clips is None else len(clips)] * len(decoder.blocks)
    attn = [KVCache.empty(n, H, length, D // H, like=decoder.positional_embedding) for n in rows]
    cross = []
    for i, (block, n) in enumerate(zip(decoder.blocks, rows, strict=True)):
        audio = xa if clips is not None or n == len(xa) else xa[:n]  # (C, S, D): the clips whose rows run block i
        k, v = block.cross_attn.kv(audio, rec.child(f"blocks.{i}.cross_attn"))  # (C, S, H, Dh)
        cross.append(KVCache.holding(k, v, None if clips is None else clips[:n]))
    return DecoderCache(attn, cross, depths)
