"""whisper-lens: a hand-written Whisper for interpretability. See README.md, and docs/contract.md for the public API."""

from .alignment import Word
from .audio import load_audio, load_mel, log_mel_spectrogram, pad_or_trim
from .distributed import load_activations
from .heads import HeadRanking, find_alignment_heads
from .loading import load_model
from .longform import Segment, Transcript, Window, transcribe
from .model import ModelDims, Run, Whisper
from .pages.explorer import show
from .tokenizer import Tokenizer, load_tokenizer
from .trace import Edits, Trace

__all__ = [
    "Edits",
    "HeadRanking",
    "ModelDims",
    "Run",
    "Segment",
    "Tokenizer",
    "Trace",
    "Transcript",
    "Whisper",
    "Window",
    "Word",
    "find_alignment_heads",
    "load_activations",
    "load_audio",
    "load_mel",
    "load_model",
    "load_tokenizer",
    "log_mel_spectrogram",
    "pad_or_trim",
    "show",
    "transcribe",
]
