"""The products a decoding step is made of, each layout against the plain one (CPU, fp32, random data).

1. ``kernels.linear`` against ``F.linear`` for the shapes of a tiny / base decoding step: the
   unembedding (51865 x D) and a D x D projection, at 1 and 8 rows, plain (MKL layouts) and with
   the weight packed by oneDNN (``Kernels.for_decoding``, 8 rows); and an encoder-sized product
   (12000 rows, oneDNN) against ``F.linear``. Figures: time ratio F.linear / ours. Distinct copies
   of the weight (96 MiB in all) are cycled, so that, as in a step, each product reads its weight
   from memory: a small weight read again from the cache would time a case that never occurs.
2. Cross-attention of one query over 8 clips' audio keys/values: ``attend_cached`` (values stored
   transposed) against ``scaled_dot_product_attention`` on the plain layout, as GB/s of keys and
   values read. Six layers' buffers are cycled so the reads come from memory, not the cache.

    python benchmarks/bench_products.py [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import interleaved, table

from whisper_lens.kernels import STEP_ROWS, attend_cached, linear, onednn_available, onednn_linear, onednn_pack

VOCAB = 51865
COLD_BYTES = 96 * 2**20  # distinct weights cycled per timing: three times a 32 MiB last-level cache


def linear_case(out: int, D: int, n: int, repeats: int) -> list[str]:
    """One row of the first table: F.linear's time and our speed-ups (plain, packed) for n rows x (out, D)."""
    g = torch.Generator().manual_seed(out + n)
    copies = -(-COLD_BYTES // (out * D * 4))  # as in a step, the weights come from memory, not the cache
    ws = [torch.randn(out, D, generator=g) / 20 for _ in range(copies)]
    b, x = torch.randn(out, generator=g), torch.randn(n, D, generator=g)
    fns = {"F.linear": lambda: [F.linear(x, w, b) for w in ws], "ours": lambda: [linear(x, w, b) for w in ws]}
    if onednn_available() and 1 < n <= STEP_ROWS:
        packs = [onednn_pack(w, n) for w in ws]
        fns["ours, packed"] = lambda: [onednn_linear(x, p, b) for p in packs]
    t = interleaved(fns, repeats=repeats if n <= STEP_ROWS else max(3, repeats // 5))
    ups = [f"{t['F.linear'] / t[k]:.2f}x" if k in t else "" for k in ("ours", "ours, packed")]
    return [f"{out} x {D}", str(n), f"{t['F.linear'] / copies * 1e3:.3f}", *ups]


def attention_case(H: int, repeats: int) -> list[str]:
    """One row of the second table: one query per clip and head over 8 clips' audio keys/values."""
    B, S, Dh, layers = 8, 1500, 64, 6
    g = torch.Generator().manual_seed(H)
    q = torch.randn(B, H, 1, Dh, generator=g)
    ks = [torch.randn(B, H, S, Dh, generator=g) for _ in range(layers)]
    vs = [torch.randn(B, H, S, Dh, generator=g) for _ in range(layers)]
    vts = [v.mT.contiguous() for v in vs]  # (B, H, Dh, S): the cache's storage
    want = F.scaled_dot_product_attention(q, ks[0], vs[0])
    torch.testing.assert_close(attend_cached(q, ks[0], vts[0], None), want, atol=1e-5, rtol=1e-5)
    t = interleaved({
        "sdpa": lambda: [F.scaled_dot_product_attention(q, k, v) for k, v in zip(ks, vs, strict=True)],
        "ours": lambda: [attend_cached(q, k, vt, None) for k, vt in zip(ks, vts, strict=True)],
    }, repeats=repeats)  # fmt: skip
    nbytes = 2 * ks[0].numel() * 4 * layers
    gbs = [f"{nbytes / t[k] / 1e9:.1f}" for k in ("sdpa", "ours")]
    return [f"{B} x {H} x {S} x {Dh}", *gbs, f"{t['sdpa'] / t['ours']:.2f}x"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN linear: {onednn_available()}")
    shapes = [(out, D, n) for D in (384, 512) for out, n in ((VOCAB, 1), (VOCAB, 8), (D, 1), (D, 8), (D, 12000))]
    rows = [linear_case(out, D, n, args.repeats) for out, D, n in shapes]
    print(table([["weight (out x in)", "rows", "F.linear ms", "ours, speed-up", "ours packed, speed-up"], *rows]))
    print()
    rows = [attention_case(H, args.repeats) for H in (6, 8)]  # tiny, base
    print(table([["one query over (B x H x S x Dh)", "SDPA GB/s", "attend_cached GB/s", "speed-up"], *rows]))


if __name__ == "__main__":
    main()
