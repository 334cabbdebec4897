"""Log-mel features of a batch of 30-second clips: whisper-lens vs openai-whisper vs transformers.

Run from the repository root:

    python benchmarks/bench_mel.py                 # 16 clips on the CPU
    python benchmarks/bench_mel.py --device cuda   # where a GPU is present

All three are timed in this process on the same audio (--repeats interleaved rounds after a warm-up)
and reported as best and median times and as ratios to whisper-lens (ratio > 1: whisper-lens
is faster). The
largest difference from openai-whisper's features is printed as a parity check.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from whisper_lens.audio import N_SAMPLES, SAMPLE_RATE, log_mel_spectrogram  # noqa: E402


def make_clips(batch: int) -> np.ndarray:
    """Speech-like test audio: noise plus a few tones, different loudness per clip."""
    rng = np.random.default_rng(0)
    t = np.arange(N_SAMPLES) / SAMPLE_RATE
    clips = []
    for i in range(batch):
        tones = sum(np.sin(2 * np.pi * f * t) for f in rng.uniform(100, 4000, size=3))
        clips.append((0.5 ** (i % 4)) * (0.05 * rng.standard_normal(N_SAMPLES) + 0.1 * tones))
    return np.stack(clips).astype(np.float32)  # (B, N_SAMPLES)


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn round after round.

    Interleaving makes a burst of load from other processes hit all implementations alike,
    so the ratios stay meaningful on a shared machine.
    """

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for fn in fns.values():  # warm-up: filter caches, FFT plans, lazy imports
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="number of 30-second clips")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per implementation")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n-mels", type=int, default=80, choices=(80, 128))
    args = parser.parse_args()

    import whisper.audio
    from transformers import WhisperFeatureExtractor

    clips = make_clips(args.batch)
    batch = torch.from_numpy(clips).to(args.device)  # (B, N_SAMPLES)
    extractor = WhisperFeatureExtractor(feature_size=args.n_mels)

    def ours():
        return log_mel_spectrogram(batch, n_mels=args.n_mels)

    def openai_one_by_one():
        return torch.stack([whisper.audio.log_mel_spectrogram(clip, n_mels=args.n_mels) for clip in batch])

    def openai_batch():
        return whisper.audio.log_mel_spectrogram(batch, n_mels=args.n_mels)

    def transformers_extractor():
        return extractor(list(clips), sampling_rate=SAMPLE_RATE, return_tensors="pt", device=args.device).input_features

    parity = (ours() - openai_one_by_one()).abs().max().item()
    rows = [
        ("whisper-lens (batch)", ours),
        ("openai-whisper (one clip at a time)", openai_one_by_one),
        ("openai-whisper (whole batch)", openai_batch),
        ("transformers WhisperFeatureExtractor", transformers_extractor),
    ]
    times = time_interleaved(dict(rows), args.repeats, args.device)
    best = {name: min(t) for name, t in times.items()}
    median = {name: statistics.median(t) for name, t in times.items()}

    print(
        f"log-mel of {args.batch} x 30 s clips, n_mels={args.n_mels}, device={args.device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} interleaved rounds"
    )
    ours_name = rows[0][0]
    print(f"{'implementation':40s} {'best ms':>9s} {'median ms':>10s} {'best / ours':>12s} {'median / ours':>14s}")
    for name, _ in rows:
        print(
            f"{name:40s} {best[name] * 1e3:9.1f} {median[name] * 1e3:10.1f} "
            f"{best[name] / best[ours_name]:12.2f} {median[name] / median[ours_name]:14.2f}"
        )
    print(f"max |whisper-lens - openai-whisper| = {parity:.2e}")


if __name__ == "__main__":
    main()
