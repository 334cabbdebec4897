"""Shared pieces of the benchmarks: random-weight models of official shapes, and a fair timer.

Every benchmark compares against a reference *in the same process*, interleaving the runs, and
reports ratios: the machine is noisy, absolute times drift, ratios much less.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from whisper_lens.loading import OFFICIAL, hf_config_from_dims, load_model  # noqa: E402
from whisper_lens.model import ModelDims  # noqa: E402


def hf_and_ours(name: str, attn: str = "sdpa", seed: int = 0):
    """A transformers model of an official shape with random weights, and ours loaded from its save_pretrained."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    dims: ModelDims = OFFICIAL[name][1]
    config = WhisperConfig(**hf_config_from_dims(dims))
    torch.manual_seed(seed)
    hf = WhisperForConditionalGeneration(config).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d)
        hf = WhisperForConditionalGeneration.from_pretrained(d, attn_implementation=attn).eval()
    return hf, ours


def forward_setup(description: str, attn: str):
    """Parse --model/--batch/--tokens/--repeats; build both models and a random batch: (args, hf, ours, mel, tokens)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    hf, ours = hf_and_ours(args.model, attn=attn)
    d = ours.dims
    mel = torch.randn(args.batch, d.n_mels, 2 * d.n_audio_ctx)
    tokens = torch.randint(0, d.n_vocab, (args.batch, args.tokens))
    return args, hf, ours, mel, tokens


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, run round-robin so drift hits all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def table(rows: list[list[str]]) -> str:
    """A GitHub markdown table, first row the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
