"""Whisper, written out for reading: an audio encoder, a text decoder, and every activation named.

Whisper (Radford et al., 2022, "Robust Speech Recognition via Large-Scale Weak Supervision") is
an encoder-decoder Transformer. The encoder turns a log-mel spectrogram of 30 s of audio into
``n_audio_ctx`` vectors (two convolutions, the second with stride 2, then pre-LayerNorm
residual blocks). The decoder reads text tokens, attends to itself causally and to the audio
through cross-attention, and predicts the next token with the token embedding matrix reused
as the unembedding.

Reading guide. Shapes use B batch, S positions attended over (``n_audio_ctx`` for the audio), T
text positions, D width, H heads, Dh = D / H, V vocabulary. Every ``rec("name", x)`` is a named
point: the recorder (``trace.py``) applies edits there and keeps the value if it was asked for;
with no trace and no edits it returns ``x`` unchanged. Module and parameter names are OpenAI's
state-dict keys, so an OpenAI checkpoint loads as is.

Attention is in ``Attention.forward``: the fused ``scaled_dot_product_attention`` over the keys
and values held in a ``KVCache`` (``attend``), or, where a layer's ``scores`` or ``pattern`` is
asked for, softmax(q k^T / sqrt(Dh)) written out (the same numbers up to float rounding, ~1e-7).
Every projection is ``ops.linear(x, layer)``: x @ W^T + b, computed by the ``Kernels`` passed
down (``kernels.py``: what is faster on the CPU, the same numbers). Inside ``with
whisper_lens.kernels.textbook():`` every product is plain ``F.linear``, for stepping through in a
debugger. While decoding, keys and values live in a ``KVCache`` made per ``generate`` call
(``decoding.py``); nothing is stored on the modules.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decoding, longform
from .inputs import check_mel, check_tokens
from .kernels import DEFAULT, Kernels, KVCache
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
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelDims.{name} must be a positive int, got {value!r}")
        if self.n_audio_state % self.n_audio_head or self.n_text_state % self.n_text_head:
            raise ValueError(f"widths must divide by head counts: {self}")


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> Tensor:
    """Fixed sinusoidal positions of the encoder: sin in the first half of channels, cos in the second."""
    if channels % 2:
        raise ValueError(f"sinusoidal embedding needs an even width, got {channels}")
    half = channels // 2
    inv_timescales = torch.exp(-math.log(max_timescale) / (half - 1) * torch.arange(half))  # (D/2,)
    angles = torch.arange(length)[:, None] * inv_timescales[None, :]  # (S, D/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)  # (S, D)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least fp32 whatever the activations' dtype (as OpenAI's, for fp16 stability)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype == torch.float32:  # the common case, without four no-op casts per call
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        t = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
        return F.layer_norm(x.to(t), self.normalized_shape, self.weight.to(t), self.bias.to(t), self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention: queries from the residual stream, keys and values from it (self) or the audio (cross)."""

    def __init__(self, n_state: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, H, Dh): a projection viewed per head."""
        return x.unflatten(-1, (self.n_head, -1))

    def kv(self, x: Tensor, rec: Recorder, ops: Kernels) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of the sequence ``x`` (B, S, D) that the queries attend over."""
        k = rec("k", self.heads(ops.linear(x, self.key)))  # (B, S, H, Dh)
        v = rec("v", self.heads(ops.linear(x, self.value)))  # (B, S, H, Dh)
        return k, v

    def forward(self, x: Tensor, rec: Recorder, ops: Kernels, *, xa: Tensor | None = None, mask: Tensor | None = None,
                cache: KVCache | None = None, pos: Tensor | None = None) -> Tensor:  # fmt: skip
        """Queries from ``x`` (B, T, D) attend over the keys and values of ``xa`` (B, S, D), or of ``x`` if None.

        ``mask`` (T, S) or (B, 1, T, S) bool: True where a query may look (None: everywhere).
        Decoding: the keys and values are in ``cache``. With ``pos`` (B, T), self-attention
        first writes this step's own keys and values into it at those positions; without, the
        cache already holds what is attended over (cross-attention: the audio's, computed once).
        """
        q = rec("q", self.heads(ops.linear(x, self.query))).transpose(1, 2)  # (B, H, T, Dh)
        if cache is None:  # teacher-forced: the keys and values of the whole sequence, computed here
            cache = KVCache(*(t.transpose(1, 2) for t in self.kv(x if xa is None else xa, rec, ops)))  # (B, H, S, Dh)
        elif pos is not None:  # a decoding step's self-attention: its own keys and values join the cache first
            cache.write(pos, *self.kv(x, rec, ops))
        if rec.wants("scores") or rec.wants("pattern"):  # asked for: the attention written out
            z = self.pattern(q, cache.keys(), mask, rec) @ cache.values()  # (B, H, T, Dh)
        else:  # the fused kernel: the same numbers up to rounding, no T x S matrix in memory
            z = cache.attend(q, mask)  # (B, H, T, Dh)
        z = rec("z", z.transpose(1, 2))  # (B, T, H, Dh)
        return ops.linear(z.flatten(2), self.out)  # (B, T, D)

    def pattern(self, q: Tensor, k: Tensor, mask: Tensor | None, rec: Recorder) -> Tensor:
        """softmax(q k^T / sqrt(Dh)) for q (B, H, T, Dh), k (B, H, S, Dh), recording ``scores`` and ``pattern``.

        Without autograd the T x S matrix is written once and the softmax runs in place when the
        scores are not kept; with autograd (attribution through patterns) plain ops run.
        """
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        scores = (q * q.shape[-1] ** -0.5) @ k.mT  # (B, H, T, S)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        scores = rec("scores", scores)  # (B, H, T, S)
        if grad or rec.wants("scores") or scores.dtype != torch.float32:  # softmax in at least fp32
            pattern = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
        else:  # the scores are not kept: their memory becomes the pattern (no second T x S buffer)
            pattern = torch.softmax(scores, dim=-1, out=scores)  # (B, H, T, S)
        return rec("pattern", pattern)  # (B, H, T, S)


