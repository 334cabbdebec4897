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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ..experiments import cer, format_table, wer
from ..files import atomic_write
from ..loading import load_model
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


def write_samples(model, folder, n: int = 5, seed: int = 0, tries: int = 200) -> tuple[dict[str, str], int]:
    """Synthesize held-out sentences (training voices) as 16 kHz wavs in ``folder`` with ``transcripts.json``.

    Keeps the first ``n`` of the first ``tries`` held-out clips that the model transcribes exactly
    (greedy), so the shipped samples double as a regression test; the model card says how many
    were tried. Returns ({file name: transcript}, clips tried).
    """
    import soundfile

    from ..audio import load_windows

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, heldout = synth.split(train.N_TRAIN, 200, seed)
    kept: dict[str, str] = {}
    tried = 0
    for clip in synth.plan(heldout[:tries], seed + 7, no_speech=0.0):
        tried += 1
        audio = synth.render(clip)
        if audio.size > synth.MAX_SECONDS * synth.SAMPLE_RATE:
            continue
        audio = np.round(audio * 32767).astype(np.int16)  # what the 16-bit file will hold
        mel = load_windows([audio], model.dims.n_mels, 2 * model.dims.n_audio_ctx)[0][0]  # as the tests read it
        with torch.inference_mode():
            text = model.generate(mel[None])[0].text.strip()
        if text != clip.text:
            continue
        name = f"sample{len(kept) + 1}.wav"
        atomic_write(folder / name, lambda p, a=audio: soundfile.write(p, a, synth.SAMPLE_RATE, format="WAV"))
        kept[name] = clip.text
        if len(kept) == n:
            break
    atomic_write(folder / "transcripts.json", lambda p: Path(p).write_text(json.dumps(kept, indent=1) + "\n"))
    return kept, tried


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
    ax.set_ylabel("loss: cross-entropy (nats/token) + 0.3 CTC")
    ax.set_title("Toy model training loss")
    ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda p: fig.savefig(p, format="png"))


# How the shipped weights were trained: one checkpoint, resumed (``fit`` recomputes the learning rate
# from the step and the run's total, so each resumption continues a new cosine schedule).
SHIPPED_SCHEDULE = """The shipped weights come from three runs on one checkpoint, each
resuming the last: steps 1-2700 with a 2700-step schedule (peak 1.5e-3); steps 2701-3750 under an
8700-step schedule with peak 1.2e-3 (a warm restart at 0.83 of the peak, after the first run's
cosine had reached 0: its held-out CER was 50 %, the loss still falling); steps 3751-9000 under a
9000-step schedule with peak 1.2e-3 (resumed at 0.68 of the peak), decaying to 0."""


