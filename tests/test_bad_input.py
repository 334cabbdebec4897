"""Bad input, tried as a hostile new user would: every case gets a clear one-line error raised by whisper_lens.

Each case asserts the error's type, that it was raised from whisper_lens' own code (not from
torch, numpy or pathlib deep inside), and that the message names the input. Cases that write
files also assert that nothing of the user's is lost.
"""

from __future__ import annotations

from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "whisper_lens"


def raised_by_whisper_lens(excinfo: pytest.ExceptionInfo) -> bool:
    """True when the innermost frame that raised the error is in the whisper_lens package."""
    return Path(excinfo.traceback[-1].path).resolve().is_relative_to(PACKAGE)


def check_error(excinfo: pytest.ExceptionInfo, *names: str) -> None:
    """The error is whisper_lens', on one line, and names each of ``names`` (the inputs at fault)."""
    message = str(excinfo.value)
    assert raised_by_whisper_lens(excinfo), f"raised from {excinfo.traceback[-1].path}: {message}"
    assert "\n" not in message.strip(), f"message is not one line: {message!r}"
    for name in names:
        assert name in message, f"{name!r} is not in {message!r}"


# ---------------------------------------------------------------- loading (checkpoints, tokenizers found with them)


# ----------------------------------------------------------------------------- the model, run and generate


@pytest.fixture(scope="module")
def toy():
    """The shipped model (a 4 s window, byte-level vocabulary of 1864 tokens) and a batch of two log-mels."""
    import torch

    import whisper_lens as wl

    model = wl.load_model()
    d = model.dims
    mel = torch.rand(2, d.n_mels, 2 * d.n_audio_ctx, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, mel


def test_beam_as_wide_as_the_vocabulary_is_refused_up_front(toy):
    model, mel = toy
    with pytest.raises(ValueError) as excinfo:
        model.generate(mel, beam_size=model.dims.n_vocab)
    check_error(excinfo, "beam_size", str(model.dims.n_vocab))


def test_transcribe_command_refuses_a_beam_as_wide_as_the_vocabulary(capsys):
    from whisper_lens.cli import main

    sample = PACKAGE.parent / "weights" / "toy" / "samples" / "sample1.wav"
    assert main(["transcribe", str(sample), "--beam-size", "5000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "beam_size=5000" in err


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_mel_is_refused(toy, bad):
    import torch

    model, mel = toy
    mel = mel.clone()
    mel[1, 3, 7] = bad
    tokens = torch.tensor([[model.tokenizer.sot]] * 2)
    for call in (lambda: model.generate(mel), lambda: model.run(mel, tokens), lambda: model(mel, tokens)):
        with pytest.raises(ValueError) as excinfo:
            call()
        check_error(excinfo, "mel", "NaN or infinite", "clip 1")


def test_non_finite_audio_features_are_refused(toy):
    import torch

    model, mel = toy
    with torch.no_grad():
        xa = model.encoder(mel)
    xa[0, 5, 2] = float("nan")
    with pytest.raises(ValueError) as excinfo:
        model.generate(audio_features=xa)
    check_error(excinfo, "audio_features", "NaN or infinite", "clip 0")


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "1.0"])
def test_bad_max_initial_timestamp_is_refused(toy, bad):
    model, mel = toy
    with pytest.raises(ValueError) as excinfo:
        model.generate(mel, timestamps=True, max_initial_timestamp=bad)
    check_error(excinfo, "max_initial_timestamp", repr(bad))


def test_run_on_an_empty_batch_is_refused(toy):
    model, mel = toy
    with pytest.raises(ValueError) as excinfo:
        model.run(mel[:0], mel.new_zeros(0, 1).long())
    check_error(excinfo, "mel", "empty batch")


@pytest.mark.parametrize("name", ["beam_size", "max_new_tokens", "seed"])
@pytest.mark.parametrize("bad", [True, 2.0, "3"])
def test_integer_options_take_integers_only(toy, name, bad):
    model, mel = toy
    with pytest.raises(TypeError) as excinfo:
        model.generate(mel, **{name: bad})
    check_error(excinfo, name, repr(bad))


@pytest.mark.parametrize("name", ["temperature", "patience", "length_penalty"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True])
def test_real_options_must_be_finite_and_in_range(toy, name, bad):
    model, mel = toy
    beam = {"beam_size": 2} if name != "temperature" else {}
    with pytest.raises(ValueError) as excinfo:
        model.generate(mel, **beam, **{name: bad})
    check_error(excinfo, name, repr(bad))


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"prompt": ["one", "two", "three"]}, ("prompt", "3 entries", "2 clips")),
        ({"language": ["en"]}, ("language", "1 entries", "2 clips")),
        ({"prompt": [["a"], "b"]}, ("prompt", "entries")),
        ({"language": "fr"}, ("fr",)),
    ],
)
def test_per_clip_prompts_and_languages_are_checked(toy, options, names):
    model, mel = toy
    with pytest.raises((ValueError, TypeError)) as excinfo:
        model.generate(mel, **options)
    check_error(excinfo, *names)


# ---------------------------------------------------------------- CLI, output files, audio, tokenizer files, edits


# ----------------------------------------------------------------------------- long-form transcription and its writers


# ----------------------------------------------------------------------------- dataset-scale sweeps and exports
