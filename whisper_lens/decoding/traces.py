"""Traces and edits while decoding: each step recorded on its own, stitched into the trace of the final sequence."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..trace import IDLE, Edits, Recorder, Trace, spliced_names, spliced_shapes

if TYPE_CHECKING:
    from ..model import Whisper
    from .loop import Decoding


def pass_recorder(rec: Recorder) -> Recorder:
    """A recorder for one decoder pass: the call's names and edits, a trace of its own."""
    return Recorder(rec.keep, rec.edits, Trace()) if rec.active else IDLE


def traced_names(d: Decoding) -> list[str]:
    """The names a result's trace holds, in the model's order; a skipped block keeps only its stream."""
    rec, dims = d.rec, d.model.dims
    blocks = [f"encoder.blocks.{i}" for i in range(dims.n_audio_layer)]
    blocks += [f"decoder.blocks.{i}" for i in range(dims.n_text_layer)]
    skipped = tuple(f"{block}." for block in blocks if rec.skips(block))
    inside = [n for n in rec.keep if n.startswith(skipped) and not n.endswith(("resid_pre", "resid_post"))]
    return [n for n in spliced_names(d.model.names(), rec.edits) if n in rec.keep and n not in inside]


def stitch_trace(order: list[str], d: Decoding, g: int, rows: list[int], length: int) -> Trace:
    """Clip ``g``'s trace: names computed once from the call's trace (its clip's row), decoder names from
    the prompts' pass (row g, its prompt's positions) then from step s at row ``rows[s - 1]``, joined along
    positions; self-attention scores/patterns are cut to the final ``length`` keys."""
    once, prompts, steps = d.rec.trace, d.steps[0], d.steps[1:]
    T0, c = len(d.plan.prompts[g]), g if d.options.clips is None else d.options.clips[g]
    out = Trace()
    for name in order:
        if name in once:  # the encoder's and the audio's keys and values: one row per clip
            out.put(name, once[name][c : c + 1])
            continue
        axis = 2 if name.endswith(("scores", "pattern")) else 1  # heads come before positions there
        parts = [prompts[name][g : g + 1].narrow(axis, 0, T0)] + [steps[s][name][r : r + 1] for s, r in enumerate(rows)]
        x = torch.cat(parts, dim=axis)
        if name.endswith((".attn.scores", ".attn.pattern")) and ".cross_attn." not in name:
            x = x[..., :length]
        out.put(name, x)
    return out


def check_step_edits(model: Whisper, edits: Edits | None) -> None:
    """Decoder edits must act on each position alone (a step sees one position at a time): a value fits one
    position, or the positions it names (applied where a step's tokens sit at them)."""
    if edits is None:
        return
    step_shapes = spliced_shapes(model.shapes(batch=1, n_tokens=1), edits)
    for name, ops in edits.ops.items():
        if name.startswith("encoder.") or name.endswith(("cross_attn.k", "cross_attn.v")):
            continue  # computed once, not per step
        for op in ops:
            if op.kind == "mean" and op.mean is None:
                raise ValueError(f"mean-ablation at {name!r} in generate needs mean= (the run's mean is unknown)")
            if op.kind not in ("replace", "add") or (op.positions is None and not op.heads):
                pass
            elif op.positions is not None and name.endswith((".scores", ".pattern")):
                raise ValueError(f"{op.kind} at {name!r} with positions: generate edits positions of names "
                                 "whose position axis is dim 1 (not scores or patterns)")  # fmt: skip
            else:  # the value gives each position it names its own (or one for all, size 1); heads likewise
                one = list(step_shapes[name])
                one[1] = 1 if op.positions is None else len(op.positions)
                one[2] = len(op.heads) if op.heads else one[2]
                if not fits(tuple(op.value.shape), tuple(one)):
                    at = "" if op.positions is None else f" at positions {op.positions.tolist()}"
                    raise ValueError(f"{op.kind} at {name!r}{at} in generate needs a value that fits {one} (size 1 "
                                     f"or absent at the batch axis), got shape {tuple(op.value.shape)}")  # fmt: skip
                continue
            if op.kind in ("replace", "add") and not fits(tuple(op.value.shape), step_shapes[name]):
                raise ValueError(
                    f"{op.kind} at {name!r} in generate needs a value that fits one position of one clip, "
                    f"{list(step_shapes[name])} (size 1 or absent at the batch and position axes), "
                    f"got shape {tuple(op.value.shape)}"
                )


def fits(value: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Does a value of shape ``value`` broadcast to ``shape`` without changing it?"""
    try:
        return torch.broadcast_shapes(value, shape) == shape
    except RuntimeError:
        return False
