"""Whisper, written out for reading: an audio encoder, a text decoder, and every activation named.

Whisper (Radford et al., 2022, "Robust Speech Recognition via Large-Scale Weak Supervision") is an
encoder-decoder Transformer. The encoder turns a log-mel spectrogram of 30 s of audio into ``n_audio_ctx``
vectors (two convolutions, the second with stride 2, then pre-LayerNorm residual blocks). The decoder reads
text tokens, attends to itself causally and to the audio through cross-attention, and predicts the next
token with the token embedding matrix reused as the unembedding.

Reading guide. Shapes use B batch, S positions attended over (``n_audio_ctx`` for the audio), T
text positions, D width, H heads, Dh = D / H, V vocabulary. Every ``rec("name", x)`` is a named
point: the recorder (``trace.py``) applies edits there and keeps the value if it was asked for;
with no trace and no edits it returns ``x`` unchanged. Module and parameter names are OpenAI's
state-dict keys, so an OpenAI checkpoint loads as is.

Attention is in ``Attention.forward``: softmax(q k^T / sqrt(Dh) + mask) v written out where a
layer's ``scores`` or ``pattern`` is asked for, or inside ``with textbook():`` (for stepping
through in a debugger: every product and the softmax are then lines of this file), and torch's
fused ``scaled_dot_product_attention`` otherwise (the same numbers up to float rounding).
Decoding (``whisper_lens/decoding/``) passes each attention layer its keys and values so far (a
``KVCache``) and is handed them back; nothing is stored on the modules.
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .inputs import check_audio_features, check_mel, check_tokens
from .names import activation_shapes
from .trace import IDLE, Edits, Recorder, Trace, TraceRequest, new_recorder

TEXTBOOK = contextvars.ContextVar("whisper_lens_textbook", default=False)


@contextmanager
def textbook() -> Iterator[None]:
    """Within this block every attention is written out, for stepping through in a debugger: ``step`` then reaches
    each product and the softmax in this file (the same numbers up to rounding). Per thread (a context variable)."""
    token = TEXTBOOK.set(True)
    try:
        yield
    finally:
        TEXTBOOK.reset(token)


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
        if x.dtype == torch.float32:  # the common case (the weights are the model's dtype), without casts
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

    def kv(self, x: Tensor, rec: Recorder) -> tuple[Tensor, Tensor]:
        """Per-head keys and values (B, S, H, Dh) of the sequence ``x`` (B, S, D) that the queries attend over."""
        heads = (*x.shape[:2], self.n_head, x.shape[2] // self.n_head)  # (B, S, H, Dh): D split into H heads
        k = rec("k", self.key(x).view(heads))  # (B, S, H, Dh)
        return k, rec("v", self.value(x).view(heads))  # k and v (B, S, H, Dh)

    def forward(self, x: Tensor, rec: Recorder, *, xa: Tensor | None = None, mask: Tensor | None = None,
                cache=None, pos: Tensor | None = None) -> tuple[Tensor, object]:  # fmt: skip
        """Queries from ``x`` (B, T, D) attend over the keys and values of ``xa`` (B, S, D), or of ``x`` if None.

        ``mask`` (T, S) or (B, 1, T, S) bool: True where a query may look (None: everywhere). Returns the
        output (B, T, D) and the keys and values attended over. Decoding passes them in as ``cache`` (a
        ``decoding.KVCache``): a step's self-attention writes its own there at positions ``pos`` (B or 1, T) first.
        """
        q = rec("q", self.query(x).view(*x.shape[:2], self.n_head, -1)).transpose(1, 2)  # (B, H, T, Dh)
        written = not torch.compiler.is_compiling() and TEXTBOOK.get() or rec.wants("scores", "pattern")  # written out
        if cache is None:  # teacher-forced: the keys and values of the whole sequence, computed here
            k, v = self.kv(x if xa is None else xa, rec)  # (B, S, H, Dh)
            k, v = cache = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, Dh)
        else:  # decoding: what the cache holds, one row per query row
            if pos is not None:  # a step's self-attention: its own keys and values join the cache first
                cache.write(pos, *self.kv(x, rec))
            shared = cache.owner is not None and not written  # several rows read one clip's audio
            k, v = (None, None) if shared else (cache.keys(), cache.values())  # (B, H, S, Dh)
        if k is None:  # rows that read one clip's audio attend together, as its extra queries (decoding/cache.py)
            z = cache.attend(q, mask)  # (B, H, T, Dh)
        elif written or k.stride(-1) != 1:  # the formula written out (also for keys stored transposed: one pass)
            z = self.pattern(q, k, mask, rec) @ v  # (B, H, T, Dh)
        else:  # the fused kernel: the same numbers up to rounding, no T x S matrix in memory
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, Dh)
        z = rec("z", z.transpose(1, 2))  # (B, T, H, Dh)
        return self.out(z.flatten(2)), cache  # (B, T, D)

    def pattern(self, q: Tensor, k: Tensor, mask: Tensor | None, rec: Recorder) -> Tensor:
        """softmax(q k^T / sqrt(Dh) + mask) for q (B, H, T, Dh), k (B, H, S, Dh), recording ``scores`` and ``pattern``.

        Without autograd the T x S matrix is written once and the softmax runs in place when the
        scores are not kept; with autograd (attribution through patterns) plain ops run.
        """
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
        scores = (q * q.shape[-1] ** -0.5) @ k.mT  # (B, H, T, S)
        if mask is not None:  # -inf where a query may not look: its weight becomes 0
            scores.masked_fill_(~mask, float("-inf"))
        scores = rec("scores", scores)  # (B, H, T, S)
        if grad or rec.wants("scores") or scores.dtype != torch.float32:  # softmax in at least fp32
            pattern = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)
        else:  # the scores are not kept: their memory becomes the pattern (no second T x S buffer)
            pattern = torch.softmax(scores, dim=-1, out=scores)  # (B, H, T, S)
        return rec("pattern", pattern)  # (B, H, T, S)


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

    def forward(self, x: Tensor, rec: Recorder, *, mask: Tensor | None = None, xa: Tensor | None = None,
                cache: tuple | None = None, pos: Tensor | None = None) -> tuple[Tensor, tuple]:  # fmt: skip
        """One block on the residual stream ``x`` (B, T, D): its output (``resid_post``) and its attentions' caches.
        ``mask``: self-attention's; ``xa``: the audio (decoder); ``cache``, ``pos``: decoding (see ``Attention``)."""
        attn_cache, cross_cache = cache or (None, None)
        h = self.attn_ln(x)  # (B, T, D)
        attn_out, attn_cache = self.attn(h, rec.child("attn"), mask=mask, cache=attn_cache, pos=pos)  # (B, T, D)
        x = rec("resid_mid", x + rec("attn_out", attn_out))  # (B, T, D)
        if self.cross_attn is not None:
            h = self.cross_attn_ln(x)  # (B, T, D)
            cross_out, cross_cache = self.cross_attn(h, rec.child("cross_attn"), xa=xa, cache=cross_cache)  # (B, T, D)
            x = rec("resid_mid_cross", x + rec("cross_attn_out", cross_out))  # (B, T, D)
        fc1, gelu, fc2 = self.mlp
        pre = rec("mlp.pre", fc1(self.mlp_ln(x)))  # (B, T, 4D)
        post = rec("mlp.post", gelu(pre))  # (B, T, 4D)
        mlp_out = rec("mlp_out", fc2(post))  # (B, T, D)
        return x + mlp_out, (attn_cache, cross_cache)  # (B, T, D)


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
        for i, block in enumerate(self.blocks):
            brec = rec.child(f"blocks.{i}")
            x = brec("resid_pre", x)  # (B, S, D)
            if not rec.skips(f"blocks.{i}"):  # Edits.skip: the residual passes through
                mask = rec.window_mask(i, x.shape[1], block.attn.n_head, x.device) if rec.active else None  # Edits
                x, _ = block(x, brec, mask=mask)  # (B, S, D)
            x = brec("resid_post", x)  # (B, S, D)
        return rec("ln_post", self.ln_post(x))  # (B, S, D)


