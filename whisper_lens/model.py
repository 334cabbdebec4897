"""Whisper, written out for reading: an audio encoder, a text decoder, and every activation named.

Whisper (Radford et al., 2022, "Robust Speech Recognition via Large-Scale Weak Supervision") is
an encoder-decoder Transformer. The encoder turns a log-mel spectrogram of 30 s of audio into
``n_audio_ctx`` vectors (two convolutions, the second with stride 2, then pre-LayerNorm
residual blocks). The decoder reads text tokens, attends to itself causally and to the audio
through cross-attention, and predicts the next token with the token embedding matrix reused
as the unembedding.

Reading guide. Shapes use B batch, S audio positions (``n_audio_ctx``), T text positions,
D width, H heads, Dh = D / H, V vocabulary. Every ``rec("name", x)`` is a named point: the
recorder (``trace.py``) applies edits there and keeps the value if it was asked for; with no
trace and no edits it returns ``x`` unchanged. Module and parameter names are OpenAI's
state-dict keys, so an OpenAI checkpoint loads as is.

Attention runs the fused ``scaled_dot_product_attention`` unless a layer's ``scores`` or
``pattern`` is asked for (recorded or edited); then that layer computes softmax(q k^T / sqrt(Dh))
by hand and z = pattern @ v: the same numbers up to float rounding (~1e-7). A decoding step,
whose cache keeps the values transposed, runs ``attend_cached`` instead (same numbers again). Every projection
(``Linear``) and the unembedding go through ``linear``: ``F.linear``, except that the few-row
products of a decoding step on CPU are laid out so that MKL reads the weights on all threads,
or, while ``packed_weights`` holds blocked copies of them for a batch, run in oneDNN.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .trace import IDLE, Edits, Recorder, Trace, TraceRequest, select_names


@dataclass(frozen=True)
class ModelDims:
    """The ten numbers that fix a Whisper network's shape (OpenAI's field names)."""

    n_mels: int  # mel bins of the input spectrogram (80; 128 for large-v3)
    n_audio_ctx: int  # encoder positions: input frames / 2 (1500 for 30 s)
    n_audio_state: int  # encoder width
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int  # longest token sequence (448)
    n_text_state: int  # decoder width
    n_text_head: int
    n_text_layer: int

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelDims.{name} must be a positive int, got {value!r}")
        if self.n_audio_state % self.n_audio_head or self.n_text_state % self.n_text_head:
            raise ValueError(f"widths must divide by head counts: {self}")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Fixed sinusoidal positions of the encoder: sin in the first half of channels, cos in the second."""
    if channels % 2:
        raise ValueError(f"sinusoidal embedding needs an even width, got {channels}")
    half = channels // 2
    log_step = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-log_step * torch.arange(half))  # (D/2,)
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (S, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (S, D)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32 whatever the activations' dtype (as OpenAI's, for fp16 stability)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the common case, without three no-op casts
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        t = torch.promote_types(x.dtype, torch.float32)
        y = F.layer_norm(x.to(t), self.normalized_shape, self.weight.to(t), self.bias.to(t), self.eps)
        return y.to(x.dtype)


