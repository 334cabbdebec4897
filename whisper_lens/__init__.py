"""whisper-lens: a hand-written Whisper for interpretability. See README.md and DESIGN.md."""

from .audio import load_audio, log_mel_spectrogram, pad_or_trim
from .distributed import load_activations
from .loading import load_model
from .model import ModelDims, Run, Whisper
from .tokenizer import Tokenizer, load_tokenizer
from .trace import Edits, Trace

__all__ = [
    "Edits",
    "ModelDims",
    "Run",
    "Tokenizer",
    "Trace",
    "Whisper",
    "load_activations",
    "load_audio",
    "load_model",
    "load_tokenizer",
    "log_mel_spectrogram",
    "pad_or_trim",
]
