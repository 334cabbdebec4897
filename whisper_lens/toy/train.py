"""The recipe of the shipped toy model: a small Whisper trained from scratch on espeak-ng speech.

    whisper-lens train-toy --out weights/toy          # synthesize (cached in data/toy), train, save

Same architecture as Whisper (``ModelDims``), a 4-second window (n_audio_ctx 200), a byte-level
tokenizer with Whisper's English-only special tokens. Targets are teacher-forced sequences
``<|startoftranscript|> <|notimestamps|> text-bytes <|endoftext|>``; for a clip without speech the
target after ``<|startoftranscript|>`` is ``<|nospeech|>`` (so the model's no-speech probability
is read where Whisper reads it) and the text is empty. AdamW, linear warm-up then cosine decay,
SpecAugment-style masks, gradient clipping, a fixed seed, resumable checkpoints.
"""

from __future__ import annotations

import base64
import json
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..files import atomic_write, check_can_write, mark_written, signals_held
from ..loading import save_model
from ..model import ModelDims, Whisper
from ..tokenizer import Tokenizer, load_tokenizer
from . import synth

TOY_DIMS = ModelDims(
    n_mels=80, n_audio_ctx=200, n_audio_state=192, n_audio_head=4, n_audio_layer=4,
    n_vocab=256 + 1608, n_text_ctx=64, n_text_state=192, n_text_head=4, n_text_layer=4,
)  # fmt: skip
N_TRAIN = 16000  # training sentences of the shipped model
TOY_DEFAULTS = {"timestamps": False, "condition_on_previous_text": False, "pad_with_silence": True}  # as trained
MODEL_FILES = ["bytes.tiktoken", "config.json", "history.json", "model.safetensors"]  # what train writes into out
RUN_FILES = ["bytes.tiktoken", "checkpoint.pt"]  # what train writes into run_dir (data_dir: the *.npz caches)
COMMAND = "train-toy"  # the command the three folders' markers name


def write_byte_vocab(path: str | os.PathLike) -> Path:
    """A tiktoken rank file of the 256 single bytes (no merges): the toy model's vocabulary."""
    text = "".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256))
    atomic_write(Path(path), lambda p: Path(p).write_text(text))
    return Path(path)


def prepare(data_dir: str | os.PathLike, n_train: int = N_TRAIN, n_heldout: int = 200, seed: int = 0) -> dict:
    """Synthesize (once; cached as .npz in ``data_dir``) the training set and the three evaluation sets."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = synth.split(n_train, n_heldout, seed)
    plans = {
        "train": synth.plan(train, seed),
        "heldout": synth.plan(heldout, seed + 1, no_speech=0.0),
        "unseen_voice": synth.plan(heldout, seed + 2, voices=[synth.UNSEEN_VOICE], no_speech=0.0),
        "no_speech": [c for c in synth.plan(heldout, seed + 3, no_speech=1.0) if not c.text],
    }
    out = {}
    paths = {name: data_dir / f"{name}-{seed}-{len(clips)}.npz" for name, clips in plans.items()}
    if not synth.espeak_available() and not all(p.exists() for p in paths.values()):
        raise FileNotFoundError("espeak-ng is not installed (apt install espeak-ng): the toy data is spoken with it")
    for name, clips in plans.items():
        path = paths[name]
        if path.exists():
            out[name] = read_cache(path)
        else:
            check_can_write(data_dir, [path.name], COMMAND, what="--data")
            out[name] = synth.build(clips, path)
            mark_written(data_dir, [path.name], COMMAND)
    return out


def read_cache(path: Path) -> dict:
    """The arrays of a cached data set (plain arrays only: no pickled objects are loaded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("mel", "text", "voice")}
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path} is not a readable data cache ({type(e).__name__}); move it away to rebuild") from None
    return arrays


