"""Studies at dataset scale: a layer-removal sweep, or an activation export, over a folder of clips.

Both run in one process or as N ranks under ``torchrun`` (torch.distributed: gloo on the CPU, nccl
on CUDA), unchanged::

    whisper-lens sweep clips/ --stack both --out sweep/
    torchrun --standalone --nproc-per-node 4 -m whisper_lens sweep clips/ --stack both --out sweep/

How a run is cut up. Rank 0 finds the clips and reads every file's header first, so an unreadable
clip, an empty one or one longer than the model's window is named before any work. The clips are
sorted by path and cut into batches of ``batch_size`` in that order; batch b goes to rank b % N.
The ranks work in rounds, one batch each, then exchange what they did (``all_gather_object``): in a
sweep, rank 0 writes the round's rows; in an export, each rank has written its own shards. A batch
holds the same clips however many ranks there are, and batched decoding depends on the batch only,
so N ranks give the rows of one process exactly (with the same number of threads per process: the
CPU's matrix products may round differently on other thread counts).

When a rank fails, the round still ends for everyone: what the others finished is written, then the
rank that failed raises its error and every other rank raises ``RankFailed`` (the command prints one
line, from the rank that failed).

Resuming. ``--out`` holds the state: ``.whisper-lens.json`` (the command and its settings, written
first), then what finished batches produced, each file written under a temporary name and renamed
into place: ``parts/*.json`` (a sweep's rows) or ``shards/*.safetensors`` (an export's tensors). A
rerun with the same settings does only the clips without results; a clip keeps its results while its
path in the dataset, its content (a SHA-256 of the file's bytes) and its reference transcript are
unchanged. A folder that holds another study, or anything the tool did not write, is refused before any
work; nothing is deleted. A run that fails before any result leaves ``--out`` as it was (a new folder is
removed again), so the corrected rerun is not taken for another study.

Reading an export. ``index.json`` names every tensor's shard, which must be a file under ``shards/``
of the export, with the SHA-256 of each shard: a shard is checked against it when first opened, so a
changed, truncated or swapped shard is named, never read as another clip's data.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import math
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .audio import AUDIO_SUFFIXES, HOP_LENGTH, SAMPLE_RATE, load_audio, load_windows
from .experiments import n_blocks, removal_sweep, summarize
from .files import MARKER, atomic_write, content_hash, write_text
from .model import ModelDims, Whisper, activation_shapes
from .trace import select_names

# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    """One audio file of a dataset, as ``find_clips`` checked it."""

    id: str  # path relative to the dataset's folder ("speaker/a.flac"): the rows' ``clip`` column
    path: str
    size: int  # bytes
    seconds: float
    reference: str | None = None  # the transcript error rates are measured against
    digest: str = ""  # SHA-256 of the file's bytes (hex), as find_clips read it

    @property
    def key(self) -> str:
        """What must not change for a finished result to be reused: the file's content and its reference."""
        ref = "-" if self.reference is None else hashlib.sha256(self.reference.encode()).hexdigest()[:16]
        return f"{self.digest[:32] or self.size}:{ref}"


def find_clips(inputs: Sequence[str | os.PathLike], model: Whisper, references=None) -> list[Clip]:
    """The clips of a dataset: audio files in folders (searched recursively) or given one by one, checked.

    A clip's id is its path relative to the inputs' common folder. Every file's header is read (not its
    samples) to check that it is audio, not empty, and fits the model's window; the first problem found
    is raised, naming the file. ``references``: a JSON file ``{clip: transcript}`` keyed by clip id, or
    by file name where that is unique; every clip needs a non-empty one.
    """
    files = _audio_files(inputs)
    root = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
    ids = [Path(os.path.relpath(os.path.abspath(f), root)).as_posix() for f in files]
    if len(set(ids)) < len(ids):
        twice = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"clip {twice} is given twice")
    window = 2 * model.dims.n_audio_ctx * HOP_LENGTH  # samples in the model's window
    sizes, seconds = zip(*(_check_clip(f, window) for f in files), strict=True)
    refs = _references(references, ids) if references is not None else [None] * len(ids)
    paths = [os.path.abspath(f) for f in files]
    digests = [content_hash(Path(f)) for f in paths]  # a clip edited in place (same size) is another clip
    clips = [Clip(*fields) for fields in zip(ids, paths, sizes, seconds, refs, digests, strict=True)]
    return sorted(clips, key=lambda c: c.id)


def _audio_files(inputs: Sequence[str | os.PathLike]) -> list[str]:
    if isinstance(inputs, str | os.PathLike) or len(inputs) == 0:
        raise ValueError("give a folder of audio files, or the files, as a list")
    files = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(
                str(f)
                for f in item.rglob("*")
                if f.suffix.lower() in AUDIO_SUFFIXES
                and not any(p.startswith(".") for p in f.relative_to(item).parts)
                and f.is_file()
            )
            if not found:
                raise FileNotFoundError(f"no audio files in {item} ({', '.join(AUDIO_SUFFIXES)}, in subfolders too)")
            files += found
        elif item.exists():
            files.append(str(item))
        else:
            raise FileNotFoundError(f"clip or folder not found: {item}")
    return files


