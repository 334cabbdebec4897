"""Synthetic English speech for the shipped toy model: sentences from a small grammar, spoken by espeak-ng.

Everything is a pure function of a seed, so the data set (and the model trained on it) can be
rebuilt bit for bit. The grammar has a few hundred words in templates; the held-out sentences
are new combinations of the same words and never appear in training. One espeak-ng voice is
kept out of training entirely, to measure generalisation to an unseen speaker. Some clips are
silence or noise with an empty transcript: the model learns a no-speech behaviour to study.

Features are Whisper log-mels (``whisper_lens.audio``), cut to the toy model's window.
"""

from __future__ import annotations

import io
import random
import shutil
import subprocess
from dataclasses import dataclass
from itertools import product

import numpy as np

from ..files import atomic_write

SAMPLE_RATE = 16000
MAX_SECONDS = 3.9  # clips must fit the toy model's 4-second window (n_audio_ctx 200 -> 400 mel frames)

# The grammar: every sentence is a template filled with words from these lists.
NOUNS = """cat dog bird fish horse cow sheep goat mouse rabbit fox wolf bear lion tiger monkey child teacher doctor
farmer baker sailor driver singer painter writer king queen boy girl man woman friend neighbour captain pilot nurse
student""".split()
THINGS = """book ball box cup hat key lamp map pen ring shoe coat door window table chair bed boat car train bus
bike kite drum bell apple bread cake egg milk tea coffee soup rice cheese letter song story picture garden house
river road bridge tree flower stone""".split()
ADJECTIVES = """big small old young red blue green yellow black white happy sad quick slow quiet loud warm cold
bright dark tall short heavy light clean dirty kind brave clever funny tired hungry busy lucky""".split()
VERBS_T = """sees finds takes wants likes holds opens closes carries brings paints reads sells buys builds
cleans drops moves pushes pulls watches keeps needs loves""".split()
VERBS_I = """sleeps runs sings jumps walks waits smiles laughs swims dances works cries falls rests""".split()
ADVERBS = """slowly quickly quietly loudly today again now often never always happily""".split()
PLACES = """in the garden|at home|by the river|on the bridge|in the house|near the road|under the tree|at school
|in the city|on the boat|at the market|in the park""".replace("\n", "").split("|")
NUMBERS = """two three four five six seven eight nine ten twelve twenty""".split()
DETS = ["the", "a", "my", "your", "our", "this", "that", "every"]

TEMPLATES = [
    "{det} {adj} {noun} {vi}",
    "{det} {noun} {vi} {adv}",
    "{det} {noun} {vt} {det2} {thing}",
    "{det} {adj} {noun} {vt} {det2} {adj2} {thing}",
    "{det} {noun} {vi} {place}",
    "{det} {noun} {vt} {num} {things}",
    "{num} {nouns} {vi2} {place}",
    "{det} {noun} {vt} {det2} {thing} {place}",
    "{det} {thing} is {adj}",
    "where is {det} {adj} {thing}",
]
THIRD_TO_PLURAL = {"cries": "cry", "watches": "watch", "pushes": "push", "carries": "carry"}
IRREGULAR = {"child": "children", "man": "men", "woman": "women", "mouse": "mice", "sheep": "sheep", "fish": "fish",
             "wolf": "wolves", "box": "boxes", "bus": "buses", "glass": "glasses", "bench": "benches",
             "rice": "bowls of rice", "tea": "cups of tea", "milk": "bottles of milk", "bread": "loaves of bread",
             "soup": "bowls of soup", "coffee": "cups of coffee", "cheese": "pieces of cheese"}  # fmt: skip


def plural(noun: str) -> str:
    return IRREGULAR.get(noun, noun + "s")


# espeak-ng voices (Germanic family, shipped with espeak-ng) and voice variants.
TRAIN_VOICES = ["en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us-nyc", "en-gb-scotland"]
UNSEEN_VOICE = "en-029"  # Caribbean English: never used in training
VARIANTS = ["", "+m1", "+m2", "+m3", "+m4", "+m5", "+f1", "+f2", "+f3", "+f4", "+klatt"]


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def sentence(rng: random.Random) -> str:
    """One random sentence of the grammar."""
    template = rng.choice(TEMPLATES)
    vi, noun, thing = rng.choice(VERBS_I), rng.choice(NOUNS), rng.choice(THINGS)
    words = {
        "det": rng.choice(DETS), "det2": rng.choice(DETS), "adj": rng.choice(ADJECTIVES),
        "adj2": rng.choice(ADJECTIVES), "noun": noun, "thing": thing, "nouns": plural(noun), "things": plural(thing),
        "vt": rng.choice(VERBS_T), "vi": vi, "vi2": THIRD_TO_PLURAL.get(vi, vi.removesuffix("s")),
        "adv": rng.choice(ADVERBS), "place": rng.choice(PLACES), "num": rng.choice(NUMBERS),
    }  # fmt: skip
    text = template.format(**words)
    return (
        text.replace(" a a", " an a").replace(" a o", " an o").replace(" a e", " an e").replace("a apple", "an apple")
    )


