"""Sparse autoencoders on Whisper: activation batches from an export, training with SAELens, the splice.

Three parts, each usable alone:

- ``batches(acts, name, batch_size)`` (also ``acts.batches(...)``): the rows of one activation of a
  ``whisper-lens export`` as shuffled ``[batch, D]`` tensors, drawn through a bounded buffer across
  shards and clips, so an export larger than memory trains as well as a small one.
- ``train(export, name, out)`` (``whisper-lens sae train``): SAELens's own ``SAETrainer`` fed by those
  batches, with its standard architectures (standard, topk, jumprelu), checkpoints it can resume from
  and the final SAE saved in SAELens's format (``sae_lens.SAE.load_from_disk(out)`` reads it). SAELens
  is an optional extra (``pip install whisper-lens[sae]``); only ``train`` imports it.
- ``Splice``: what ``Edits.splice(name, sae)`` puts at a point of the forward pass (see trace.py).

Metrics, as SAE papers report them: FVU (fraction of variance unexplained: the squared error of the
reconstruction over the squared distance of the rows from their mean), L0 (latents active per row, on
average) and dead latents (latents active on no row of the measured rows).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- activation batches


class Batches:
    """One epoch of shuffled rows of one activation of an export: iterate for ``[batch, D]`` tensors.

    How the shuffle works, in bounded memory. The clips are visited in a random order drawn from
    ``seed`` (the shards in a random order, each shard's clips in a random order, so that each shard
    is opened, and its checksum verified, once an epoch); their rows pour into a buffer of at most
    ``buffer + one clip`` rows. Whenever the buffer is full it is permuted and its first half leaves as
    batches; the second half stays to be mixed with the next clips. At the end what is left is permuted
    and leaves too, the last batch short unless ``drop_last``. So every row of every clip comes out
    exactly once per epoch, the same seed gives the same batches, and memory holds the buffer plus the
    shard being read (shards are memory-mapped, a clip at a time is copied out).

    ``with_rows=True`` yields ``(x, rows)`` instead: ``rows[i] = (clip number in acts.clips, position)``
    of ``x[i]``. An activation with more than one feature axis (``attn.z``: ``[positions, H, Dh]``) is
    flattened to ``[positions, H * Dh]``; one whose first axis is not a position (scores, patterns)
    is an error.
    """

    def __init__(self, acts, name: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 buffer: int = 65536, dtype: torch.dtype | None = torch.float32, drop_last: bool = False,
                 with_rows: bool = False) -> None:  # fmt: skip
        if name not in acts.axes:
            raise KeyError(f"the export in {acts.folder} has no name {name!r}; it has {', '.join(acts.names)}")
        axes = acts.axes[name]
        if not axes or axes[0] not in ("audio", "text") or any(a is not None for a in axes[1:]):
            raise ValueError(f"{name} has axes {axes}: batches need position first, then features (not heads)")
        for what, value in (("batch_size", batch_size), ("buffer", buffer)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{what} must be a positive integer, got {value!r}")
        self.acts, self.name, self.batch_size = acts, name, batch_size
        self.shuffle, self.seed, self.dtype, self.drop_last, self.with_rows = shuffle, seed, dtype, drop_last, with_rows
        self.buffer = max(buffer, 2 * batch_size)  # room for at least one batch out of each half
        shapes = [acts.entries[c["clip"], name]["shape"] for c in acts.clips]
        self.lengths = [s[0] for s in shapes]  # rows of each clip
        self.width = math.prod(shapes[0][1:]) if shapes else 0  # D

    @property
    def rows(self) -> int:
        """Rows in one epoch (before drop_last)."""
        return sum(self.lengths)

    def __len__(self) -> int:
        """Batches in one epoch."""
        return self.rows // self.batch_size if self.drop_last else -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[Tensor] | Iterator[tuple[Tensor, Tensor]]:
        g = torch.Generator().manual_seed(self.seed)
        n = len(self.acts.clips)
        order = list(range(n))
        if self.shuffle:  # shards in a random order, each one's clips in a random order: a shard is opened once
            shards: dict[str, list[int]] = {}
            for c in torch.randperm(n, generator=g).tolist():
                shards.setdefault(self.acts.entries[self.acts.clips[c]["clip"], self.name]["shard"], []).append(c)
            groups = list(shards.values())
            order = [c for k in torch.randperm(len(groups), generator=g).tolist() for c in groups[k]]
        xs: list[Tensor] = []
        where: list[Tensor] = []
        held = 0
        for k, c in enumerate(order):
            x = self.acts[self.acts.clips[c]["clip"], self.name]
            x = x.reshape(x.shape[0], -1)  # (P, D)
            xs.append(x if self.dtype is None else x.to(self.dtype))
            where.append(torch.stack([torch.full((len(x),), c), torch.arange(len(x))], dim=1))  # (P, 2)
            held += len(x)
            last = k == n - 1
            if held < self.buffer and not last:
                continue
            x, w = torch.cat(xs), torch.cat(where)  # (held, D), (held, 2)
            if self.shuffle:
                p = torch.randperm(len(x), generator=g)
                x, w = x[p], w[p]
            out = len(x) if last else (len(x) // 2 // self.batch_size) * self.batch_size
            for i in range(0, out, self.batch_size):
                xb, wb = x[i : i + self.batch_size], w[i : i + self.batch_size]
                if len(xb) < self.batch_size and self.drop_last:
                    break
                yield (xb, wb) if self.with_rows else xb
            xs, where, held = [x[out:]], [w[out:]], len(x) - out


def batches(acts, name: str, batch_size: int, **options) -> Batches:
    """The rows of ``name`` in an export (``load_activations(folder)``) as shuffled batches: see ``Batches``."""
    return Batches(acts, name, batch_size, **options)


# ----------------------------------------------------------------------------- training with SAELens

ARCHITECTURES = ("standard", "topk", "jumprelu")
COMMAND = "sae train"
CHECKPOINTS = "checkpoints"  # SAELens's checkpoint folders, one per saved step: checkpoints/<samples seen>/
FINAL = ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors")  # SAELens's names for a saved SAE
METRICS = "metrics.json"


@dataclass(frozen=True)
class Metrics:
    """How well an SAE reconstructs rows of the export, measured on the final (inference) SAE."""

    fvu: float  # fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean(x)|^2
    l0: float  # latents active per row, on average
    dead: int  # latents active on none of the measured rows
    d_sae: int
    rows: int  # rows measured

    def __str__(self) -> str:
        return f"FVU {self.fvu:.4f}, L0 {self.l0:.1f}, dead latents {self.dead} of {self.d_sae} (on {self.rows} rows)"


@dataclass
class Trained:
    """What ``train`` returns: the SAE (a ``sae_lens`` inference SAE, loaded back from ``out``), where, how good."""

    sae: object
    out: Path
    metrics: Metrics
    steps: int  # training steps done in all (this run and the runs it resumed)
    resumed_from: int | None  # samples already seen by the checkpoint this run resumed from, or None


def train(
    export: str | os.PathLike,
    name: str,
    out: str | os.PathLike,
    *,
    architecture: str = "topk",
    width: int | None = None,
    k: int = 32,
    sparsity: float | None = None,
    steps: int | None = None,
    batch_size: int = 4096,
    lr: float = 4e-4,
    seed: int = 0,
    checkpoints: int = 4,
    buffer: int = 2**17,
    device: str = "cpu",
    eval_rows: int = 2**16,
) -> Trained:
    """Train an SAE on one activation of an export with SAELens's ``SAETrainer``; save it in SAELens's format.

    - ``architecture``: "standard" (ReLU, L1 penalty ``sparsity``, default 5), "topk" (``k`` active
      latents per row) or "jumprelu" (L0 penalty ``sparsity``, default 1); ``width``: latents (``d_sae``,
      default 8 x the activation's width).
    - ``steps`` of ``batch_size`` rows (default: one pass over the export), Adam at ``lr``. Rows come
      from ``Batches`` (a new shuffle each epoch); inputs are scaled to norm sqrt(d_in) while training
      (SAELens's ``expected_average_only_in``) and the scale is folded into the saved weights.
    - ``out``: a new or empty folder, or one this command wrote with the same settings: then training
      resumes from the last complete checkpoint in ``out/checkpoints`` (``checkpoints`` of them are
      written), or returns the finished SAE. Finished, ``out`` holds SAELens's ``cfg.json``,
      ``sae_weights.safetensors`` and ``sparsity.safetensors``, so ``sae_lens.SAE.load_from_disk(out)``
      reads it, and ``metrics.json`` (FVU, L0, dead latents on ``eval_rows`` rows of the export).
    """
    from .distributed import load_activations

    acts = load_activations(export)
    rows = Batches(acts, name, batch_size, seed=seed, buffer=buffer, drop_last=True)  # checks name and batch_size
    d_in = rows.width
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {architecture!r}")
    width = 8 * d_in if width is None else width
    for what, value in (("width", width), ("k", k), ("checkpoints", checkpoints + 1), ("eval_rows", eval_rows)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be a positive integer, got {value!r}")
    if architecture == "topk" and k > width:
        raise ValueError(f"k ({k}) must be at most the width ({width} latents)")
    if sparsity is not None and not (isinstance(sparsity, int | float) and math.isfinite(sparsity) and sparsity >= 0):
        raise ValueError(f"sparsity must be a finite number >= 0, got {sparsity!r}")
    if len(rows) == 0:
        raise ValueError(f"the export has {rows.rows} rows of {name}, fewer than one batch of {batch_size}")
    steps = len(rows) if steps is None else steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    sparsity = {"standard": 5.0, "jumprelu": 1.0, "topk": None}[architecture] if sparsity is None else sparsity
    settings = {"export": str(Path(export).resolve()), "name": name, "architecture": architecture, "width": width,
                "k": k if architecture == "topk" else None, "sparsity": sparsity if architecture != "topk" else None,
                "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "checkpoints": checkpoints,
                "buffer": buffer}  # fmt: skip
    folder = _claim(Path(out), settings)
    if all((folder / f).is_file() for f in (*FINAL, METRICS)):
        from sae_lens import SAE

        metrics = Metrics(**json.loads((folder / METRICS).read_text()))
        return Trained(SAE.load_from_disk(folder, device=device), folder, metrics, steps, None)
    sae, trainer, resumed = _trainer(settings, d_in, device, folder, acts, rows)
    start = trainer.n_training_steps
    trainer.data_provider = _provider(acts, rows, start)
    trainer.fit()
    _save_final(trainer, folder)
    from sae_lens import SAE

    final = SAE.load_from_disk(folder, device=device)
    metrics = measure(final, Batches(acts, name, min(eval_rows, 4096), seed=seed + 1, buffer=buffer), eval_rows)
    from .files import write_text

    write_text(folder / METRICS, json.dumps(asdict(metrics), indent=1))
    return Trained(final, folder, metrics, trainer.n_training_samples // batch_size, resumed)


def _sae_lens():
    try:
        import sae_lens
    except ImportError:
        raise ImportError("training SAEs needs SAELens: pip install 'whisper-lens[sae]'") from None
    return sae_lens


def _trainer(settings: dict, d_in: int, device: str, folder: Path, acts, rows: Batches):
    """SAELens's training SAE and trainer for ``settings``, resumed from the last complete checkpoint if any."""
    sl = _sae_lens()
    arch, width = settings["architecture"], settings["width"]
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=settings["name"], model_name=str(acts.index.get("model", {}).get("name")))
    common = {"d_in": d_in, "d_sae": width, "device": device, "normalize_activations": "expected_average_only_in"}
    if arch == "topk":
        cfg = sl.TopKTrainingSAEConfig(**common, k=settings["k"], metadata=meta)
        sae = sl.TopKTrainingSAE(cfg)
    elif arch == "standard":
        cfg = sl.StandardTrainingSAEConfig(**common, l1_coefficient=settings["sparsity"], metadata=meta)
        sae = sl.StandardTrainingSAE(cfg)
    else:
        cfg = sl.JumpReLUTrainingSAEConfig(**common, l0_coefficient=settings["sparsity"], metadata=meta)
        sae = sl.JumpReLUTrainingSAE(cfg)
    steps, bs = settings["steps"], settings["batch_size"]
    window = max(1, min(1000, steps // 4))
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * bs,
        train_batch_size_samples=bs,
        lr=settings["lr"],
        lr_end=settings["lr"] / 10,  # the trainer asserts it is set; the constant schedule does not use it
        lr_warm_up_steps=min(100, steps // 10),
        device=device,
        dead_feature_window=window,
        feature_sampling_window=window,
        n_checkpoints=settings["checkpoints"],
        checkpoint_path=str(folder / CHECKPOINTS),
        save_final_checkpoint=False,
        n_batches_for_norm_estimate=1,
    )
    trainer = sl.SAETrainer(cfg=trainer_cfg, sae=sae, data_provider=iter(()), evaluator=None)
    last = _last_checkpoint(folder / CHECKPOINTS)
    if last is not None:
        trainer.load_trainer_state(last)
        sae.load_weights_from_checkpoint(last)
        done = trainer.n_training_samples
        # saved between a step and its count (fit adds 1 after checkpointing): the samples say how many ran
        trainer.n_training_steps = done // bs
        trainer.checkpoint_thresholds = [t for t in trainer.checkpoint_thresholds if t >= done]
        return sae, trainer, done
    # the input scale from rows of its own shuffle, so that the training batches do not depend on it
    scale_rows = Batches(acts, rows.name, bs, seed=settings["seed"] - 1, buffer=rows.buffer)
    trainer.activation_scaler.estimate_scaling_factor(d_in, iter(scale_rows), min(8, len(scale_rows)))
    return sae, trainer, None


def _provider(acts, rows: Batches, skip: int) -> Iterator[Tensor]:
    """Training batches forever, a new shuffle each epoch (seed, seed + 1, ...), the first ``skip`` left out."""
    per_epoch = len(rows)
    epoch, skip = divmod(skip, per_epoch)
    while True:
        for x in Batches(acts, rows.name, rows.batch_size, seed=rows.seed + epoch, buffer=rows.buffer, drop_last=True):
            if skip:
                skip -= 1
                continue
            yield x
        epoch += 1


def _last_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the most samples whose last file (the scaler, written last) is complete."""
    found = sorted((int(p.name), p) for p in folder.glob("*") if p.name.isdigit()) if folder.is_dir() else []
    for _, path in reversed(found):
        try:
            json.loads((path / "activation_scaler.json").read_text())
        except (OSError, ValueError):
            continue
        return path
    return None


def _save_final(trainer, folder: Path) -> None:
    """SAELens's inference SAE and the feature sparsity, written beside and renamed into ``folder``."""
    tmp = folder / f".final.whisper-lens-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.sae.save_inference_model(str(tmp))
    from safetensors.torch import save_file

    save_file({"sparsity": trainer.log_feature_sparsity}, str(tmp / FINAL[2]))
    umask = os.umask(0)
    os.umask(umask)
    for f in FINAL:
        os.chmod(tmp / f, 0o666 & ~umask)  # safetensors writes 0600: the user's umask decides, as for every file
        os.replace(tmp / f, folder / f)
    tmp.rmdir()


def _claim(out: Path, settings: dict) -> Path:
    """``out`` for this run: absent, empty, or an earlier ``sae train`` with the same settings (then resumed)."""
    from .distributed import _check_marker, _create_marker
    from .files import MARKER

    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and MARKER not in held:
        raise FileExistsError(f"--out {out} holds {held[0]} and was not written by whisper-lens: give a new folder")
    ours = {MARKER, CHECKPOINTS, METRICS, *FINAL}
    strangers = [h for h in held if h not in ours and not h.startswith(".")]
    if strangers:
        raise FileExistsError(f"--out {out} holds {strangers[0]}, which whisper-lens {COMMAND} did not write")
    out.mkdir(parents=True, exist_ok=True)
    settings = json.loads(json.dumps(settings))
    if MARKER not in held:
        _create_marker(out / MARKER, {"tool": "whisper-lens", "command": COMMAND, "version": 1, "settings": settings})
    _check_marker(out / MARKER, COMMAND, settings)
    return out


@torch.no_grad()
def measure(sae, batches, rows: int = 2**16) -> Metrics:
    """FVU, L0 and dead latents of ``sae`` on the first ``rows`` rows of ``batches`` (an iterable of [N, D])."""
    param = next(iter(sae.parameters()))
    d_sae = sae.cfg.d_sae
    err = total = sq = 0.0
    active, fired, seen = 0.0, torch.zeros(d_sae, dtype=torch.bool), 0
    s1 = None
    for x in batches:
        x = x[: rows - seen].to(param.device, param.dtype).double()
        z = sae.encode(x.to(param.dtype))  # (N, d_sae)
        x_hat = sae.decode(z).double()  # (N, D)
        err += float((x - x_hat).pow(2).sum())
        s1 = x.sum(0) if s1 is None else s1 + x.sum(0)
        sq += float(x.pow(2).sum())
        active += float((z != 0).sum())
        fired |= (z != 0).any(0).cpu()
        seen += len(x)
        if seen >= rows:
            break
    if not seen:
        raise ValueError("no rows to measure the SAE on")
    total = sq - float(s1.pow(2).sum()) / seen  # sum |x - mean|^2
    return Metrics(err / total, active / seen, int((~fired).sum()), d_sae, seen)


# ----------------------------------------------------------------------------- the splice


class Splice:
    """An SAE at one point of the forward pass, as ``Edits.splice(name, sae, error)`` puts it there.

    Called with the point's activation x ``[B, T, ...]`` (trailing axes flattened to the SAE's
    ``d_in``) and ``latents_at``, the recorder's hook for ``{name}.sae.latents``, which edits and keeps
    the latents. Returns x rebuilt from the (edited) latents::

        z = encode(x);  z' = latents_at(z)
        error=True:  x + (decode(z') - decode(z))   # = decode(z') + (x - decode(z)): x itself while z' is z
        error=False: decode(z')

    The SAE runs in its own dtype and device; its output is cast back to x's.
    """

    def __init__(self, sae, error: bool = True) -> None:
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise TypeError(f"splice wants an SAE with encode and decode (a sae_lens.SAE), got {type(sae).__name__}")
        cfg = getattr(sae, "cfg", None)
        d_in, d_sae = getattr(cfg, "d_in", None), getattr(cfg, "d_sae", None)
        if not isinstance(d_in, int) or not isinstance(d_sae, int):
            raise TypeError("splice wants an SAE whose cfg gives d_in and d_sae (a sae_lens.SAE)")
        if not isinstance(error, bool):
            raise TypeError(f"error must be True or False, got {error!r}")
        self.sae, self.error, self.d_in, self.d_sae = sae, error, d_in, d_sae

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """The point's features must be the SAE's input: ``[B, T, d_in]`` (or trailing axes of that size)."""
        width = math.prod(shape[2:])
        if len(shape) < 3 or width != self.d_in:
            raise ValueError(f"splice at {name!r}: the SAE reads {self.d_in} features, the activation is {list(shape)}")

    def __call__(self, x: Tensor, latents_at) -> Tensor:
        self.check("the point", tuple(x.shape))
        # gradients flow through the SAE only where they flow into it (attribution); its own weights stay out
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            return self._splice(x, latents_at)

    def _splice(self, x: Tensor, latents_at) -> Tensor:
        h = x.flatten(2)  # (B, T, d_in)
        param = next(iter(self.sae.parameters()), None) if hasattr(self.sae, "parameters") else None
        inside = h if param is None else h.to(param.device, param.dtype)
        z = self.sae.encode(inside)  # (B, T, d_sae)
        edited = latents_at(z)  # (B, T, d_sae): the same tensor unless edited
        if edited is z:
            out = h if self.error else self.sae.decode(z).to(h)  # (B, T, d_in)
        elif self.error:
            out = h + (self.sae.decode(edited) - self.sae.decode(z)).to(h)
        else:
            out = self.sae.decode(edited).to(h)
        return out.reshape(x.shape)