def _check_clip(path: str, window: int) -> tuple[int, float]:
    """(bytes, seconds) of an audio file, from its header; an error naming it if it cannot be a clip."""
    import soundfile

    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"cannot read {path}")
    try:
        header = soundfile.info(path)
        samples = math.ceil(header.frames * SAMPLE_RATE / header.samplerate)  # at 16 kHz
    except Exception:  # not a format libsndfile reads (or not audio): decode it as load_audio would, or fail there
        samples = len(load_audio(path))
    if samples == 0:
        raise ValueError(f"{path} holds no audio samples")
    if samples > window:
        raise ValueError(
            f"{path} is {samples / SAMPLE_RATE:.1f} s long, longer than the model's {window / SAMPLE_RATE:g} s "
            "window; long-form audio is not supported here: cut it into windows first"
        )
    return info.st_size, samples / SAMPLE_RATE


def _references(path, ids: list[str]) -> list[str]:
    """Each clip's transcript from a JSON file {clip id or unique file name: text}."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read references {path}: {e}") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise ValueError(f"references {path} must be a JSON object {{clip: transcript}} of strings")
    names = [Path(i).name for i in ids]
    found = [table.get(i, table.get(n) if names.count(n) == 1 else None) for i, n in zip(ids, names, strict=True)]
    missing = [i for i, r in zip(ids, found, strict=True) if r is None]
    if missing:
        more = f" (and {len(missing) - 1} more clips)" if len(missing) > 1 else ""
        raise ValueError(f"references {path} have no transcript for clip {missing[0]}{more}")
    empty = [i for i, r in zip(ids, found, strict=True) if not r.strip()]
    if empty:
        raise ValueError(f"references {path}: the transcript of clip {empty[0]} is empty")
    return found


# ----------------------------------------------------------------------------- ranks

TIMEOUT = timedelta(hours=12)  # longest a rank waits for the others' round: only a hung rank (not a dead one) meets it


class RankFailed(RuntimeError):
    """Raised on every rank but the one that failed (which raises its own error), so the run stops together."""


def _attempt(fn: Callable):
    """(fn(), None), or (None, the exception) when fn raises."""
    try:
        return fn(), None
    except Exception as e:
        return None, e


class Ranks:
    """This process's place among the run's processes: ``rank`` of ``size`` (0 of 1 without torchrun).

    Collectives exchange Python objects (rows, progress, errors); with one process they are no-ops.
    """

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self.rank, self.size = rank, size

    @staticmethod
    def current() -> Ranks:
        """The default process group's ranks if one is initialised (e.g. by your torchrun script), else one process."""
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    @staticmethod
    @contextlib.contextmanager
    def join(device: str = "cpu") -> Iterator[Ranks]:
        """The ranks of a ``torchrun`` launch (its process group joined here and left at the end), else one process.

        A process group initialised by the caller is used as it is.
        """
        if (dist.is_available() and dist.is_initialized()) or int(os.environ.get("WORLD_SIZE", "1")) == 1:
            yield Ranks.current()
            return
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
        try:
            yield Ranks(dist.get_rank(), dist.get_world_size())
            # leave together: a rank that tears down its connections while a peer still uses them can abort
            # the peer's process ("terminate called without an active exception")
            dist.barrier()
        finally:
            dist.destroy_process_group()

    def gather(self, obj) -> list:
        """Every rank's ``obj``, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        try:
            dist.all_gather_object(out, obj)
        except RuntimeError as e:  # a peer died: gloo and nccl report the broken connection
            raise RankFailed(f"lost contact with another rank ({e})") from None
        return out

    def first(self, fn: Callable):
        """Rank 0 computes ``fn()``; every rank returns its result, or stops with its error."""
        result, error = _attempt(fn) if self.rank == 0 else (None, None)
        shared = self.gather((result, _describe(error)) if self.rank == 0 else None)[0]
        self.stop_if_failed([shared[1]], error)
        return shared[0]

    def together(self, fn: Callable):
        """Every rank computes ``fn()`` and returns its own result; if one fails, all stop."""
        result, error = _attempt(fn)
        self.stop_if_failed(self.gather(_describe(error)), error)
        return result

    def stop_if_failed(self, errors: list[str | None], own: Exception | None) -> None:
        """After an exchange: if any rank failed, raise (the first failing rank its error, the others RankFailed)."""
        failed = [(rank, message) for rank, message in enumerate(errors) if message is not None]
        if not failed:
            return
        if self.size > 1:
            self.gather(None)  # a barrier: no rank exits (and torchrun stops no one) while rank 0 still writes
        rank, message = failed[0]
        if own is not None and rank == self.rank:
            raise own
        raise RankFailed(f"rank {rank} failed: {message}")


def _describe(error: Exception | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def rank_device(device: str) -> str:
    """The device of this rank: ``cuda`` under torchrun becomes the rank's own GPU, ``cuda:LOCAL_RANK``."""
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if device == "cuda" and local is not None else device


def rounds(ranks: Ranks, batches: list, work: Callable, save: Callable[[list], None]) -> None:
    """Batch b is rank b % N's; each round every rank does one, then rank 0 ``save``s the round's results.

    A rank without a batch in the last round still takes part in the exchange. A failure stops every
    rank after the round's other results are saved.
    """
    mine = batches[ranks.rank :: ranks.size]
    for r in range(math.ceil(len(batches) / ranks.size)):
        result, error = _attempt(functools.partial(work, mine[r])) if r < len(mine) else (None, None)
        gathered = ranks.gather((result, _describe(error)))
        if ranks.rank == 0:
            save([res for res, err in gathered if err is None and res is not None])
        ranks.stop_if_failed([err for _, err in gathered], error)


