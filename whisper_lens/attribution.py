"""Attribution and activation patching: which heads, MLPs and positions make an output, for both stacks.

Three standard questions, the way TransformerLens users ask them, for an encoder-decoder:

1. **What is the residual stream made of?** Every residual point is a sum: the embeddings, then
   what each block adds. An attention layer adds ``z @ W_O^T + b_O``; split ``W_O`` by head and
   the layer's output is a sum of per-head *results* (``head_results``: z of head h times the
   columns of ``W_O`` that read it, [B, T, H, D]) plus the output bias. ``decompose`` lists these
   components (embeddings, every self- and cross-attention head, every attention output bias,
   every MLP) for any point of either stack; they sum to the stream exactly.
2. **Direct logit attribution.** The logit of token t is ``W_U[t] . LN(x)``. With the final
   LayerNorm's scale frozen at the run's value, LN is affine in x, so the logit is a sum over
   components plus a constant (the LN's bias read by ``W_U[t]``): ``logit_attribution``.
3. **Activation patching.** Run the *corrupt* input with one activation (a layer's stream at one
   position, one head) taken from the *clean* run, and measure a metric: how much of the clean
   behaviour does that activation restore? ``patch`` does a whole grid of such runs in batches,
   encoding each clip once; ``attribution_patch`` estimates the same grid from one backward pass
   (gradient x activation difference; Nanda, "Attribution Patching", 2023).

The decoder rows of a sweep decode the corrupt clip's audio together: its cross-attention keys and
values are computed once and attended over by every row (``KVCache`` sharing, as ``generate``'s
beams). Rows patched in block l start from the corrupt run's stream at block l (earlier blocks are
skipped: they would compute exactly that). The metric reads only the positions it names
(``Metric.at``): the decoder is causal, so tokens after them are not run and positions after them
cannot change it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .decoding.cache import DecoderCache, KVCache, new_cache
from .inputs import check_mel, check_tokens
from .model import Attention, Whisper
from .trace import Edits, Recorder, Trace, _closest

# ----------------------------------------------------------------------------- per-head results

_LAYER = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(attn|cross_attn)(\.result)?$")
_POINT = re.compile(r"^(encoder|decoder)\.(?:embed|blocks\.(\d+)\.(resid_pre|resid_mid|resid_mid_cross|resid_post))$")
_STAGES = ("resid_pre", "resid_mid", "resid_mid_cross", "resid_post")


def attention(model: Whisper, layer: str) -> Attention:
    """The attention module of ``'decoder.blocks.2.cross_attn'`` (a ``.result`` suffix is allowed)."""
    m = _LAYER.match(layer)
    if not m:
        raise ValueError(f"want an attention layer like 'decoder.blocks.2.cross_attn', got {layer!r}")
    stack, i, kind = m[1], int(m[2]), m[3]
    blocks = getattr(model, stack).blocks
    if i >= len(blocks):
        raise IndexError(f"{stack} block {i} out of range: the {stack} has {len(blocks)} blocks")
    if kind == "cross_attn" and stack == "encoder":
        raise ValueError(f"{layer!r}: the encoder has no cross-attention")
    return getattr(blocks[i], kind)


def head_results(model: Whisper, trace: Trace, layer: str) -> Tensor:
    """Each head's output [B, T, H, D] of an attention layer: its ``z`` times its slice of ``W_O`` (no bias).

    What TransformerLens calls ``result``, computed on demand from the recorded ``{layer}.z``
    (record ``'*.z'``, not a [B, T, H, D] tensor per layer). Summed over heads, plus the output
    bias, it is the layer's output (``attn_out`` / ``cross_attn_out``).
    """
    layer = layer.removesuffix(".result")
    out = attention(model, layer).out
    z = _float(trace[f"{layer}.z"])  # (B, T, H, Dh)
    H, Dh = z.shape[-2:]
    w = out.weight.to(z).view(-1, H, Dh)  # (D, H, Dh): W_O's columns, by the head that feeds them
    return torch.einsum("bthk,dhk->bthd", z, w)  # (B, T, H, D)


def _float(x: Tensor) -> Tensor:
    """At least fp32 (traces may be kept in fp16), on the tensor's own device."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------- residual decomposition