def write_card(folder, report: dict, history: list[dict], samples: dict[str, str], tried: int) -> Path:
    """The model card (README.md) of the shipped model, from measured numbers."""
    from ..loading import load_model

    folder = Path(folder)
    model = load_model(folder)
    d = model.dims
    params = sum(p.numel() for p in model.parameters())
    minutes = history[-1]["seconds"] / 60
    words = {w for group in (synth.NOUNS, synth.THINGS, synth.ADJECTIVES, synth.VERBS_T, synth.VERBS_I,
                             synth.ADVERBS, synth.NUMBERS, synth.DETS) for w in group}  # fmt: skip
    h, u, q = report["heldout"], report["unseen_voice"], report["no_speech"]
    dims_table = format_table([asdict(d)])
    unseen = f"held-out sentences, unseen voice ({synth.UNSEEN_VOICE})"
    sample_rows = "\n".join(f"| `samples/{name}` | {text} |" for name, text in samples.items())
    text = f"""# whisper-lens toy model

A small Whisper trained from scratch by this project on English speech synthesized with espeak-ng,
so that whisper-lens runs offline with a model that really transcribes: its lessons (logit lens,
layer removal, attention) show real behaviour. It knows one small grammar and espeak's voices; it
is a teaching and testing model, not a speech recognizer for real recordings.

## Architecture

Whisper's, unchanged (`whisper_lens.model.Whisper`), with these dims:

{dims_table}

{params / 1e6:.2f} M parameters, fp32, stored in the hub layout (`config.json` + `model.safetensors`,
transformers' key names: `WhisperForConditionalGeneration.from_pretrained` reads it too). The
window is {2 * d.n_audio_ctx * 10 / 1000:g} s (n_audio_ctx {d.n_audio_ctx}: {2 * d.n_audio_ctx} mel frames) instead
of 30 s. Tokenizer: `bytes.tiktoken`, the 256 single bytes with no merges, followed by Whisper's
special tokens in the English-only layout (<|endoftext|> = 256, <|startoftranscript|> = 257, ...,
<|notimestamps|> = 362, timestamps from 363): `whisper_lens.load_tokenizer(path, n_vocab=1864)`.

## Data (`whisper_lens/toy/synth.py`)

- Text: sentences from {len(synth.TEMPLATES)} templates over {len(words)} words (nouns, things,
  adjectives, verbs, adverbs, places, numbers). {train.N_TRAIN} distinct training sentences
  (seed 0); 200 held-out sentences drawn first and excluded from training: new combinations
  of the same words.
- Audio: espeak-ng, voices {", ".join(synth.TRAIN_VOICES)} with variants
  {", ".join(v or "(none)" for v in synth.VARIANTS)}; 140-200 words per minute, pitch 30-70,
  0-0.4 s of silence before and 0-0.3 s after, white noise at 0-1 % of the peak. About 5 % extra
  clips are silence or noise (0-5 %) with an empty transcript. Clips longer than
  {synth.MAX_SECONDS} s are dropped. Features: Whisper's log-mel of the audio padded with silence
  to the window (`whisper_lens.audio.load_windows`).
- Targets: `<|startoftranscript|> <|notimestamps|> text <|endoftext|>`; for no-speech clips
  the target at the <|startoftranscript|> position is <|nospeech|> (where Whisper reads its
  no-speech probability) and the text is empty.

## Recipe (`whisper_lens/toy/train.py`, `whisper-lens train-toy`)

GPT-2-style initialisation (N(0, 0.02); the convolutions keep PyTorch's fan-in default),
AdamW (betas 0.9/0.98, weight decay 0.01), peak learning
rate 1.5e-3 with 5 % linear warm-up then cosine decay, batch 32, gradient clipping at 1.0,
SpecAugment (two frequency masks of <= 10 bins and two time masks of <= 25 frames per clip),
an auxiliary CTC loss (weight 0.3) from a linear head on the encoder output to the text bytes
(hybrid CTC/attention training; the head is dropped, the shipped model is plain Whisper),
seed 0, {history[-1]["step"]} steps ({history[-1]["step"] * 32 / train.N_TRAIN:.1f} epochs). {SHIPPED_SCHEDULE}
Wall-clock: {minutes:.0f} minutes on the 2 threads of a 2-core x86 CPU (no GPU), shared with
development work (about 1 step per second when the machine was otherwise idle).

![training loss](loss.png)

## Results (`python -m whisper_lens.toy.evaluate`, greedy)

| set | clips | CER | WER |
|---|---|---|---|
| held-out sentences, training voices | {h["clips"]} | {100 * h["cer"]:.2f} % | {100 * h["wer"]:.2f} % |
| {unseen} | {u["clips"]} | {100 * u["cer"]:.2f} % | {100 * u["wer"]:.2f} % |

Silence and noise clips ({q["clips"]}): no-speech probability above 0.5 for
{100 * q["no_speech_prob_over_0.5"]:.0f} %; decoded to an empty transcript (blank suppression off)
for {100 * q["decodes_to_empty"]:.0f} %.

## Samples

Held-out sentences in training voices, 16 kHz 16-bit wav; `samples/transcripts.json` maps each
file to its reference. They are the first {len(samples)} of the first {tried} held-out clips that the model
transcribes exactly (the tests check that it still does).

| file | transcript |
|---|---|
{sample_rows}

## Reproduce

```bash
# synthesizes data/toy (cached) and trains; each command resumes from runs/toy/checkpoint.pt
whisper-lens train-toy --steps 2700 --out weights/toy
whisper-lens train-toy --steps 8700 --lr 1.2e-3 --out weights/toy   # stopped after step 3750 (Ctrl-C)
whisper-lens train-toy --steps 9000 --lr 1.2e-3 --out weights/toy
python -m whisper_lens.toy.evaluate --finish weights/toy   # samples, evaluation, this card, loss.png
```
"""
    atomic_write(folder / "README.md", lambda p: Path(p).write_text(text))
    return folder / "README.md"


def finish(folder, data_dir: str = "data/toy") -> dict:
    """After training: write the samples, evaluate, draw the loss curve and write the model card."""
    from ..loading import load_model

    folder = Path(folder)
    model = load_model(folder)
    samples, tried = write_samples(model, folder / "samples")
    history = json.loads((folder / "history.json").read_text())
    loss_figure(history, folder / "loss.png")
    report = evaluate(str(folder), data_dir)
    write_card(folder, report, history, samples, tried)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--data", default="data/toy")
    parser.add_argument("--finish", metavar="FOLDER", help="also write samples, loss.png and the model card there")
    args = parser.parse_args()
    if args.finish:
        print(json.dumps(finish(args.finish, args.data), indent=2))
        return
    print(json.dumps(evaluate(args.model, args.data), indent=2))


if __name__ == "__main__":
    main()
