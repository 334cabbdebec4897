"""The products decoding chooses (decoding/packed.py, decoding/cache.py), each against the plain one (CPU, fp32).

1. A linear product of a tiny / base decoding step, ``F.linear`` against the weight packed by
   oneDNN for that many rows (``onednn_pack``): the unembedding (51865 x D) and a D x D projection
   at 1, 5, 8 and 40 rows, and an encoder-sized product (12000 rows) in oneDNN unpacked. ``packed``
   packs only the unembedding (4 to 64 rows) and leaves everything else to ``F.linear``: the
   speed-ups say where oneDNN pays on this machine (the encoder-sized product's few per cent did
   not make the encoder as a whole faster, so the encoder runs as ``F.linear``).
   Distinct copies of the weight (96 MiB in all) are cycled, so that, as in a step, each product
   reads its weight from memory: a small weight read again from the cache would time a case that
   never occurs.
2. Cross-attention of one query over B clips' audio keys/values, as GB/s of keys and values read:
   ``scaled_dot_product_attention`` on contiguous (B, H, S, Dh) keys and values; the same with the
   values as a transposed view (which sends SDPA down its slower path); and what a decoding step
   runs, ``KVCache.holding(...).attend``: keys stored transposed (B, H, Dh, S), softmax(q k^T) v
   written out. The speed-up is the last over the first. Layers' buffers are cycled so that the
   reads come from memory, not the cache.
3. ``--drafts``: what a speculative draft's guess costs (decoding/speculative.py). The unembedding
   (51865 x D) and a D x D projection at 1, 2, 4 and 8 rows in fp32 (``F.linear``), in bf16
   (weight and input cast, as the "copy" and "head" drafts run) and in int8 (the "int8" draft's
   dynamically quantised linear layer, one scale per output row), with each one's speed-up over
   fp32 (how often the guesses agree with fp32 is measured on real speech: ``bench_decode.py
   --speculative``); and the timestamp rule's best text token over a step's logits (N, V), ``amax`` against
   ``max().values`` (decoding/filters.py); and what small ops cost whatever their size: the greedy
   choice over the vocabulary (``argmax`` against ``max().indices`` and ``amax``) and ``F.gelu`` on
   one and ten rows of tiny's MLP.

    python benchmarks/bench_products.py [--repeats 20]
    python benchmarks/bench_products.py --drafts [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import interleaved, table

from whisper_lens.decoding.cache import KVCache
from whisper_lens.decoding.packed import onednn_available, onednn_linear, onednn_pack
from whisper_lens.decoding.speculative import int8_head

VOCAB = 51865
STEP_ROWS = 64  # this table times a packed copy up to this many rows, oneDNN's plain product beyond
COLD_BYTES = 96 * 2**20  # distinct weights cycled per timing: three times a 32 MiB last-level cache


def linear_case(out: int, D: int, n: int, repeats: int) -> list[str]:
    """One row of the first table: F.linear's time and oneDNN's speed-up for n rows x (out, D)."""
    g = torch.Generator().manual_seed(out + n)
    copies = -(-COLD_BYTES // (out * D * 4))  # as in a step, the weights come from memory, not the cache
    ws = [torch.randn(out, D, generator=g) / 20 for _ in range(copies)]
    b, x = torch.randn(out, generator=g), torch.randn(n, D, generator=g)
    fns = {"F.linear": lambda: [F.linear(x, w, b) for w in ws]}
    if onednn_available() and n > STEP_ROWS:
        fns["oneDNN"] = lambda: [onednn_linear(x, w, b) for w in ws]
    elif onednn_available() and n > 1:
        packs = [onednn_pack(w, n) for w in ws]
        fns["oneDNN"] = lambda: [onednn_linear(x, p, b) for p in packs]
    t = interleaved(fns, repeats=repeats if n <= STEP_ROWS else max(3, repeats // 5))
    up = f"{t['F.linear'] / t['oneDNN']:.2f}x" if "oneDNN" in t else ""
    how = "plain" if n > STEP_ROWS else "packed" if n > 1 else ""
    return [f"{out} x {D}", str(n), f"{t['F.linear'] / copies * 1e3:.3f}", how, up]


def attention_case(B: int, H: int, repeats: int) -> list[str]:
    """One row of the second table: one query per clip and head over B clips' audio keys/values."""
    S, Dh, layers = 1500, 64, max(6, 48 // B)  # enough layers' buffers that the reads come from memory
    g = torch.Generator().manual_seed(H + B)
    q = torch.randn(B, H, 1, Dh, generator=g)
    ks = [torch.randn(B, H, S, Dh, generator=g) for _ in range(layers)]
    vs = [torch.randn(B, H, S, Dh, generator=g) for _ in range(layers)]
    vts = [v.mT.contiguous().mT for v in vs]  # the same values, stored (B, H, Dh, S)
    audio = [KVCache.holding(k.transpose(1, 2), v.transpose(1, 2)) for k, v in zip(ks, vs, strict=True)]
    want = F.scaled_dot_product_attention(q, ks[0], vs[0])
    torch.testing.assert_close(F.scaled_dot_product_attention(q, ks[0], vts[0]), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(audio[0].attend(q, None), want, atol=1e-5, rtol=1e-5)
    t = interleaved({
        "contiguous": lambda: [F.scaled_dot_product_attention(q, k, v) for k, v in zip(ks, vs, strict=True)],
        "view": lambda: [F.scaled_dot_product_attention(q, k, v) for k, v in zip(ks, vts, strict=True)],
        "audio": lambda: [c.attend(q, None) for c in audio],
    }, repeats=repeats)  # fmt: skip
    nbytes = 2 * ks[0].numel() * 4 * layers
    gbs = [f"{nbytes / t[k] / 1e9:.1f}" for k in ("contiguous", "view", "audio")]
    return [f"{B} x {H} x {S} x {Dh}", *gbs, f"{t['contiguous'] / t['audio']:.2f}x"]


def draft_case(out: int, D: int, n: int, repeats: int) -> list[str]:
    """One row of the drafts table: fp32 ``F.linear``'s time for n rows x (out, D), and bf16's and int8's speed-ups.

    Each kind cycles COLD_BYTES of its own copies (four times as many int8 copies as fp32 ones), so that
    each product reads its weight from memory, as in a step; times are per product."""
    g = torch.Generator().manual_seed(out + n)
    w = torch.randn(out, D, generator=g) / 20
    x = torch.randn(n, D, generator=g)
    count = {k: -(-COLD_BYTES // (out * D * size)) for k, size in (("fp32", 4), ("bf16", 2), ("int8", 1))}
    fp32 = [w.clone() for _ in range(count["fp32"])]
    bf16 = [w.bfloat16() for _ in range(count["bf16"])]
    fns = {"fp32": lambda: [F.linear(x, v) for v in fp32], "bf16": lambda: [F.linear(x.bfloat16(), h) for h in bf16]}
    if int8_head(w) is not None:  # where this build has torch's dynamic quantisation
        heads = [int8_head(w) for _ in range(count["int8"])]
        fns["int8"] = lambda: [h(x) for h in heads]
    t = {k: v / count[k] for k, v in interleaved(fns, repeats=repeats).items()}  # seconds per product
    ups = [f"{t['fp32'] / t[k]:.2f}x" if k in t else "n/a" for k in ("bf16", "int8")]
    return [f"{out} x {D}", str(n), f"{t['fp32'] * 1e3:.3f}", *ups]


def per_call_us(fns: dict, repeats: int, calls: int = 100) -> dict[str, float]:
    """Microseconds per call of each function, ``calls`` calls per timing, interleaved."""
    t = interleaved({k: (lambda f=f: [f() for _ in range(calls)]) for k, f in fns.items()}, repeats=repeats)
    return {k: v / calls * 1e6 for k, v in t.items()}


def best_text_token(N: int, repeats: int) -> list[str]:
    """The timestamp rule's best text token of a step's logits (N, V): ``amax`` against ``max().values``, in µs."""
    logits = torch.randn(N, VOCAB, generator=torch.Generator().manual_seed(N))[:, :50257]  # (N, text tokens)
    assert torch.equal(logits.amax(-1), logits.max(-1).values)
    us = per_call_us({"amax": lambda: logits.amax(-1), "max": lambda: logits.max(-1).values}, repeats)
    return [str(N), f"{us['amax']:.1f}", f"{us['max']:.1f}", f"{us['max'] / us['amax']:.2f}x"]


def small_op_costs(repeats: int) -> list[list[str]]:
    """What a decoding step's small ops cost here whatever their size: the greedy choice over the vocabulary
    (``argmax``, ``max().indices``, and ``amax`` for comparison) at 1 and 8 rows, and ``F.gelu`` on one and ten
    rows of tiny's MLP (1,536 and 15,360 numbers), in µs per call."""
    rows = []
    for N in (1, 8):
        logits = torch.randn(N, VOCAB, generator=torch.Generator().manual_seed(N))  # (N, V)
        assert torch.equal(logits.argmax(-1), logits.max(-1).indices)
        us = per_call_us({"argmax": lambda x=logits: x.argmax(-1), "max": lambda x=logits: x.max(-1).indices,
                          "amax": lambda x=logits: x.amax(-1)}, repeats)  # fmt: skip
        rows.append([f"{N} x {VOCAB} logits", f"argmax {us['argmax']:.1f}",
                     f"max().indices {us['max']:.1f}", f"amax {us['amax']:.1f}"])  # fmt: skip
    for n in (1536, 15360):
        x = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(n))
        us = per_call_us({"gelu": lambda x=x: F.gelu(x)}, repeats)
        rows.append([f"{n} numbers", f"F.gelu {us['gelu']:.1f}", "", ""])
    return rows


def drafts(repeats: int) -> None:
    """The three tables of ``--drafts``."""
    shapes = [(out, D, n) for D in (384, 512) for out in (VOCAB, D) for n in (1, 2, 4, 8)]
    rows = [draft_case(out, D, n, repeats) for out, D, n in shapes]
    print(table([["weight (out x in)", "rows", "fp32 F.linear ms", "bf16 speed-up", "int8 speed-up"], *rows]))
    print()
    rows = [best_text_token(N, repeats) for N in (1, 8, 40)]
    print(table([["rows", "amax µs", "max().values µs", "amax speed-up"], *rows]))
    print()
    print(table([["small op (µs per call)", "", "", ""], *small_op_costs(repeats)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--drafts", action="store_true", help="only the drafts' products (bf16, int8) and amax")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN linear: {onednn_available()}")
    if args.drafts:
        return drafts(args.repeats)
    shapes = [(out, D, n) for D in (384, 512) for out in (VOCAB, D) for n in (1, 5, 8, 40)]
    shapes += [(D, D, 12000) for D in (384, 512)]
    rows = [linear_case(out, D, n, args.repeats) for out, D, n in shapes]
    print(table([["weight (out x in)", "rows", "F.linear ms", "oneDNN", "oneDNN speed-up"], *rows]))
    print()
    rows = [attention_case(B, H, args.repeats) for H in (6, 8) for B in (1, 2, 8)]  # tiny, base
    print(table([["one query over (B x H x S x Dh)", "SDPA, contiguous GB/s", "SDPA, values as a view GB/s",
                  "KVCache.holding GB/s", "speed-up"], *rows]))  # fmt: skip


if __name__ == "__main__":
    main()