@dataclass
class Components:
    """A residual point split into what wrote it: ``values`` (C, B, T, D), one label per component.

    Labels: ``embed``; per block i ``L{i}.attn.H{h}`` (each head), ``L{i}.attn.bias``, then for the
    decoder ``L{i}.cross_attn.H{h}``, ``L{i}.cross_attn.bias``; then ``L{i}.mlp``.
    ``values.sum(0)`` is the stream at ``point``.
    """

    point: str
    labels: list[str]
    values: Tensor  # (C, B, T, D)

    def __getitem__(self, label: str) -> Tensor:
        """The component (B, T, D) labelled ``label``."""
        if label not in self.labels:
            raise KeyError(f"no component {label!r}; closest: {_closest(label, self.labels)}")
        return self.values[self.labels.index(label)]

    def sum(self) -> Tensor:
        """The stream the components add up to (B, T, D)."""
        return self.values.sum(dim=0)


def _parse_point(model: Whisper, point: str) -> tuple[str, int, int]:
    """(stack, block, stage) of a residual point: the blocks before ``block`` are whole, then ``stage`` of
    its sub-layers (0: none, 1: self-attention, 2: + cross-attention, 3: + MLP)."""
    m = _POINT.match(point) if isinstance(point, str) else None
    if not m:
        raise ValueError(
            f"cannot decompose {point!r}: give a residual point, '{{stack}}.embed' or "
            "'{stack}.blocks.{i}.resid_pre|resid_mid|resid_mid_cross|resid_post'"
        )
    stack = m[1]
    if m[2] is None:
        return stack, 0, 0
    i, n = int(m[2]), len(getattr(model, stack).blocks)
    if i >= n:
        raise IndexError(f"{stack} block {i} out of range: the {stack} has {n} blocks (0-{n - 1})")
    if stack == "encoder" and m[3] == "resid_mid_cross":
        raise ValueError(f"{point!r}: the encoder has no cross-attention")
    return stack, i, _STAGES.index(m[3])


def _parts(model: Whisper, point: str) -> list[tuple[int, str]]:
    """The sub-layers (block, 'attn' | 'cross_attn' | 'mlp') that write the stream at ``point``, in order."""
    stack, block, stage = _parse_point(model, point)
    kinds = ["attn", "cross_attn", "mlp"] if stack == "decoder" else ["attn", "mlp"]
    out = [(i, k) for i in range(block) for k in kinds]
    upto = {0: [], 1: ["attn"], 2: ["attn", "cross_attn"], 3: kinds}[stage]
    return out + [(block, k) for k in upto]


def decompose_names(model: Whisper, point: str) -> list[str]:
    """What to record (``trace=``) to decompose ``point``: the embeddings, each layer's ``z``, each ``mlp_out``
    and the point itself."""
    stack = _parse_point(model, point)[0]
    names = [f"{stack}.embed"]
    for i, kind in _parts(model, point):
        names.append(f"{stack}.blocks.{i}.{'mlp_out' if kind == 'mlp' else kind + '.z'}")
    return [*names, point] if point not in names else names


def decompose(model: Whisper, trace: Trace, point: str) -> Components:
    """The components of the residual stream at ``point`` (``'decoder.blocks.3.resid_post'``): see ``Components``.

    The trace must hold ``decompose_names(model, point)``. A run with edits that write the stream
    directly (replacing a residual point, skipping a block) is not a sum of these components.
    """
    stack = _parse_point(model, point)[0]
    missing = [n for n in decompose_names(model, point) if n not in trace]
    if missing:
        raise KeyError(f"the trace lacks {missing[0]!r}: record trace=whisper_lens.attribution.decompose_names("
                       f"model, {point!r})")  # fmt: skip
    embed = _float(trace[f"{stack}.embed"])  # (B, T, D)
    labels, values = ["embed"], [embed]
    for i, kind in _parts(model, point):
        if kind == "mlp":
            labels.append(f"L{i}.mlp")
            values.append(_float(trace[f"{stack}.blocks.{i}.mlp_out"]))  # (B, T, D)
            continue
        layer = f"{stack}.blocks.{i}.{kind}"
        result = head_results(model, trace, layer)  # (B, T, H, D)
        labels += [f"L{i}.{kind}.H{h}" for h in range(result.shape[2])] + [f"L{i}.{kind}.bias"]
        values += list(result.unbind(2)) + [attention(model, layer).out.bias.to(embed).expand_as(embed)]
    return Components(point, labels, torch.stack(values))  # (C, B, T, D)


# ----------------------------------------------------------------------------- direct logit attribution


