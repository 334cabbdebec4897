"""The fast paths: how the model's products run fast on the device they run on, and the switch back to the textbook.

``model.py`` computes every projection and the unembedding as ``ops.linear(x, layer)``, where
``ops`` is a ``Kernels`` passed down the forward, and a decoding step attends through its
``KVCache``. What happens there is the business of this file alone:

- ``Kernels.linear``: x @ W^T + b, ``F.linear`` unless the product has a packed weight.
- ``Kernels.for_decoding``: the unembedding (the token embedding matrix, most of a step's
  bytes) copied once per ``generate`` call into oneDNN's blocked ("packed") layout for the
  call's 4 to 64 rows: 1.3x-1.6x ``F.linear``'s speed there (at 2 rows it does not pay).
  Packing the step's small projections does not pay (0.75x-0.9x), so they are left alone. The
  copy belongs to that call's ``Kernels``; nothing is stored on the model.
- ``KVCache``: a decoding step's keys and values, stored contiguous (B, H, S, Dh), which the
  fused attention kernel reads at full speed (1.3x a transposed view); the audio's keys stored
  transposed (B, H, Dh, S) instead, attended over by the two products written out (1.05x-1.2x).
- ``textbook()``: a context manager under which every product is ``F.linear`` and every
  attention ``scaled_dot_product_attention``: what to step through in a debugger. It is a
  context variable, so it holds for the thread (or asyncio task) that entered it.

All of it computes the same numbers as the textbook ops up to float rounding (tests/test_parity.py).
oneDNN's linear product is a private torch op (the one torch.compile's CPU backend emits): it is
used only after a check that runs it once on this build and compares it with ``F.linear``
(``onednn_available``); where the check fails, the public ops run. Figures for each choice:
``benchmarks/bench_products.py``. The layouts that once won on a machine with twice this
one's memory bandwidth (one row split into a block per thread, (W @ x^T)^T, values stored
transposed, oneDNN for the encoder's many-row products) lost to the plain ops on this one
and are gone; ``benchmarks/README.md`` has the history.
"""

from __future__ import annotations

import collections
import contextvars
import copy
import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .model import TextDecoder

STEP_ROWS = 64  # the most rows of a decoding step whose products are bound by reading the weight
PACK_FROM = 4  # fewer rows read the unembedding as fast with F.linear as packed (and packing it costs 30 ms)

_TEXTBOOK = contextvars.ContextVar("whisper_lens_textbook", default=False)


@contextmanager
def textbook() -> Iterator[None]:
    """Within this block every product is the textbook one: ``F.linear``, SDPA or the written-out softmax.

    For stepping through the model in a debugger (or checking the fast paths): the numbers are
    the same up to float rounding. Thread-safe: other threads keep their own setting.
    """
    token = _TEXTBOOK.set(True)
    try:
        yield
    finally:
        _TEXTBOOK.reset(token)


def is_textbook() -> bool:
    """Is ``textbook()`` in force here?"""
    return _TEXTBOOK.get()


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN's private linear ops run on this build and agree with ``F.linear`` (checked once).

    The check multiplies a small random input by a plain and by a packed weight and compares
    both with ``F.linear``; a missing op, a changed signature or a wrong result means no.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 16, generator=g), torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
    want = F.linear(x, w, b)  # (3, 24)
    try:
        with torch.no_grad():
            plain = onednn_linear(x, w, b)  # (3, 24)
            packed = onednn_linear(x, onednn_pack(w, 3), b)  # (3, 24)
    except (AttributeError, RuntimeError, TypeError, NotImplementedError):
        return False
    return all(y.shape == want.shape and torch.allclose(y, want, atol=1e-5, rtol=1e-5) for y in (plain, packed))


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ W^T + b in oneDNN, W plain (out, in) or packed by ``onednn_pack``. No gradient flows through it."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (rows, out)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def onednn_pack(weight: Tensor, rows: int) -> Tensor:
    """oneDNN's blocked copy of W (out, in) for ``onednn_linear`` of ``rows``-row inputs (CPU, fp32, no gradient)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


class Kernels:
    """How one forward pass or one ``generate`` call computes its products; passed down the forward as ``ops``.

    ``Kernels()`` (``DEFAULT``) runs ``F.linear``. ``Kernels.for_decoding(decoder, rows)`` also
    holds oneDNN's packed copy of the unembedding for ``rows``-row products, made from the weight
    as it is when the call starts (a weight edited between two calls is always the one used) and
    dropped with the object. Under ``textbook()`` every product is ``F.linear``.
    """

    def __init__(self, packed: dict[nn.Module, Tensor] | None = None, rows: int = 0) -> None:
        self.packed = packed or {}  # layer -> its weight packed for `rows`-row inputs
        self.rows = rows

    @classmethod
    def for_decoding(cls, decoder: TextDecoder, rows: int) -> Kernels:
        """Kernels for a loop of ``rows``-row decoding steps of ``decoder`` (a ``TextDecoder``).

        Packs the unembedding (the token embedding matrix, the step's one big product) when it
        is fp32 on the CPU, for 4 to 64 rows, autograd off and oneDNN available; else nothing
        is packed. The step's other products are small enough that packing them does not pay.
        """
        W = decoder.token_embedding.weight
        if not (PACK_FROM <= rows <= STEP_ROWS and W.device.type == "cpu" and W.dtype == torch.float32):
            return cls()
        if torch.is_grad_enabled() or is_textbook() or not onednn_available():
            return cls()
        return cls({decoder.token_embedding: onednn_pack(W, rows)}, rows)

    def linear(self, x: Tensor, layer: nn.Module) -> Tensor:
        """x @ W^T + b with the ``layer``'s weight and bias (an ``nn.Linear``, or the embedding as the unembedding)."""
        weight, bias = layer.weight, getattr(layer, "bias", None)
        if _TEXTBOOK.get():
            return F.linear(x, weight, bias)
        packed = self.packed.get(layer)
        if packed is not None and x.dtype == torch.float32 and x.numel() == self.rows * weight.shape[1]:
            return onednn_linear(x, packed, bias)
        return F.linear(x, weight, bias)


DEFAULT = Kernels()
"""The kernels of a plain forward: ``F.linear`` for every product, nothing packed."""


class KVCache:
    """The keys and values an attention layer attends over, and the operations on them.

    Decoding, self-attention: an empty cache of ``length`` positions (``KVCache.empty``); each step
    writes its keys and values at its positions (``write``) and its queries attend over all of it
    under a mask. Cross-attention: the audio's keys and values, computed once (``KVCache.holding``).
    A teacher-forced pass wraps the keys and values it has just computed. Decoding stores values
    (C, H, S, Dh) contiguous, and self-attention's keys too: the layout the fused attention kernel
    reads fastest (a transposed or strided view sends it down its slower written-out path). The
    audio's keys are stored transposed, (C, H, Dh, S) (``audio``), and attended over by the two
    products written out: a step reads them at 1.05x-1.2x the fused kernel's speed, since the
    scores of a few queries are then one pass over contiguous memory (``bench_products.py``).

    ``owner``: the cache row each query row reads, when rows share one. A clip's beams, or the
    rows decoding one clip under several settings, attend over the same audio: its keys and values
    are stored once, and the queries of all the rows that read them attend in one go (as extra
    query positions), so a step reads each clip's audio once, not once per row.
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
        if not self.audio or _TEXTBOOK.get():
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