# oneDNN's linear product (a private torch op, the one torch.compile's CPU backend emits), where this build has it
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# the most rows a decoding step multiplies (batch x beams); more rows are compute-bound, fewer memory-bound
STEP_ROWS = 64


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: Tensor | None = None) -> Tensor:
    """x @ W^T + b for x (..., in) and W (out, in), as ``F.linear``; laid out for the CPU by the number of rows.

    A decoding step multiplies 1 to 64 rows by every weight, and its cost is reading W from
    memory. Written x @ W^T, MKL reads W for so few rows far below the memory bandwidth; written
    (W @ x^T)^T, the same product runs up to several times faster. One row is a matrix-vector
    product that MKL keeps on one core whatever the layout, so W is viewed (no copy) as n blocks
    of output features, a batch of n products for n threads; where ``out`` does not split (the
    vocabulary is odd) the row is padded with a zero row instead. ``packed``: oneDNN's blocked
    copy of W (``packed_weights``: CPU, fp32, no autograd, while a batch decodes); the rows then
    run in oneDNN with no further checks, faster still (8 rows: 1.6-1.7x for the unembedding,
    1.05-1.3x for a D x D projection, on the AMD CPU of ``benchmarks/bench_products.py``). More
    than 64 rows (the encoder, a teacher-forced pass) are compute-bound and run in oneDNN too
    (~10-20 % faster than MKL there), unless autograd needs the product. Same numbers up to float
    rounding. Other inputs (not fp32, not on the CPU) take ``F.linear``.
    """
    out_features, in_features = weight.shape
    if packed is not None and x.dtype == torch.float32 and x.shape[-1] == in_features:  # a step, checked no further
        return onednn_linear(x, packed, bias)
    rows = x.numel() // in_features
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[-1] != in_features or rows == 0:
        return F.linear(x, weight, bias)
    if rows > STEP_ROWS:
        grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
        return F.linear(x, weight, bias) if grad or not ONEDNN else onednn_linear(x, weight, bias)
    n = math.gcd(out_features, torch.get_num_threads())
    if rows == 1 and n > 1 and weight.is_contiguous():
        w = weight.view(n, out_features // n, in_features)  # (n, out/n, in)
        xt = x.reshape(1, in_features).T.expand(n, in_features, 1)  # (n, in, 1)
        b = None if bias is None else bias.view(n, out_features // n, 1)
        y = torch.bmm(w, xt) if b is None else torch.baddbmm(b, w, xt)  # (n, out/n, 1)
    else:
        x2 = x.reshape(rows, in_features)  # (rows, in)
        if rows == 1:
            x2 = F.pad(x2, (0, 0, 0, 1))  # (2, in)
        y = weight @ x2.T if bias is None else torch.addmm(bias[:, None], weight, x2.T)  # (out, rows or 2)
    y = y.reshape(out_features, -1)[:, :rows].T.contiguous()  # (rows, out)
    return y.view(*x.shape[:-1], out_features)  # (..., out)


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x @ W^T + b in oneDNN, W plain (out, in) or packed by ``packed_weights``. No gradient flows through it."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (rows, out)
    return y.view(*x.shape[:-1], y.shape[-1])  # (..., out)


def onednn_pack(weight: Tensor, rows: int) -> Tensor:
    """oneDNN's blocked copy of W (out, in) for ``onednn_linear`` of ``rows``-row inputs (CPU, fp32, no gradient)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)


class Linear(nn.Linear):
    """``nn.Linear`` computed by ``linear``: the same parameters and numbers, faster for a decoding step on CPU.

    ``packed`` is None except while ``packed_weights`` holds oneDNN's copy of the weight.
    """

    packed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias, self.packed)


@dataclass
class KVCache:
    """Static key/value buffers for incremental decoding: one fixed shape for a whole generation.

    Self-attention keys/values of every decoder layer are written at the positions of each
    step (``index_copy_``); the cross-attention keys/values of the audio are computed once.
    Values are stored transposed, (Dh, positions) per head: a step reads its few queries'
    attention as K q^T and V^T p^T (``attend_cached``), and both products then read their big
    operand row by row, in storage order. ``vt[i].mT`` is layer i's values as (B, H, length, Dh).
    """

    k: Tensor  # (L, B, H, length, Dh), length <= n_text_ctx
    vt: Tensor  # (L, B, H, Dh, length)
    cross_k: Tensor  # (L, B, H, S, Dh)
    cross_vt: Tensor  # (L, B, H, Dh, S)


def attend_cached(q: Tensor, k: Tensor, vt: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v for a decoding step: a few queries q (B, H, T, Dh) over cached
    keys k (B, H, S, Dh) and values stored transposed, vt (B, H, Dh, S); (B, H, T, Dh).

    Written as k q^T and vt p^T, each product streams its big operand (S rows of k, Dh rows of
    vt) in storage order. For one query on the CPU this is memory-bound and reads k and v
    1.4x-1.9x as fast as the fused kernel (``benchmarks/bench_products.py``); at batch 8 a step's
    cross-attention, which reads every layer's audio keys/values, is its largest cost. The scale
    and the mask ride in the first product (``baddbmm``: bias + alpha k q^T), and the products run
    on (B*H)-batched views: at most four kernels per attention, and for one query no copies.
    """
    B, H, T, Dh = q.shape
    S = k.shape[2]
    zero = q.new_zeros(())
    bias = zero if mask is None else torch.where(mask.mT, zero, float("-inf"))  # (S, T): -inf where hidden
    scores = torch.baddbmm(bias, k.reshape(B * H, S, Dh), q.reshape(B * H, T, Dh).mT, alpha=Dh**-0.5).mT  # (BH, T, S)
    p = scores.float().softmax(dim=-1).to(q.dtype)  # (BH, T, S)
    z = torch.bmm(vt.reshape(B * H, Dh, S), p.mT)  # (BH, Dh, T)
    return z.view(B, H, Dh, T).mT  # (B, H, T, Dh)


class Attention(nn.Module):
    """Multi-head attention. Keys/values are computed by the caller (``kv``) so caches stay visible."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = Linear(n_state, n_state)
        self.key = Linear(n_state, n_state, bias=False)
        self.value = Linear(n_state, n_state)
        self.out = Linear(n_state, n_state)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, H, T, Dh)."""
        B, T, D = x.shape
        return x.view(B, T, self.n_head, D // self.n_head).transpose(1, 2)

    def kv(self, x: Tensor, rec: Recorder) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of the sequence ``x`` (B, S, D) that the queries will attend to."""
        k = rec("k", self.heads(self.key(x)))  # (B, H, S, Dh)
        v = rec("v", self.heads(self.value(x)))  # (B, H, S, Dh)
        return k, v

    def pattern(self, q: Tensor, k: Tensor, rec: Recorder, mask: Tensor | None, causal: bool) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) written out, recording ``scores`` and ``pattern``: (B, H, T, S).

        Without autograd the T x S matrix is written once and the softmax runs in place when the
        scores are not kept; with autograd (attribution through patterns) plain ops run.
        """
        T, S = q.shape[2], k.shape[2]
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, S)
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()  # (T, S)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        scores = rec("scores", scores)  # (B, H, T, S)
        if grad or rec.wants("scores") or scores.dtype != torch.float32:
            pattern = scores.float().softmax(dim=-1).to(scores.dtype)  # (B, H, T, S)
        else:  # the scores are not kept: their memory becomes the pattern (no second T x S buffer)
            pattern = torch.softmax(scores, dim=-1, out=scores)  # (B, H, T, S)
        return rec("pattern", pattern)  # (B, H, T, S)

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, rec: Recorder, mask: Tensor | None = None, causal: bool = False
    ) -> Tensor:
        """Queries from ``x`` (B, T, D) attend over ``k``, ``v`` (B, H, S, Dh).

        ``mask`` (T, S) bool is True where a query may look; ``causal`` is the square lower triangle.
        ``v`` may be the transposed view ``vt.mT`` of the decoding cache's values (``KVCache``).
        """
        B, T, D = x.shape
        q = rec("q", self.heads(self.query(x)))  # (B, H, T, Dh)
        if rec.wants("scores") or rec.wants("pattern"):  # asked for: the attention written out by hand
            z = self.pattern(q, k, rec, mask, causal) @ v  # (B, H, T, Dh)
        elif v.stride(-2) == 1 and not causal:  # values stored (Dh, S): a decoding step over the cache
            z = attend_cached(q, k, v.mT, mask)  # (B, H, T, Dh)
        else:  # the fused kernel: same numbers up to rounding, no T x S matrix in memory
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, T, Dh)
        z = rec("z", z.transpose(1, 2))  # (B, T, H, Dh)
        return self.out(z.reshape(B, T, D))  # (B, T, D)