# ----------------------------------------------------------------------------- the output folder

TEMPORARY = re.compile(r"\.(?P<name>.+)\.whisper-lens-\d+-[0-9a-f]{8}\.tmp")  # a file atomic_write is writing


def _temporary(rel: Path, contents: dict[str, str]) -> bool:
    """Whether ``rel`` is a temporary file of ``atomic_write`` for one of the command's own files."""
    found = TEMPORARY.fullmatch(rel.name)
    return found is not None and _ours(rel.with_name(found["name"]), contents)


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj))


@contextlib.contextmanager
def claim(out: str | os.PathLike, command: str, settings: dict, contents: dict[str, str]) -> Iterator[Path]:
    """Make ``out`` this run's, before any work; hold it (a lock) until the run ends.

    ``out`` is created, or must be empty, or must have been written by the same command with the same
    ``settings`` (then the run resumes). ``contents``: the names the command writes in it (a file, or a
    folder mapped to the suffix of its files); anything else in it is refused. Temporary files left by
    an interrupted run are removed.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    marker = out / MARKER
    existed = out.exists()
    held = sorted(out.iterdir()) if out.is_dir() else []
    if held and not marker.is_file():
        raise FileExistsError(
            f"--out {out} holds {held[0].name}{' and more' if len(held) > 1 else ''} and was not written by "
            f"whisper-lens (no {MARKER}): give a new or empty folder"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"cannot create --out {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into --out {out}")
    settings = json.loads(json.dumps(settings))  # as it reads back
    fresh = None if marker.exists() else not held  # True: out was new or empty, and this run claims it
    if fresh is not None:
        _create_marker(marker, {"tool": "whisper-lens", "command": command, "version": 1, "settings": settings})
    _check_marker(marker, command, settings)
    strangers = [p for p in _entries(out) if not _ours(p.relative_to(out), contents)]
    if strangers:
        more = f" (and {len(strangers) - 1} more)" if len(strangers) > 1 else ""
        raise FileExistsError(
            f"--out {out} holds {strangers[0]}{more}, which whisper-lens {command} did not write: "
            "move it away or give another folder"
        )
    import fcntl  # POSIX; imported here so that whisper_lens imports everywhere

    with open(marker) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BlockingIOError(f"--out {out} is in use by another whisper-lens {command} run") from None
        for p in _entries(out):
            if _temporary(p.relative_to(out), contents):
                p.unlink()
        try:
            yield out
        except BaseException:
            if fresh:
                _unclaim(out, existed)
            raise


def _unclaim(out: Path, existed: bool) -> None:
    """After a run that claimed a new or empty ``out`` failed: if it wrote no result, leave ``out`` empty again."""
    entries = _entries(out)
    if any(p.is_file() and p.name != MARKER or p.is_symlink() for p in entries):
        return  # results to resume from
    for p in sorted(entries, key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            p.rmdir() if p.is_dir() else p.unlink()
    if not existed:
        with contextlib.suppress(OSError):
            out.rmdir()


def _create_marker(marker: Path, content: dict) -> None:
    """Write the marker unless another run just did (a link does not replace an existing file)."""
    tmp = marker.parent / f".{marker.name}.whisper-lens-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    with open(tmp, "x") as f:
        json.dump(content, f, indent=1)
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def _check_marker(marker: Path, command: str, settings: dict) -> None:
    out = marker.parent
    try:
        found = json.loads(marker.read_text())
        found_command = found["command"]
    except (OSError, ValueError, TypeError, KeyError):
        raise ValueError(f"{marker} is not a whisper-lens marker: give another --out") from None
    if found_command != command:
        raise FileExistsError(f"--out {out} holds a whisper-lens {found_command}, not a {command}: give another folder")
    found_settings = found.get("settings", {})
    if found_settings != settings:
        differ = [k for k in settings if found_settings.get(k) != settings[k]] or list(found_settings)
        said = "; ".join(f"{k} {_short(found_settings.get(k))} there, {_short(settings.get(k))} here" for k in differ)
        raise FileExistsError(
            f"--out {out} holds another {command} ({said}): give another folder, or the same settings to resume"
        )


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _entries(out: Path) -> list[Path]:
    """Everything in ``out`` and one level down, sorted."""
    top = sorted(out.iterdir())
    return top + [p for d in top if d.is_dir() and not d.is_symlink() for p in sorted(d.iterdir())]


def _ours(rel: Path, contents: dict[str, str]) -> bool:
    """Whether the command wrote ``rel`` (a path inside --out): its files, its folders' files, its temporaries."""
    if rel.name == MARKER and len(rel.parts) == 1 or _temporary(rel, contents):
        return True
    if len(rel.parts) == 1:
        return rel.name in contents
    folder = rel.parts[0]
    return contents.get(folder, "").startswith(".") and rel.suffix == contents[folder]


