"""The audio front end against openai-whisper's: same log-mel numbers, clear errors on bad input."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile
import torch
import whisper.audio

from whisper_lens.audio import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FFT,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    load_audio,
    log_mel_spectrogram,
    pad_or_trim,
)

TOLERANCE = 1e-4  # the parity target in docs/contract.md


def tone(freq: float, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def chirp(seconds: float) -> np.ndarray:
    # Linear sweep from 50 Hz to 7.5 kHz: crosses every mel band.
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    f0, f1 = 50.0, 7500.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (0.3 * np.sin(phase)).astype(np.float32)


def signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    mixed = tone(220, 3.0) + tone(3300, 3.0, 0.05)
    quiet_then_loud = np.concatenate([np.zeros(16000, np.float32), tone(1000, 2.0, 0.8)])
    return {
        "tone_440": tone(440, 2.0),
        "two_tones": mixed,
        "white_noise": (0.1 * rng.standard_normal(SAMPLE_RATE * 2)).astype(np.float32),
        "faint_noise": (1e-4 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32),
        "chirp": chirp(4.0),
        "silence": np.zeros(SAMPLE_RATE, np.float32),
        "silence_then_tone": quiet_then_loud,
        "odd_length": (0.2 * rng.standard_normal(12345)).astype(np.float32),
        "full_chunk": (0.05 * rng.standard_normal(N_SAMPLES)).astype(np.float32),
    }


def reference_mel(audio: np.ndarray, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    return whisper.audio.log_mel_spectrogram(torch.from_numpy(audio), n_mels=n_mels, padding=padding)


def test_constants_match_openai():
    assert (SAMPLE_RATE, N_FFT, HOP_LENGTH, CHUNK_LENGTH, N_SAMPLES, N_FRAMES) == (
        whisper.audio.SAMPLE_RATE,
        whisper.audio.N_FFT,
        whisper.audio.HOP_LENGTH,
        whisper.audio.CHUNK_LENGTH,
        whisper.audio.N_SAMPLES,
        whisper.audio.N_FRAMES,
    )


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filters_equal_openai_shipped_file(n_mels):
    from whisper_lens.audio import _mel_filters_cpu

    ours = _mel_filters_cpu(n_mels)
    theirs = whisper.audio.mel_filters("cpu", n_mels)
    assert ours.shape == theirs.shape == (n_mels, N_FFT // 2 + 1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("name", list(signals()))
def test_mel_matches_openai(name, n_mels):
    audio = signals()[name]
    ours = log_mel_spectrogram(audio, n_mels=n_mels)
    theirs = reference_mel(audio, n_mels)
    assert ours.shape == theirs.shape == (n_mels, len(audio) // HOP_LENGTH)
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("padding", [0, 1, 999, N_SAMPLES])
def test_padding_matches_openai(padding):
    audio = chirp(1.5)
    ours = log_mel_spectrogram(audio, padding=padding)
    theirs = reference_mel(audio, padding=padding)
    assert ours.shape == theirs.shape == (80, (len(audio) + padding) // HOP_LENGTH)
    assert (ours - theirs).abs().max().item() < TOLERANCE


def test_zero_length_audio_with_padding_matches_openai():
    empty = np.zeros(0, np.float32)
    ours = log_mel_spectrogram(empty, padding=N_SAMPLES)
    assert ours.shape == (80, N_FRAMES)
    assert (ours - reference_mel(empty, padding=N_SAMPLES)).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("n_mels", [80, 128])
def test_batch_equals_clips_one_by_one(n_mels):
    # Very different loudness per clip: with one maximum over the batch the quiet clip's floor
    # would move; every clip must keep its own.
    clips = [tone(440, 2.0), (1e-3 * chirp(2.0)), np.zeros(2 * SAMPLE_RATE, np.float32)]
    batch = np.stack(clips)
    features = log_mel_spectrogram(batch, n_mels=n_mels)
    assert features.shape == (3, n_mels, 200)
    for clip, row in zip(clips, features, strict=True):
        torch.testing.assert_close(row, log_mel_spectrogram(clip, n_mels=n_mels), rtol=0, atol=1e-6)
        assert (row - reference_mel(clip, n_mels)).abs().max().item() < TOLERANCE


def test_empty_batch_gives_empty_features():
    assert log_mel_spectrogram(np.zeros((0, 1000), np.float32)).shape == (0, 80, 6)


def test_gradients_match_openai():
    # Features are differentiable in the waveform (e.g. for attribution), with openai-whisper's gradients.
    audio = torch.from_numpy(chirp(0.5)) + 0.01 * torch.randn(8000, generator=torch.Generator().manual_seed(0))
    ours = audio.clone().requires_grad_()
    log_mel_spectrogram(ours).square().sum().backward()
    theirs = audio.clone().requires_grad_()
    whisper.audio.log_mel_spectrogram(theirs).square().sum().backward()
    assert ours.grad.abs().max() > 0.1
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-4 * theirs.grad.abs().max().item())


def test_torch_and_numpy_and_path_inputs_agree(tmp_path):
    audio = chirp(2.0)
    path = tmp_path / "chirp.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    from_numpy = log_mel_spectrogram(audio)
    torch.testing.assert_close(log_mel_spectrogram(torch.from_numpy(audio)), from_numpy, rtol=0, atol=0)
    torch.testing.assert_close(log_mel_spectrogram(str(path)), from_numpy, rtol=0, atol=0)
    torch.testing.assert_close(log_mel_spectrogram(path, device="cpu"), from_numpy, rtol=0, atol=0)


def test_float64_and_int16_are_converted():
    audio = tone(500, 1.0)
    as_int16 = np.round(audio * 32767).astype(np.int16)
    expected = reference_mel(as_int16.astype(np.float32) / 32768.0)
    assert (log_mel_spectrogram(as_int16) - expected).abs().max().item() < TOLERANCE
    assert (log_mel_spectrogram(torch.from_numpy(as_int16)) - expected).abs().max().item() < TOLERANCE
    float64 = log_mel_spectrogram(audio.astype(np.float64))
    assert float64.dtype == torch.float32
    assert (float64 - reference_mel(audio)).abs().max().item() < TOLERANCE


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_matches_openai_on_synthesized_speech(tmp_path, n_mels):
    path = tmp_path / "speech.wav"
    text = "The quick brown fox jumps over the lazy dog, and then it sleeps."
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    speech = load_audio(path)  # espeak-ng writes 22.05 kHz: this also exercises resampling
    assert speech.dtype == np.float32 and speech.ndim == 1 and len(speech) > SAMPLE_RATE
    clip = pad_or_trim(speech)
    ours = log_mel_spectrogram(clip, n_mels=n_mels)
    theirs = reference_mel(clip, n_mels)
    assert ours.shape == (n_mels, N_FRAMES)
    assert (ours - theirs).abs().max().item() < TOLERANCE
    # speech is not silence: over the spoken part, many values sit well above the floor
    spoken = ours[:, : len(speech) // HOP_LENGTH]
    assert (spoken > ours.min() + 1.0).float().mean() > 0.15
    unpadded = log_mel_spectrogram(speech, n_mels=n_mels)
    assert (unpadded - reference_mel(speech, n_mels)).abs().max().item() < TOLERANCE


# ----- load_audio -----


@pytest.mark.parametrize("fmt,subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None)])
def test_load_audio_formats(tmp_path, fmt, subtype):
    audio = tone(440, 1.0, 0.5)
    path = tmp_path / f"tone.{fmt.lower()}"
    soundfile.write(path, audio, SAMPLE_RATE, format=fmt, subtype=subtype)
    loaded = load_audio(path)
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    if fmt in ("WAV", "FLAC"):  # lossless: equal up to 16-bit quantization
        np.testing.assert_allclose(loaded, audio, atol=1 / 32768)
    else:  # lossy codecs add delay and padding; the tone must survive
        assert abs(len(loaded) - len(audio)) < 0.1 * SAMPLE_RATE
        spectrum = np.abs(np.fft.rfft(loaded))
        assert abs(np.argmax(spectrum) * SAMPLE_RATE / len(loaded) - 440) < 3


def test_load_audio_resamples_and_mixes_to_mono(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    left = 0.4 * np.sin(2 * np.pi * 300 * t)
    right = 0.2 * np.sin(2 * np.pi * 300 * t)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, np.stack([left, right], axis=1), sr, subtype="FLOAT")
    loaded = load_audio(path)
    assert loaded.shape == (SAMPLE_RATE,) and loaded.dtype == np.float32
    # mono = mean of the channels: a 300 Hz sine of amplitude 0.3
    middle = loaded[1000:-1000]
    assert abs(np.abs(middle).max() - 0.3) < 0.01
    spectrum = np.abs(np.fft.rfft(loaded))
    assert np.argmax(spectrum) == 300  # 1 s of audio: bin k is k Hz
    assert load_audio(path, sr=8000).shape == (8000,)


def test_load_audio_zero_length_file(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    loaded = load_audio(path)
    assert loaded.shape == (0,) and loaded.dtype == np.float32
    with pytest.raises(ValueError, match="samples per clip"):
        log_mel_spectrogram(loaded)


def test_load_audio_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(FileNotFoundError, match="not found"):
        log_mel_spectrogram(str(tmp_path / "missing.wav"))
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 100)
    with pytest.raises(ValueError, match="could not decode"):
        load_audio(text)
    with pytest.raises(IsADirectoryError):
        load_audio(tmp_path)
    with pytest.raises(ValueError, match="sample rate"):
        load_audio(text, sr=0)


def test_load_audio_rejects_nan_file(tmp_path):
    audio = tone(440, 0.5)
    audio[100] = np.nan
    path = tmp_path / "nan.wav"
    soundfile.write(path, audio, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio(path)
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_audio(path, sr=8000)


# ----- bad arrays -----


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_raise(bad):
    audio = tone(440, 1.0)
    audio[5000] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        log_mel_spectrogram(audio)
    with pytest.raises(ValueError, match="NaN or infinite"):
        log_mel_spectrogram(np.stack([tone(440, 1.0), audio]))


def test_bad_shapes_and_types_raise():
    with pytest.raises(ValueError, match="stereo"):
        log_mel_spectrogram(np.zeros((SAMPLE_RATE, 2), np.float32))  # [N, channels], not a batch
    with pytest.raises(ValueError, match="one clip"):
        log_mel_spectrogram(np.zeros((1, 2, SAMPLE_RATE), np.float32))
    with pytest.raises(ValueError, match="samples per clip"):
        log_mel_spectrogram(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="n_mels"):
        log_mel_spectrogram(tone(440, 1.0), n_mels=0)
    with pytest.raises(ValueError, match="padding"):
        log_mel_spectrogram(tone(440, 1.0), padding=-1)
    with pytest.raises(TypeError, match="path, numpy array or torch tensor"):
        log_mel_spectrogram([0.0] * 1000)
    with pytest.raises(TypeError, match="dtype"):
        log_mel_spectrogram(np.zeros(1000, np.complex64))
    with pytest.raises(TypeError, match="dtype"):
        log_mel_spectrogram(torch.zeros(1000, dtype=torch.int64))


# ----- pad_or_trim -----


@pytest.mark.parametrize("length", [0, 7, 10, 25])
@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_pad_or_trim_matches_openai(length, axis):
    array = np.random.default_rng(1).standard_normal((10, 10, 3)).astype(np.float32)
    array = np.moveaxis(array, -1, axis) if axis != -1 else array
    expected = whisper.audio.pad_or_trim(array, length, axis=axis)
    got = pad_or_trim(array, length, axis=axis)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)
    got_torch = pad_or_trim(torch.from_numpy(array), length, axis=axis)
    assert isinstance(got_torch, torch.Tensor)
    np.testing.assert_array_equal(got_torch.numpy(), expected)


def test_pad_or_trim_defaults_and_errors():
    assert pad_or_trim(np.ones(100, np.float32)).shape == (N_SAMPLES,)
    mel = torch.ones(80, 10)
    padded = pad_or_trim(mel, N_FRAMES)
    assert padded.shape == (80, N_FRAMES) and padded[:, 10:].abs().sum() == 0
    with pytest.raises(ValueError, match="axis"):
        pad_or_trim(mel, 5, axis=2)
    with pytest.raises(ValueError, match="length"):
        pad_or_trim(mel, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu():
    batch = np.stack([chirp(30.0), tone(440, 30.0, 0.01)])
    cpu = log_mel_spectrogram(batch)
    gpu = log_mel_spectrogram(torch.from_numpy(batch).cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() < TOLERANCE
    by_name = log_mel_spectrogram(batch, device="cuda")
    assert by_name.device.type == "cuda"
    assert (by_name.cpu() - cpu).abs().max().item() < TOLERANCE