class ResidualBlock(nn.Module):
    """Pre-LN block: self-attention, then (decoder only) cross-attention, then a GELU MLP."""

    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.attn = Attention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = Attention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(Linear(n_state, 4 * n_state), nn.GELU(), Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(
        self,
        x: Tensor,
        rec: Recorder,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        cross_kv: tuple[Tensor, Tensor] | None = None,
        cache_kv: tuple[Tensor, Tensor] | None = None,
        pos: Tensor | None = None,
    ) -> Tensor:
        """One block on the residual stream ``x`` (B, T, D).

        ``cross_kv``: the audio's keys/values for cross-attention (decoder). ``cache_kv`` and
        ``pos``: this layer's static self-attention buffers, keys (B, H, n_ctx, Dh) and values
        transposed (B, H, Dh, n_ctx), and the positions (T,) of ``x`` in them; the new keys/values
        are written there and the queries attend over the whole buffer under ``mask``.
        """
        h = self.attn_ln(x)  # (B, T, D)
        k, v = self.attn.kv(h, rec.child("attn"))  # (B, H, T, Dh)
        if cache_kv is not None:
            cache_kv[0].index_copy_(2, pos, k)  # (B, H, n_ctx, Dh)
            cache_kv[1].index_copy_(3, pos, v.mT)  # (B, H, Dh, n_ctx)
            k, v = cache_kv[0], cache_kv[1].mT  # (B, H, n_ctx, Dh)
        attn_out = rec("attn_out", self.attn(h, k, v, rec.child("attn"), mask=mask, causal=causal))  # (B, T, D)
        x = rec("resid_mid", x + attn_out)  # (B, T, D)

        if self.cross_attn is not None:
            h = self.cross_attn_ln(x)  # (B, T, D)
            cross_out = self.cross_attn(h, *cross_kv, rec.child("cross_attn"))  # (B, T, D)
            cross_out = rec("cross_attn_out", cross_out)
            x = rec("resid_mid_cross", x + cross_out)  # (B, T, D)

        pre = rec("mlp.pre", self.mlp[0](self.mlp_ln(x)))  # (B, T, 4D)
        post = rec("mlp.post", self.mlp[1](pre))  # (B, T, 4D)
        mlp_out = rec("mlp_out", self.mlp[2](post))  # (B, T, D)
        return rec("resid_post", x + mlp_out)  # (B, T, D)


class AudioEncoder(nn.Module):
    """Log-mel (B, n_mels, 2S) -> audio features (B, S, D)."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def forward(self, mel: Tensor, rec: Recorder = IDLE) -> Tensor:
        x = F.gelu(self.conv1(mel))  # (B, D, 2S)
        x = rec("conv1", x.transpose(1, 2))  # (B, 2S, D)
        x = F.gelu(self.conv2(x.transpose(1, 2)))  # (B, D, S)
        x = rec("conv2", x.transpose(1, 2))  # (B, S, D)
        x = rec("embed", (x + self.positional_embedding).to(x.dtype))  # (B, S, D)
        S = x.shape[1]
        for i, block in enumerate(self.blocks):
            brec = rec.child(f"blocks.{i}")
            x = brec("resid_pre", x)  # (B, S, D)
            if rec.skips(f"blocks.{i}"):
                x = brec("resid_post", x)
                continue
            k = rec.window(i)
            mask = None if k is None else local_mask(S, k, x.device)  # (S, S)
            x = block(x, brec, mask=mask)  # (B, S, D)
        return rec("ln_post", self.ln_post(x))  # (B, S, D)


def local_mask(n: int, k: int, device: torch.device) -> Tensor:
    """(n, n) bool: position i may attend to j when |i - j| <= k."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs() <= k


class TextDecoder(nn.Module):
    """Tokens (B, T) and audio features (B, S, D) -> logits (B, T, V)."""

    packed_unembedding: Tensor | None = None  # oneDNN's copy of token_embedding.weight, see packed_weights

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)

    def new_cache(self, xa: Tensor, rec: Recorder = IDLE, length: int | None = None) -> KVCache:
        """Empty self-attention buffers for ``xa``'s batch, and the audio's cross-attention keys/values.

        ``length``: the longest token sequence the buffers will hold (default ``n_text_ctx``); a
        generation that knows its limit attends over (and allocates) only that many positions.
        """
        n_ctx = self.positional_embedding.shape[0]
        if length is not None and not 0 < length <= n_ctx:
            raise ValueError(f"cache length must be between 1 and n_text_ctx={n_ctx}, got {length}")
        (B, S, D), L, H = xa.shape, len(self.blocks), self.blocks[0].cross_attn.n_head
        Dh, dtype, length = D // H, self.token_embedding.weight.dtype, length or n_ctx
        cross_k = xa.new_empty(L, B, H, S, Dh, dtype=dtype)  # (L, B, H, S, Dh)
        cross_vt = xa.new_empty(L, B, H, Dh, S, dtype=dtype)  # (L, B, H, Dh, S)
        for i, block in enumerate(self.blocks):  # the audio's keys/values, once
            k, v = block.cross_attn.kv(xa, rec.child(f"blocks.{i}.cross_attn"))  # (B, H, S, Dh)
            cross_k[i], cross_vt[i] = k, v.mT
        k = xa.new_zeros(L, B, H, length, Dh, dtype=dtype)  # (L, B, H, length, Dh)
        vt = xa.new_zeros(L, B, H, Dh, length, dtype=dtype)  # (L, B, H, Dh, length)
        return KVCache(k, vt, cross_k, cross_vt)

    def forward(
        self,
        tokens: Tensor,
        rec: Recorder = IDLE,
        *,
        xa: Tensor | None = None,
        cache: KVCache | None = None,
        pos: Tensor | None = None,
    ) -> Tensor:
        """Teacher-forced over the audio ``xa`` (B, S, D), or one incremental step through ``cache``.

        Incremental: ``tokens`` (B, t) sit at positions ``pos`` (t,) (a tensor, so a compiled step
        has one fixed shape); every query attends over the whole cache, masked to positions <= its own.
        """
        if cache is None:
            positions, mask = torch.arange(tokens.shape[1], device=tokens.device), None  # (T,)
        else:
            n_ctx = cache.k.shape[3]
            positions = pos  # (T,)
            mask = torch.arange(n_ctx, device=tokens.device)[None, :] <= pos[:, None]  # (T, n_ctx)
        x = rec("embed", self.token_embedding(tokens) + self.positional_embedding[positions])  # (B, T, D)
        for i, block in enumerate(self.blocks):
            brec = rec.child(f"blocks.{i}")
            x = brec("resid_pre", x)  # (B, T, D)
            if rec.skips(f"blocks.{i}"):
                x = brec("resid_post", x)
                continue
            if cache is None:  # teacher-forced: keys/values of the audio, and a causal square
                cross_kv, cache_kv = block.cross_attn.kv(xa, brec.child("cross_attn")), None  # (B, H, S, Dh)
            else:  # one step: cached audio keys/values, this layer's static buffers
                cross_kv, cache_kv = (cache.cross_k[i], cache.cross_vt[i].mT), (cache.k[i], cache.vt[i])
            x = block(x, brec, mask=mask, causal=cache is None, cross_kv=cross_kv, cache_kv=cache_kv, pos=pos)
        x = rec("ln", self.ln(x))  # (B, T, D)
        W, packed = self.token_embedding.weight.to(x.dtype), self.packed_unembedding
        return linear(x, W, packed=packed).float()  # (B, T, V): the tied unembedding