@dataclass(frozen=True)
class Context:
    """What a block reads besides the residual stream: for the encoder, a mask at most."""

    mask: Tensor | None = None  # self-attention: (T, S) or (B, 1, T, S) bool, True where a query may look
    xa: Tensor | None = None  # decoder, teacher-forced: the audio features (B, S, D) cross-attention reads
    attn_cache: KVCache | None = None  # decoding: this layer's self-attention keys and values so far
    cross_cache: KVCache | None = None  # decoding: this layer's keys and values of the audio
    pos: Tensor | None = None  # decoding: positions (B or 1, T) of the step's tokens
    rows: int | None = None  # decoding at per-clip depths: only the first `rows` rows run this block

    def first(self, n: int) -> Context:
        """The context of the first ``n`` rows of a decoding step (a mask or positions given per row are cut)."""
        return Context(self.mask[:n] if len(self.mask) > 1 else self.mask, self.xa, self.attn_cache,
                       self.cross_cache, self.pos[:n] if len(self.pos) > 1 else self.pos)  # fmt: skip


class ResidualBlock(nn.Module):
    """Pre-LN block: self-attention, then (decoder only) cross-attention, then a GELU MLP."""

    def __init__(self, n_state: int, n_head: int, cross_attention: bool = False) -> None:
        super().__init__()
        self.attn = Attention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state)
        self.cross_attn = Attention(n_state, n_head) if cross_attention else None
        self.cross_attn_ln = LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = LayerNorm(n_state)

    def forward(self, x: Tensor, rec: Recorder, ops: Kernels, ctx: Context) -> Tensor:
        """One block on the residual stream ``x`` (B, T, D); returns its output (``resid_post``)."""
        h = self.attn_ln(x)  # (B, T, D)
        attn_out = self.attn(h, rec.child("attn"), ops, mask=ctx.mask, cache=ctx.attn_cache, pos=ctx.pos)  # (B, T, D)
        x = rec("resid_mid", x + rec("attn_out", attn_out))  # (B, T, D)
        if self.cross_attn is not None:
            h = self.cross_attn_ln(x)  # (B, T, D)
            cross_out = self.cross_attn(h, rec.child("cross_attn"), ops, xa=ctx.xa, cache=ctx.cross_cache)  # (B, T, D)
            x = rec("resid_mid_cross", x + rec("cross_attn_out", cross_out))  # (B, T, D)
        pre = rec("mlp.pre", ops.linear(self.mlp_ln(x), self.mlp[0]))  # (B, T, 4D)
        post = rec("mlp.post", self.mlp[1](pre))  # (B, T, 4D)
        mlp_out = rec("mlp_out", ops.linear(post, self.mlp[2]))  # (B, T, D)
        return x + mlp_out  # (B, T, D)


