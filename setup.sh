#!/usr/bin/env bash
# One-time set-up on a fresh machine: system packages, PyTorch (CPU wheel), whisper-lens and its test tools.
# Safe to re-run. Usage: bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"

# espeak-ng synthesizes the speech the shipped toy model was trained on (training, samples, some tests);
# chromium (Debian's, headless) runs the page tests through Playwright, which downloads no browser of its own.
if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng chromium >/dev/null
fi

PIP="python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore"
# PyTorch first and pinned: a bare "torch" requirement would pull several GB of CUDA packages.
python3 -c "import torch" 2>/dev/null || $PIP torch==2.13.0
$PIP -e ".[test,plot]"
# openai-whisper is a reference for the tests only; without --no-deps it would pull triton.
python3 -c "import whisper" 2>/dev/null || $PIP --no-deps openai-whisper
hash -r
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true
