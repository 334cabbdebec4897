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

import difflib
import fnmatch
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
    how tensors are stored while recording (e.g. fp16 on CPU for a large CUDA run).
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
        if self.device is not None or self.dtype is not None:
            x = x.detach().to(device=self.device, dtype=self.dtype or x.dtype)
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


_BLOCK = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)$")
_ATTN_Z = re.compile(r"^(encoder|decoder)\.blocks\.(\d+)\.(attn|cross_attn)\.z$")


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

    def replace(self, name: str, value: Tensor, positions: Sequence[int] | Tensor | None = None) -> Edits:
        """Replace the activation at ``name`` (whole, or at ``positions``) by ``value``: patching.

        ``positions`` index the activation's position axis: dim 1, or dim 2 for ``scores`` and
        ``pattern`` ([B, H, T, S]: the query positions).
        """
        return self._push(name, _Op("replace", value=_as_value(name, value), positions=_as_positions(positions)))

    def add(self, name: str, vector: Tensor, positions: Sequence[int] | Tensor | None = None) -> Edits:
        """Add ``vector`` (broadcast) to the activation at ``name``, everywhere or at ``positions``: steering."""
        return self._push(name, _Op("add", value=_as_value(name, vector), positions=_as_positions(positions)))

    def apply(self, name: str, fn: EditFn) -> Edits:
        """Replace the activation at ``name`` by ``fn(activation)`` (same shape, dtype and device)."""
        if not callable(fn):
            raise TypeError(f"apply wants a callable, got {type(fn).__name__}")
        return self._push(name, _Op("apply", fn=fn))

    def local_window(self, k: int, layers: Sequence[int] | None = None) -> Edits:
        """Restrict encoder self-attention (all blocks, or ``layers``) to frames within +/- ``k`` of the query."""
        (self.window,) = _indices("local window k (frames)", [k])
        self.window_layers = None if layers is None else tuple(_indices("layers", layers))
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
        known = set(names)
        for name, ops in self.ops.items():
            m = _ATTN_Z.match(name)
            if m:
                _check_layer(m[1], int(m[2]), n_layers)
            if name not in known:
                raise KeyError(f"cannot edit {name!r}: no such activation; closest: {_closest(name, names)}")
            for op in ops:
                if op.kind in ("zero", "mean"):
                    h = n_heads[m[1]]  # type: ignore[index]
                    if max(op.heads) >= h:
                        raise ValueError(f"{name}: heads {list(op.heads)} out of range (the layer has {h} heads)")
                if shapes is not None:
                    _check_fit(name, op, shapes[name])

    def skips(self, block: str) -> bool:
        return block in self.skipped

    def window_for(self, layer: int) -> int | None:
        if self.window is None or (self.window_layers is not None and layer not in self.window_layers):
            return None
        return self.window

    def edit(self, name: str, x: Tensor) -> Tensor:
        """Apply the edits registered at ``name`` to ``x`` (returns a new tensor; ``x`` is not modified).

        An edit that turns finite values into NaN or infinities (an infinite steering vector, a function
        that divides by zero) is stopped here, naming it: downstream it would only be a silent NaN."""
        for op in self.ops.get(name, ()):
            y = _apply_op(name, op, x)
            if x.is_floating_point() and x.device.type != "meta" and _broken(name, y) and not _broken(name, x):
                raise ValueError(f"the {op.kind} edit at {name!r} gave NaN or infinite values (from finite ones): "
                                 "check its vector or function")  # fmt: skip
            x = y
        return x


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


def _as_positions(positions: Sequence[int] | Tensor | None) -> Tensor | None:
    if positions is None:
        return None
    chosen = _indices("positions", positions)
    if not chosen:
        raise ValueError("positions is empty: give None for every position")
    return torch.tensor(chosen, dtype=torch.long)


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


def _check_layer(stack: str, i: int, n_layers: Mapping[str, int]) -> None:
    n = n_layers[stack]
    if not 0 <= i < n:
        raise IndexError(f"{stack} block {i} out of range: the {stack} has {n} blocks (0-{n - 1})")


