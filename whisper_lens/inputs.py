"""Checking what users pass to ``run`` and ``generate``: a one-line error before any work, naming the input.

Each check also batches an unbatched input and moves it to the model's device and dtype, so the
model's code can assume [batch, ...] tensors of its own dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import ModelDims


def check_mel(mel: Tensor, dims: ModelDims, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A log-mel [B, n_mels, 2 * n_audio_ctx] (or unbatched [n_mels, frames]), non-empty and finite."""
    mel = torch.as_tensor(mel)
    if not mel.is_floating_point():
        raise ValueError(f"mel must be a floating-point log-mel spectrogram, got {mel.dtype}: make one with "
                         "whisper_lens.audio.log_mel_spectrogram (or load_windows)")  # fmt: skip
    if mel.device.type == "meta":
        raise ValueError("mel is on the meta device: it holds no values to run on")
    if mel.dim() == 2:
        mel = mel[None]
    frames = 2 * dims.n_audio_ctx
    if mel.dim() != 3 or mel.shape[1] != dims.n_mels or mel.shape[2] != frames:
        raise ValueError(
            f"mel must be [batch, {dims.n_mels}, {frames}] for this model, got {list(mel.shape)}; pad the audio "
            f"to the window first (whisper_lens.audio.load_windows(paths, {dims.n_mels}, {frames}))"
        )
    if mel.shape[0] == 0:
        raise ValueError("mel is an empty batch [0, ...]: nothing to run")
    return check_finite("mel", mel.to(device, dtype))


def check_tokens(tokens: Tensor, dims: ModelDims, batch: int, device: torch.device) -> Tensor:
    """Token ids [B, T] (or unbatched [T]) of the vocabulary, 1 to n_text_ctx of them, one row per clip."""
    tokens = torch.as_tensor(tokens)
    if tokens.device.type == "meta":
        raise ValueError("tokens are on the meta device: they hold no ids")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"tokens must be an integer tensor [batch, T], got {tokens.dtype} {list(tokens.shape)}")
    if tokens.shape[0] != batch:
        raise ValueError(f"mel has batch {batch} but tokens have batch {tokens.shape[0]}")
    if not 0 < tokens.shape[1] <= dims.n_text_ctx:
        raise ValueError(f"tokens must have 1 to {dims.n_text_ctx} positions, got {tokens.shape[1]}")
    if tokens.device.type != "meta" and (tokens.min() < 0 or tokens.max() >= dims.n_vocab):
        bad = tokens[(tokens < 0) | (tokens >= dims.n_vocab)][0].item()
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {dims.n_vocab})")
    return tokens.to(device, torch.long)


def check_audio_features(xa: Tensor, dims: ModelDims, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The encoder's output [B, n_audio_ctx, n_audio_state] (or unbatched), non-empty and finite."""
    xa = torch.as_tensor(xa)
    if not xa.is_floating_point() or xa.device.type == "meta":
        raise ValueError(f"audio_features must be the encoder's floating-point output, got {xa.dtype} on {xa.device}")
    if xa.dim() == 2:
        xa = xa[None]
    if xa.dim() != 3 or xa.shape[1:] != (dims.n_audio_ctx, dims.n_audio_state):
        raise ValueError(f"audio_features must be [batch, {dims.n_audio_ctx}, {dims.n_audio_state}] (the encoder's "
                         f"output) for this model, got {list(xa.shape)}")  # fmt: skip
    if xa.shape[0] == 0:
        raise ValueError("audio_features is an empty batch: nothing to decode")
    return check_finite("audio_features", xa.to(device, dtype))


def check_finite(what: str, x: Tensor) -> Tensor:
    """``x`` if every value is finite, else a one-line error naming ``what`` and the first clip at fault."""
    if x.device.type != "meta" and not torch.isfinite(x).all():
        clip = int((~torch.isfinite(x)).flatten(1).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{what} has NaN or infinite values (clip {clip} of the batch); check the audio it came from")
    return x
