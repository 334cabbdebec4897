"""The logit lens: read the residual stream of every layer through the model's own unembedding.

nostalgebraist's logit lens (2020) asks what a Transformer "believes so far" at layer l: take the
residual stream there, apply the final LayerNorm and the unembedding, and read a distribution over
the vocabulary as if the remaining layers did nothing. In Whisper the decoder's unembedding is
the token embedding matrix, after ``decoder.ln``. If the readouts sharpen towards the final
prediction layer by layer, the model refines one answer in place rather than computing it at the
end. The last readout (the last block's output) is exactly the model's logits.

The encoder has no unembedding of its own. Its "lens" truncates it: keep the first k blocks, apply
``ln_post`` and let the full decoder read the result (``Edits().skip("encoder", range(k, L))``).
How the transcript degrades as k shrinks, and at which positions, shows what late encoder layers
add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .model import Whisper
from .trace import Edits, Trace


def readout(model: Whisper, resid: Tensor) -> Tensor:
    """Logits (fp32) of a decoder residual stream [..., D]: ``decoder.ln`` then the tied unembedding.

    The same operations as the model's own head, so the last block's output reads out to its logits bit for bit.
    """
    return model.decoder.unembed(model.decoder.ln(resid))  # (..., V)


def lens_names(model: Whisper) -> list[str]:
    """The streams the decoder lens reads: each block's input, then the last block's output (L + 1 of them)."""
    L = model.dims.n_text_layer
    return [f"decoder.blocks.{i}.resid_pre" for i in range(L)] + [f"decoder.blocks.{L - 1}.resid_post"]


def layer_labels(model: Whisper) -> list[str]:
    """Short labels for the lens' rows: 'emb' (the embeddings = block 0's input), '1'..'L-1', 'L (final)'."""
    L = model.dims.n_text_layer
    return ["emb"] + [str(i) for i in range(1, L)] + [f"{L} (final)"]


@dataclass
class DecoderLens:
    """Per-layer readouts of the decoder at every position. Leading dims: [L + 1, B, T]."""

    layers: list[str]  # trace names read (L + 1)
    labels: list[str]  # short row labels
    top_ids: Tensor  # (L+1, B, T, k) the k most probable tokens of each readout
    top_probs: Tensor  # (L+1, B, T, k)
    final_token: Tensor  # (B, T) the model's own prediction (argmax of its logits)
    final_prob: Tensor  # (L+1, B, T) probability each readout gives the final token
    final_rank: Tensor  # (L+1, B, T) its rank in each readout (0 = top)
    kl: Tensor  # (L+1, B, T) KL(final || layer), nats
    entropy: Tensor  # (L+1, B, T) entropy of each readout, nats
    logit_norm: Tensor  # (L+1, B, T) L2 norm of each readout's logits

    def agreement(self) -> Tensor:
        """(L+1,) share of positions where the layer's top-1 token is the final token."""
        return (self.top_ids[..., 0] == self.final_token).float().mean(dim=(1, 2))


def decoder_lens_from_trace(model: Whisper, trace: Trace, k: int = 5) -> DecoderLens:
    """The decoder lens of a recorded run (``model.run`` or ``generate(..., trace=...)``); needs ``lens_names``."""
    names = lens_names(model)
    missing = [n for n in names if n not in trace]
    if missing:
        raise KeyError(f"the trace lacks {missing[0]!r}: record trace=whisper_lens.lens.lens_names(model)")
    with torch.no_grad():
        logits = torch.stack([readout(model, trace[n].to(model.device, model.dtype)) for n in names])  # (L+1, B, T, V)
        logp = logits.log_softmax(dim=-1)  # (L+1, B, T, V)
        final_logp = logp[-1]  # (B, T, V)
        final_token = final_logp.argmax(dim=-1)  # (B, T)
        top_logp, top_ids = logp.topk(k, dim=-1)  # (L+1, B, T, k)
        final_lp = logp.gather(-1, final_token[None, ..., None].expand(len(names), -1, -1, 1))[..., 0]  # (L+1, B, T)
        rank = (logp > final_lp[..., None]).sum(dim=-1)  # (L+1, B, T)
        p_final = final_logp.exp()  # (B, T, V)
        kl = (p_final * (final_logp - logp)).sum(dim=-1)  # (L+1, B, T)
        entropy = -(logp.exp() * logp).nan_to_num().sum(dim=-1)  # (L+1, B, T)
        norm = logits.norm(dim=-1)  # (L+1, B, T)
    return DecoderLens(names, layer_labels(model), top_ids, top_logp.exp(), final_token, final_lp.exp(), rank,
                       kl.clamp_min(0), entropy, norm)  # fmt: skip