def _check_fit(name: str, op: _Op, shape: tuple[int, ...]) -> None:
    """Positions within the run's length and a value that fits, checked on shapes before any compute."""
    axis = _position_axis(name)
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
    axis = _position_axis(name)
    value = op.value.to(x)  # type: ignore[union-attr]
    index = (slice(None),) * axis + (op.positions.to(x.device),) if op.positions is not None else ()
    target = x[index] if op.positions is not None else x
    new = value.expand_as(target) if op.kind == "replace" else target + value
    if op.positions is None:
        return new.clone() if op.kind == "replace" else new
    x = x.clone()
    x[index] = new
    return x


# ----------------------------------------------------------------------------- recorder


class Recorder:
    """What one forward pass records and changes; passed down the modules, scoped by name prefix.

    ``rec(point, x)`` applies the edits for ``prefix + point`` and records the result if that
    name was asked for, then returns it. ``rec.wants(point)`` says whether anything is needed
    at a point, so a module can take a slower path (explicit attention) only when it must.
    """

    __slots__ = ("keep", "edits", "trace", "prefix", "active")

    def __init__(self, keep: frozenset[str], edits: Edits | None, trace: Trace | None, prefix: str = "") -> None:
        self.keep = keep
        self.edits = edits if edits else None
        self.trace = trace
        self.prefix = prefix
        self.active = bool(keep) or self.edits is not None

    def __call__(self, point: str, x: Tensor) -> Tensor:
        return self.record(point, x) if self.active else x  # one line: a debugger's step leaves at once

    def record(self, point: str, x: Tensor) -> Tensor:
        """Apply the edits at ``point`` to ``x`` and keep the result if it was asked for."""
        name = self.prefix + point
        if self.edits is not None and name in self.edits.ops:
            x = self.edits.edit(name, x)
        if name in self.keep:
            self.trace.put(name, x)  # type: ignore[union-attr]
        return x

    def wants(self, *points: str) -> bool:
        """Is the value at any of ``points`` to be recorded or edited?"""
        return self.active and any(self.prefix + p in self.keep or self.edits is not None
                                   and self.prefix + p in self.edits.ops for p in points)  # fmt: skip

    def child(self, part: str) -> Recorder:
        """The recorder for a sub-module named ``part`` (``rec.child("blocks.3")``)."""
        return Recorder(self.keep, self.edits, self.trace, f"{self.prefix}{part}.") if self.active else self

    def skips(self, block: str) -> bool:
        return self.edits is not None and self.edits.skips(self.prefix + block)

    def window(self, layer: int) -> int | None:
        return None if self.edits is None else self.edits.window_for(layer)


IDLE = Recorder(frozenset(), None, None)
"""The recorder of a plain forward: records nothing, edits nothing."""


def new_recorder(trace: TraceRequest, edits: Edits | None, names: Sequence[str], n_layers: Mapping[str, int],
                 n_heads: Mapping[str, int], shapes: Shapes | None = None, *, encoder: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Recorder:  # fmt: skip
    """A recorder for one pass: the ``names`` the ``trace`` request asks for, and ``edits`` checked against the
    model (``n_layers`` and ``n_heads`` per stack; ``shapes`` of the run, when known). Recorded tensors are
    kept on ``device`` in ``dtype`` (None: as computed). ``encoder=False``: the pass starts from the audio
    features, so an encoder name asked for is an error."""
    keep = select_names(trace, names)
    if edits is not None:
        if not isinstance(edits, Edits):
            raise TypeError(f"edits must be a whisper_lens.Edits, got {type(edits).__name__}")
        edits.check(names, n_layers, n_heads, shapes)
    if not encoder:
        asked = [*keep, *(edits.ops if edits else ()), *(edits.skipped if edits else ())]
        asked += ["encoder local_window"] if edits is not None and edits.window is not None else []
        inside = sorted(n for n in asked if n.startswith("encoder"))
        if inside:
            raise ValueError(f"{inside[0]!r} is in the encoder, but audio_features skip the encoder: pass the mel "
                             "to trace or edit the encoder")  # fmt: skip
    return Recorder(keep, edits, Trace(device=device, dtype=dtype))