def encode_batch(texts: list[str], tok: Tokenizer, no_speech: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets (-100 = no loss) for a batch of transcripts."""
    seqs = [[tok.sot, tok.no_timestamps, *tok.encode(t), tok.eot] for t in texts]
    T = max(map(len, seqs)) - 1
    inputs = torch.full((len(seqs), T), tok.eot, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
        targets[i, : len(s) - 1] = torch.tensor(s[1:])
        if no_speech[i]:
            targets[i, 0] = tok.no_speech
    return inputs, targets


def spec_augment(mel: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Two frequency masks (<= 10 bins) and two time masks (<= 25 frames) per clip, filled with the clip's floor."""
    mel = mel.clone()
    B, M, N = mel.shape
    floor = mel.amin(dim=(1, 2))  # (B,)
    for b in range(B):
        for size, length in ((10, M), (25, N)):
            for _ in range(2):
                w = int(torch.randint(0, size + 1, (1,), generator=g))
                s = int(torch.randint(0, max(1, length - w), (1,), generator=g))
                if length == M:
                    mel[b, s : s + w, :] = floor[b]
                else:
                    mel[b, :, s : s + w] = floor[b]
    return mel


def init_weights(model: Whisper) -> Whisper:
    """GPT-2-style initialisation: linear and embedding weights N(0, 0.02), biases 0, LayerNorms identity.

    The two convolutions keep PyTorch's fan-in-scaled default: at 0.02 their output would be
    ~10x smaller than the sinusoidal positions added to it, and the decoder learns to ignore the
    audio (a language model of the grammar) long before it learns to listen.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.split(".")[-2]
            if module.startswith("conv"):
                continue
            if "ln" in module or p.dim() == 1:
                p.fill_(1.0 if name.endswith("weight") and "ln" in module else 0.0)
            else:
                p.normal_(0.0, 0.02)
    return model


def batch_loss(
    model: Whisper,
    mel: torch.Tensor,
    texts: list[str],
    tok: Tokenizer,
    no_speech: np.ndarray,
    ctc_head: torch.nn.Linear | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch: mel (B, n_mels, frames), one transcript per clip.

    With ``ctc_head`` (encoder width -> 256 bytes + blank), plus 0.3 x a CTC loss of the encoder output
    against the text bytes (hybrid CTC/attention training, Watanabe et al. 2017): it makes the encoder
    learn the sounds from the first steps, before the decoder has learnt to rely on the grammar alone.
    The head is training scaffolding only; the saved model is Whisper's architecture, unchanged.
    """
    inputs, targets = encode_batch(texts, tok, no_speech)
    device = mel.device
    xa = model.encoder(mel)  # (B, S, D)
    logits = model.decoder(inputs.to(device), xa=xa)  # (B, T, V)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten(), ignore_index=-100)
    if ctc_head is None:
        return loss
    labels = [torch.tensor(list(t.encode("utf-8")), dtype=torch.long) + 1 for t in texts]  # 0 is the blank
    logp = ctc_head(xa).float().log_softmax(-1).transpose(0, 1)  # (S, B, 257)
    lengths = torch.full((len(texts),), xa.shape[1], dtype=torch.long)
    ctc = F.ctc_loss(logp, torch.cat(labels).to(device), lengths, torch.tensor([len(x) for x in labels]),
                     zero_infinity=True)  # fmt: skip
    return loss + 0.3 * ctc


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Learning rate at ``step``: linear warm-up to ``peak`` over ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def fit(
    model: Whisper,
    tok: Tokenizer,
    mels: torch.Tensor,
    texts: list[str],
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    seed: int = 0,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """The training loop: AdamW, warm-up + cosine, SpecAugment, clipping; resumes from ``checkpoint`` if it exists.

    ``mels`` (N, n_mels, frames) and ``texts`` (N, "" = no speech). Returns the loss history (one row per step).
    """
    from tqdm import tqdm

    device = model.device
    no_speech = np.array([t == "" for t in texts])
    ctc_head = torch.nn.Linear(model.dims.n_audio_state, 257).to(device)
    params = list(model.parameters()) + list(ctc_head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    step, history = 0, []
    state = load_checkpoint(checkpoint, model.dims, steps) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        ctc_head.load_state_dict(state["ctc_head"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        step, history = state["step"], state["history"]

    model.train()
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", disable=not progress)
    started = time.time() - (history[-1]["seconds"] if history else 0.0)
    while step < steps:
        idx = torch.randint(0, len(texts), (batch_size,), generator=g)
        mel = spec_augment(mels[idx].float(), g).to(device)  # (B, n_mels, frames)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=max(1, steps // 20))
        loss = batch_loss(model, mel, [texts[i] for i in idx], tok, no_speech[idx.numpy()], ctc_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), "seconds": time.time() - started})
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if checkpoint is not None and (step % 250 == 0 or step == steps):
            state = {"model": model.state_dict(), "ctc_head": ctc_head.state_dict(), "opt": opt.state_dict(),
                     "rng": g.get_state(), "step": step, "history": history, "dims": asdict(model.dims)}  # fmt: skip
            with signals_held():  # the checkpoint and its hash in the marker change together
                atomic_write(checkpoint, lambda p, s=state: torch.save(s, p))
                mark_written(checkpoint.parent, [checkpoint.name], COMMAND)
    bar.close()
    model.eval()
    return history


CHECKPOINT_KEYS = {"model", "ctc_head", "opt", "rng", "step", "history", "dims"}


def load_checkpoint(path: Path, dims: ModelDims, steps: int) -> dict | None:
    """The training state to resume from, or None when ``path`` does not exist.

    Read with ``weights_only=True``: a checkpoint holds tensors, numbers, lists and dicts, and a
    file holding anything else (such as a pickled object that would run code) is refused
    unread. It must be of a model of ``dims`` and not beyond ``steps``.
    """
    if not path.exists():
        return None
    try:
        with warnings.catch_warnings():  # torch's notes on unusual pickles: the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (unpickling refused, zip, runtime) for a file that is not ours
        raise ValueError(
            f"cannot resume from {path}: it is not a checkpoint of tensors and numbers ({type(e).__name__}); nothing "
            "in it was run. Move it away to train from scratch"
        ) from None
    if not isinstance(state, dict) or set(state) != CHECKPOINT_KEYS:
        raise ValueError(f"cannot resume from {path}: not a train-toy checkpoint (keys {sorted(CHECKPOINT_KEYS)})")
    if state["dims"] != asdict(dims):
        raise ValueError(f"cannot resume from {path}: it is a model of other dims ({state['dims']})")
    if not isinstance(state["step"], int) or not 0 <= state["step"] <= steps:
        raise ValueError(f"cannot resume from {path}: it is at step {state['step']}, past the {steps} steps asked for")
    return state


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device, if training can run there: the CPU, or a CUDA device that exists."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    count = torch.cuda.device_count() if parsed.type == "cuda" else 0
    if parsed.type == "cuda" and (count == 0 or (parsed.index or 0) >= count):
        raise ValueError(f"device {device!r}: there are {count} CUDA devices here")
    return parsed


def check_training(out, data_dir, run_dir, *, n_train: int, steps: int, batch_size: int, lr: float) -> None:
    """Refuse bad settings before any work: counts, learning rate, and where the results go."""
    for name, value in (("n_train (--clips)", n_train), ("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    # one rule for the three folders: absent, empty, or written by train-toy before (and the files it would
    # replace unedited since); a folder of the user's is never written into
    check_can_write(out, MODEL_FILES, COMMAND, what="--out")
    check_can_write(data_dir, [], COMMAND, what="--data")
    check_can_write(run_dir, RUN_FILES, COMMAND, what="--runs")


def train(
    out: str | os.PathLike = "weights/toy",
    *,
    data_dir: str | os.PathLike = "data/toy",
    run_dir: str | os.PathLike = "runs/toy",
    n_train: int = N_TRAIN,
    steps: int = 2400,
    batch_size: int = 32,
    lr: float = 1.5e-3,
    seed: int = 0,
    device: str = "cpu",
    threads: int | None = None,
    dims: ModelDims = TOY_DIMS,
) -> Whisper:
    """Synthesize the data, train the toy model, save it (HF layout + tokenizer + loss history) to ``out``.

    Resumes from ``run_dir/checkpoint.pt`` when it exists (same seed, same data). Every setting
    is checked before any work; ``out``, ``data_dir`` and ``run_dir`` may each be a new or empty
    folder, or one train-toy wrote before (its ``.whisper-lens.json`` lists the files with their
    content hashes): nothing else there is overwritten, and a file the user edited since is kept
    (the run is refused, naming it).
    """
    check_training(out, data_dir, run_dir, n_train=n_train, steps=steps, batch_size=batch_size, lr=lr)
    device = check_device(device)
    load_checkpoint(Path(run_dir) / "checkpoint.pt", dims, steps)  # refused now, not after the synthesis
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    vocab = write_byte_vocab(run_dir / "bytes.tiktoken")
    mark_written(run_dir, [vocab.name], COMMAND)
    tok = load_tokenizer(vocab, n_vocab=dims.n_vocab)
    data = prepare(data_dir, n_train=n_train, seed=seed)["train"]
    torch.manual_seed(seed)
    model = init_weights(Whisper(dims)).to(device)
    history = fit(model, tok, torch.from_numpy(data["mel"]), list(data["text"]), steps=steps, batch_size=batch_size,
                  lr=lr, seed=seed, checkpoint=run_dir / "checkpoint.pt")  # fmt: skip
    model.tokenizer = tok
    model.transcribe_defaults = dict(TOY_DEFAULTS)  # they travel with its files, whatever name it is loaded by
    save_model(model, out, tokenizer_file=vocab)
    atomic_write(Path(out) / "history.json", lambda p: Path(p).write_text(json.dumps(history)))
    mark_written(out, MODEL_FILES, COMMAND)  # a rerun may replace these files, and only these
    return model
