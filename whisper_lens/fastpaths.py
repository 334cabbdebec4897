"""Fast paths chosen by timing on this machine, once, with the plain op as the fallback.

Some ways of computing the same numbers are faster on one machine and slower on another: oneDNN's
packed copy of the unembedding pays at some row counts on some CPUs and not on others; a
low-precision draft for speculative decoding pays where the CPU has bf16 instructions. Which one
runs is therefore never written down from the machine where the code was written, nor decided
from a CPU's name: the first time a choice is needed for a shape, each candidate is timed here
(best of a few repeats, a fraction of a second in all) and the fastest one is kept, provided it
beats the plain op by ``MARGIN``; a tie, a failed timing or a timing that raises keeps the plain
op. The numbers never depend on the choice: every candidate computes the same products (the
tests decode with each one forced and compare).

A choice is kept per key: what is chosen, the device (with the CPU's or GPU's model, which only
names the machine in the key), torch's version, the thread count, and the shape (dims and rows).
It lives in memory for the process and in ``fastpaths.json`` in the user cache folder
(``platformdirs``: ``~/.cache/whisper-lens`` on Linux), written atomically under a file lock,
so the next process reuses it. A cache file that cannot be read or parsed is ignored (its
choices are timed again), never an error. Each new choice is logged at INFO with its times;
``whisper-lens info`` lists them and ``whisper-lens info --calibrate`` times them again.

The environment variable ``WHISPER_LENS_FASTPATHS`` changes this:

- ``cache`` (or unset): as above;
- ``memory``: time once per process, read and write no file;
- ``retime``: time every choice again (once per process) and write the new times;
- ``plain``: time nothing and take the plain op everywhere.

``forced(what=candidate)`` makes a choice in a block of code, for tests and comparisons.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

LOG = logging.getLogger(__name__)
ENV = "WHISPER_LENS_FASTPATHS"
MODES = ("cache", "memory", "retime", "plain")
PLAIN = "plain"  # the candidate every choice has: the ordinary op
MARGIN = 0.03  # a fast path is taken only if it beats the plain op by this fraction (else noise decides)
FILE = "fastpaths.json"
FORMAT = 1  # the cache file's layout; another number is ignored

_MEMORY: dict[str, Choice] = {}  # key -> the choice, this process
_RETIMED: set[str] = set()  # keys timed again in this process under "retime"
_TIMING: list[float] = []  # while timings run inside one another: the seconds spent in the inner ones, per level
_LOCK = threading.RLock()  # one timing at a time: two at once would slow each other down
_FRESH: contextvars.ContextVar[bool] = contextvars.ContextVar("fresh_fastpaths", default=False)  # calibrate()
_FORCED: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("forced_fastpaths", default={})  # noqa: B039


@dataclass(frozen=True)
class Choice:
    """One choice: ``what`` ("unembedding", "draft") for ``shape`` on ``device``, the ``chosen`` candidate and
    the ``seconds`` each candidate took per step (best of its repeats), as measured ``when`` (UTC, ISO 8601);
    ``cost``: the seconds its timing took (less those of other choices it needed, each with its own cost)."""

    what: str
    device: str
    shape: str
    chosen: str
    seconds: dict[str, float]
    when: str
    torch: str = torch.__version__
    threads: int = 1
    cost: float = 0.0

    @property
    def key(self) -> str:
        return make_key(self.what, self.device, self.shape, self.torch, self.threads)


def make_key(what: str, device: str, shape: str, version: str | None = None, threads: int | None = None) -> str:
    """The cache key: what is chosen, the device, torch's version, the thread count and the shape."""
    version = torch.__version__ if version is None else version
    threads = torch.get_num_threads() if threads is None else threads
    return f"{what} | {device} | torch {version} | {threads} threads | {shape}"


def shape(**parts) -> str:
    """A shape's part of a key: ``shape(rows=8, vocab=51864)`` -> ``"rows=8 vocab=51864"``."""
    return " ".join(f"{k}={v}" for k, v in parts.items())


def device_name(device: torch.device | str) -> str:
    """The device as a key names it: ``cpu (CPU model)`` or ``cuda (GPU model)``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({cpu_model()})" if device.type == "cpu" else device.type


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def mode() -> str:
    """``WHISPER_LENS_FASTPATHS``: cache (the default), memory, retime or plain; anything else is an error."""
    value = os.environ.get(ENV, "").strip().lower() or "cache"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r}: it takes one of {', '.join(MODES)}")
    return value


def cache_file() -> Path:
    """Where choices are kept between processes: ``fastpaths.json`` in the user cache folder."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("whisper-lens")) / FILE


# ----------------------------------------------------------------------------- choosing


@contextlib.contextmanager
def forced(**choices: str) -> Iterator[None]:
    """Within the block, ``what`` is ``candidate`` without timing: ``with forced(unembedding="plain"): ...``."""
    token = _FORCED.set({**_FORCED.get(), **choices})
    try:
        yield
    finally:
        _FORCED.reset(token)


def choose(what: str, device: torch.device | str, shape: str, measure: Callable[[], dict[str, float]]) -> str:
    """The candidate to run for ``what`` at ``shape`` on ``device``: forced, cached, or timed now by ``measure``.

    ``measure()`` returns the seconds per step of each candidate, ``PLAIN`` among them; it runs at
    most once per key and machine (see the module's docstring). The fastest candidate is chosen if
    it beats the plain op by ``MARGIN``; if ``measure`` raises, the plain op is chosen.
    """
    if what in _FORCED.get():
        return _FORCED.get()[what]
    how = "retime" if _FRESH.get() else mode()
    if how == "plain":
        return PLAIN
    key = make_key(what, device_name(device), shape)
    with _LOCK:
        if key in _MEMORY and (how != "retime" or key in _RETIMED and not _FRESH.get()):
            return _MEMORY[key].chosen
        if how == "cache":
            found = read_cache().get(key)
            if found is not None:
                _MEMORY[key] = found
                return found.chosen
        choice = timed(what, device_name(device), shape, measure)
        _MEMORY[key] = choice
        _RETIMED.add(key)
        LOG.info(
            "fast path %s on %s, %s: %s (%s; timed in %.2f s)",
            what,
            choice.device,
            shape,
            choice.chosen,
            describe(choice),
            choice.cost,
        )
        if how != "memory":
            write_cache(choice)
        return choice.chosen


