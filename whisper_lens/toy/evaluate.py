"""Measure the toy model on its evaluation sets (the numbers in weights/toy/README.md).

    python -m whisper_lens.toy.evaluate [--model toy] [--data data/toy]

- held-out sentences (never in training), voices of the training distribution: CER and WER, greedy;
- the same sentences in an espeak-ng voice never heard in training: CER and WER;
- silence/noise clips: the share whose no-speech probability exceeds 0.5, and the share that decodes
  to an empty transcript (with blank suppression off, as a voice-activity check should run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..experiments import cer, wer
from ..loading import atomic_write, load_model
from . import synth, train


def transcribe(model, mels: np.ndarray, batch_size: int = 50, suppress_blank: bool = True) -> list:
    """Greedy results for float16 mels [N, n_mels, frames], in batches."""
    out = []
    for i in range(0, len(mels), batch_size):
        mel = torch.from_numpy(mels[i : i + batch_size]).float()
        with torch.inference_mode():
            out += model.generate(mel, suppress_blank=suppress_blank)
    return out


def evaluate(model_name: str = "toy", data_dir: str = "data/toy", seed: int = 0) -> dict:
    model = load_model(model_name)
    sets = train.prepare(data_dir, seed=seed)
    report = {}
    for name in ("heldout", "unseen_voice"):
        refs = list(sets[name]["text"])
        hyps = [r.text.strip() for r in transcribe(model, sets[name]["mel"])]
        report[name] = {"clips": len(refs), "cer": cer(refs, hyps), "wer": wer(refs, hyps)}
    quiet = transcribe(model, sets["no_speech"]["mel"], suppress_blank=False)
    report["no_speech"] = {
        "clips": len(quiet),
        "no_speech_prob_over_0.5": float(np.mean([r.no_speech_prob > 0.5 for r in quiet])),
        "decodes_to_empty": float(np.mean([r.text.strip() == "" for r in quiet])),
    }
    return report


def write_samples(model, folder, n: int = 5, seed: int = 0, tries: int = 20) -> dict[str, str]:
    """Synthesize held-out sentences (training voices) as 16 kHz wavs in ``folder`` with ``transcripts.json``.

    Keeps the first ``n`` of the first ``tries`` held-out clips that the model transcribes exactly
    (greedy), so the shipped samples double as a regression test; the model card says how many
    were tried. Returns {file name: transcript}.
    """
    import soundfile

    from ..audio import log_mel_spectrogram, pad_or_trim

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, heldout = synth.split(train.N_TRAIN, 200, seed)
    kept: dict[str, str] = {}
    for i, clip in enumerate(synth.plan(heldout[:tries], seed + 7, no_speech=0.0)):
        audio = synth.render(clip)
        if audio.size > synth.MAX_SECONDS * synth.SAMPLE_RATE:
            continue
        audio = np.round(audio * 32767).astype(np.int16)  # what the 16-bit file will hold
        mel = pad_or_trim(log_mel_spectrogram(audio), 2 * model.dims.n_audio_ctx)
        with torch.inference_mode():
            text = model.generate(mel[None])[0].text.strip()
        if text != clip.text:
            continue
        name = f"sample{len(kept) + 1}.wav"
        atomic_write(folder / name, lambda p, a=audio: soundfile.write(p, a, synth.SAMPLE_RATE, format="WAV"))
        kept[name] = clip.text
        if len(kept) == n:
            print(f"kept {n} of the first {i + 1} held-out clips (the others were not transcribed exactly)")
            break
    atomic_write(folder / "transcripts.json", lambda p: Path(p).write_text(json.dumps(kept, indent=1) + "\n"))
    return kept


def loss_figure(history: list[dict], path) -> None:
    """The training loss curve (per step, and a 50-step running mean), as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    smooth = np.convolve(loss, np.ones(50) / 50, mode="valid")
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, loss, color="0.75", lw=0.8, label="loss per step")
    ax.plot(steps[49:], smooth, color="C0", lw=1.8, label="running mean (50 steps)")
    ax.set_yscale("log")
    ax.set_xlabel("step (batch of 32 clips)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Toy model training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--data", default="data/toy")
    args = parser.parse_args()
    print(json.dumps(evaluate(args.model, args.data), indent=2))


if __name__ == "__main__":
    main()
