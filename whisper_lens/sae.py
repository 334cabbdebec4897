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

import math
from collections.abc import Iterator

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- activation batches


class Batches:
    """One epoch of shuffled rows of one activation of an export: iterate for ``[batch, D]`` tensors.

    How the shuffle works, in bounded memory. The clips are visited in a random order (a permutation
    of the export's clips, drawn from ``seed``); their rows pour into a buffer of at most
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
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
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
