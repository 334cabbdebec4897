"""Forward pass (encoder + 64 decoder tokens, batch 4, tiny shape, random weights): ours vs transformers (SDPA).

    python benchmarks/bench_forward.py [--model tiny] [--batch 4] [--tokens 64] [--repeats 5]

Prints median times and the ratio ours / transformers (target: <= 1.0).
"""

from __future__ import annotations

import torch
from common import forward_setup, interleaved, table


def main() -> None:
    args, hf, ours, mel, tokens = forward_setup(__doc__.splitlines()[0], attn="sdpa")
    with torch.inference_mode():
        torch.testing.assert_close(ours(mel, tokens), hf(input_features=mel, decoder_input_ids=tokens).logits,
                                   atol=1e-4, rtol=0)  # fmt: skip
        t = interleaved({
            "whisper-lens": lambda: ours(mel, tokens),
            "transformers (sdpa)": lambda: hf(input_features=mel, decoder_input_ids=tokens),
        }, repeats=args.repeats)  # fmt: skip
    ratio = t["whisper-lens"] / t["transformers (sdpa)"]
    print(f"forward, {args.model} shape, batch {args.batch}, {args.tokens} tokens, {torch.get_num_threads()} threads")
    print(table([["implementation", "median s"], *[[k, f"{v:.3f}"] for k, v in t.items()]]))
    print(f"ratio whisper-lens / transformers: {ratio:.2f} (target <= 1.0)")


if __name__ == "__main__":
    main()