def fingerprint(model: Whisper) -> str:
    """A short hash of the model's shapes, dtype and a sample of every weight: another checkpoint, another hash."""
    h = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        h.update(f"{name} {tuple(p.shape)} {p.dtype}".encode())
        h.update(torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_settings(model: Whisper) -> dict:
    return {"weights": fingerprint(model), "device": model.device.type}


# ----------------------------------------------------------------------------- the removal sweep

SWEEP_CONTENTS = {"parts": ".json", "rows.csv": "", "summary.csv": "", "removal.png": ""}
SUMMARY_COLUMNS = ("wer", "cer", "compression_ratio", "max_repeats", "tokens_per_second", "empty")


@dataclass
class SweepResult:
    summary: list[dict]  # mean of each metric per stack and number of removed blocks
    rows: Path  # the rows CSV: one row per (stack, removal, clip)
    plot: Path | None  # None when matplotlib is missing
    new_clips: int  # clips swept by this run (the others were finished before)
    seconds: float  # wall time of this run's rounds


def removal_plan(model: Whisper, stack: str, removals: Sequence[int] | None) -> dict[str, list[int]]:
    """Stack -> the numbers k of last blocks to remove (default 0..L), checked against the model."""
    stacks = {"encoder": model.dims.n_audio_layer, "decoder": model.dims.n_text_layer}
    if stack not in (*stacks, "both"):
        raise ValueError(f"stack must be 'encoder', 'decoder' or 'both', got {stack!r}")
    plan = {}
    for name in stacks if stack == "both" else [stack]:
        L = stacks[name]
        ks = list(range(L + 1)) if removals is None else list(removals)
        bad = [k for k in ks if not (isinstance(k, int) and 0 <= k <= L)]
        if bad or not ks:
            raise ValueError(f"removals {bad or '(none)'}: the {name} has {L} blocks, remove 0 to {L} of them")
        plan[name] = sorted(set(ks))
    return plan


def sweep(
    model: Whisper,
    clips: Sequence[Clip],
    out: str | os.PathLike,
    *,
    stack: str = "both",
    removals: Sequence[int] | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> SweepResult:
    """Remove the last k blocks of a stack, for each k, and decode every clip: ``experiments.removal_sweep`` at scale.

    Each batch's rows are ``removal_sweep``'s (WER, CER, hallucination metrics; against the clips'
    references, else the full model's own transcripts), with ``clip`` the clip's id. When every batch
    is done, rank 0 writes ``rows.csv`` (ordered by stack, k, clip), ``summary.csv`` (means per stack
    and k) and ``removal.png`` (WER against k) into ``out``. Resumable: see the module's docstring.
    """
    ranks = ranks or Ranks.current()
    plan = removal_plan(model, stack, removals)
    _check_run(model, clips, batch_size, text=True)
    _check_max_new_tokens(max_new_tokens)
    settings = {"model": model_settings(model), "removals": plan, "max_new_tokens": max_new_tokens}
    with contextlib.ExitStack() as held:
        todo = ranks.first(lambda: _start_sweep(held, out, settings, clips))
        parts = Path(out) / "parts"
        run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        bar = _bar(progress and ranks.rank == 0, len(clips), len(clips) - len(todo), "sweep")
        count = iter(range(len(clips)))

        def save(done: list[dict]) -> None:
            for part in done:
                write_json(parts / f"{run}-{next(count):06d}.json", part)
                bar.update(len(part["clips"]))

        ranks.together(lambda: _warm_up(model, clips))
        started = time.perf_counter()
        work = lambda batch: _sweep_batch(model, batch, plan, max_new_tokens)  # noqa: E731
        with bar:  # closed (its line ended) before an error is printed
            rounds(ranks, _batches([clips[i] for i in todo], batch_size), work, save)
        seconds = time.perf_counter() - started
        summary, rows, plot = ranks.first(lambda: _finish_sweep(Path(out), clips, plan))
    return SweepResult(summary, rows, plot, len(todo), seconds)


def _check_run(model: Whisper, clips: Sequence[Clip], batch_size: int, text: bool) -> None:
    if not isinstance(model, Whisper):
        raise TypeError(f"model must be a whisper_lens.Whisper, got {type(model).__name__}")
    if text and model.tokenizer is None:
        raise ValueError("the model has no tokenizer beside its weights: transcripts need one")
    if not clips or not all(isinstance(c, Clip) for c in clips):
        raise ValueError("clips must be a non-empty list of Clip, as find_clips returns")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size!r}")


def _check_max_new_tokens(max_new_tokens) -> None:
    ok = max_new_tokens is None or isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool)
    if not ok or max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens (--max-new-tokens) must be at least 1, got {max_new_tokens!r}")


def _warm_up(model: Whisper, clips: Sequence[Clip]) -> None:
    """Read one clip: the first read imports the audio decoders (seconds), which the timed rate should not count."""
    load_windows([clips[0].path], model.dims.n_mels, 2 * model.dims.n_audio_ctx)


def _batches(clips: list[Clip], size: int) -> list[list[Clip]]:
    return [clips[i : i + size] for i in range(0, len(clips), size)]


def _bar(enabled: bool, total: int, done: int, what: str):
    import sys

    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc=what, unit="clip", disable=not enabled, file=sys.stderr)


