"""Named activations (`Trace`) and interventions (`Edits`), with no hooks.

The model's forward passes a `Recorder` down through every module. At each point worth
naming, the code calls ``x = rec("resid_mid", x)``: the recorder applies any edit registered
for the full name (``decoder.blocks.2.resid_mid``) and keeps the result if that name was
asked for. When nothing is asked for and nothing is edited, the call returns ``x`` at once,
so an untraced forward pays one attribute check per point.

Names are ``{stack}.blocks.{i}.{point}`` (the table: docs/contract.md). A request is ``None``
(record nothing), ``True`` (everything) or a list of glob patterns over names.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

TraceRequest = None | bool | str | Sequence[str]


def _layer_order(name: str) -> tuple:
    """Sort key that puts ``blocks.10`` after ``blocks.9`` (natural order of numbers in names)."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _closest(name: str, names: Sequence[str], n: int = 3) -> str:
    """A hint listing the names closest to a misspelt one."""
    close = difflib.get_close_matches(name, names, n=n, cutoff=0.0)
    return ", ".join(repr(c) for c in close)


def select_names(request: TraceRequest, names: Sequence[str]) -> frozenset[str]:
    """The names a trace request asks for. A pattern that matches nothing is an error naming the closest names."""
    if request is None or request is False:
        return frozenset()
    if request is True:
        return frozenset(names)
    if not isinstance(request, str | list | tuple | set | frozenset):
        raise TypeError(f"trace= takes True, a name or glob pattern, or a list of them; got {type(request).__name__} "
                        f"{request!r}")  # fmt: skip
    patterns = [request] if isinstance(request, str) else list(request)
    chosen: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"trace patterns must be strings, got {type(pattern).__name__}")
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise KeyError(f"trace pattern {pattern!r} matches no activation name; closest: {_closest(pattern, names)}")
        chosen.update(hits)
    return frozenset(chosen)


