"""``python -m whisper_lens`` is the ``whisper-lens`` command."""

import sys

from .cli import main

sys.exit(main())