def _start_sweep(held: contextlib.ExitStack, out, settings: dict, clips: Sequence[Clip]) -> list[int]:
    """Rank 0: claim ``out``; the indices of the clips still to sweep."""
    folder = held.enter_context(claim(out, "sweep", settings, SWEEP_CONTENTS))
    (folder / "parts").mkdir(exist_ok=True)
    done = {(c, key) for part in _parts(folder / "parts") for c, key in part["clips"].items()}
    return [i for i, c in enumerate(clips) if (c.id, c.key) not in done]


def _parts(folder: Path) -> Iterator[dict]:
    """Every part file's ``{"clips": {id: key}, "rows": [row, ...]}``, checked: one that is not is named."""
    for path in sorted(folder.glob("*.json")):
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} ({e}): move it away to sweep its clips again") from None
        if not _is_part(part):
            raise ValueError(
                f'{path} is not a sweep\'s part ({{"clips": {{clip: key}}, "rows": [...]}}): move it away to '
                "sweep its clips again"
            )
        yield part


def _is_part(part) -> bool:
    if not isinstance(part, dict) or not isinstance(part.get("clips"), dict) or not isinstance(part.get("rows"), list):
        return False
    if not all(isinstance(c, str) and isinstance(k, str) for c, k in part["clips"].items()):
        return False
    fields = {"clip": str, "stack": str, "removed": int}
    return all(isinstance(r, dict) and all(isinstance(r.get(f), t) for f, t in fields.items()) for r in part["rows"])


def _sweep_batch(model: Whisper, batch: list[Clip], plan: dict[str, list[int]], max_new_tokens: int | None) -> dict:
    """One batch through ``removal_sweep``, every stack at once: {"clips": {id: key}, "rows": [...]}."""
    mels, seconds = load_windows([c.path for c in batch], model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    refs = [c.reference for c in batch] if batch[0].reference is not None else None
    L = {stack: n_blocks(model, stack) for stack in plan}
    removals = {stack: [list(range(L[stack] - k, L[stack])) for k in ks] for stack, ks in plan.items()}
    found = removal_sweep(model, mels, list(plan), references=refs, removals=removals, seconds=seconds,
                          max_new_tokens=max_new_tokens)  # fmt: skip
    rows = [row | {"clip": batch[row["clip"]].id} for row in found]
    return {"clips": {c.id: c.key for c in batch}, "rows": rows}


def _finish_sweep(out: Path, clips: Sequence[Clip], plan: dict[str, list[int]]):
    """Rank 0: every clip's rows from the parts, in order, as rows.csv, summary.csv and removal.png."""
    wanted = {c.id: (n, c.key) for n, c in enumerate(clips)}
    parts = list(_parts(out / "parts"))
    source = {}  # clip -> the first part that holds its rows for its current key
    for i, part in enumerate(parts):
        for clip, key in part["clips"].items():
            if clip in wanted and wanted[clip][1] == key:
                source.setdefault(clip, i)
    rows = [row for i, part in enumerate(parts) for row in part["rows"] if source.get(row["clip"]) == i]
    stacks = list(plan)
    rows.sort(key=lambda r: (stacks.index(r["stack"]), plan[r["stack"]].index(r["removed"]), wanted[r["clip"]][0]))
    by_stack = {s: [r for r in rows if r["stack"] == s] for s in stacks}
    summary = [{"stack": s, **m} for s in stacks for m in summarize(by_stack[s], "removed", SUMMARY_COLUMNS)]
    write_csv(out / "rows.csv", rows)
    write_csv(out / "summary.csv", summary)
    return summary, out / "rows.csv", _plot_removal(out / "removal.png", summary, stacks)


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    columns = list(dict.fromkeys(c for r in rows for c in r))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)


def _plot_removal(path: Path, summary: list[dict], stacks: list[str]) -> Path | None:
    from . import plot

    curves = {s: [(r["removed"], r["wer"]) for r in summary if r["stack"] == s] for s in stacks}
    try:
        fig = plot.removal_curves(curves, metric="WER (mean over clips)", title="Removing the last k blocks")
        return plot.save(fig, path)
    except ImportError:  # matplotlib is an optional extra: the rows and the summary stand without the picture
        return None


# ----------------------------------------------------------------------------- the activation export

EXPORT_CONTENTS = {"shards": ".safetensors", "index.json": ""}
FORMAT = "whisper-lens activations"


@dataclass
class ExportResult:
    index: Path  # index.json: read it with load_activations(folder)
    new_clips: int  # clips exported by this run (the others were finished before)
    bytes: int  # bytes of tensors written by this run, all ranks together
    seconds: float  # wall time of this run's rounds


def position_axes(dims: ModelDims, names: Sequence[str]) -> dict[str, list[str | None]]:
    """Per name, what each axis of a clip's tensor (no batch axis) indexes: "audio" or "text" positions, or None.

    Read from the shapes alone: an axis is a position axis when its length follows the number of
    audio positions (``n_audio_ctx``) or of text tokens, so no layout of heads and positions is assumed.
    """
    base = activation_shapes(dims, 1, 1)
    text = activation_shapes(dims, 1, 2)
    audio = activation_shapes(replace(dims, n_audio_ctx=dims.n_audio_ctx + 1), 1, 1)
    kinds = {}
    for name in names:
        b, t, a = base[name][1:], text[name][1:], audio[name][1:]
        kinds[name] = ["text" if t[i] != b[i] else "audio" if a[i] != b[i] else None for i in range(len(b))]
    return kinds


