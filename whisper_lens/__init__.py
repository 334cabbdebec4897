"""whisper-lens: a hand-written Whisper for interpretability. See README.md and DESIGN.md."""

from .loading import load_model
from .model import ModelDims, Run, Whisper
from .trace import Edits, Trace

__all__ = ["Edits", "ModelDims", "Run", "Trace", "Whisper", "load_model"]
