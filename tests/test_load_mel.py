"""wl.load_mel: a clip in, the model's input out: openai-whisper's log_mel_spectrogram(pad_or_trim(audio))."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import whisper.audio

import whisper_lens as wl
from whisper_lens.audio import HOP_LENGTH, load_windows

from .conftest import DATA

TOLERANCE = 1e-4  # the mel parity target (docs/contract.md)
SHORT = DATA / "austen-0880.flac"  # 2.99 s, 16 kHz: shorter than the toy's 4 s window
LONG = DATA / "austen-0870.flac"  # 7.1 s: longer than the toy's window


@pytest.fixture(scope="module")
def toy():
    return wl.load_model()  # 80 mels, a 4 s window (400 frames)


def test_without_a_model_it_is_openai_whispers_30_s_input():
    audio = wl.load_audio(SHORT)
    ours = wl.load_mel(SHORT)
    theirs = whisper.audio.log_mel_spectrogram(whisper.audio.pad_or_trim(torch.from_numpy(audio)))
    assert ours.shape == theirs.shape == (80, 3000)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    assert torch.equal(wl.load_mel(audio), ours)  # a 16 kHz array is the same as its file
    assert wl.load_mel(SHORT, n_mels=128).shape == (128, 3000)


def test_with_a_model_it_follows_its_mels_and_window(toy):
    frames = 2 * toy.dims.n_audio_ctx
    mel = wl.load_mel(SHORT, toy)
    assert mel.shape == (toy.dims.n_mels, frames) == (80, 400)
    assert torch.equal(mel, load_windows([SHORT], 80, frames)[0][0])  # what the studies feed the model
    both = wl.load_mel([SHORT, wl.load_audio(DATA / "cards-001.flac")], toy)
    assert both.shape == (2, 80, frames) and torch.equal(both[0], mel)


def test_longer_audio_is_cut_to_the_window_before_the_spectrogram(toy):
    audio = wl.load_audio(LONG)
    frames = 2 * toy.dims.n_audio_ctx
    assert len(audio) > frames * HOP_LENGTH
    expected = wl.log_mel_spectrogram(audio[: frames * HOP_LENGTH], n_mels=80)
    assert torch.equal(wl.load_mel(LONG, toy), expected)
    theirs = whisper.audio.log_mel_spectrogram(whisper.audio.pad_or_trim(torch.from_numpy(audio), frames * HOP_LENGTH))
    assert (wl.load_mel(LONG, toy) - theirs).abs().max().item() < TOLERANCE


def test_bad_input_is_a_one_line_error(toy):
    with pytest.raises(ValueError, match="n_mels=128 but the model reads 80"):
        wl.load_mel(SHORT, toy, n_mels=128)
    with pytest.raises(TypeError, match="model must be a loaded Whisper"):
        wl.load_mel(SHORT, "tiny.en")
    with pytest.raises(ValueError, match="1-D 16 kHz waveform, got shape \\(2, 100\\)"):
        wl.load_mel(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="empty list"):
        wl.load_mel([], toy)
    with pytest.raises(FileNotFoundError, match="audio file not found"):
        wl.load_mel(DATA / "missing.flac", toy)