@contextmanager
def packed_weights(decoder: TextDecoder, rows: int) -> Iterator[None]:
    """The decoder's weights in oneDNN's blocked layout while a loop of ``rows``-row steps runs (CPU, fp32).

    For 2 to 64 rows, oneDNN multiplies by a blocked (packed) weight faster than MKL by the plain
    one (``linear``, ``benchmarks/bench_products.py``); packing copies the step's weights once per call. The
    copies are made from the weights as they are on entry and dropped on exit, so a weight edited
    between two calls is always the one used. Nothing is packed for other devices and dtypes, for
    a single row, where this build of torch has no oneDNN, or while autograd is on (oneDNN's op has
    no gradient).
    """
    W = decoder.token_embedding.weight
    cpu_fp32 = W.device.type == "cpu" and W.dtype == torch.float32
    if torch.is_grad_enabled() or not (ONEDNN and cpu_fp32 and 1 < rows <= STEP_ROWS):
        yield
        return
    cached = ("cross_attn.key", "cross_attn.value")  # the audio's keys/values are computed before the steps
    linears = [m for name, m in decoder.named_modules() if isinstance(m, Linear) and not name.endswith(cached)]
    try:
        for m in linears:
            m.packed = onednn_pack(m.weight, rows)
        decoder.packed_unembedding = onednn_pack(W, rows)
        yield
    finally:
        for m in linears:
            m.packed = None
        decoder.packed_unembedding = None


