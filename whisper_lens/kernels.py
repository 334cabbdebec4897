"""The fast paths: how the model's products run fast on the device they run on, and the switch back to the textbook.

``model.py`` computes every projection and the unembedding as ``ops.linear(x, layer)``, where
``ops`` is a ``Kernels`` passed down the forward, and a decoding step attends through its
``KVCache``. What happens there is the business of this file alone:

- ``linear``: x @ W^T + b laid out by the number of rows on the CPU. A decoding step multiplies
  1 to 64 rows by each weight and its cost is reading W from memory; MKL reads W far below the
  memory bandwidth when the product is written x @ W^T for so few rows, and up to several times
  faster when written (W @ x^T)^T (for one row, split into one block of outputs per thread).
  More than 64 rows (the encoder, a teacher-forced pass) run in oneDNN, 10-20 % faster than MKL.
- ``Kernels.for_decoding``: the decoder's step weights copied once per ``generate`` call into
  oneDNN's blocked ("packed") layout, faster again for 2 to 64 rows. The copies belong to that
  call's ``Kernels``; nothing is stored on the model.
- ``KVCache``: a decoding step's keys and values, the values stored transposed so that a
  step's few queries read both in storage order (``attend_cached``).
- ``textbook()``: a context manager under which every product is ``F.linear`` and every
  attention ``scaled_dot_product_attention``: what to step through in a debugger. It is a
  context variable, so it holds for the thread (or asyncio task) that entered it.

All of it computes the same numbers as the textbook ops up to float rounding (tests/test_parity.py).
oneDNN's linear product is a private torch op (the one torch.compile's CPU backend emits): it is
used only after a check that runs it once on this build and compares it with ``F.linear``
(``onednn_available``); where the check fails, the public ops run. Figures for each path:
``benchmarks/bench_products.py``.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .model import TextDecoder

STEP_ROWS = 64  # the most rows a decoding step multiplies (batch x beams): fewer are memory-bound, more compute-bound

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


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ W^T + b for x (..., in) and W (out, in), as ``F.linear``, laid out for the CPU by the number of rows.

    One row is a matrix-vector product that MKL keeps on one core whatever the layout, so W is
    viewed (no copy) as n blocks of output features, a batch of n products for n threads; where
    ``out`` does not split (an odd vocabulary) the row is padded with a zero row instead. 2 to 64
    rows run as (W @ x^T)^T. More than 64 rows run in oneDNN unless autograd needs the product.
    Other inputs (not fp32, not on the CPU) take ``F.linear``.
    """
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] != in_features or rows == 0:
        return F.linear(x, weight, bias)
    if rows > STEP_ROWS:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        return F.linear(x, weight, bias) if grad or not onednn_available() else onednn_linear(x, weight, bias)
    n = math.gcd(out_features, torch.get_num_threads())
    if rows == 1 and n > 1 and weight.is_contiguous():
        w = weight.view(n, out_features // n, in_features)  # (n, out/n, in)
        xt = x.reshape(1, in_features).T.expand(n, in_features, 1)  # (n, in, 1)
        b = None if bias is None else bias.view(n, out_features // n, 1)  # (n, out/n, 1)
        y = torch.bmm(w, xt) if b is None else torch.baddbmm(b, w, xt)  # (n, out/n, 1)
    else:
        x2 = x.reshape(rows, in_features)  # (rows, in)
        if rows == 1:
            x2 = F.pad(x2, (0, 0, 0, 1))  # (2, in)
        y = weight @ x2.T if bias is None else torch.addmm(bias[:, None], weight, x2.T)  # (out, rows or 2)
    y = y.reshape(out_features, -1)[:, :rows].T.contiguous()  # (rows, out)
    return y.view(*x.shape[:-1], out_features)  # (..., out)


class Kernels:
    """How one forward pass or one ``generate`` call computes its products; passed down the forward as ``ops``.

    ``Kernels()`` (``DEFAULT``) runs ``linear``. ``Kernels.for_decoding(decoder, rows)`` also
    holds oneDNN's packed copies of the decoder's step weights for ``rows``-row products, made
    from the weights as they are when the call starts (a weight edited between two calls is
    always the one used) and dropped with the object. Under ``textbook()`` every product is
    ``F.linear``.
    """

    def __init__(self, packed: dict[nn.Module, Tensor] | None = None, rows: int = 0) -> None:
        self.packed = packed or {}  # layer -> its weight packed for `rows`-row inputs
        self.rows = rows

    @classmethod
    def for_decoding(cls, decoder: TextDecoder, rows: int) -> Kernels:
        """Kernels for a loop of ``rows``-row decoding steps of ``decoder`` (a ``TextDecoder``).

        Packs the step's projections (not the audio's keys/values, computed once before the
        steps) and the unembedding, when they are fp32 on the CPU, 2 to 64 rows, autograd off
        and oneDNN available; else nothing is packed.
        """
        W = decoder.token_embedding.weight
        if not (1 < rows <= STEP_ROWS and W.device.type == "cpu" and W.dtype == torch.float32):
            return cls()
        if torch.is_grad_enabled() or is_textbook() or not onednn_available():
            return cls()
        audio = ("cross_attn.key", "cross_attn.value")
        layers = [m for name, m in decoder.named_modules() if isinstance(m, nn.Linear) and not name.endswith(audio)]
        packed = {m: onednn_pack(m.weight, rows) for m in layers}
        packed[decoder.token_embedding] = onednn_pack(W, rows)
        return cls(packed, rows)

    def linear(self, x: Tensor, layer: nn.Module) -> Tensor:
        """x @ W^T + b with the ``layer``'s weight and bias (an ``nn.Linear``, or the embedding as the unembedding)."""
        weight, bias = layer.weight, getattr(layer, "bias", None)
        if _TEXTBOOK.get():
            return F.linear(x, weight, bias)
        packed = self.packed.get(layer)
        if packed is not None and x.dtype == torch.float32 and x.numel() == self.rows * weight.shape[1]:
            return onednn_linear(x, packed, bias)
        return linear(x, weight, bias)


DEFAULT = Kernels()
"""The kernels of a plain forward: ``linear`` for every product, nothing packed."""


def attend_cached(q: Tensor, k: Tensor, vt: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for a decoding step: queries q (B, H, T, Dh) over cached keys
    k (B, H, S, Dh) and values stored transposed, vt (B, H, Dh, S); returns (B, H, T, Dh).

    Written as k q^T and vt p^T, each product streams its big operand (S rows of k, Dh rows of
    vt) in storage order: for one query on the CPU, 1.4x-1.9x the rate of the fused kernel. The
    scale and the mask ride in the first product (``baddbmm``: bias + alpha k q^T) on (B*H)-batched
    views. ``mask`` (B or 1, 1, T, S) bool: True where a query may look.
    """
    B, H, T, Dh = q.shape
    S = k.shape[2]
    if mask is None:
        bias = q.new_zeros(())  # ()
    else:
        bias = torch.where(mask.mT, 0.0, float("-inf")).to(q.dtype)  # (B or 1, 1, S, T)
        bias = bias.expand(B, H, S, T).reshape(B * H, S, T) if mask.shape[0] > 1 else bias[0]  # (BH or 1, S, T)
    scores = torch.baddbmm(bias, k.reshape(B * H, S, Dh), q.reshape(B * H, T, Dh).mT, alpha=Dh**-0.5).mT  # (BH, T, S)
    p = scores.softmax(dim=-1, dtype=torch.float32 if q.element_size() < 4 else None).to(q.dtype)  # (BH, T, S)
    z = torch.bmm(vt.reshape(B * H, Dh, S), p.mT)  # (BH, Dh, T)
    return z.view(B, H, Dh, T).mT  # (B, H, T, Dh)


class KVCache:
    """The keys and values one attention layer attends over while decoding, in buffers of a fixed size.

    Self-attention: an empty cache of ``length`` positions (``KVCache.empty``); each step writes
    its keys and values at its positions (``write``) and its queries attend over all of it under
    a mask. Cross-attention: the audio's keys and values, computed once (``KVCache.holding``).
    Keys are stored (B, H, S, Dh), values transposed, (B, H, Dh, S): a step's queries read both
    in storage order (``attend_cached``). ``keys()`` / ``values()`` are the plain (B, H, S, Dh) views.
    """

    def __init__(self, k: Tensor, vt: Tensor) -> None:
        self.k = k  # (B, H, S, Dh)
        self.vt = vt  # (B, H, Dh, S)
        self.rows = torch.arange(k.shape[0], device=k.device)[:, None]  # (B, 1): row b writes into row b

    @classmethod
    def empty(cls, batch: int, heads: int, length: int, head_dim: int, like: Tensor) -> KVCache:
        """A cache of ``length`` positions of zeros (finite: masked positions get weight 0, and 0 * NaN is NaN)."""
        k = like.new_zeros(batch, heads, length, head_dim)  # (B, H, S, Dh)
        vt = like.new_zeros(batch, heads, head_dim, length)  # (B, H, Dh, S)
        return cls(k, vt)

    @classmethod
    def holding(cls, k: Tensor, v: Tensor) -> KVCache:
        """A cache holding the keys and values k, v (B, S, H, Dh) (the audio's, for cross-attention)."""
        return cls(k.transpose(1, 2).contiguous(), v.permute(0, 2, 3, 1).contiguous())

    def write(self, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """Store k, v (B, T, H, Dh) at positions ``pos`` (B, T), or (1, T) when every row is at the same ones."""
        self.k[self.rows, :, pos] = k  # k[b, :, pos[b, t]] = k[b, t]
        self.vt[self.rows, :, :, pos] = v

    def keys(self) -> Tensor:
        return self.k  # (B, H, S, Dh)

    def values(self) -> Tensor:
        return self.vt.mT  # (B, H, S, Dh), a view

    def attend(self, q: Tensor, mask: Tensor | None) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) v for queries q (B, H, T, Dh) over the cache: (B, H, T, Dh)."""
        if _TEXTBOOK.get():
            return F.scaled_dot_product_attention(q, self.keys(), self.values(), attn_mask=mask)  # (B, H, T, Dh)
        return attend_cached(q, self.k, self.vt, mask)  # (B, H, T, Dh)

    def repeat_rows(self, n: int) -> KVCache:
        """Each row repeated ``n`` times in place (row b becomes rows b*n .. b*n + n-1): a clip's beams."""
        return KVCache(self.k.repeat_interleave(n, dim=0), self.vt.repeat_interleave(n, dim=0))

    def take_rows(self, rows: Tensor, upto: int) -> None:
        """Row b takes the first ``upto`` positions of row ``rows[b]`` (beam search: a beam's history follows it)."""
        self.k[:, :, :upto] = self.k[:, :, :upto].index_select(0, rows)
        self.vt[..., :upto] = self.vt[..., :upto].index_select(0, rows)