class Trace(Mapping[str, Tensor]):
    """Activations of one forward pass, by name.

    A plain mapping ``name -> tensor`` in the order the forward computed them, with a few
    conveniences: glob selection (``trace.select("*.resid_post")``), stacking a per-layer
    name over layers (``trace.stack("decoder.blocks.*.resid_post")`` -> ``[L, ...]``), size
    (``nbytes``) and moving (``to``). ``device``/``dtype`` given at construction are where and
    how tensors are stored while recording (e.g. fp16 on CPU for a large CUDA run); the stored copy
    stays on the autograd graph, so gradients taken with respect to it reach the run.
    """

    def __init__(
        self,
        tensors: Mapping[str, Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._tensors: dict[str, Tensor] = {}
        self.device = _storage_device(device)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"trace_dtype={dtype!r} would not hold activations: give a floating-point dtype "
                             "(torch.float16, torch.bfloat16, torch.float32) or None")  # fmt: skip
        self.dtype = dtype
        for name, x in (tensors or {}).items():
            self.put(name, x)

    def put(self, name: str, x: Tensor) -> None:
        """Store ``x`` under ``name`` (moved to the storage device/dtype if one was set)."""
        if self.device is not None or self.dtype is not None:  # a differentiable copy: gradients reach the run
            x = x.to(device=self.device, dtype=self.dtype or x.dtype)
        self._tensors[name] = x

    def __getitem__(self, name: str) -> Tensor:
        try:
            return self._tensors[name]
        except KeyError:
            hint = _closest(name, list(self._tensors)) if self._tensors else "(the trace is empty)"
            raise KeyError(f"{name!r} was not recorded in this trace; closest recorded: {hint}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Trace({len(self)} tensors, {self.nbytes / 2**20:.1f} MiB)"

    def names(self) -> list[str]:
        """Recorded names, in the order they were computed."""
        return list(self._tensors)

    def select(self, pattern: str) -> Trace:
        """The sub-trace whose names match a glob pattern."""
        return Trace({n: x for n, x in self._tensors.items() if fnmatch.fnmatchcase(n, pattern)})

    def stack(self, pattern: str) -> Tensor:
        """Stack matching tensors in layer order: ``stack("decoder.blocks.*.resid_post")`` -> [L, ...]."""
        hits = sorted(fnmatch.filter(self._tensors, pattern), key=_layer_order)
        if not hits:
            raise KeyError(f"no recorded name matches {pattern!r}")
        shapes = {n: tuple(self._tensors[n].shape) for n in hits}
        other = next((n for n in hits if shapes[n] != shapes[hits[0]]), None)
        if other is not None:
            first = f"{hits[0]} {list(shapes[hits[0]])}"
            raise ValueError(f"stack({pattern!r}) matches tensors of different shapes ({first}, {other} "
                             f"{list(shapes[other])}): give a pattern of one kind, such as "
                             "'decoder.blocks.*.resid_post'")  # fmt: skip
        return torch.stack([self._tensors[n] for n in hits])

    @property
    def nbytes(self) -> int:
        """Total bytes held by the recorded tensors."""
        return sum(x.numel() * x.element_size() for x in self._tensors.values())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Trace:
        """A copy of the trace with every tensor moved/cast (floating tensors only are cast)."""
        out = Trace()
        for n, x in self._tensors.items():
            out._tensors[n] = x.to(device=device, dtype=dtype if (dtype and x.is_floating_point()) else x.dtype)
        return out


def _storage_device(device) -> torch.device | None:
    """``trace_device`` as a torch.device this machine has (None: where the activations are computed)."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"trace_device={device!r} is not a torch device (use 'cpu' or 'cuda')") from None
    here = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not here.get(parsed.type, False):
        raise ValueError(f"trace_device={str(parsed)!r}: no {parsed.type} device is available here; use 'cpu'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"trace_device={str(parsed)!r}: there are {torch.cuda.device_count()} CUDA devices here")
    return parsed


TRACE_LIMIT_VARIABLE = "WHISPER_LENS_TRACE_LIMIT"  # bytes of traces one transcribe call may keep in memory
DEFAULT_TRACE_LIMIT = 4 * 2**30


def trace_limit() -> int:
    """The most bytes of traces ``transcribe`` keeps in memory: $WHISPER_LENS_TRACE_LIMIT, else 4 GiB."""
    text = os.environ.get(TRACE_LIMIT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TRACE_LIMIT
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{TRACE_LIMIT_VARIABLE}={text!r}: give a number of bytes, such as 8e9")
    return value


def check_trace_budget(kept: int, per_window: float, windows_left: int) -> None:
    """Refuse to go on when the traces kept so far plus the windows still to come would pass ``trace_limit()``.

    ``kept``: bytes already held; ``per_window``: bytes one window's trace takes; ``windows_left``:
    windows still to decode (at least). The error says how much the whole trace would need.
    """
    need, limit = kept + per_window * windows_left, trace_limit()
    if need > limit:
        raise ValueError(
            f"the trace would need about {need / 1e9:.2f} GB ({per_window / 1e6:.1f} MB per window, "
            f"{windows_left} windows to come), more than the {limit / 1e9:.2f} GB allowed: trace fewer names, "
            f"trace the windows one at a time (docs/long-recordings.md), or raise {TRACE_LIMIT_VARIABLE}"
        )


# ----------------------------------------------------------------------------- edits

EditFn = Callable[[Tensor], Tensor]
Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class _Op:
    """One intervention at one name: ``kind`` in replace / add / apply / zero / mean."""

    kind: str
    value: Tensor | None = None
    positions: Tensor | None = None  # (P,) positions along the activation's position axis, or None = all
    fn: EditFn | None = None
    heads: tuple[int, ...] = ()
    mean: Tensor | None = None  # (H', Dh) means for mean-ablation, or None = mean of this run
    features: tuple[int, ...] = ()  # clamp: indices along the last axis
    splice: object | None = None  # a sae.Splice: the SAE and whether the error term is kept
    generated: bool = False  # positions count from the first generated token (``Edits.generated``)


@dataclass(frozen=True)
class Generated:
    """Token positions counted from the first generated token (0: the first): ``Edits.generated(k)``."""

    offsets: tuple[int, ...]


_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)$")
_ATTN_Z = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(attn|cross_attn)\.z$")
_PER_HEAD = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(attn|cross_attn)\.(q|k|v|z|scores|pattern)$")


@dataclass
class Edits:
    """Interventions applied at named points of the forward pass, no hooks.

    Build with the chainable methods, then pass to ``model.run`` or ``model.generate``::

        edits = (wl.Edits()
                 .skip("encoder", [22, 23])                      # remove blocks: residual passes through
                 .ablate_heads("decoder.blocks.3.attn", [0, 5])  # zero heads at attn.z
                 .replace("decoder.blocks.2.resid_post", other.trace["decoder.blocks.2.resid_post"])
                 .add("decoder.blocks.4.resid_post", steering_vector)
                 .apply("encoder.blocks.1.mlp.post", torch.relu)
                 .local_window(k=50))                              # encoder self-attention sees +/- 50 frames

    Edits at one name run in the order they were added. The arguments are checked as they are
    given (blocks, heads and positions are non-negative integers; values are numbers, taken as
    tensors), and against the model and the run's shapes before the run computes anything: an
    unknown name, a block, head or position out of range, or a value that does not fit is an error.
    """

    ops: dict[str, list[_Op]] = field(default_factory=dict)
    skipped: set[str] = field(default_factory=set)
    window: int | None = None
    window_layers: tuple[int, ...] | None = None
    window_heads: tuple[int, ...] | None = None

    def _push(self, name: str, op: _Op) -> Edits:
        if not isinstance(name, str):
            raise TypeError(f"an activation name must be a str, got {type(name).__name__}")
        self.ops.setdefault(name, []).append(op)
        return self

    def skip(self, stack: str, layers: int | Sequence[int]) -> Edits:
        """Skip blocks of ``stack`` ('encoder' or 'decoder'): their input passes through unchanged."""
        if stack not in ("encoder", "decoder"):
            raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
        for i in _indices("blocks", layers):
            self.skipped.add(f"{stack}.blocks.{i}")
        return self

    def ablate_heads(self, attn: str, heads: Sequence[int], how: str = "zero", mean: Tensor | None = None) -> Edits:
        """Zero- or mean-ablate heads of one attention layer (``'decoder.blocks.3.cross_attn'``) at its ``z``.

        Mean-ablation replaces each head's output with its mean over batch and positions of
        this run, or with ``mean`` ([len(heads), Dh]) when given, e.g. from a reference run.
        """
        if how not in ("zero", "mean"):
            raise ValueError(f"how must be 'zero' or 'mean', got {how!r}")
        name = f"{attn}.z"
        if not _ATTN_Z.match(name):
            raise ValueError(f"ablate_heads wants an attention layer like 'decoder.blocks.0.cross_attn', got {attn!r}")
        if how == "zero" and mean is not None:
            raise ValueError("mean= only makes sense with how='mean'")
        chosen = _indices("heads", heads)
        if not chosen:
            raise ValueError(f"ablate_heads at {attn!r}: no heads given")
        mean = None if mean is None else _as_value(name, mean)
        return self._push(name, _Op(how, heads=tuple(chosen), mean=mean))

    def replace(self, name: str, value: Tensor, positions: Sequence[int] | Tensor | None = None,
                heads: Sequence[int] | None = None) -> Edits:  # fmt: skip
        """Replace the activation at ``name`` (whole, or at ``positions`` and/or ``heads``) by ``value``: patching.

        ``positions`` index the activation's position axis: dim 1, or dim 2 for ``scores`` and
        ``pattern`` ([B, H, T, S]: the query positions). ``heads`` index the head axis of a per-head
        name (``attn.q/k/v/z`` [B, T, H, Dh]: dim 2; ``scores``/``pattern``: dim 1); ``value`` then
        has len(heads) there (``replace("decoder.blocks.2.cross_attn.z", clean_z[:, :, [3]], heads=[3])``).
        """
        op = _Op("replace", value=_as_value(name, value), positions=_as_positions(positions), heads=_as_heads(heads),
                 generated=isinstance(positions, Generated))  # fmt: skip
        return self._push(name, op)

    def add(self, name: str, vector: Tensor, positions: Sequence[int] | Tensor | None = None,
            heads: Sequence[int] | None = None) -> Edits:  # fmt: skip
        """Add ``vector`` (broadcast) to the activation at ``name``, everywhere or at ``positions`` / ``heads``."""
        op = _Op("add", value=_as_value(name, vector), positions=_as_positions(positions), heads=_as_heads(heads),
                 generated=isinstance(positions, Generated))  # fmt: skip
        return self._push(name, op)

    @staticmethod
    def generated(k: int) -> Generated:
        """``positions=`` for ``generate``: the first ``k`` generated tokens, whatever the prompt's length
        (``generate`` adds it; a ``run`` wants the absolute positions, prompt length + 0..k-1)."""
        (k,) = _indices("generated tokens", [k])
        if k == 0:
            raise ValueError("Edits.generated(k): k must be at least 1")
        return Generated(tuple(range(k)))

    def after_prompt(self, length: int) -> Edits:
        """A copy whose ``Edits.generated`` positions are absolute: the prompt's ``length`` added."""
        ops = {name: [dataclasses.replace(op, positions=op.positions + length, generated=False) if op.generated
                      else op for op in ops] for name, ops in self.ops.items()}  # fmt: skip
        return dataclasses.replace(self, ops=ops)

    @property
    def counts_generated(self) -> bool:
        """Does an edit name positions by ``Edits.generated``?"""
        return any(op.generated for ops in self.ops.values() for op in ops)

    def apply(self, name: str, fn: EditFn) -> Edits:
        """Replace the activation at ``name`` by ``fn(activation)`` (same shape, dtype and device)."""
        if not callable(fn):
            raise TypeError(f"apply wants a callable, got {type(fn).__name__}")
        return self._push(name, _Op("apply", fn=fn))

    def clamp(self, name: str, features: int | Sequence[int], value: float = 0.0) -> Edits:
        """Set ``features`` (indices along the last axis) of the activation at ``name`` to ``value``, everywhere.

        Made for SAE latents (``"encoder.blocks.3.resid_post.sae.latents"``, after ``splice``) and
        neurons (``mlp.post``): ``clamp(name, [7], 0.0)`` zeroes latent 7, ``clamp(name, [7], 20.0)``
        holds it at 20. To add to a latent instead, ``add(name, vector)`` with a one-hot ``vector``.
        """
        chosen = torch.tensor(_indices("features", features), dtype=torch.long)
        if not len(chosen):
            raise ValueError(f"clamp at {name!r}: no features given")
        value = float(_as_value(name, value))
        return self._push(name, _Op("clamp", value=torch.tensor(value), features=tuple(chosen.tolist())))

    def splice(self, name: str, sae, error: bool = True) -> Edits:
        """Put a sparse autoencoder at ``name``: its latents are recorded and editable as ``{name}.sae.latents``.

        The activation x becomes ``decode(z') + (x - decode(z))`` with ``z = encode(x)`` and ``z'`` the
        latents after any edits at ``{name}.sae.latents`` (``clamp``, ``add``, ``replace``, ``apply``): with
        the error term the model's outputs are unchanged until a latent is edited. ``error=False`` gives
        ``decode(z')``, the SAE's reconstruction alone. ``sae``: a ``sae_lens.SAE`` (``SAE.load_from_disk``,
        or ``whisper_lens.sae.train``'s result), or any module with ``encode``/``decode`` and ``cfg.d_in``,
        ``cfg.d_sae``. Trace ``"*.sae.latents"`` to read the latents: ``[B, T, d_sae]``.
        """
        from .sae import Splice

        if any(op.kind == "splice" for op in self.ops.get(name, ())):
            raise ValueError(f"{name!r} already has an SAE spliced in")
        if name.endswith((".scores", ".pattern")):
            raise ValueError(f"cannot splice an SAE at {name!r}: heads come before positions there")
        return self._push(name, _Op("splice", splice=Splice(sae, error)))

    def local_window(self, k: int, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Edits:
        """Restrict encoder self-attention (all blocks, or ``layers``; all heads, or ``heads`` of each) to frames
        within +/- ``k`` of the query; the other heads keep attending everywhere."""
        (self.window,) = _indices("local window k (frames)", [k])
        self.window_layers = None if layers is None else tuple(_indices("layers", layers))
        self.window_heads = _as_heads(heads) or None
        return self

    def __bool__(self) -> bool:
        return bool(self.ops or self.skipped or self.window is not None)

    # -- used by the model

    def check(
        self,
        names: Sequence[str],
        n_layers: Mapping[str, int],
        n_heads: Mapping[str, int],
        shapes: Shapes | None = None,
    ) -> None:
        """Raise a clear error for any edit the model cannot honour, before the run computes anything.

        ``shapes``: the run's activation shapes (``activation_shapes(dims, B, T)``), when known:
        positions and values are then checked against them too.
        """
        for block in sorted(self.skipped, key=_layer_order):
            stack, i = _BLOCK.match(block).groups()  # type: ignore[union-attr]
            _check_layer(stack, int(i), n_layers)
        if self.window_layers is not None:
            for i in self.window_layers:
                _check_layer("encoder", i, n_layers)
        if self.window_heads is not None and max(self.window_heads) >= n_heads["encoder"]:
            h = n_heads["encoder"]
            raise ValueError(f"local_window: heads {list(self.window_heads)} out of range (the encoder's layers have "
                             f"{h} heads, 0-{h - 1})")  # fmt: skip
        known = set(names)
        for name, ops in self.ops.items():
            m = _ATTN_Z.match(name)
            if m:
                _check_layer(m[1], int(m[2]), n_layers)
            if name not in known:
                raise KeyError(f"cannot edit {name!r}: no such activation; closest: {_closest(name, names)}")
            for op in ops:
                if op.kind == "splice" and shapes is not None:
                    op.splice.check(name, shapes[name])  # type: ignore[union-attr]
                if op.heads:
                    headed = _PER_HEAD.match(name)
                    if not headed:
                        raise ValueError(f"{op.kind} at {name!r} with heads=: heads exist only at a per-head name "
                                         "(attn or cross_attn q, k, v, z, scores, pattern)")  # fmt: skip
                    h = n_heads[headed[1]]
                    if max(op.heads) >= h:
                        raise ValueError(f"{name}: heads {list(op.heads)} out of range (the layer has {h} heads)")
                if shapes is not None and op.generated:
                    raise ValueError(f"{op.kind} at {name!r}: Edits.generated(k) counts from the first generated "
                                     "token, so it applies in generate; run takes absolute positions")  # fmt: skip
                if shapes is not None:
                    _check_fit(name, op, shapes[name])

    def skips(self, block: str) -> bool:
        return block in self.skipped

    def window_for(self, layer: int) -> tuple[int, tuple[int, ...] | None] | None:
        """(k, heads) of the local window at encoder block ``layer`` (heads None: every head), or None."""
        if self.window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.window, self.window_heads

    def edit(self, name: str, x: Tensor, at: Tensor | None = None, inner=None) -> Tensor:
        """Apply the edits registered at ``name`` to ``x`` (returns a new tensor; ``x`` is not modified).

        ``at`` (B or 1, T): the absolute token positions of ``x``'s positions, when they are not 0..T-1
        (a decoding step): an edit at ``positions`` then acts where ``at`` holds one of them.
        ``inner(name, value)``: how a spliced SAE's latents are edited and kept (the recorder's ``named``).
        An edit that turns finite values into NaN or infinities (an infinite steering vector, a function
        that divides by zero) is stopped here, naming it: downstream it would only be a silent NaN."""
        for op in self.ops.get(name, ()):
            if op.kind == "splice":
                latents = f"{name}.sae.latents"
                y = op.splice(x, lambda z, n=latents: inner(n, z) if inner else self.edit(n, z, at))  # type: ignore[union-attr]
            else:
                y = _apply_op(name, op, x) if at is None or op.positions is None else _apply_at(name, op, x, at)
            if x.is_floating_point() and x.device.type != "meta" and _broken(name, y) and not _broken(name, x):
                raise ValueError(f"the {op.kind} edit at {name!r} gave NaN or infinite values (from finite ones): "
                                 "check its vector or function")  # fmt: skip
            x = y
        return x

    def spliced(self) -> dict[str, object]:
        """The SAEs spliced in, by their latents' name: ``{"encoder.blocks.3.resid_post.sae.latents": Splice}``."""
        return {f"{n}.sae.latents": op.splice for n, ops in self.ops.items() for op in ops if op.kind == "splice"}


def spliced_names(names: Sequence[str], edits: Edits | None) -> list[str]:
    """``names`` with each spliced SAE's ``{name}.sae.latents`` right after its ``name`` (what a trace can ask for)."""
    inner = edits.spliced() if edits else {}
    if not inner:
        return list(names)
    return [m for n in names for m in (n, f"{n}.sae.latents") if m == n or m in inner]


def spliced_shapes(shapes: Shapes, edits: Edits | None) -> dict[str, tuple[int, ...]]:
    """``shapes`` with each spliced SAE's latents, ``[B, T, d_sae]`` (B and T those of the point it reads)."""
    out = dict(shapes)
    for latents, splice in (edits.spliced() if edits else {}).items():
        point = shapes.get(latents.removesuffix(".sae.latents"))
        if point is not None:
            out[latents] = (*point[:2], splice.d_sae)  # type: ignore[attr-defined]
    return out


def _broken(name: str, x: Tensor) -> bool:
    """NaN anywhere, or an infinity outside attention scores (whose masked places are -inf by design)."""
    scores = isinstance(name, str) and name.endswith(".scores")
    return bool(x.isnan().any()) if scores else not bool(torch.isfinite(x).all())


def _indices(what: str, values: int | Sequence[int] | Tensor) -> list[int]:
    """Non-negative integer indices (block, head or position numbers); 1.7, True or "12" is an error, not 1."""
    if isinstance(values, Tensor | np.ndarray) and values.ndim == 0:
        values = values.item()
    if isinstance(values, int | np.integer) or not isinstance(values, Iterable) or isinstance(values, str | bytes):
        values = [values]
    out = []
    for v in values.tolist() if isinstance(values, Tensor | np.ndarray) else values:
        if isinstance(v, bool | np.bool_) or not isinstance(v, int | np.integer):
            raise TypeError(f"{what} must be integers, got {v!r} ({type(v).__name__})")
        if v < 0:
            raise ValueError(f"{what} count from 0, got {v}")
        out.append(int(v))
    return out


def _as_positions(positions: Sequence[int] | Tensor | Generated | None) -> Tensor | None:
    if positions is None:
        return None
    if isinstance(positions, Generated):
        return torch.tensor(positions.offsets, dtype=torch.long)
    chosen = _indices("positions", positions)
    if not chosen:
        raise ValueError("positions is empty: give None for every position")
    return torch.tensor(chosen, dtype=torch.long)


def _as_heads(heads: Sequence[int] | None) -> tuple[int, ...]:
    if heads is None:
        return ()
    chosen = _indices("heads", heads)
    if not chosen:
        raise ValueError("heads is empty: give None for every head")
    if len(set(chosen)) < len(chosen):
        raise ValueError(f"heads {chosen} name a head twice")
    return tuple(chosen)


def _as_value(name: str, value) -> Tensor:
    """A replacement or steering value as a real-valued tensor (numpy arrays and numbers are accepted)."""
    if not isinstance(value, Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError):
            got = type(value).__name__
            raise TypeError(f"the value for {name!r} must be a tensor or array of numbers, got {got}") from None
    if value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"the value for {name!r} must hold real numbers, got dtype {value.dtype}")
    if value.dtype.is_floating_point and _broken(name, value):  # -inf in scores masks a place: allowed
        raise ValueError(f"the value for {name!r} holds NaN or infinite values")
    return value


def _position_axis(name: str) -> int:
    """Where positions are along an activation: dim 2 for scores and patterns ([B, H, T, S]), else dim 1."""
    return 2 if name.endswith((".scores", ".pattern")) else 1


def _head_axis(name: str) -> int:
    """Where heads are along a per-head activation: dim 1 for scores and patterns ([B, H, T, S]), else dim 2."""
    return 1 if name.endswith((".scores", ".pattern")) else 2


def _check_layer(stack: str, i: int, n_layers: Mapping[str, int]) -> None:
    n = n_layers[stack]
    if not 0 <= i < n:
        raise IndexError(f"{stack} block {i} out of range: the {stack} has {n} blocks (0-{n - 1})")


def _check_fit(name: str, op: _Op, shape: tuple[int, ...]) -> None:
    """Positions within the run's length and a value that fits, checked on shapes before any compute."""
    axis = _position_axis(name)
    if op.kind == "clamp" and max(op.features) >= shape[-1]:
        raise IndexError(f"clamp at {name!r}: feature {max(op.features)} is out of range, it has {shape[-1]}")
    if op.positions is not None:
        length = shape[axis]
        if int(op.positions.max()) >= length:
            raise IndexError(
                f"{op.kind} at {name!r}: position {int(op.positions.max())} is out of range, the run has {length} "
                f"positions there (0-{length - 1})"
            )
    if op.kind in ("replace", "add"):
        target = list(shape)
        if op.positions is not None:
            target[axis] = len(op.positions)
        if op.heads:
            target[_head_axis(name)] = len(op.heads)
        _check_broadcast(name, op, tuple(op.value.shape), tuple(target))  # type: ignore[union-attr]
    if op.kind == "mean" and op.mean is not None and tuple(op.mean.shape) != (len(op.heads), shape[-1]):
        raise ValueError(f"{name}: mean has shape {tuple(op.mean.shape)}, want {(len(op.heads), shape[-1])}")


def _check_broadcast(name: str, op: _Op, value: tuple[int, ...], target: tuple[int, ...]) -> None:
    try:
        ok = torch.broadcast_shapes(value, target) == target
    except RuntimeError:
        ok = False
    if not ok:
        where = "" if op.positions is None else f" at positions {op.positions.tolist()}"
        raise ValueError(
            f"{op.kind} at {name!r}{where}: value of shape {value} does not fit the activation of shape {target}"
        )


def _apply_op(name: str, op: _Op, x: Tensor) -> Tensor:
    if op.kind in ("zero", "mean"):  # x: (B, T, H, Dh)
        heads = torch.tensor(op.heads, device=x.device)
        x = x.clone()
        if op.kind == "zero":
            x[:, :, heads] = 0
        else:
            mean = op.mean if op.mean is not None else x[:, :, heads].mean(dim=(0, 1))  # (H', Dh)
            _check_fit(name, op, tuple(x.shape))
            x[:, :, heads] = mean.to(x)
        return x
    if op.kind == "clamp":
        x = x.clone()
        x[..., list(op.features)] = op.value.to(x)  # type: ignore[union-attr]
        return x
    if op.kind == "apply":
        y = op.fn(x)  # type: ignore[misc]
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"edit function at {name!r} returned {got}, want shape {tuple(x.shape)}")
        if (y.dtype, y.device) != (x.dtype, x.device):
            raise ValueError(
                f"edit function at {name!r} returned {y.dtype} on {y.device}, want the activation's {x.dtype} on "
                f"{x.device}"
            )
        return y
    _check_fit(name, op, tuple(x.shape))  # again here: generate's steps have shapes the run could not know
    value = op.value.to(x)  # type: ignore[union-attr]
    index = _where(name, op, x)
    target = x[index] if index else x
    new = value.expand_as(target) if op.kind == "replace" else target + value
    if not index:
        return new.clone() if op.kind == "replace" else new
    x = x.clone()
    x[index] = new
    return x


def _apply_at(name: str, op: _Op, x: Tensor, at: Tensor) -> Tensor:
    """A replace or add at ``op.positions`` in a pass whose tokens sit at absolute positions ``at`` (B or 1, T):
    row b's position t is edited when at[b, t] is one of them, with the value given for that position."""
    if _position_axis(name) != 1:
        raise ValueError(f"{op.kind} at {name!r} with positions: while decoding, positions are edited at names "
                         "whose position axis is dim 1 (not scores or patterns)")  # fmt: skip
    B, T = x.shape[:2]
    hit = at.to(x.device)[..., None] == op.positions.to(x.device)  # (B or 1, T, P)
    if not bool(hit.any()):
        return x
    heads = torch.tensor(op.heads, device=x.device) if op.heads else None
    part = x if heads is None else x[:, :, heads]  # (B, T, [H',] ...)
    target = [B, len(op.positions), *part.shape[2:]]
    _check_broadcast(name, op, tuple(op.value.shape), tuple(target))  # type: ignore[union-attr]
    value = op.value.to(x).expand(target)  # type: ignore[union-attr]  # (B, P, ...)
    j = hit.int().argmax(dim=-1).expand(B, T)  # (B, T): which of the positions each one is
    value = value[torch.arange(B, device=x.device)[:, None], j]  # (B, T, ...)
    new = value if op.kind == "replace" else part + value
    where = hit.any(dim=-1).expand(B, T).view(B, T, *[1] * (part.dim() - 2))  # (B, T, 1...)
    new = torch.where(where, new, part)
    if heads is None:
        return new
    x = x.clone()
    x[:, :, heads] = new
    return x


def _where(name: str, op: _Op, x: Tensor) -> tuple:
    """The index of the part of ``x`` an op acts on: positions and/or heads (adjacent axes), or () for all of it."""
    parts = {}
    if op.positions is not None:
        parts[_position_axis(name)] = op.positions.to(x.device)
    if op.heads:
        parts[_head_axis(name)] = torch.tensor(op.heads, device=x.device)
    if not parts:
        return ()
    axes = sorted(parts)
    if len(axes) == 2:  # positions and heads: broadcast against each other, (first, 1) and (1, second)
        parts[axes[0]], parts[axes[1]] = parts[axes[0]][:, None], parts[axes[1]][None, :]
    return (slice(None),) * axes[0] + tuple(parts[a] for a in axes)


# ----------------------------------------------------------------------------- recorder


class Recorder:
    """What one forward pass records and changes; passed down the modules, scoped by name prefix.

    ``rec(point, x)`` applies the edits for ``prefix + point`` and records the result if that
    name was asked for, then returns it. ``rec.wants(point)`` says whether anything is needed
    at a point, so a module can take a slower path (explicit attention) only when it must.
    """

    __slots__ = ("keep", "edits", "trace", "prefix", "active", "at")

    def __init__(self, keep: frozenset[str], edits: Edits | None, trace: Trace | None, prefix: str = "",
                 at: Tensor | None = None) -> None:  # fmt: skip
        self.keep = keep
        self.edits = edits if edits else None
        self.trace = trace
        self.prefix = prefix
        self.active = bool(keep) or self.edits is not None
        self.at = at  # (B or 1, T): the absolute positions of a decoding pass's tokens; None: 0..T-1

    def __call__(self, point: str, x: Tensor) -> Tensor:
        return self.record(point, x) if self.active else x  # one line: a debugger's step leaves at once

    def record(self, point: str, x: Tensor) -> Tensor:
        """Apply the edits at ``point`` to ``x`` and keep the result if it was asked for."""
        return self.named(self.prefix + point, x)

    def named(self, name: str, x: Tensor) -> Tensor:
        """``record`` by full name: also how a spliced SAE's latents (``{name}.sae.latents``) are edited and kept."""
        if self.edits is not None and name in self.edits.ops:
            x = self.edits.edit(name, x, self.at, self.named)
        if name in self.keep:
            self.trace.put(name, x)  # type: ignore[union-attr]
        return x

    def wants(self, *points: str) -> bool:
        """Is the value at any of ``points`` to be recorded or edited?"""
        return self.active and any(self.prefix + p in self.keep or self.edits is not None
                                   and self.prefix + p in self.edits.ops for p in points)  # fmt: skip

    def child(self, part: str) -> Recorder:
        """The recorder for a sub-module named ``part`` (``rec.child("blocks.3")``)."""
        return Recorder(self.keep, self.edits, self.trace, f"{self.prefix}{part}.", self.at) if self.active else self

    def positioned(self, at: Tensor) -> Recorder:
        """This recorder for a pass whose tokens sit at the absolute positions ``at`` (B or 1, T): decoding."""
        return Recorder(self.keep, self.edits, self.trace, self.prefix, at) if self.active else self

    def skips(self, block: str) -> bool:
        return self.edits is not None and self.edits.skips(self.prefix + block)

    def window_mask(self, layer: int, n: int, n_head: int, device: torch.device) -> Tensor | None:
        """The self-attention mask of ``Edits.local_window`` at encoder block ``layer`` (None: no window there):
        (n, n) bool, True where frame i may see frame j (|i - j| <= k); (1, H, n, n) when it holds for some heads,
        the others seeing every frame."""
        w = None if self.edits is None else self.edits.window_for(layer)
        if w is None:
            return None
        (k, heads), idx = w, torch.arange(n, device=device)  # (n,)
        near = (idx[:, None] - idx[None, :]).abs() <= k  # (n, n)
        if heads is None:
            return near
        mask = torch.ones(1, n_head, n, n, dtype=torch.bool, device=device)  # (1, H, n, n)
        mask[:, list(heads)] = near
        return mask


IDLE = Recorder(frozenset(), None, None)
"""The recorder of a plain forward: records nothing, edits nothing."""


def new_recorder(trace: TraceRequest, edits: Edits | None, names: Sequence[str], n_layers: Mapping[str, int],
                 n_heads: Mapping[str, int], shapes: Shapes | None = None, *, encoder: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Recorder:  # fmt: skip
    """A recorder for one pass: the ``names`` the ``trace`` request asks for, and ``edits`` checked against the
    model (``n_layers`` and ``n_heads`` per stack; ``shapes`` of the run, when known). Recorded tensors are
    kept on ``device`` in ``dtype`` (None: as computed). ``encoder=False``: the pass starts from the audio
    features, so an encoder name asked for is an error."""
    if edits is not None and not isinstance(edits, Edits):
        raise TypeError(f"edits must be a whisper_lens.Edits, got {type(edits).__name__}")
    names = spliced_names(names, edits)  # with each spliced SAE's latents
    shapes = None if shapes is None else spliced_shapes(shapes, edits)
    keep = select_names(trace, names)
    if edits is not None:
        edits.check(names, n_layers, n_heads, shapes)
    if not encoder:
        asked = [*keep, *(edits.ops if edits else ()), *(edits.skipped if edits else ())]
        asked += ["encoder local_window"] if edits is not None and edits.window is not None else []
        inside = sorted(n for n in asked if n.startswith("encoder"))
        if inside:
            raise ValueError(f"{inside[0]!r} is in the encoder, but audio_features skip the encoder: pass the mel "
                             "to trace or edit the encoder")  # fmt: skip
    return Recorder(keep, edits, Trace(device=device, dtype=dtype))
