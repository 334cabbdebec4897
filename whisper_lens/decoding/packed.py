"""The unembedding of a decoding step, fast on the CPU: oneDNN's packed copy of the token embedding, per call.

A decoding step's biggest product is the unembedding (the token embedding matrix, most of a
step's bytes). ``Kernels.for_decoding`` can copy it once per ``generate`` call into oneDNN's
blocked ("packed") layout for the call's rows; whether that pays depends on the machine and the
row count (1.3x-1.6x ``F.linear``'s speed at 4 to 64 rows on one machine, nothing at 2), so it is
decided by timing both on this machine, once per shape (``packing_pays``, through
``whisper_lens.fastpaths``), the copy's cost spread over ``PAYBACK_STEPS`` steps. Packing the
step's small projections does not pay (0.75x-0.9x), so the model's own products stay
``nn.Linear``. The copy belongs to that call's ``Kernels``; nothing is stored on the model. Inside
``whisper_lens.model.textbook()`` every product is ``F.linear``.

oneDNN's linear product is a private torch op (the one torch.compile's CPU backend emits): it is
used only after a check that runs it once on this build and compares it with ``F.linear``
(``onednn_available``); where the check fails, the public ops run. Figures for each choice:
``benchmarks/bench_products.py``; ``benchmarks/README.md`` has the history.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import fastpaths
from ..model import TEXTBOOK

if TYPE_CHECKING:
    from ..model import TextDecoder

PAYBACK_STEPS = 32  # the packed copy must pay for its making within this many steps (a short window's tokens)


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


def packing_pays(weight: Tensor, rows: int) -> bool:
    """Whether oneDNN's packed copy of ``weight`` (V, D) beats ``F.linear`` for ``rows``-row products here.

    Timed once per machine and shape (``fastpaths.choose("unembedding", ...)``): a product of
    each kind, best of a few, the packed one charged its copy's making spread over
    ``PAYBACK_STEPS`` steps. The caller checks first that packing applies (fp32 CPU weight, no
    autograd, oneDNN available).
    """
    key = fastpaths.shape(rows=rows, out=weight.shape[0], into=weight.shape[1], dtype="float32")
    return fastpaths.choose("unembedding", weight.device, key, lambda: time_packing(weight, rows)) == "packed"


@torch.no_grad()
def time_packing(weight: Tensor, rows: int) -> dict[str, float]:
    """Seconds per step of a ``rows``-row product with ``weight``: ``F.linear`` ("plain") and oneDNN's packed
    copy ("packed", plus its making over ``PAYBACK_STEPS`` steps)."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))  # (rows, D)
    t = time.perf_counter()
    packed = onednn_pack(weight, rows)
    making = time.perf_counter() - t
    plain_s = fastpaths.best_of(lambda: F.linear(x, weight))  # (rows, V)
    packed_s = fastpaths.best_of(lambda: onednn_linear(x, packed, None))  # (rows, V)
    return {fastpaths.PLAIN: plain_s, "packed": packed_s + making / PAYBACK_STEPS}


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
        is fp32 on the CPU, autograd off, oneDNN available and packing pays for ``rows`` rows on
        this machine (``packing_pays``); else nothing is packed. The step's other products are
        small enough that packing them does not pay.
        """
        W = decoder.token_embedding.weight
        if not (rows >= 1 and W.device.type == "cpu" and W.dtype == torch.float32):
            return cls()
        if torch.is_grad_enabled() or TEXTBOOK.get() or not onednn_available() or not packing_pays(W, rows):
            return cls()
        return cls({decoder.token_embedding: onednn_pack(W, rows)}, rows)

    def linear(self, x: Tensor, layer: nn.Module) -> Tensor:
        """x @ W^T + b with the ``layer``'s weight and bias (an ``nn.Linear``, or the embedding as the unembedding)."""
        weight, bias = layer.weight, getattr(layer, "bias", None)
        if TEXTBOOK.get():
            return F.linear(x, weight, bias)
        packed = self.packed.get(layer)
        if packed is not None and x.dtype == torch.float32 and x.numel() == self.rows * weight.shape[1]:
            return onednn_linear(x, packed, bias)
        return F.linear(x, weight, bias)


DEFAULT = Kernels()
"""The kernels of a plain forward: ``F.linear`` for every product, nothing packed."""