def run_blocks(blocks: nn.ModuleList, x: Tensor, rec: Recorder, ops: Kernels, contexts: list[Context]) -> Tensor:
    """The residual stream ``x`` (B, T, D) through each block in turn; a skipped block passes it on unchanged."""
    for i, (block, ctx) in enumerate(zip(blocks, contexts, strict=True)):
        brec = rec.child(f"blocks.{i}")
        x = brec("resid_pre", x)  # (B, T, D)
        n = len(x) if ctx.rows is None else ctx.rows  # per-clip depths: only the first n rows run this block
        if n and not rec.skips(f"blocks.{i}"):  # Edits.skip: the residual passes through
            y = block(x[:n], brec, ops, ctx if n == len(x) else ctx.first(n))  # (n, T, D)
            x = y if n == len(x) else torch.cat([y, x[n:]])  # (B, T, D): the other rows pass through
        x = brec("resid_post", x)  # (B, T, D)
    return x


class AudioEncoder(nn.Module):
    """Log-mel (B, n_mels, 2S) -> audio features (B, S, D)."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualBlock(n_state, n_head) for _ in range(n_layer)])
        self.ln_post = LayerNorm(n_state)

    def forward(self, mel: Tensor, rec: Recorder = IDLE, ops: Kernels = DEFAULT) -> Tensor:
        x = F.gelu(self.conv1(mel))  # (B, D, 2S)
        x = rec("conv1", x.transpose(1, 2))  # (B, 2S, D)
        x = F.gelu(self.conv2(x.transpose(1, 2)))  # (B, D, S)
        x = rec("conv2", x.transpose(1, 2))  # (B, S, D)
        x = rec("embed", (x + self.positional_embedding).to(x.dtype))  # (B, S, D)
        windows = [rec.window(i) for i in range(len(self.blocks))]  # Edits.local_window, per block
        contexts = [Context(mask=None if k is None else local_mask(x.shape[1], k, x.device)) for k in windows]
        x = run_blocks(self.blocks, x, rec, ops, contexts)  # (B, S, D)
        return rec("ln_post", self.ln_post(x))  # (B, S, D)


def local_mask(n: int, k: int, device: torch.device) -> Tensor:
    """(n, n) bool: position i may attend to j when |i - j| <= k."""
    idx = torch.arange(n, device=device)  # (n,)
    return (idx[:, None] - idx[None, :]).abs() <= k  # (n, n)


@dataclass
class DecoderCache:
    """The keys and values one generation attends over, per decoder layer (``TextDecoder.new_cache``)."""

    attn: list[KVCache]  # self-attention: written at each step's positions
    cross_attn: list[KVCache]  # the audio's, computed once

    def repeat_rows(self, n: int) -> DecoderCache:
        """Each row repeated ``n`` times (row b becomes rows b*n .. b*n + n-1): every beam starts as its clip.
        Self-attention histories are copied (beams diverge); the audio's keys and values are shared."""
        return DecoderCache([c.repeat_rows(n) for c in self.attn], [c.shared_by(n) for c in self.cross_attn])

    def take_rows(self, rows: Tensor) -> DecoderCache:
        """A cache of only the rows ``rows`` (L,), ascending: rows that are done leave a generation. A layer
        whose cache holds only the first n rows (per-clip depths) keeps those of ``rows`` below n."""
        kept = [[c.select_rows(rows[rows < c.rows]) for c in caches] for caches in (self.attn, self.cross_attn)]
        return DecoderCache(*kept)