@dataclass
class Attribution:
    """Each component's share of a logit (or logit difference): ``values`` (C, B, T), ``labels`` (C).

    With ``ln='frozen'``, ``values.sum(0) + constant`` is the logit the run computed (up to float
    rounding); ``constant`` (B, T) is what the final LayerNorm's bias adds along the direction.
    """

    labels: list[str]
    values: Tensor  # (C, B, T)
    constant: Tensor  # (B, T)
    ln: str

    def total(self) -> Tensor:
        """(B, T): the components' sum plus the constant: the logit (difference), for ``ln='frozen'``."""
        return self.values.sum(dim=0) + self.constant

    def top(self, k: int = 10, batch: int = 0, position: int = -1) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute contribution at one (batch, position), with their values."""
        v = self.values[:, batch, position]  # (C,)
        order = v.abs().argsort(descending=True)[:k]
        return [(self.labels[i], float(v[i].detach())) for i in order.tolist()]

    def plot(self, batch: int = 0, position: int = -1, k: int = 15):
        """A bar chart (a matplotlib Figure) of the ``k`` largest contributions at one position."""
        import matplotlib.pyplot as plt

        top = self.top(k, batch, position)[::-1]
        fig, ax = plt.subplots(figsize=(6, 0.25 * len(top) + 1.2))
        ax.barh([label for label, _ in top], [v for _, v in top], color=["C3" if v < 0 else "C0" for _, v in top])
        ax.set_xlabel("direct contribution to the logit (difference)")
        ax.axvline(0, color="k", lw=0.5)
        fig.tight_layout()
        return fig


def logit_attribution(model: Whisper, trace: Trace, token: int | Tensor, other: int | Tensor | None = None, *,
                      point: str | None = None, ln: str = "frozen") -> Attribution:  # fmt: skip
    """Direct logit attribution: each component's contribution to the logit of ``token`` (minus ``other``'s).

    ``token`` / ``other``: a token id, or ids (B, T) per position (e.g. the next tokens). ``point``:
    the decoder stream read (default the last block's output, the one the model unembeds; an earlier
    one reads it through the lens). ``ln``: how the final LayerNorm is treated:

    - ``'frozen'``: its scale fixed at the run's value at ``point``, so each component is centred,
      divided by that scale, multiplied by the LN weight and read by the unembedding direction. The
      contributions plus ``constant`` give the logit (TransformerLens's ``apply_ln=True``).
    - ``'each'``: each component normalised by its own LayerNorm, as if it were the whole stream (the
      values no longer add up).
    - ``'none'``: the raw component read by the unembedding direction (``apply_ln=False``).

    Record ``decompose_names(model, point)``.
    """
    if ln not in ("frozen", "each", "none"):
        raise ValueError(f"ln must be 'frozen', 'each' or 'none', got {ln!r}")
    point = point or f"decoder.blocks.{model.dims.n_text_layer - 1}.resid_post"
    if _parse_point(model, point)[0] != "decoder":
        raise ValueError(f"logits read the decoder's stream; {point!r} is in the encoder")
    comps = decompose(model, trace, point)
    B, T, D = comps.values.shape[1:]
    W = model.decoder.token_embedding.weight.to(comps.values)  # (V, D)
    u = _direction(W, token, B, T, "token")  # (B, T, D)
    if other is not None:
        u = u - _direction(W, other, B, T, "other")  # (B, T, D)
    lnmod = model.decoder.ln
    g, b = lnmod.weight.to(comps.values), lnmod.bias.to(comps.values)  # (D,)
    c = comps.values - comps.values.mean(dim=-1, keepdim=True)  # (C, B, T, D): LN's centring is linear
    if ln == "frozen":
        x = _float(trace[point])  # (B, T, D)
        scale = (x.var(dim=-1, unbiased=False, keepdim=True) + lnmod.eps).sqrt()  # (B, T, 1): the run's
        c = c / scale * g  # (C, B, T, D)
    elif ln == "each":
        c = c / (c.pow(2).mean(dim=-1, keepdim=True) + lnmod.eps).sqrt() * g  # (C, B, T, D)
    else:
        c = comps.values  # (C, B, T, D)
    values = (c * u).sum(dim=-1)  # (C, B, T)
    constant = (u * b).sum(dim=-1) if ln != "none" else torch.zeros_like(values[0])  # (B, T)
    return Attribution(comps.labels, values, constant, ln)


def _direction(W: Tensor, token: int | Tensor, B: int, T: int, what: str) -> Tensor:
    """Unembedding rows (B, T, D) of a token id or ids (B, T) / (T,)."""
    ids = torch.as_tensor(token, device=W.device)
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() > 2:
        raise ValueError(f"{what} must be a token id or ids [B, T], got {ids.dtype} {list(ids.shape)}")
    try:
        ids = ids.expand(B, T)
    except RuntimeError:
        raise ValueError(f"{what} ids of shape {list(ids.shape)} do not fit the run's [B, T] = [{B}, {T}]") from None
    if ids.min() < 0 or ids.max() >= len(W):
        raise ValueError(f"{what} id {int(ids.max() if ids.max() >= len(W) else ids.min())} is outside the "
                         f"vocabulary [0, {len(W)})")  # fmt: skip
    return W[ids]  # (B, T, D)


# ----------------------------------------------------------------------------- metrics


@dataclass
class Metric:
    """What a patching sweep measures: ``fn(logits)`` -> (N,), logits (N, P, V) at positions ``at``.

    ``at``: the token positions whose logits ``fn`` reads (P of them), or None for all. Naming them
    lets a sweep unembed only those, run only the tokens up to the last of them, and skip cells
    after it (the decoder is causal, so a patch there cannot change the metric).
    """

    fn: Callable[[Tensor], Tensor]
    at: list[int] | None = None

    def __call__(self, logits: Tensor) -> Tensor:
        out = self.fn(logits)
        if not isinstance(out, Tensor) or out.shape != logits.shape[:1]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the metric must return one number per row, shape ({len(logits)},), got {got}")
        return out


def logit_diff(position: int, token: int, other: int | None = None) -> Metric:
    """The logit of ``token`` minus that of ``other`` (or the logit alone) at token ``position``."""
    if other is None:
        return Metric(lambda logits: logits[:, 0, token], [position])
    return Metric(lambda logits: logits[:, 0, token] - logits[:, 0, other], [position])


def _as_metric(metric: Metric | Callable[[Tensor], Tensor]) -> Metric:
    if isinstance(metric, Metric):
        return metric
    if not callable(metric):
        raise TypeError(f"metric must be a callable logits (N, T, V) -> (N,) or a Metric, got {type(metric).__name__}")
    return Metric(metric)


# ----------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    """A patching result, labelled: ``values`` with one axis per entry of ``dims``, ``coords`` its labels.

    ``dims`` is ("name", "position"), ("name", "head", "position"), ("name", "window") or
    ("name", "head", "window"): names are activation names, windows (start, stop) encoder frames.
    ``clean`` / ``corrupt``: the metric of the unpatched runs; ``normalized()`` maps them to 1 / 0.
    """

    values: Tensor
    dims: tuple[str, ...]
    coords: dict[str, list]
    clean: float
    corrupt: float
    method: str = "patch"

    def __getitem__(self, key) -> Tensor:
        """``grid["decoder.blocks.2.cross_attn.z"]`` (the sub-grid of one name) or plain tensor indexing."""
        if isinstance(key, str):
            return self.values[self.coords["name"].index(key)]
        return self.values[key]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def normalized(self) -> Tensor:
        """(values - corrupt) / (clean - corrupt): 1 where a patch restores the clean metric, 0 where it does not."""
        return (self.values - self.corrupt) / (self.clean - self.corrupt)

    def cells(self) -> list[tuple]:
        """Every cell's labels, in ``values.flatten()`` order."""
        out: list[tuple] = [()]
        for d in self.dims:
            out = [c + (label,) for c in out for label in self.coords[d]]
        return out

    def top(self, k: int = 10, by: str = "effect") -> list[tuple[tuple, float]]:
        """The ``k`` cells whose value moves furthest from ``corrupt`` (``by='effect'``) or are largest."""
        flat = self.values.flatten()
        key = (flat - self.corrupt).abs() if by == "effect" else flat
        order = key.argsort(descending=True)[:k].tolist()
        cells = self.cells()
        return [(cells[i], float(flat[i])) for i in order]

    def plot(self, title: str | None = None, labels: Callable[[tuple], str] | None = None):
        """A heatmap (a matplotlib Figure) of the normalized values: one row per name (and head), positions across."""
        import matplotlib.pyplot as plt

        v = self.normalized().reshape(-1, self.values.shape[-1]).cpu()  # (rows, positions)
        rows = self.cells()[:: self.values.shape[-1]]
        names = [labels(r[:-1]) if labels else _short(r[:-1]) for r in rows]
        fig, ax = plt.subplots(figsize=(min(2 + 0.3 * v.shape[1], 14), 0.22 * len(names) + 1.5))
        lim = float(v.abs().max()) or 1.0
        im = ax.imshow(v.detach().numpy(), aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        last = self.coords[self.dims[-1]]
        ax.set_xticks(range(len(last)), [str(x) for x in last], fontsize=7, rotation=90)
        ax.set_xlabel(self.dims[-1])
        fig.colorbar(im, ax=ax, label="share of the clean metric restored")
        ax.set_title(title or f"{self.method}: {self.values.numel()} cells")
        fig.tight_layout()
        return fig


def _short(labels: tuple) -> str:
    """'decoder.blocks.2.cross_attn.z', 3 -> 'L2 cross_attn H3'."""
    name = re.sub(r"^(encoder|decoder)\.blocks\.(\d+)\.", r"L\2 ", labels[0]).removesuffix(".z")
    return name + (f" H{labels[1]}" if len(labels) > 1 else "")


# ----------------------------------------------------------------------------- the sweep's plan


@dataclass
class _Cell:
    name: str
    head: int | None
    positions: list[int]


@dataclass
class _Plan:
    stack: str
    names: list[str]
    dims: tuple[str, ...]
    coords: dict[str, list]
    cells: list[_Cell] = field(default_factory=list)


_HEADED = re.compile(r"\.(attn|cross_attn)\.(q|k|v|z)$")
_NOT_PATCHABLE = re.compile(r"(cross_attn\.(k|v)|\.(scores|pattern)|^encoder\.conv\d|^logits|^decoder\.ln)$")


def _plan(model: Whisper, names: str | Sequence[str], heads, positions, windows, T: int) -> _Plan:
    """Resolve a sweep's request into its grid: names x [heads] x positions (decoder) or windows (encoder)."""
    from .trace import _indices, select_names

    patterns = [names] if isinstance(names, str) else list(names)
    chosen = select_names(patterns, model.names())
    order = [n for n in model.names() if n in chosen]
    bad = [n for n in order if _NOT_PATCHABLE.search(n)]
    if bad:
        raise ValueError(f"cannot patch {bad[0]!r}: sweeps patch residual points, attention and MLP outputs, "
                         "neurons and q/k/v/z per head (not audio keys/values, patterns, the final LN)")  # fmt: skip
    stacks = {n.split(".")[0] for n in order}
    if len(stacks) > 1:
        raise ValueError("a sweep patches one stack at a time: the names match both encoder and decoder")
    stack = stacks.pop()
    headed = {bool(_HEADED.search(n)) for n in order}
    if len(headed) > 1:
        raise ValueError("a sweep patches per-head names (attn.z ...) or whole activations, not both: split the call")
    per_head = headed.pop()
    n_heads = model.dims.n_text_head if stack == "decoder" else model.dims.n_audio_head
    if heads is not None and not per_head:
        raise ValueError(f"heads= needs per-head names (e.g. '{stack}.blocks.*.cross_attn.z'), got {order[0]!r}")
    head_list = list(range(n_heads)) if heads is None else _indices("heads", heads)
    if per_head and (not head_list or max(head_list) >= n_heads):
        raise ValueError(f"heads {head_list} out of range: the {stack}'s layers have {n_heads} heads (0-{n_heads - 1})")
    if stack == "decoder":
        if windows is not None:
            raise ValueError("windows= are encoder time windows; decoder sweeps take positions=")
        pos_list = list(range(T)) if positions is None else _indices("positions", positions)
        if not pos_list or max(pos_list) >= T:
            raise ValueError(f"positions {pos_list} out of range: the tokens have {T} positions (0-{T - 1})")
        spans, last, last_coords = [[p] for p in pos_list], "position", pos_list
    else:
        if positions is not None:
            raise ValueError("positions= are decoder token positions; encoder sweeps take windows=")
        if windows is None:
            raise ValueError("an encoder sweep needs windows=: a width in frames, or a list of (start, stop) frames")
        last_coords = _windows(windows, model.dims.n_audio_ctx)
        spans, last = [list(range(a, b)) for a, b in last_coords], "window"
    dims = ("name", "head", last) if per_head else ("name", last)
    coords = {"name": order, last: last_coords}
    if per_head:
        coords["head"] = head_list
    plan = _Plan(stack, order, dims, coords)
    for name in order:
        for h in head_list if per_head else [None]:
            plan.cells += [_Cell(name, h, span) for span in spans]
    return plan


def _windows(windows, S: int) -> list[tuple[int, int]]:
    """Encoder time windows: a width (consecutive windows covering all S frames) or (start, stop) pairs."""
    if isinstance(windows, int) and not isinstance(windows, bool):
        if not 0 < windows <= S:
            raise ValueError(f"window width must be 1 to n_audio_ctx={S} frames, got {windows}")
        return [(a, min(a + windows, S)) for a in range(0, S, windows)]
    out = []
    for w in windows:
        if not (isinstance(w, Sequence) and len(w) == 2 and all(isinstance(x, int) for x in w)):
            raise ValueError(f"a window is (start, stop) frames, got {w!r}")
        a, b = w
        if not 0 <= a < b <= S:
            raise ValueError(f"window {w!r} must satisfy 0 <= start < stop <= n_audio_ctx={S}")
        out.append((a, b))
    if not out:
        raise ValueError("windows is empty")
    return out


# ----------------------------------------------------------------------------- patching


class Patcher:
    """A clean and a corrupt clip, encoded once, for any number of patching sweeps over them.

    ``clean`` / ``corrupt``: (mel [n_mels, frames], tokens [T]) of one clip each, tokens of equal
    length (patching is position for position). ``metric``: a ``Metric`` (or a callable logits
    (N, T, V) -> (N,)). ``batch_size``: patched copies run together.
    """

    def __init__(self, model: Whisper, clean: tuple[Tensor, Tensor], corrupt: tuple[Tensor, Tensor],
                 metric: Metric | Callable[[Tensor], Tensor], *, batch_size: int = 64) -> None:  # fmt: skip
        self.model, self.metric, self.batch_size = model, _as_metric(metric), int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.mel, self.tokens = {}, {}
        for which, clip in (("clean", clean), ("corrupt", corrupt)):
            if not isinstance(clip, tuple | list) or len(clip) != 2:
                raise TypeError(f"{which} must be a (mel, tokens) pair of one clip")
            mel = check_mel(clip[0], model.dims, model.device, model.dtype)  # (1, n_mels, 2S)
            if len(mel) != 1:
                raise ValueError(f"{which}: patching takes one clip, got a batch of {len(mel)}")
            self.mel[which], self.tokens[which] = mel, check_tokens(clip[1], model.dims, 1, model.device)  # (1, T)
        T = self.tokens["clean"].shape[1]
        if self.tokens["corrupt"].shape[1] != T:
            raise ValueError(f"clean and corrupt tokens must have the same length, got {T} and "
                             f"{self.tokens['corrupt'].shape[1]}")  # fmt: skip
        at = self.metric.at
        if at is not None and (not at or min(at) < 0 or max(at) >= T):
            raise ValueError(f"the metric reads positions {at}, outside the tokens' 0-{T - 1}")
        self.T = T if at is None else max(at) + 1  # the tokens a patched run needs
        self.acts: dict[str, dict[str, Tensor]] = {"clean": {}, "corrupt": {}}
        self.cross: dict[str, list[KVCache]] = {}
        self.xa: dict[str, Tensor] = {}
        self.baseline: dict[str, float] = {}
        with torch.no_grad():
            for w in ("clean", "corrupt"):  # each clip encoded once; its decoder's activations all kept (T' small)
                self.xa[w] = self._record(w, [])  # (1, S, D)
                run = model.run(tokens=self.tokens[w][:, : self.T], trace=["decoder.*"], audio_features=self.xa[w])
                self.acts[w].update(run.trace)
                logits = run.logits if self.metric.at is None else run.logits[:, self.metric.at]  # (1, P, V)
                self.baseline[w] = float(self.metric(logits)[0])

    def _record(self, which: str, names: list[str]) -> Tensor:
        """Run a clip (the encoder only if it is not encoded yet or an encoder name is asked for) keeping ``names``;
        returns its audio features."""
        enc = [n for n in names if n.startswith("encoder.")]
        if enc or which not in self.xa:
            rec = self.model.recorder(enc, None)
            xa = self.model.encoder(self.mel[which], rec.child("encoder"))  # (1, S, D)
            self.acts[which].update(rec.trace or {})
        else:
            xa = self.xa[which]
        dec = [n for n in names if n.startswith("decoder.")]
        if dec:
            tokens = self.tokens[which][:, : self.T]  # (1, T')
            run = self.model.run(tokens=tokens, trace=dec, audio_features=xa)
            self.acts[which].update(run.trace)
        return xa

    def activations(self, which: str, names: list[str]) -> dict[str, Tensor]:
        """The clean or corrupt run's activations at ``names`` (recorded on first use)."""
        missing = [n for n in names if n not in self.acts[which]]
        if missing:
            with torch.no_grad():
                self._record(which, missing)
        return {n: self.acts[which][n] for n in names}

    def _decode(self, which: str, xa: Tensor, rec: Recorder, rows: int = 1, shared: bool = True) -> Tensor:
        """The metric (rows,) of ``rows`` copies of a clip's tokens decoded over ``xa`` under ``rec``.
        ``shared``: ``xa`` is one clip's features (1, S, D), attended over by every row from one cache."""
        model, T = self.model, self.T
        tokens = self.tokens[which][:, :T].expand(rows, T)  # (N, T')
        if shared:
            if which not in self.cross:  # the audio's keys and values, computed once per clip
                self.cross[which] = new_cache(model.decoder, xa, T).cross_attn
            D, H = model.dims.n_text_state, model.dims.n_text_head
            cache = DecoderCache([KVCache.empty(rows, H, T, D // H, like=xa) for _ in self.cross[which]],
                                 [c.shared_by(rows) for c in self.cross[which]])  # fmt: skip
            pos = torch.arange(T, device=tokens.device)[None]  # (1, T')
            x, _ = model.decoder.stream(tokens, rec.child("decoder"), cache=cache, pos=pos)  # (N, T', D)
        else:
            x, _ = model.decoder.stream(tokens, rec.child("decoder"), xa=xa)  # (N, T', D)
        x = x if self.metric.at is None else x[:, self.metric.at]  # (N, P, D): only the positions read
        return self.metric(model.decoder.unembed(x))  # (N,)

    def sweep(self, names: str | Sequence[str], *, heads: Sequence[int] | None = None,
              positions: Sequence[int] | None = None, windows=None) -> Grid:  # fmt: skip
        """Patch each cell of the grid alone (clean value into the corrupt run) and measure the metric: a ``Grid``."""
        plan = _plan(self.model, names, heads, positions, windows, self.tokens["clean"].shape[1])
        clean = self.activations("clean", plan.names)
        values = torch.full((len(plan.cells),), self.baseline["corrupt"])
        causal = plan.stack == "decoder" and self.metric.at is not None  # cells after the metric's position: no effect
        todo = [i for i, c in enumerate(plan.cells) if not causal or c.positions[0] < self.T]
        groups: dict[int, list[int]] = {}
        for i in todo:  # rows patched in block l start from the corrupt stream at block l
            groups.setdefault(_block_of(plan.cells[i].name), []).append(i)
        with torch.no_grad():
            for block, idx in sorted(groups.items()):
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s : s + self.batch_size]
                    values[chunk] = self._patched(plan, [plan.cells[i] for i in chunk], clean, block).cpu().float()
        return Grid(values.view(*(len(plan.coords[d]) for d in plan.dims)), plan.dims, plan.coords,
                    self.baseline["clean"], self.baseline["corrupt"])  # fmt: skip

    def attribute(self, names: str | Sequence[str], *, heads: Sequence[int] | None = None,
                  positions: Sequence[int] | None = None, windows=None) -> Grid:  # fmt: skip
        """The grid of ``sweep`` estimated by attribution patching: see ``attribution_patch``."""
        plan = _plan(self.model, names, heads, positions, windows, self.tokens["clean"].shape[1])
        clean_acts = self.activations("clean", plan.names)
        tokens = self.tokens["corrupt"][:, : self.T]  # (1, T')
        # the stacks' inputs become leaves that need gradients: the activations are on the graph even when
        # the model's parameters do not require gradients
        leaf = Edits().apply(f"{plan.stack}.embed", lambda x: x.detach().requires_grad_())
        if plan.stack == "encoder":
            leaf.apply("decoder.embed", lambda x: x.detach().requires_grad_())
        with torch.enable_grad():
            if plan.stack == "decoder":
                xa = self.xa["corrupt"].detach().requires_grad_()  # (1, S, D)
                run = self.model.run(tokens=tokens, trace=plan.names, edits=leaf, audio_features=xa)
            else:
                run = self.model.run(self.mel["corrupt"], tokens, trace=plan.names, edits=leaf)
            logits = run.logits if self.metric.at is None else run.logits[:, self.metric.at]  # (1, P, V)
            value = self.metric(logits)  # (1,)
            acts = [run.trace[n] for n in plan.names]
            grads = torch.autograd.grad(value.sum(), acts, allow_unused=True)
        value = float(value.detach())
        est = torch.full((len(plan.cells),), value)
        effect = {}
        for n, a, g in zip(plan.names, acts, grads, strict=True):
            if g is None:  # the metric does not depend on it (positions after the metric's)
                g = torch.zeros_like(a)
            effect[n] = (g * (_pad(clean_acts[n], a) - a)).detach()[0]  # (T', [H,] Dh or D)
        for i, cell in enumerate(plan.cells):
            e = effect[cell.name]
            pos = [q for q in cell.positions if q < e.shape[0]]
            part = e[pos] if cell.head is None else e[pos, cell.head]
            est[i] += float(part.sum())
        return Grid(est.view(*(len(plan.coords[d]) for d in plan.dims)), plan.dims, plan.coords,
                    self.baseline["clean"], value, method="attribution patching")  # fmt: skip

    def _patched(self, plan: _Plan, cells: list[_Cell], clean: dict[str, Tensor], block: int) -> Tensor:
        """The metric of the corrupt run with each row's cell patched, rows = cells (N,)."""
        stack, N = plan.stack, len(cells)
        edits = Edits()
        if block > 0:  # blocks before this one compute the corrupt run's stream: take it instead
            start = f"{stack}.blocks.{block}.resid_pre"
            edits.skip(stack, range(block)).replace(start, self.activations("corrupt", [start])[start])
        by_name: dict[str, list[tuple[int, _Cell]]] = {}
        for r, cell in enumerate(cells):
            by_name.setdefault(cell.name, []).append((r, cell))
        for name, rows in by_name.items():
            edits.apply(name, _row_patcher(rows, clean[name]))
        rec = Recorder(frozenset(), edits, None)
        if stack == "decoder":
            return self._decode("corrupt", self.xa["corrupt"], rec, rows=N)
        mel = self.mel["corrupt"].expand(N, -1, -1)  # (N, n_mels, 2S)
        xa = self.model.encoder(mel, rec.child("encoder"))  # (N, S, D)
        return self._decode("corrupt", xa, Recorder(frozenset(), None, None), rows=N, shared=False)


def _block_of(name: str) -> int:
    m = re.match(r"^(?:encoder|decoder)\.blocks\.(\d+)\.", name)
    return int(m[1]) if m else 0


def _row_patcher(rows: list[tuple[int, _Cell]], clean: Tensor) -> Callable[[Tensor], Tensor]:
    """An edit function: row r of the batch takes the clean run's value at its cell (positions, head)."""

    def fn(x: Tensor) -> Tensor:
        x = x.clone()
        src = clean.to(x)
        for r, cell in rows:
            p = torch.tensor(cell.positions, device=x.device)
            p = p[p < x.shape[1]]  # a run cut after the metric's last position
            if cell.head is None:
                x[r, p] = src[0, p]
            else:
                x[r, p, cell.head] = src[0, p, cell.head]
        return x

    return fn


def patch(model: Whisper, clean: tuple[Tensor, Tensor], corrupt: tuple[Tensor, Tensor],
          metric: Metric | Callable[[Tensor], Tensor], names: str | Sequence[str], *,
          heads: Sequence[int] | None = None, positions: Sequence[int] | None = None, windows=None,
          batch_size: int = 64) -> Grid:  # fmt: skip
    """Activation patching as one call: every cell of ``names`` x [heads] x positions (or encoder windows).

    Each cell is a run of ``corrupt`` with the activation at one name (one head of it for a per-head
    name such as ``'decoder.blocks.*.cross_attn.z'``), at one token position (decoder) or over one
    window of frames (encoder), replaced by the ``clean`` run's; the grid holds ``metric`` of each.
    ``names``: glob patterns over activation names of one stack (``'decoder.blocks.*.resid_pre'``).
    ``heads``: which heads of per-head names (default all). ``positions``: decoder token positions
    (default all). ``windows``: encoder frames, a width or (start, stop) pairs. For several sweeps
    of one pair, make a ``Patcher`` once: it encodes the clips once.
    """
    if isinstance(clean, tuple | list) and len(clean) == 2:  # a bad request fails before the clips are encoded
        _plan(model, names, heads, positions, windows, torch.as_tensor(clean[1]).shape[-1])
    p = Patcher(model, clean, corrupt, metric, batch_size=batch_size)
    return p.sweep(names, heads=heads, positions=positions, windows=windows)


def attribution_patch(model: Whisper, clean: tuple[Tensor, Tensor], corrupt: tuple[Tensor, Tensor],
                      metric: Metric | Callable[[Tensor], Tensor], names: str | Sequence[str], *,
                      heads: Sequence[int] | None = None, positions: Sequence[int] | None = None,
                      windows=None) -> Grid:  # fmt: skip
    """The grid of ``patch`` estimated from one forward and one backward pass of the corrupt run.

    Each cell's metric is estimated to first order: corrupt metric + sum over the cell's slice of
    d(metric)/d(activation) * (clean - corrupt activation). Cheap (two passes for the whole grid),
    exact for a metric linear in the activation, and a ranking to check with ``patch`` where the
    model is far from linear (attention patterns that saturate, LayerNorm scales that move).
    ``Patcher.attribute`` does the same for a pair already encoded.
    """
    if isinstance(clean, tuple | list) and len(clean) == 2:  # a bad request fails before the clips are encoded
        _plan(model, names, heads, positions, windows, torch.as_tensor(clean[1]).shape[-1])
    p = Patcher(model, clean, corrupt, metric)
    return p.attribute(names, heads=heads, positions=positions, windows=windows)


def _pad(clean: Tensor, like: Tensor) -> Tensor:
    """The clean activation cut to the corrupt run's positions (the tokens the metric needs)."""
    return clean[:, : like.shape[1]].to(like)
