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

import numpy as np
import torch

from ..experiments import cer, wer
from ..loading import load_model
from . import train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--data", default="data/toy")
    args = parser.parse_args()
    print(json.dumps(evaluate(args.model, args.data), indent=2))


if __name__ == "__main__":
    main()
