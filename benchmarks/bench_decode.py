"""Greedy decoding speed: whisper-lens' static-cache loop against transformers and openai-whisper.

All three decode the same random-weight model (official tiny / base shapes) from the same log-mel
input, for exactly 100 new tokens (end-of-text is suppressed, so no run stops early), prompt
<|startoftranscript|><|en|><|transcribe|><|notimestamps|>, on the CPU in fp32. Two timings:
"decoding loop" starts every implementation from the same encoder output (each one's documented
way to skip its encoder: our ``audio_features=``, transformers' ``encoder_outputs=``, openai-whisper's
decode given features instead of a mel), so tokens per second measure the decoding alone; "with
encoder" starts from the log-mel, as a user would call it, and the encoder (the same work for all
three, ~0.5 s for tiny on one core) dilutes the ratio. Runs are interleaved round-robin in one
process and the report is the ratio of tokens per second (ours / theirs), the machine's noise
cancelling out.

transformers runs ``GenerationMixin.generate`` with ``cache_implementation="static"`` (its static
KV cache) and ``min_new_tokens`` = ``max_new_tokens``; openai-whisper runs ``whisper.decoding.decode``
(its own loop with a growing cache) with EOT in ``suppress_tokens``.

At batch 1 the step is bound by memory bandwidth: every token reads all decoder weights that a
step uses (the unembedding, i.e. the token embedding matrix, dominates). The report gives that
byte count, the machine's copy bandwidth (read + write bytes per second of a large tensor copy,
as STREAM counts it) and the fraction of it our loop reaches.

    python benchmarks/bench_decode.py            # tiny and base, batch 1 and 8 (a few minutes)
    python benchmarks/bench_decode.py --quick    # tiny only, one repeat (under a minute)
    python benchmarks/bench_decode.py --loop-only    # the decoding loop only, not "with encoder"
    python benchmarks/bench_decode.py --loop-only --beam 5   # beam search, batch 1 (openai-whisper's only)
    python benchmarks/bench_decode.py --profile base [--batch 1]   # where our loop's time goes, op by op
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, table  # noqa: E402
from whisper_lens.loading import OFFICIAL, load_model, save_model  # noqa: E402
from whisper_lens.model import textbook  # noqa: E402

NEW_TOKENS = 100


def models(name: str, folder: Path):
    """openai-whisper, ours and transformers holding the same random weights of an official shape."""
    from dataclasses import asdict

    import whisper
    import whisper.model
    from transformers import WhisperForConditionalGeneration

    dims = OFFICIAL[name][1]
    torch.manual_seed(0)
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(dims))).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() > 1 or not torch.isfinite(p).all():
                p.normal_(0, 0.05)  # includes the decoder's torch.empty positional embedding
    pt = folder / f"{name}.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": ref.state_dict()}, pt)
    vocab = os.path.join(os.path.dirname(whisper.__file__), "assets", "multilingual.tiktoken")
    ours = load_model(pt, tokenizer=vocab)
    hf = WhisperForConditionalGeneration.from_pretrained(save_model(ours, folder / name)).eval()
    return ref, ours, hf


def step_weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: the decoder without the cached cross-attention keys/values
    projections and all but one row of the positional embedding."""
    total = 0
    for key, p in model.decoder.named_parameters():
        if ".cross_attn.key." in key or ".cross_attn.value." in key:
            continue
        rows = 1 if key == "positional_embedding" else None
        total += (p[:rows] if rows else p).numel() * p.element_size()
    return total


def copy_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved (read + write) by copying a large fp32 tensor."""
    src = torch.ones(mib * 2**18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.numel() * src.element_size() / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def inputs(ours, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random log-mel batch (seeded by its size) and our encoder's output for it: (B, 80, 3000), (B, S, D)."""
    mel = torch.rand(batch, 80, 3000, generator=torch.Generator().manual_seed(batch)) * 2 - 1
    with torch.no_grad():
        return mel, ours.encoder(mel)


def decode_ours(ours, beam: int | None = None, **audio) -> None:
    """Our loop (greedy, or ``beam`` beams) for exactly NEW_TOKENS tokens (EOT suppressed) from ``mel=`` or
    ``audio_features=``."""
    eot = ours.tokenizer.eot
    out = ours.generate(**audio, language="en", max_new_tokens=NEW_TOKENS, suppress_tokens=[-1, eot], beam_size=beam)
    assert all(len(r.tokens) == NEW_TOKENS for r in out)