def export(
    model: Whisper,
    clips: Sequence[Clip],
    out: str | os.PathLike,
    trace: str | Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    positions: str = "speech",
    batch_size: int = 8,
    shard_clips: int = 32,
    max_new_tokens: int | None = None,
    progress: bool = True,
    ranks: Ranks | None = None,
) -> ExportResult:
    """Write the activations ``trace`` names for every clip as safetensors shards, with an index.

    What is recorded is ``model.run``'s trace: for encoder names on the audio alone, for decoder
    names (and ``logits``) teacher-forced on the prompt and the model's greedy transcript. Each clip's
    tensor loses the batch axis; ``positions="speech"`` keeps only the audio positions that cover the
    clip (every audio axis, ``"all"`` keeps the whole window); text axes keep the clip's tokens. Every
    rank writes its own shards of ``shard_clips`` clips (``shards/*.safetensors``); at the end rank 0
    writes ``index.json`` (clips, names with their position axes, one entry per tensor: clip, name,
    shape, shard). Read it with ``load_activations(out)``. Resumable: see the module's docstring.
    """
    ranks = ranks or Ranks.current()
    names = [n for n in model.names() if n in select_names(trace, model.names())]
    text = any(not n.startswith("encoder.") for n in names)
    _check_run(model, clips, batch_size, text=text)
    _check_max_new_tokens(max_new_tokens)
    clips = [replace(c, reference=None) for c in clips]  # an export does not depend on the references
    dtype = model.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a torch floating point dtype, got {dtype!r}")
    if positions not in ("speech", "all"):
        raise ValueError(f"positions must be 'speech' or 'all', got {positions!r}")
    if not isinstance(shard_clips, int) or shard_clips < 1:
        raise ValueError(f"clips per shard must be at least 1, got {shard_clips!r}")
    axes = position_axes(model.dims, names)
    settings = {"model": model_settings(model), "names": names, "dtype": str(dtype).removeprefix("torch."),
                "positions": positions, "max_new_tokens": max_new_tokens if text else None}  # fmt: skip
    shards = Path(out) / "shards"
    with contextlib.ExitStack() as held:
        todo = ranks.first(lambda: _start_export(held, out, settings, clips))
        shards.mkdir(parents=True, exist_ok=True)  # every rank's, in case --out is not shared between machines
        bar = _bar(progress and ranks.rank == 0, len(clips), len(clips) - len(todo), "export")
        writer = ShardWriter(shards, shard_clips)
        ranks.together(lambda: _warm_up(model, clips))
        started = time.perf_counter()
        work = lambda batch: writer.add(_export_batch(model, batch, names, axes, dtype, positions, max_new_tokens))  # noqa: E731
        try:
            with bar:
                rounds(ranks, _batches([clips[i] for i in todo], batch_size), work, lambda done: bar.update(sum(done)))
        except BaseException:
            with contextlib.suppress(Exception):  # keep what this rank finished; the error that stopped the run wins
                writer.flush()
            raise
        ranks.together(writer.flush)
        seconds = time.perf_counter() - started
        total = sum(ranks.gather(writer.bytes))
        index = ranks.first(lambda: _write_index(Path(out), clips, settings, model.dims, axes))
    return ExportResult(index, len(todo), total, seconds)


def _start_export(held: contextlib.ExitStack, out, settings: dict, clips: Sequence[Clip]) -> list[int]:
    """Rank 0: claim ``out``; the indices of the clips still to export."""
    folder = held.enter_context(claim(out, "export", settings, EXPORT_CONTENTS))
    done = {(c["clip"], c["key"]) for _, meta in _shard_metadata(folder / "shards") for c in meta["clips"]}
    return [i for i, c in enumerate(clips) if (c.id, c.key) not in done]


