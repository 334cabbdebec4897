"""``python -m whisper_lens`` is the ``whisper-lens`` command."""

from .cli import run

run()
