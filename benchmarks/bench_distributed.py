"""Dataset scale: torchrun ranks against one process, and the export's throughput against the disk.

    python benchmarks/bench_distributed.py [--clips 8] [--repeats 3]

On the shipped toy model, over copies of its samples (``--clips`` of them), each run a fresh
``whisper-lens`` command in its own process(es), the two set-ups interleaved:

1. ``sweep --stack both --removals 0 2 4``: clips per second of the sweep's rounds (the command's own
   "swept N of N clips in X s": model loading and start-up excluded; end-to-end wall time beside it),
   ``1 process x 2 threads`` against ``torchrun --nproc-per-node 2`` with 1 thread per rank.
   Target: the ranks >= 0.8x the single process.
2. The per-rank rate (1 process x 1 thread) and the exchange after each round (``all_gather_object``
   of one round's rows between 2 gloo ranks, timed under torchrun): the figures a run on N machines
   is projected from.
3. ``export --trace 'encoder.*' --positions all`` (every encoder activation, whole windows, fp32):
   MB/s written, against the disk's sequential write speed (the same folder, fsync'd).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import table

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "weights" / "toy" / "samples"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
SWEEP = ["sweep", "--stack", "both", "--removals", "0", "2", "4", "--batch-size", "4"]
EXPORT = ["export", "--trace", "encoder.*", "--positions", "all", "--batch-size", "4"]


def dataset(folder: Path, n: int) -> Path:
    """``n`` clips: the toy's samples copied round-robin under new names."""
    samples = sorted(SAMPLES.glob("*.wav"))
    folder.mkdir()
    for i in range(n):
        shutil.copy(samples[i % len(samples)], folder / f"clip{i:04d}.wav")
    return folder


def command(args: list[str], threads: int, ranks: int) -> tuple[float, float, str]:
    """Run ``whisper-lens args`` (under torchrun for 2 ranks): (seconds the command reports, wall seconds, stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    launch = TORCHRUN + ["-m", "whisper_lens"] if ranks > 1 else [sys.executable, "-m", "whisper_lens"]
    started = time.perf_counter()
    done = subprocess.run(launch + args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    seconds = float(re.search(r" in ([0-9.]+) s \(", done.stdout)[1])
    return seconds, wall, done.stdout


def disk_write_speed(folder: Path, megabytes: int = 256) -> float:
    """MB/s of writing ``megabytes`` in 8 MB blocks, fsync'd, into ``folder``."""
    block = os.urandom(8 << 20)
    path = folder / "disk-speed.bin"
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(megabytes // 8):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return megabytes * (1 << 20) / 1e6 / seconds


def exchange(repeats: int = 200) -> None:
    """Under torchrun: time the exchange after a round (all_gather_object of a round's rows)."""
    import torch.distributed as dist

    from whisper_lens.distributed import Ranks

    row = {"stack": "encoder", "removed": 2, "blocks_removed": "2 3", "clip": "speaker/clip0000.flac",
           "text": "every woman reads five balls " * 4, "wer": 0.25, "cer": 0.1, "avg_logprob": -0.2,
           "compression_ratio": 1.1, "longest_repeat": 2, "max_repeats": 1, "tokens_per_second": 3.2,
           "empty": False}  # fmt: skip
    part = {"clips": {f"c{i}": "1234:-" for i in range(8)}, "rows": [row] * 8 * 50}  # 8 clips x 50 settings
    with Ranks.join("cpu") as ranks:
        ranks.gather(part)
        started = time.perf_counter()
        for _ in range(repeats):
            ranks.gather((part, None))
        seconds = (time.perf_counter() - started) / repeats
        if ranks.rank == 0:
            print(f"exchange: {seconds * 1e3:.2f} ms per round ({len(part['rows'])} rows per rank)")
        dist.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--exchange", action="store_true", help=argparse.SUPPRESS)  # the torchrun child of part 2
    args = parser.parse_args()
    if args.exchange:
        return exchange()

    work = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        clips = str(dataset(work / "clips", args.clips))
        setups = {"1 process x 2 threads": (2, 1), "2 ranks x 1 thread": (1, 2), "1 process x 1 thread": (1, 1)}
        sweeps: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
        exports: dict[str, list[tuple[float, float]]] = {k: [] for k in list(setups)[:2]}
        for r in range(args.repeats):
            for name, (threads, ranks) in setups.items():
                out = work / f"sweep-{r}-{ranks}-{threads}"
                seconds, wall, _ = command(SWEEP + [clips, "--out", str(out)], threads, ranks)
                sweeps[name].append((args.clips / seconds, wall))
            for name, (threads, ranks) in list(setups.items())[:2]:
                out = work / f"export-{r}-{ranks}"
                seconds, _, stdout = command(EXPORT + [clips, "--out", str(out)], threads, ranks)
                megabytes = float(re.search(r"clips, ([0-9.]+) MB in", stdout)[1])
                exports[name].append((megabytes / seconds, megabytes))
                shutil.rmtree(out)
        disk = statistics.median(disk_write_speed(work) for _ in range(3))
        exchanged = subprocess.run(TORCHRUN + [__file__, "--exchange"], capture_output=True, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = statistics.median(rate for rate, _ in sweeps["1 process x 2 threads"])
    rows = [["sweep (toy, 6 settings)", "clips/s (median)", "runs", "vs 1 process x 2 threads", "wall s (median)"]]
    for name, runs in sweeps.items():
        rate = statistics.median(r for r, _ in runs)
        rows.append([name, f"{rate:.2f}", " ".join(f"{r:.2f}" for r, _ in runs), f"{rate / base:.2f}x",
                     f"{statistics.median(w for _, w in runs):.1f}"])  # fmt: skip
    print(table(rows))
    print()
    rows = [["export (every encoder name, fp32)", "MB/s (median)", "runs", "vs disk"]]
    for name, runs in exports.items():
        rate = statistics.median(r for r, _ in runs)
        rows.append([name, f"{rate:.1f}", " ".join(f"{r:.1f}" for r, _ in runs), f"{rate / disk:.3f}"])
    rows.append(["disk, sequential write, fsync'd", f"{disk:.0f}", "", "1"])
    print(table(rows))
    print(f"({exports['2 ranks x 1 thread'][0][1]:.0f} MB per export of {args.clips} clips)")
    print()
    per_rank = statistics.median(r for r, _ in sweeps["2 ranks x 1 thread"]) / 2
    print(exchanged.stdout.strip() or f"exchange: not measured ({exchanged.stderr[-300:]})")
    print(f"per rank: {per_rank:.3f} clips/s; N machines x R ranks (one core each) sweep about N x R x {per_rank:.3f}")
    hours = ", ".join(f"{2620 / (n * 2 * per_rank) / 3600:.2f} h" for n in (1, 2, 4, 8))
    print(f"clips/s while a round's compute outweighs its exchange; 2,620 clips on 1, 2, 4, 8 machines x 2: {hours}")


if __name__ == "__main__":
    main()