class TextDecoder(nn.Module):
    """Tokens (B, T) and audio features (B, S, D) -> logits (B, T, V)."""

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)

    def new_cache(self, xa: Tensor, length: int, rec: Recorder = IDLE, ops: Kernels = DEFAULT,
                  rows: list[int] | None = None, clips: Tensor | None = None) -> DecoderCache:  # fmt: skip
        """Empty self-attention caches of ``length`` positions and, computed once, every layer's keys and values
        of the audio ``xa`` (C, S, D). ``clips`` (N,): the clip each row decodes (None: row n, clip n); rows of a
        clip share its keys and values. ``rows``: per block, how many rows (the first) run it (per-clip depths)."""
        n_ctx, D = self.positional_embedding.shape
        if not 0 < length <= n_ctx:
            raise ValueError(f"cache length must be between 1 and n_text_ctx={n_ctx}, got {length}")
        clips = torch.arange(len(xa), device=xa.device) if clips is None else clips  # (N,)
        H, rows = self.blocks[0].attn.n_head, rows or [len(clips)] * len(self.blocks)
        attn = [KVCache.empty(n, H, length, D // H, like=self.positional_embedding) for n in rows]
        cross = [KVCache.holding(*block.cross_attn.kv(xa, rec.child(f"blocks.{i}.cross_attn"), ops), clips[:n])
                 for i, (block, n) in enumerate(zip(self.blocks, rows, strict=True))]  # fmt: skip
        return DecoderCache(attn, cross)

    def forward(self, tokens: Tensor, rec: Recorder = IDLE, ops: Kernels = DEFAULT, *, xa: Tensor | None = None,
                cache: DecoderCache | None = None, pos: Tensor | None = None,
                at: Tensor | None = None) -> Tensor:  # fmt: skip
        """Logits (B, T, V) of ``tokens`` (B, T), teacher-forced over the audio ``xa`` (B, S, D), or decoding.

        Teacher-forced: the tokens sit at positions 0..T-1, each attending to itself and the ones
        before. Decoding: they sit at positions ``pos`` (B, T), or (1, T) when every row is at the
        same ones; their keys and values are written into ``cache`` there, and each query attends
        over the cache masked to positions <= its own. ``at`` (B, P): only those positions' logits.
        """
        if cache is None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
            mask = pos.mT >= pos  # (T, T): query i sees positions j <= i
            contexts = [Context(mask=mask, xa=xa)] * len(self.blocks)
        else:
            length = cache.attn[0].keys().shape[2]
            mask = (torch.arange(length, device=tokens.device) <= pos[..., None])[:, None]  # (B or 1, 1, T, length)
            contexts = [Context(mask=mask, attn_cache=a, cross_cache=c, pos=pos, rows=a.rows)
                        for a, c in zip(cache.attn, cache.cross_attn, strict=True)]  # fmt: skip
        x = rec("embed", self.token_embedding(tokens) + self.positional_embedding[pos])  # (B, T, D)
        x = run_blocks(self.blocks, x, rec, ops, contexts)  # (B, T, D)
        x = rec("ln", self.ln(x))  # (B, T, D)
        x = x if at is None else x[torch.arange(len(x), device=x.device)[:, None], at]  # (B, P, D): the ones read
        return ops.linear(x, self.token_embedding).float()  # (B, T or P, V): the tied unembedding


@dataclass
class Run:
    """The result of ``Whisper.run``: logits and the activations asked for."""

    logits: Tensor  # (B, T, V)
    trace: Trace


class Whisper(nn.Module):
    """The whole model. ``model(mel, tokens)`` gives logits; ``model.run`` also a trace; ``model.generate`` decodes."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer)  # fmt: skip
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer)  # fmt: skip
        self.tokenizer = None  # a whisper_lens.Tokenizer, set by load_model
        self.alignment_heads = None  # [(layer, head), ...] of cross-attention that tracks time, set by load_model

    generate = decoding.generate  # model.generate(mel, beam_size=..., ...): batched decoding, see decoding.py
    transcribe = longform.transcribe  # model.transcribe(audio, ...): long-form, batched, see longform.py

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """Logits (B, T, V) of ``tokens`` (B, T) given the log-mel ``mel`` (B, n_mels, 2 * n_audio_ctx)."""
        return self.run(mel, tokens).logits

    def run(self, mel: Tensor, tokens: Tensor, trace: TraceRequest = None, edits: Edits | None = None, *,
            trace_device: torch.device | str | None = None, trace_dtype: torch.dtype | None = None) -> Run:  # fmt: skip
        """Teacher-forced forward that records the activations ``trace`` asks for and applies ``edits``.

        ``trace``: None, True (every name in ``self.names()``) or glob patterns
        (``["decoder.blocks.*.resid_post", "*.cross_attn.pattern"]``). ``trace_device`` /
        ``trace_dtype`` say where recorded tensors are kept (e.g. "cpu", torch.float16).
        Unbatched inputs (mel [n_mels, frames], tokens [T]) are given a batch of one.
        """
        mel = check_mel(mel, self.dims, self.device, self.dtype)  # (B, n_mels, 2S)
        tokens = check_tokens(tokens, self.dims, len(mel), self.device)  # (B, T)
        rec = self.recorder(trace, edits, trace_device=trace_device, trace_dtype=trace_dtype, tokens=tokens)
        xa = self.encoder(mel, rec.child("encoder"))  # (B, S, D)
        logits = rec("logits", self.decoder(tokens, rec.child("decoder"), xa=xa))  # (B, T, V)
        return Run(logits, rec.trace if rec.trace is not None else Trace())

    def recorder(self, trace: TraceRequest, edits: Edits | None, *, trace_device: torch.device | str | None = None,
                 trace_dtype: torch.dtype | None = None, tokens: Tensor | None = None) -> Recorder:  # fmt: skip
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

    def names(self) -> list[str]:
        """Every activation name this model records, in the order a forward computes them."""
        return list(activation_shapes(self.dims))

    def shapes(self, batch: int = 1, n_tokens: int = 1) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every activation of a ``batch`` of ``n_tokens`` tokens (computed on the meta device)."""
        return dict(activation_shapes(self.dims, batch, n_tokens))


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