def measure(ref, ours, hf, batch: int, repeats: int, loop: bool, beam: int | None = None) -> dict[str, float]:
    """Tokens per second (clips x tokens of the result) of the three implementations decoding the same batch,
    interleaved; greedy, or beam search with ``beam`` beams.

    ``loop``: decode from the same precomputed encoder output (each implementation's documented way
    to skip its encoder), so the figure is the decoding loop's own; otherwise from the log-mel.
    """
    import whisper.decoding as wd
    from transformers.modeling_outputs import BaseModelOutput

    tok = ours.tokenizer
    prompt = [*tok.sot_sequence_for("en", "transcribe"), tok.no_timestamps]
    mel, xa = inputs(ours, batch)  # (B, 80, 3000), (B, S, D)
    options = wd.DecodingOptions(language="en", without_timestamps=True, sample_len=NEW_TOKENS,
                                 suppress_tokens=[-1, tok.eot], fp16=False, beam_size=beam)  # fmt: skip
    start = torch.tensor([prompt] * batch)
    audio = {"audio_features": xa} if loop else {"mel": mel}
    hf_audio = {"encoder_outputs": BaseModelOutput(last_hidden_state=xa)} if loop else {"input_features": mel}

    def run_ours():
        decode_ours(ours, beam, **audio)

    def run_textbook():
        with textbook():  # the same loop, F.linear unembedding: whether decoding/packed.py's product pays here
            decode_ours(ours, beam, **audio)

    def run_openai():
        out = wd.decode(ref, xa if loop else mel, options)  # audio features of shape (B, S, D) skip its encoder
        assert all(len(r.tokens) == NEW_TOKENS for r in out)

    def run_hf():
        with torch.no_grad():
            out = hf.generate(**hf_audio, decoder_input_ids=start, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=beam or 1,
                              cache_implementation="static", eos_token_id=tok.eot, pad_token_id=tok.eot)  # fmt: skip
        assert out.shape[1] in (NEW_TOKENS, len(prompt) + NEW_TOKENS), out.shape  # with or without the prompt

    runs = {"ours": run_ours, "textbook": run_textbook, "openai": run_openai}
    if beam is None or not loop:  # transformers' Whisper generate does not take encoder outputs with beams
        runs["hf"] = run_hf
    seconds = interleaved(runs, repeats=repeats)
    return {k: batch * NEW_TOKENS / v for k, v in seconds.items()}


def profile(name: str, batch: int = 8) -> None:
    """Our decoding loop once under the torch profiler: the ops that take the time, with their shapes.

    Each line's share is of the whole ``generate`` call (cache set-up, weight packing and the 100
    steps); "per call" divided into the bytes an op reads gives its read rate.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with tempfile.TemporaryDirectory() as tmp:
        _, ours, _ = models(name, Path(tmp))
    _, xa = inputs(ours, batch)  # (B, S, D)
    decode_ours(ours, audio_features=xa)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        decode_ours(ours, audio_features=xa)
    print(f"{name}, batch {batch}, {NEW_TOKENS} tokens, {torch.get_num_threads()} threads")
    ops = prof.key_averages(group_by_input_shape=True)
    print(ops.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=32, max_shapes_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, one repeat: under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 3)")
    parser.add_argument("--profile", choices=["tiny", "base"], help="profile our loop on this shape instead")
    parser.add_argument("--batch", type=int, default=8, help="the batch --profile decodes (default 8)")
    parser.add_argument("--loop-only", action="store_true", help="only the decoding loop (what the targets are on)")
    parser.add_argument("--beam", type=int, default=None, help="beam search with this many beams instead of greedy")
    args = parser.parse_args()
    if args.profile:
        return profile(args.profile, args.batch)
    import transformers

    transformers.logging.set_verbosity_error()
    names = ["tiny"] if args.quick else ["tiny", "base"]
    repeats = args.repeats or (1 if args.quick else 3)
    bandwidth = copy_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    header = ["model", "batch", "timed", "ours tok/s", "ours textbook() tok/s", "openai-whisper tok/s",
              "transformers tok/s", "vs openai", "vs hf", "bandwidth used"]  # fmt: skip
    rows = [header]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ref, ours, hf = models(name, Path(tmp))
            weight_bytes = step_weight_bytes(ours)
            d = ours.dims
            cross_bytes = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * 4  # fp32 keys and values, per clip
            print(f"{name}: {weight_bytes / 2**20:.0f} MiB of weights read per step, plus "
                  f"{cross_bytes / 2**20:.1f} MiB of cross-attention keys/values per clip")  # fmt: skip
            for batch in (1,) if args.beam else (1, 8):  # openai-whisper's beam search runs one clip at a time
                for loop in (True,) if args.loop_only else (True, False):
                    tps = measure(ref, ours, hf, batch, repeats, loop, args.beam)
                    greedy_loop = batch == 1 and loop and args.beam is None
                    used = f"{weight_bytes * tps['ours'] / bandwidth:.0%}" if greedy_loop else ""
                    ratios = [f"{tps['ours'] / tps[k]:.2f}x" if k in tps else "n/a" for k in ("openai", "hf")]
                    timed = "decoding loop" if loop else "with encoder"
                    timed += f", {args.beam} beams" if args.beam else ""
                    speeds = [f"{tps[k]:.0f}" if k in tps else "n/a" for k in ("ours", "textbook", "openai", "hf")]
                    rows.append([name, str(batch), timed, *speeds, *ratios, used])
                    print(table([header, rows[-1]]).splitlines()[-1], flush=True)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