def decoder_lens(model: Whisper, mel: Tensor, tokens: Tensor, k: int = 5, edits: Edits | None = None) -> DecoderLens:
    """Teacher-forced decoder lens of ``tokens`` [B, T] on the audio ``mel`` [B, n_mels, frames]."""
    with torch.no_grad():
        run = model.run(mel, tokens, trace=lens_names(model), edits=edits)
    return decoder_lens_from_trace(model, run.trace, k)


def restricted_lens(model: Whisper, trace: Trace, token_ids: Sequence[int], position: int) -> tuple[Tensor, Tensor]:
    """Each layer's belief over a token set at one position: (probabilities within the set, mass of the set).

    Returns ``(within, mass)`` of shapes (L+1, B, len(token_ids)) and (L+1, B): ``within`` is the
    softmax over the set's logits only (which language, which timestamp), ``mass`` the set's share
    of the full softmax (how much the layer believes in the set at all).
    """
    ids = torch.as_tensor(list(token_ids), device=model.device)
    if ids.numel() == 0:
        raise ValueError("the token set is empty")
    with torch.no_grad():
        logits = torch.stack([readout(model, trace[n][:, position].to(model.device, model.dtype))
                              for n in lens_names(model)])  # (L+1, B, V)  # fmt: skip
        sub = logits[..., ids]  # (L+1, B, n)
        within = sub.softmax(dim=-1)  # (L+1, B, n)
        mass = (sub.logsumexp(dim=-1) - logits.logsumexp(dim=-1)).exp()  # (L+1, B)
    return within, mass


def sot_lens(model: Whisper, mel: Tensor) -> dict[str, Tensor]:
    """What each decoder layer believes at the <|startoftranscript|> position, where Whisper identifies things.

    ``no_speech`` (L+1, B): the readout's probability of <|nospeech|> (Whisper's voice-activity signal).
    ``timestamp_mass`` (L+1, B): total probability of the timestamp tokens. For multilingual models also
    ``language_probs`` (L+1, B, n_languages) over the language tokens (language identification per layer).
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("this model has no tokenizer: load_model(..., tokenizer=path)")
    mel = mel if mel.dim() == 3 else mel[None]
    tokens = torch.full((mel.shape[0], 1), tok.sot, dtype=torch.long)
    with torch.no_grad():
        trace = model.run(mel, tokens, trace=lens_names(model)).trace
    out = {"no_speech": restricted_lens(model, trace, [tok.no_speech], 0)[1]}
    timestamps = range(tok.timestamp_begin, model.dims.n_vocab)
    out["timestamp_mass"] = restricted_lens(model, trace, timestamps, 0)[1]
    if tok.multilingual:
        out["language_probs"] = restricted_lens(model, trace, tok.all_language_tokens, 0)[0]
    return out


def encoder_lens(model: Whisper, mel: Tensor, tokens: Tensor) -> Tensor:
    """Probability of each token of ``tokens`` [B, T] when only the first k encoder blocks run, k = 0..L.

    Teacher-forced on the given tokens (e.g. the full model's transcript): row k of the result
    (L+1, B, T-1) is p(tokens[:, t+1] | tokens[:, :t+1]) with encoder blocks k..L-1 skipped
    (ln_post still applied). Where late encoder layers matter, a position's probability rises late.
    """
    L = model.dims.n_audio_layer
    rows = []
    with torch.no_grad():
        for k in range(L + 1):
            edits = Edits().skip("encoder", range(k, L)) if k < L else None
            logp = model.run(mel, tokens, edits=edits).logits.log_softmax(dim=-1)  # (B, T, V)
            rows.append(logp[:, :-1].gather(-1, tokens[:, 1:, None].to(logp.device))[..., 0].exp())  # (B, T-1)
    return torch.stack(rows)  # (L+1, B, T-1)
