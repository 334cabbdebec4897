"""The name and shape of every activation a model records, from its dims alone (no model is run).

``model.py`` names each point where it computes it (``rec("resid_mid", x)``); this table lists
the same names in the same order, with their shapes for a batch of B clips and T tokens, so
that trace patterns and edits are checked before a run, and a trace's size known before it is
made. tests/test_model.py checks it against what a full trace records.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .model import ModelDims


@functools.lru_cache(maxsize=64)
def activation_shapes(dims: ModelDims, batch: int = 1, n_tokens: int = 1) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every recorded activation, in the order a forward records them (from the dims alone)."""
    B, T, S = batch, n_tokens, dims.n_audio_ctx
    shapes = {"encoder.conv1": (B, 2 * S, dims.n_audio_state), "encoder.conv2": (B, S, dims.n_audio_state),
              "encoder.embed": (B, S, dims.n_audio_state)}  # fmt: skip
    stacks = [("encoder", dims.n_audio_layer, S, dims.n_audio_state, dims.n_audio_head),
              ("decoder", dims.n_text_layer, T, dims.n_text_state, dims.n_text_head)]  # fmt: skip
    for stack, n_layer, n, D, H in stacks:
        if stack == "decoder":
            shapes["decoder.embed"] = (B, T, D)
        for i in range(n_layer):
            p = f"{stack}.blocks.{i}."
            shapes[p + "resid_pre"] = (B, n, D)
            attentions = [("attn", n, "resid_mid"), ("cross_attn", S, "resid_mid_cross")][: 1 + (stack == "decoder")]
            for attn, keys, resid in attentions:
                for point, shape in [("q", (B, n, H, D // H)), ("k", (B, keys, H, D // H)), ("v", (B, keys, H, D // H)),
                                     ("scores", (B, H, n, keys)), ("pattern", (B, H, n, keys)),
                                     ("z", (B, n, H, D // H))]:  # fmt: skip
                    shapes[f"{p}{attn}.{point}"] = shape
                shapes[f"{p}{attn}_out"] = shapes[p + resid] = (B, n, D)
            shapes[p + "mlp.pre"] = shapes[p + "mlp.post"] = (B, n, 4 * D)
            shapes[p + "mlp_out"] = shapes[p + "resid_post"] = (B, n, D)
        shapes[f"{stack}.{'ln_post' if stack == 'encoder' else 'ln'}"] = (B, n, D)
    shapes["logits"] = (B, T, dims.n_vocab)
    return shapes