class TextDecoder(nn.Module):
    """Tokens (B, T) and audio features (B, S, D) -> logits (B, T, V)."""

    def __init__(self, n_vocab: int, n_ctx: int, n_state: int, n_head: int, n_layer: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualBlock(n_state, n_head, cross_attention=True) for _ in range(n_layer)])
        self.ln = LayerNorm(n_state)

    def forward(self, tokens: Tensor, rec: Recorder = IDLE, *, xa: Tensor | None = None, cache=None,
                pos: Tensor | None = None) -> Tensor:  # fmt: skip
        """Logits (B, T, V) of ``tokens`` (B, T) over the audio features ``xa`` (B, S, D): ``stream``, unembedded."""
        return self.unembed(self.stream(tokens, rec, xa=xa, cache=cache, pos=pos)[0])  # (B, T, V)

    def stream(self, tokens: Tensor, rec: Recorder = IDLE, *, xa: Tensor | None = None, cache=None,
               pos: Tensor | None = None) -> tuple[Tensor, list]:  # fmt: skip
        """The final residual stream after ``ln`` (B, T, D), and each block's attention caches.

        Teacher-forced: the tokens sit at positions 0..T-1, each attending to itself and the ones before,
        and cross-attention reads ``xa``. Decoding: they sit at positions ``pos`` (B or 1, T), and ``cache``
        (a ``decoding.DecoderCache``) holds each layer's keys and values, attended over up to each query's own.
        """
        if cache is None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None]  # (1, T)
            mask = pos.mT >= pos  # (T, T): query i sees positions j <= i
            caches = [None] * len(self.blocks)
        else:
            mask = (torch.arange(cache.length, device=tokens.device) <= pos[..., None])[:, None]  # (B or 1, 1, T, S)
            caches = cache.layers()  # [(self-attention cache, cross-attention cache)] per block
            rec = rec.positioned(pos)  # edits at positions act where these tokens sit
        x = rec("embed", self.token_embedding(tokens) + self.positional_embedding[pos])  # (B, T, D)
        for i, block in enumerate(self.blocks):
            brec = rec.child(f"blocks.{i}")
            x = brec("resid_pre", x)  # (B, T, D)
            if not rec.skips(f"blocks.{i}"):  # Edits.skip: the residual passes through
                x, caches[i] = block(x, brec, mask=mask, xa=xa, cache=caches[i], pos=None if cache is None else pos)
            x = brec("resid_post", x)  # (B, T, D)
        return rec("ln", self.ln(x)), caches  # (B, T, D)

    def unembed(self, x: Tensor) -> Tensor:
        """Logits (..., V) in fp32 of the final stream ``x`` (..., D): the token embedding, reused (tied)."""
        return F.linear(x, self.token_embedding.weight).float()  # (..., V)


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
        self.transcribe_defaults: dict = {}  # how the model wants to be decoded when not told (its config's)

    def generate(self, mel: Tensor | None = None, **options) -> list:
        """Batched decoding (greedy, sampling, beam search): ``whisper_lens.decoding.generate`` has every option."""
        from .decoding.loop import generate  # imported here: model.py needs nothing of decoding

        return generate(self, mel, **options)

    def transcribe(self, audio, **options):
        """Long-form, batched transcription of audio files or arrays: ``whisper_lens.transcribe`` (longform.py)."""
        from .longform import transcribe

        return transcribe(self, audio, **options)

    @property
    def device(self) -> torch.device:
        return self.decoder.token_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.token_embedding.weight.dtype

    def forward(self, mel: Tensor, tokens: Tensor) -> Tensor:
        """Logits (B, T, V) of ``tokens`` (B, T) given the log-mel ``mel`` (B, n_mels, 2 * n_audio_ctx)."""
        return self.run(mel, tokens).logits

    def run(self, mel: Tensor | None = None, tokens: Tensor | None = None, trace: TraceRequest = None,
            edits: Edits | None = None, *, audio_features: Tensor | None = None,
            trace_device: torch.device | str | None = None, trace_dtype: torch.dtype | None = None) -> Run:  # fmt: skip
        """Teacher-forced forward that records the activations ``trace`` asks for and applies ``edits``.

        ``trace``: None, True (every name in ``self.names()``) or glob patterns
        (``["decoder.blocks.*.resid_post", "*.cross_attn.pattern"]``). ``trace_device`` /
        ``trace_dtype`` say where recorded tensors are kept (e.g. "cpu", torch.float16).
        ``audio_features`` (B, S, D): instead of ``mel``, the encoder's output, which is then not
        run (the encoder's names cannot be traced or edited). Unbatched inputs get a batch of one.
        """
        if (mel is None) == (audio_features is None) or tokens is None:
            raise ValueError("give tokens and either mel or audio_features (the encoder's output), not both")
        w = self.decoder.token_embedding.weight  # the model's device and dtype
        if mel is not None:
            mel = check_mel(mel, self.dims, w.device, w.dtype)  # (B, n_mels, 2S)
        else:
            audio_features = check_audio_features(audio_features, self.dims, w.device, w.dtype)  # (B, S, D)
        tokens = check_tokens(tokens, self.dims, (mel if mel is not None else audio_features).shape[0], w.device)
        rec = self.recorder(trace, edits, trace_device=trace_device, trace_dtype=trace_dtype, tokens=tokens,
                            encoder=mel is not None)  # fmt: skip
        xa = self.encoder(mel, rec.child("encoder")) if mel is not None else audio_features  # (B, S, D)
        logits = rec("logits", self.decoder(tokens, rec.child("decoder"), xa=xa))  # (B, T, V)
        return Run(logits, rec.trace if rec.trace is not None else Trace())

    def recorder(self, trace: TraceRequest, edits: Edits | None, *, trace_device: torch.device | str | None = None,
                 trace_dtype: torch.dtype | None = None, tokens: Tensor | None = None,
                 encoder: bool = True) -> Recorder:  # fmt: skip
        """A recorder for one pass (``trace.new_recorder``): ``IDLE`` at once when nothing is traced or edited;
        edits are checked against the shapes of ``tokens`` (B, T) when given. ``encoder=False``: no encoder run."""
        if (trace is None or trace is False) and edits is None:
            return IDLE
        d, shapes = self.dims, None if tokens is None else activation_shapes(self.dims, *tokens.shape)
        return new_recorder(trace, edits, self.names(), {"encoder": d.n_audio_layer, "decoder": d.n_text_layer},
                            {"encoder": d.n_audio_head, "decoder": d.n_text_head}, shapes, encoder=encoder,
                            device=trace_device, dtype=trace_dtype)  # fmt: skip

    def names(self) -> list[str]:
        """Every activation name this model records, in the order a forward computes them."""
        return list(activation_shapes(self.dims))

    def shapes(self, batch: int = 1, n_tokens: int = 1) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every activation of a ``batch`` of ``n_tokens`` tokens."""
        return dict(activation_shapes(self.dims, batch, n_tokens))