def timed(what: str, device: str, shape: str, measure: Callable[[], dict[str, float]]) -> Choice:
    """Run ``measure`` and make the choice from its times (the plain op where it fails or nothing wins)."""
    start = time.perf_counter()
    _TIMING.append(0.0)
    try:
        seconds = {str(k): float(v) for k, v in measure().items()}
    except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError) as e:
        LOG.warning("timing the fast paths of %s failed (%s): the plain op runs", what, e)
        seconds = {}
    finally:
        inner = _TIMING.pop()
        if _TIMING:
            _TIMING[-1] += time.perf_counter() - start
    chosen = PLAIN
    if PLAIN in seconds and all(v > 0 for v in seconds.values()):
        best = min(seconds, key=seconds.get)
        if seconds[best] < (1 - MARGIN) * seconds[PLAIN]:
            chosen = best
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cost = time.perf_counter() - start - inner
    return Choice(what, device, shape, chosen, seconds, when, torch.__version__, torch.get_num_threads(), cost)


def best_of(fn: Callable[[], object], device: torch.device | str = "cpu", repeats: int = 5, budget: float = 0.1):
    """The shortest of up to ``repeats`` timed runs of ``fn`` (after one untimed run), in seconds; fewer runs where
    they would take more than ``budget`` seconds in all. CUDA work is waited for before each clock reading."""
    device = torch.device(device)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    start = now()
    fn()
    times = []
    for _ in range(repeats):
        t = now()
        fn()
        times.append(now() - t)
        if now() - start > budget:
            break
    return min(times)


def calibrate(model, batches: tuple[int, ...] = (1, 8)) -> list[Choice]:
    """Time every fast path of greedy decoding with ``model`` now, for each batch size (rows), whatever is
    cached, and keep the results as ``choose`` does; returns the choices made."""
    from .decoding.packed import onednn_available, packing_pays
    from .decoding.speculative import chosen_draft

    if mode() == "plain":
        raise ValueError(f"{ENV}=plain: the fast paths are off, there is nothing to time")
    before = dict(_MEMORY)
    token = _FRESH.set(True)
    try:
        with torch.no_grad():
            W = model.decoder.token_embedding.weight
            for rows in batches:
                if W.device.type == "cpu" and W.dtype == torch.float32 and onednn_available():
                    packing_pays(W, rows)
                chosen_draft(model, rows)
    finally:
        _FRESH.reset(token)
    return sorted((c for k, c in _MEMORY.items() if before.get(k) is not c), key=lambda c: (c.what, c.shape))


def choices(what: str | None = None) -> list[Choice]:
    """Every choice known here: this process's and, unless the disk cache is off, the cache file's (sorted)."""
    with _LOCK:
        known = {} if mode() in ("memory", "plain") else read_cache()
        known.update(_MEMORY)
    return sorted((c for c in known.values() if what in (None, c.what)), key=lambda c: (c.what, c.device, c.shape))


def describe(choice: Choice) -> str:
    """``plain 8.10 ms, packed 6.02 ms``: each candidate's time per step."""
    return ", ".join(f"{name} {s * 1e3:.3g} ms" for name, s in choice.seconds.items()) or "not timed"


# ----------------------------------------------------------------------------- the file


def read_cache() -> dict[str, Choice]:
    """The cache file's choices by key; an absent, unreadable or malformed file (or entry) counts as none."""
    try:
        data = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("choices"), list):
        return {}
    out = {}
    for entry in data["choices"]:
        try:
            choice = Choice(**entry)
            ok = isinstance(choice.chosen, str) and all(isinstance(v, (int, float)) for v in choice.seconds.values())
            ok = ok and isinstance(choice.cost, (int, float))
        except (TypeError, AttributeError):
            continue
        if ok:
            out[choice.key] = choice
    return out


def write_cache(choice: Choice) -> None:
    """Add ``choice`` to the cache file (atomically, under a file lock); a file that cannot be written is skipped."""
    import filelock

    from .files import write_text

    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with filelock.FileLock(f"{path}.lock", timeout=10):
            kept = read_cache()
            kept[choice.key] = choice
            entries = [asdict(c) for c in sorted(kept.values(), key=lambda c: c.key)]
            write_text(path, json.dumps({"format": FORMAT, "choices": entries}, indent=1) + "\n")
    except (OSError, filelock.Timeout) as e:
        LOG.debug("the fast-path cache %s was not written: %s", path, e)


# ----------------------------------------------------------------------------- the machine


def machine() -> dict[str, str]:
    """What the choices depend on: the CPU, its cores, torch and its threads, CUDA's devices if any."""
    out = {
        "cpu": f"{cpu_model()} ({platform.machine()})",
        "cores": str(os.cpu_count()),
        "torch": f"{torch.__version__}, {torch.get_num_threads()} threads",
    }
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["cuda"] = f"{torch.version.cuda}: {', '.join(names)}"
    else:
        out["cuda"] = "none"
    out["cache"] = f"{cache_file()} ({ENV}={mode()})"
    return out