def _export_batch(model, batch, names, axes, dtype, positions, max_new_tokens) -> list[tuple[dict, dict]]:
    """One batch through ``model.run``: per clip, its record and its tensors {name: tensor}, cut to the clip."""
    mels, seconds = load_windows([c.path for c in batch], model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    if any(not n.startswith("encoder.") for n in names):
        from .study import prompt_tokens

        results = model.generate(mels, max_new_tokens=max_new_tokens)
        sequences = [prompt_tokens(model, r.language) + r.tokens for r in results]
        texts = [r.text.strip() for r in results]
    else:  # the encoder's names only: one token for the decoder, whose outputs are not kept
        sequences, texts = [[model.tokenizer.sot if model.tokenizer else 0]] * len(batch), [None] * len(batch)
    T = max(map(len, sequences))
    tokens = torch.tensor([s + [s[-1]] * (T - len(s)) for s in sequences])  # (B, T): padded at the end
    trace = model.run(mels, tokens, trace=names).trace  # causal: padding never reaches a clip's own positions
    window = 2 * model.dims.n_audio_ctx * HOP_LENGTH
    out = []
    for i, clip in enumerate(batch):
        samples = round(seconds[i] * SAMPLE_RATE) if positions == "speech" else window
        tensors = {}
        for n in names:
            x = _cut(trace[n][i], axes[n], samples, window, len(sequences[i]))
            tensors[n] = x.to("cpu", dtype, memory_format=torch.contiguous_format, copy=True)  # its own memory
        record = {"clip": clip.id, "key": clip.key, "seconds": clip.seconds}
        if texts[i] is not None:
            record |= {"tokens": sequences[i], "text": texts[i]}
        out.append((record, tensors))
    return out


def _cut(x: Tensor, axes: list[str | None], samples: int, window: int, n_tokens: int) -> Tensor:
    """One clip's tensor: text axes to its tokens, audio axes to the positions that cover ``samples`` of audio."""
    for axis, kind in enumerate(axes):
        if kind == "text":
            x = x.narrow(axis, 0, n_tokens)
        elif kind == "audio":
            x = x.narrow(axis, 0, max(1, -(-x.shape[axis] * samples // window)))  # ceil
    return x


class ShardWriter:
    """One rank's clips, gathered and written ``per_shard`` at a time as ``shards/<first clip's id>....safetensors``."""

    def __init__(self, folder: Path, per_shard: int) -> None:
        self.folder, self.per_shard = folder, per_shard
        self.pending: list[tuple[dict, dict]] = []
        self.bytes = 0

    def add(self, clips: list[tuple[dict, dict]]) -> int:
        """Take a batch's clips; write every full shard. Returns the number of clips taken."""
        self.pending += clips
        while len(self.pending) >= self.per_shard:
            self.write(self.pending[: self.per_shard])
            self.pending = self.pending[self.per_shard :]
        return len(clips)

    def flush(self) -> None:
        if self.pending:
            self.write(self.pending)
            self.pending = []

    def write(self, clips: list[tuple[dict, dict]]) -> None:
        from safetensors.torch import save_file

        tensors = {f"{record['clip']}/{name}": x for record, named in clips for name, x in named.items()}
        meta = {"clips": [record for record, _ in clips], "shapes": {k: list(x.shape) for k, x in tensors.items()}}
        # unique: no clip is in two shards, and a clip's id is hashed with a random suffix against reruns
        name = f"{hashlib.sha256(clips[0][0]['clip'].encode()).hexdigest()[:12]}-{secrets.token_hex(4)}.safetensors"
        atomic_write(self.folder / name, lambda tmp: save_file(tensors, tmp, metadata={FORMAT: json.dumps(meta)}))
        self.bytes += sum(x.numel() * x.element_size() for x in tensors.values())


def _shard_metadata(folder: Path) -> Iterator[tuple[Path, dict]]:
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(path, framework="pt") as f:
                yield path, json.loads(f.metadata()[FORMAT])
        except Exception as e:
            raise ValueError(f"cannot read shard {path} ({e}): move it away to export its clips again") from None


def _write_index(out: Path, clips: Sequence[Clip], settings: dict, dims: ModelDims, axes: dict) -> Path:
    """Rank 0: index.json from the shards' own metadata, for the clips of this run, in clip order."""
    wanted = {c.id: (n, c.key) for n, c in enumerate(clips)}
    found = {}
    for path, meta in _shard_metadata(out / "shards"):
        for record in meta["clips"]:
            if wanted.get(record["clip"], (0, None))[1] == record["key"]:
                found[record["clip"]] = (record, path.name, meta["shapes"])
    full = activation_shapes(dims, 1, 1)
    names = {}
    for n, a in axes.items():
        audio = [size for size, kind in zip(full[n][1:], a, strict=True) if kind == "audio"]
        names[n] = {"axes": a, "audio_length": audio[0] if audio else None}  # positions in a whole window
    missing = [c.id for c in clips if c.id not in found]
    if missing:
        raise FileNotFoundError(
            f"clip {missing[0]} is in no shard of {out / 'shards'} (written on another machine? --out must be "
            "one folder shared by every rank's machine)"
        )
    records = [found[c.id][0] for c in clips]
    used = sorted({found[c.id][1] for c in clips})
    checksums = {f"shards/{shard}": content_hash(out / "shards" / shard) for shard in used}
    tensors = []
    for c in clips:
        record, shard, shapes = found[c.id]
        for n in axes:
            tensors.append({"clip": c.id, "name": n, "shape": shapes[f"{c.id}/{n}"], "shard": f"shards/{shard}",
                            "key": f"{c.id}/{n}"})  # fmt: skip
    index = {"format": FORMAT, "version": 2, "dims": asdict(dims), "window_seconds": 2 * dims.n_audio_ctx * HOP_LENGTH
             / SAMPLE_RATE, **{k: settings[k] for k in ("model", "dtype", "positions", "max_new_tokens")},
             "names": names, "clips": records, "tensors": tensors, "sha256": checksums}  # fmt: skip
    return write_json(out / "index.json", index)


# ----------------------------------------------------------------------------- reading an export


class Activations:
    """An export's tensors, read from its shards on demand (memory-mapped): ``load_activations(folder)``.

    - ``acts.clips``: one record per clip (``clip`` id, ``seconds``; ``tokens`` and ``text`` when decoder
      names were exported); ``acts.names``; ``acts.axes[name]``: what each axis indexes ("audio", "text", None).
    - ``acts[clip, name]``: one tensor, e.g. ``[audio positions, D]`` for ``encoder.blocks.3.resid_post``.
    - ``acts.tensors(name)``: ``(clip, tensor)`` for every clip in order; ``iter(acts)``: ``(clip, name, tensor)``.

    For a sparse autoencoder: ``torch.cat([x for _, x in acts.tensors("encoder.blocks.3.resid_post")])``
    is every speech position of every clip, ``[N, D]``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        path = self.folder / "index.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a finished whisper-lens export (rerun export to finish it)")
        try:
            self.index = json.loads(path.read_text())
        except (OSError, ValueError):
            self.index = None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT:
            raise ValueError(f"{path} is not a whisper-lens activation index")
        self.path = path
        problem = _index_problem(self.index, self.folder)
        if problem:
            raise ValueError(f"{path} is not a valid activation index: {problem} (export again into a new folder)")
        self.clips: list[dict] = self.index["clips"]
        self.names: list[str] = list(self.index["names"])
        self.axes: dict[str, list[str | None]] = {n: v["axes"] for n, v in self.index["names"].items()}
        self.entries = {(t["clip"], t["name"]): t for t in self.index["tensors"]}
        self.checksums: dict[str, str] = self.index.get("sha256", {})  # version 1 exports have none
        self._open: OrderedDict = OrderedDict()  # a few open shards, most recently used last

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[str, str]) -> Tensor:
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(f"index an export as acts[clip, name] (two strings), got acts[{key!r}]")
        entry = self.entries.get(key)
        if entry is None:
            clip, name = key
            listed = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
            known = any(c["clip"] == clip for c in self.clips)
            what = f"name {name!r} (it has {listed})" if known else f"clip {clip!r}"
            raise KeyError(f"the export in {self.folder} has no {what}; index it as acts[clip, name]")
        shard = self._shard(entry["shard"])
        try:
            return shard.get_tensor(entry["key"])
        except Exception as e:  # safetensors' own errors: say which shard and tensor
            raise ValueError(f"cannot read {entry['key']} from {self.folder / entry['shard']} ({e})") from None

    def tensors(self, name: str) -> Iterator[tuple[str, Tensor]]:
        """``(clip, tensor)`` of one name for every clip, in the index's order."""
        if name not in self.axes:
            raise KeyError(f"the export in {self.folder} has no name {name!r}; it has {', '.join(self.names)}")
        for c in self.clips:
            yield c["clip"], self[c["clip"], name]

    def batches(self, name: str, batch_size: int, **options):
        """Shuffled ``[batch, D]`` rows of ``name`` across clips and shards, for SAEs: ``whisper_lens.sae.Batches``."""
        from .sae import Batches

        return Batches(self, name, batch_size, **options)

    def __iter__(self) -> Iterator[tuple[str, str, Tensor]]:
        for c in self.clips:
            for name in self.names:
                yield c["clip"], name, self[c["clip"], name]

    def _shard(self, rel: str):
        from safetensors import safe_open

        if rel not in self._open:
            path = self.folder / rel
            if rel in self.checksums and content_hash(path) != self.checksums[rel]:
                raise ValueError(
                    f"shard {path} does not match the checksum in {self.path}: it changed since the export "
                    "(export again into a new folder)"
                )
            try:
                self._open[rel] = safe_open(path, framework="pt")
            except Exception as e:  # truncated, not safetensors, unreadable
                raise ValueError(f"cannot read shard {path} ({type(e).__name__}: {e})") from None
            if len(self._open) > 8:
                self._open.popitem(last=False)
        self._open.move_to_end(rel)
        return self._open[rel]


SHARD_NAME = re.compile(r"shards/[^/\\]+\.safetensors")


def _index_problem(index: dict, folder: Path) -> str | None:
    """What is wrong with an index's structure (None when nothing): fields, and shards only inside the export."""
    clips, names, tensors, sums = (index.get(k) for k in ("clips", "names", "tensors", "sha256"))
    if not isinstance(clips, list) or not all(isinstance(c, dict) and isinstance(c.get("clip"), str) for c in clips):
        return "'clips' must be a list of {clip: ...} records"
    if not isinstance(names, dict) or not all(isinstance(v, dict) and isinstance(v.get("axes"), list)
                                              for v in names.values()):  # fmt: skip
        return "'names' must map each name to its axes"
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        return "'tensors' must be a list of entries"
    if sums is not None and not (isinstance(sums, dict) and all(isinstance(v, str) for v in sums.values())):
        return "'sha256' must map shards to their checksums"
    inside = os.path.realpath(folder / "shards")
    for t in tensors:
        if not all(isinstance(t.get(k), str) for k in ("clip", "name", "shard", "key")):
            return f"the entry {_short(t)} lacks clip, name, shard or key"
        if t["key"] != f"{t['clip']}/{t['name']}":
            return f"the entry of {t['clip']} {t['name']} names the tensor {t['key']!r}, another clip's or name's"
        real = os.path.realpath(folder / t["shard"])
        if not SHARD_NAME.fullmatch(t["shard"]) or os.path.dirname(real) != inside:
            return f"the entry of {t['clip']} {t['name']} names {t['shard']!r}, not a shard inside the export"
        if sums is not None and t["shard"] not in sums:
            return f"the shard {t['shard']} has no checksum"
    return None


def load_activations(folder: str | os.PathLike) -> Activations:
    """Open an export written by ``whisper-lens export`` / ``export``: its tensors as torch tensors."""
    return Activations(folder)
