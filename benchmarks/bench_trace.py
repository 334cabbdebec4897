"""Cost of recording: a full trace against transformers' eager outputs, and a residual trace against no trace.

    python benchmarks/bench_trace.py [--model tiny] [--batch 4] [--tokens 64] [--repeats 5]

1. Full trace (every residual stream + every attention pattern, self and cross) vs transformers
   eager with output_hidden_states=True and output_attentions=True. Every recorded tensor is
   read (summed) inside the timed region, so nothing can be skipped. Target: >= 1.5x faster,
   peak memory no higher (peak resident memory above the level before the call).
2. Residual-only trace vs our untraced forward. Target: within 10%.
3. nbytes of a full trace (every name) of each official size at batch 1, from the dims alone.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import torch
from common import OFFICIAL, forward_setup, interleaved, table

from whisper_lens.model import activation_shapes

FULL = ["*.embed", "*.resid_pre", "*.resid_mid", "*.resid_mid_cross", "*.resid_post", "encoder.ln_post", "decoder.ln",
        "*.attn.pattern", "*.cross_attn.pattern"]  # fmt: skip
RESID = ["*.embed", "*.resid_pre", "*.resid_mid", "*.resid_mid_cross", "*.resid_post", "encoder.ln_post", "decoder.ln"]


def read_all(tensors) -> float:
    return float(sum(x.sum() for x in tensors))


def ours_full(model, mel, tokens) -> float:
    return read_all(model.run(mel, tokens, trace=FULL).trace.values())


def hf_full(hf, mel, tokens) -> float:
    out = hf(input_features=mel, decoder_input_ids=tokens, output_hidden_states=True, output_attentions=True)
    parts = [*out.encoder_hidden_states, *out.decoder_hidden_states, *out.encoder_attentions,
             *out.decoder_attentions, *out.cross_attentions]  # fmt: skip
    return read_all(parts)


def rss() -> int:
    """Resident set size of this process, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn) -> float:
    """MiB of peak resident memory above the current level while ``fn`` runs (sampled every millisecond)."""
    gc.collect()
    base, peak, done = rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], rss()) - base) / 2**20


def main() -> None:
    args, hf, ours, mel, tokens = forward_setup(__doc__.splitlines()[0], attn="eager")
    with torch.inference_mode():
        # equality of the shared tensors is tests/test_trace.py's job; ours records more (resid_mid, ...)
        t = interleaved({
            "whisper-lens full trace": lambda: ours_full(ours, mel, tokens),
            "transformers eager + hidden states + attentions": lambda: hf_full(hf, mel, tokens),
            "whisper-lens residual trace": lambda: read_all(ours.run(mel, tokens, trace=RESID).trace.values()),
            "whisper-lens no trace": lambda: ours(mel, tokens),
        }, repeats=args.repeats)  # fmt: skip
        mem_ours = peak_memory(lambda: ours_full(ours, mel, tokens))
        mem_hf = peak_memory(lambda: hf_full(hf, mel, tokens))

    print(f"{args.model} shape, batch {args.batch}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(table([["run", "median s"], *[[k, f"{v:.3f}"] for k, v in t.items()]]))
    speedup = t["transformers eager + hidden states + attentions"] / t["whisper-lens full trace"]
    overhead = t["whisper-lens residual trace"] / t["whisper-lens no trace"] - 1
    print(f"full trace speed-up over transformers: {speedup:.2f}x (target >= 1.5x)")
    print(f"peak memory above the model: whisper-lens {mem_ours:.0f} MiB, transformers {mem_hf:.0f} MiB "
          f"(ratio {mem_ours / mem_hf:.2f}, target <= 1.0)")  # fmt: skip
    print(f"residual-only trace overhead over no trace: {100 * overhead:+.1f}% (target within 10%)")

    rows = [["model", "names", "full trace, batch 1, 1 token", "full trace, batch 1, 448 tokens"]]
    for name in ["tiny", "base", "small", "medium", "large-v3", "large-v3-turbo"]:
        dims = OFFICIAL[name][1]
        sizes = [sum(4 * torch.Size(s).numel() for s in activation_shapes(dims, 1, n).values()) for n in (1, 448)]
        rows.append([name, str(len(activation_shapes(dims))), *[f"{b / 2**30:.2f} GiB" for b in sizes]])
    print("\nfp32 nbytes of a trace of every name (trace_dtype=torch.float16 halves it):")
    print(table(rows))


if __name__ == "__main__":
    main()