def sentences(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[str]:
    """``n`` distinct sentences for ``seed``, none of them in ``exclude``."""
    rng, out, seen = random.Random(seed), [], set(exclude)
    while len(out) < n:
        s = sentence(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def split(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Training and held-out sentences, disjoint by construction (held-out drawn first, then excluded)."""
    heldout = sentences(n_heldout, seed=seed + 1_000_003)
    train = sentences(n_train, seed=seed, exclude=frozenset(heldout))
    return train, heldout


@dataclass(frozen=True)
class Clip:
    """One utterance to synthesize: text (empty for no-speech) and how to say it."""

    text: str
    voice: str
    speed: int  # words per minute
    pitch: int  # 0-99
    lead: float  # seconds of silence before
    tail: float  # seconds of silence after
    noise: float  # noise amplitude relative to the speech peak
    seed: int


def plan(texts: list[str], seed: int, voices: list[str] = TRAIN_VOICES, no_speech: float = 0.05) -> list[Clip]:
    """How each text is spoken (voice, variant, speed, pitch, silence, noise); plus no-speech clips."""
    rng = random.Random(seed)
    clips = []
    for i, text in enumerate(texts):
        if rng.random() < no_speech:
            clips.append(Clip("", "", 0, 0, rng.uniform(0, 1), 0.0, rng.choice([0.0, 0.002, 0.01, 0.05]), seed + i))
        clips.append(
            Clip(text, rng.choice(voices) + rng.choice(VARIANTS), rng.randint(140, 200), rng.randint(30, 70),
                 rng.uniform(0.0, 0.4), rng.uniform(0.0, 0.3), rng.choice([0.0, 0.002, 0.005, 0.01]), seed + i)
        )  # fmt: skip
    return clips


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """espeak-ng's rendering of ``text`` at 16 kHz, float32 in [-1, 1]."""
    import soundfile

    if not espeak_available():
        raise FileNotFoundError("espeak-ng is not installed: apt-get install espeak-ng")
    wav = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", text],
        capture_output=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    audio, sr = soundfile.read(io.BytesIO(wav), dtype="float32")
    if sr == SAMPLE_RATE:
        return audio
    import librosa

    return librosa.resample(audio, orig_sr=sr, target_sr=SAMPLE_RATE).astype(np.float32)


def render(clip: Clip) -> np.ndarray:
    """The waveform of a clip: speech (or nothing) between silences, plus white noise."""
    rng = np.random.default_rng(clip.seed)
    speech = speak(clip.text, clip.voice, clip.speed, clip.pitch) if clip.text else np.zeros(0, np.float32)
    if speech.size:
        speech = 0.5 * speech / max(1e-6, float(np.abs(speech).max()))
    lead, tail = np.zeros(int(clip.lead * SAMPLE_RATE), np.float32), np.zeros(int(clip.tail * SAMPLE_RATE), np.float32)
    audio = np.concatenate([lead, speech, tail])
    if audio.size < SAMPLE_RATE // 2:
        audio = np.concatenate([audio, np.zeros(SAMPLE_RATE // 2 - audio.size, np.float32)])
    audio = audio + clip.noise * rng.standard_normal(audio.size).astype(np.float32)
    return audio[: int(MAX_SECONDS * SAMPLE_RATE)] if not clip.text else audio


def all_voices() -> list[str]:
    """Every voice/variant combination used in training (for documentation)."""
    return [v + var for v, var in product(TRAIN_VOICES, VARIANTS)]


N_FRAMES = 400  # mel frames of the toy model's window (2 * n_audio_ctx)


def features(clip: Clip) -> np.ndarray | None:
    """The clip's log-mel [80, N_FRAMES] as float16, or None when the speech is longer than the window."""
    from ..audio import load_windows

    audio = render(clip)
    if audio.size > MAX_SECONDS * SAMPLE_RATE:
        return None
    mel = load_windows([audio], n_mels=80, frames=N_FRAMES)[0][0]  # (80, N_FRAMES), silence-padded as Whisper
    return mel.numpy().astype(np.float16)


def _one_thread() -> None:
    """Pool workers run one torch thread each: the pool is the parallelism (more would oversubscribe the cores).

    A worker does not inherit the command's signal handlers (forked, it would: the CLI's SIGTERM
    handler raises in it, and the pool's own shutdown, which terminates its workers, printed a
    traceback per worker). Ctrl-C is the parent's to handle; SIGTERM and SIGHUP end a worker quietly.
    """
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    torch.set_num_threads(1)


def build(clips: list[Clip], path, workers: int = 2) -> dict:
    """Render and featurize ``clips`` (in a process pool) into one ``.npz`` at ``path``; returns its arrays.

    Clips too long for the window are dropped (deterministically). Written atomically.
    """
    from multiprocessing import get_context

    from tqdm import tqdm

    with get_context("fork").Pool(workers, initializer=_one_thread) as pool:
        mels = list(tqdm(pool.imap(features, clips, chunksize=16), total=len(clips), desc="synthesizing", unit="clip"))
    keep = [i for i, m in enumerate(mels) if m is not None]
    data = {
        "mel": np.stack([mels[i] for i in keep]),  # (N, 80, N_FRAMES) float16
        "text": np.array([clips[i].text for i in keep]),
        "voice": np.array([clips[i].voice for i in keep]),
    }
    atomic_write(path, lambda p: _save_npz(p, data))
    return data


def _save_npz(path: str, data: dict) -> None:
    with open(path, "wb") as f:  # np.savez given a name would add ".npz" to it
        np.savez(f, **data)