@dataclass
class Run:
    """The result of ``Whisper.run``: logits and the activations asked for."""

    logits: Tensor  # (B, T, V)
    trace: Trace


class Whisper(nn.Module):
    """The whole model. ``model(mel, tokens)`` gives logits; ``model.run`` also gives a trace."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)  # fmt: skip
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)  # fmt: skip
        self.tokenizer = None  # a whisper_lens.Tokenizer, set by load_model
        self.alignment_heads = None  # [(layer, head), ...] of cross-attention that tracks time, set by load_model

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """Logits (B, T, V) of ``tokens`` (B, T) given the log-mel ``mel`` (B, n_mels, 2 * n_audio_ctx)."""
        return self.run(mel, tokens).logits

    def run(
        self,
        mel: Tensor,
        tokens: Tensor,
        trace: TraceRequest = None,
        edits: Edits | None = None,
        *,
        trace_device: torch.device | str | None = None,
        trace_dtype: torch.dtype | None = None,
    ) -> Run:
        """Teacher-forced forward that records the activations ``trace`` asks for and applies ``edits``.

        ``trace``: None, True (every name in ``self.names()``) or glob patterns
        (``["decoder.blocks.*.resid_post", "*.cross_attn.pattern"]``). ``trace_device`` /
        ``trace_dtype`` say where recorded tensors are kept (e.g. "cpu", torch.float16).
        Unbatched inputs (mel [n_mels, frames], tokens [T]) are given a batch of one.
        """
        mel, tokens = self.check_inputs(mel, tokens)
        rec = self.recorder(trace, edits, trace_device=trace_device, trace_dtype=trace_dtype, tokens=tokens)
        xa = self.encoder(mel, rec.child("encoder"))  # (B, S, D)
        logits = rec("logits", self.decoder(tokens, rec.child("decoder"), xa=xa))  # (B, T, V)
        return Run(logits, rec.trace if rec.trace is not None else Trace())

    def recorder(
        self,
        trace: TraceRequest,
        edits: Edits | None,
        *,
        trace_device: torch.device | str | None = None,
        trace_dtype: torch.dtype | None = None,
        tokens: Tensor | None = None,
    ) -> Recorder:
        """A recorder for one pass: resolves trace patterns against ``names()``, checks edits (on tokens' shapes)."""
        names = self.names()
        keep = select_names(trace, names)
        if edits is not None:
            if not isinstance(edits, Edits):
                raise TypeError(f"edits must be a whisper_lens.Edits, got {type(edits).__name__}")
            d = self.dims
            shapes = None if tokens is None else activation_shapes(d, *tokens.shape)
            edits.check(names, {"encoder": d.n_audio_layer, "decoder": d.n_text_layer},
                        {"encoder": d.n_audio_head, "decoder": d.n_text_head}, shapes)  # fmt: skip
        return Recorder(keep, edits, Trace(device=trace_device, dtype=trace_dtype))

    def generate(
        self,
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
        prompt: str | list[int] | None = None,
        prefix: str | list[int] | None = None,
        suppress_tokens: str | list[int] | None = "-1",
        suppress_blank: bool = True,
        max_initial_timestamp: float | None = 1.0,
        compile: bool = False,
    ) -> list:
        """Decode the batch ``mel`` (or the encoder output ``audio_features``): greedy, sampling or beam search.

        See ``whisper_lens.decoding.generate`` for every argument.
        """
        from .decoding import generate

        return generate(self, mel, audio_features=audio_features, beam_size=beam_size, max_new_tokens=max_new_tokens,
                        language=language, task=task, timestamps=timestamps, trace=trace, edits=edits,
                        patience=patience, length_penalty=length_penalty, temperature=temperature, seed=seed,
                        prompt=prompt, prefix=prefix, suppress_tokens=suppress_tokens, suppress_blank=suppress_blank,
                        max_initial_timestamp=max_initial_timestamp, compile=compile)  # fmt: skip

    def names(self) -> list[str]:
        """Every activation name this model records, in the order a forward computes them."""
        return list(activation_shapes(self.dims))

    def check_mel(self, mel: Tensor) -> Tensor:
        """Validate and batch a log-mel [B, n_mels, 2 * n_audio_ctx] (or [n_mels, frames]); move it to the model."""
        d = self.dims
        mel = torch.as_tensor(mel)
        if mel.dim() == 2:
            mel = mel[None]
        frames = 2 * d.n_audio_ctx
        if mel.dim() != 3 or mel.shape[1] != d.n_mels or mel.shape[2] != frames:
            raise ValueError(
                f"mel must be [batch, {d.n_mels}, {frames}] for this model, got {list(mel.shape)}; pad the audio "
                f"to the window first (whisper_lens.audio.load_windows(paths, {d.n_mels}, {frames}))"
            )
        return mel.to(self.device, self.dtype)

    def check_inputs(self, mel: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Validate and batch ``mel`` / ``tokens``; move them to the model's device (mel to its dtype)."""
        d = self.dims
        mel, tokens = self.check_mel(mel), torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be an integer tensor [batch, T], got {tokens.dtype} {list(tokens.shape)}")
        if tokens.shape[0] != mel.shape[0]:
            raise ValueError(f"mel has batch {mel.shape[0]} but tokens have batch {tokens.shape[0]}")
        if not 0 < tokens.shape[1] <= d.n_text_ctx:
            raise ValueError(f"tokens must have 1 to {d.n_text_ctx} positions, got {tokens.shape[1]}")
        if tokens.device.type != "meta" and (tokens.min() < 0 or tokens.max() >= d.n_vocab):
            bad = tokens[(tokens < 0) | (tokens >= d.n_vocab)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {d.n_vocab})")
        return mel, tokens.to(self.device, torch.long)


@functools.lru_cache(maxsize=32)
def activation_shapes(dims: ModelDims, batch: int = 1, n_tokens: int = 1) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every recorded activation, found by running the model on the meta device (no memory)."""
    with torch.device("meta"):
        model = Whisper(dims)
        mel = torch.zeros(batch, dims.n_mels, 2 * dims.n_audio_ctx)
        tokens = torch.zeros(batch, n_tokens, dtype=torch.long)
    trace = Trace()
    rec = Recorder(_EVERYTHING, None, trace)
    xa = model.encoder(mel, rec.child("encoder"))
    rec("logits", model.decoder(tokens, rec.child("decoder"), xa=xa))
    return {name: tuple(x.shape) for name, x in trace.items()}


class _Everything(frozenset):
    """A set that contains every name: records a full trace without knowing the names first."""

    def __contains__(self, name: object) -> bool:
        return True

    def __bool__(self) -> bool:
        return True


_EVERYTHING = _Everything()


# long-form transcription (transcribe.py) builds on decoding, which builds on the classes above: attached after them
from .transcribe import transcribe  # noqa: E402

Whisper.transcribe = transcribe  # model.transcribe(audio, word_timestamps=..., ...): see transcribe.py
