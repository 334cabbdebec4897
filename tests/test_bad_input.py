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


# ---------------------------------------------------------------- CLI, output files, audio, tokenizer files, edits


# ----------------------------------------------------------------------------- long-form transcription and its writers


# ----------------------------------------------------------------------------- dataset-scale sweeps and exports


# ----------------------------------------------------------------------------- the study and hallucination experiments


@pytest.fixture(scope="module")
def study_toy():
    from whisper_lens import load_model

    return load_model()


def test_samples_folder_missing_or_empty(study_toy, tmp_path):
    from whisper_lens.study import load_clips

    with pytest.raises(FileNotFoundError) as excinfo:
        load_clips(study_toy, tmp_path / "nowhere")
    check_error(excinfo, "nowhere")
    (tmp_path / "notes.txt").write_text("not audio")
    with pytest.raises(FileNotFoundError) as excinfo:
        load_clips(study_toy, tmp_path)
    check_error(excinfo, str(tmp_path), "transcripts.json")


@pytest.mark.parametrize(
    ("content", "names"),
    [
        ("{not json", ["transcripts.json", "not valid JSON"]),
        ('["a.wav"]', ["transcripts.json", "object"]),
        ('{"a.wav": "   "}', ["a.wav", "non-empty"]),
        ('{"a.wav": {"words": []}}', ["a.wav", "non-empty"]),
        ('{"missing.wav": "hello"}', ["missing.wav", "not a file"]),
    ],
)
def test_samples_with_a_bad_transcripts_json(study_toy, tmp_path, content, names):
    import shutil

    from whisper_lens.loading import SHIPPED
    from whisper_lens.study import load_clips

    shutil.copy(SHIPPED["toy"] / "samples" / "sample1.wav", tmp_path / "a.wav")
    (tmp_path / "transcripts.json").write_text(content)
    with pytest.raises((ValueError, FileNotFoundError)) as excinfo:
        load_clips(study_toy, tmp_path)
    check_error(excinfo, *names)


def test_clip_longer_than_the_window(study_toy, tmp_path):
    import numpy as np
    import soundfile

    from whisper_lens.study import load_clips

    soundfile.write(tmp_path / "long.wav", np.zeros(5 * 16000, np.float32), 16000)  # 5 s; the toy's window is 4 s
    with pytest.raises(ValueError) as excinfo:
        load_clips(study_toy, tmp_path)
    check_error(excinfo, "long.wav", "5.0 s", "4 s window", "whisper-lens transcribe")


def test_model_without_a_tokenizer(study_toy, tmp_path):
    import copy

    import torch

    from whisper_lens.experiments import removal_sweep
    from whisper_lens.hallucination import head_sweep
    from whisper_lens.study import load_clips

    bare = copy.copy(study_toy)
    bare.tokenizer = None
    mel = torch.zeros(1, 80, 2 * study_toy.dims.n_audio_ctx)
    for call in (lambda: load_clips(bare), lambda: removal_sweep(bare, mel, "decoder", references=["a"]),
                 lambda: head_sweep(bare, mel, mel)):  # fmt: skip
        with pytest.raises(ValueError) as excinfo:
            call()
        check_error(excinfo, "no tokenizer", "tokenizer=")


def test_bad_experiment_arguments(study_toy):
    import torch

    from whisper_lens.experiments import wer
    from whisper_lens.hallucination import head_sweep, non_speech

    with pytest.raises(ValueError) as excinfo:
        wer("a", "a", normalize="french")
    check_error(excinfo, "'french'", "english")
    with pytest.raises(ValueError) as excinfo:
        non_speech(seconds=-1)
    check_error(excinfo, "seconds", "-1")
    mel = torch.zeros(1, 80, 2 * study_toy.dims.n_audio_ctx)
    with pytest.raises(ValueError) as excinfo:
        head_sweep(study_toy, mel, mel, heads=[("cross_attn", 9, 0)])
    check_error(excinfo, "('cross_attn', 9, 0)", "layer 0-3")
    with pytest.raises(ValueError) as excinfo:
        head_sweep(study_toy, mel, mel, heads=["attn"])
    check_error(excinfo, "'attn'", "(kind, layer, head)")


def test_bad_picture_arguments(tmp_path):
    import numpy as np

    from whisper_lens import plot

    with pytest.raises(ValueError) as excinfo:
        plot.cross_attention_over_mel(np.zeros((80, 20)), np.ones((2, 10)) / 10, ["a", "b"], tmp_path / "x.png",
                                      seconds=-1.0)  # fmt: skip
    check_error(excinfo, "seconds", "-1.0")
    with pytest.raises(ValueError) as excinfo:
        plot.attention_grid(np.ones((1, 3, 3)) / 3, tmp_path / "x.png", crop=0)
    check_error(excinfo, "crop", "0")
    with pytest.raises(ValueError) as excinfo:
        plot.head_grid({"self": np.zeros((4, 6)), "cross": np.zeros((4, 5))}, tmp_path / "x.png")
    check_error(excinfo, "(4, 5)", "(4, 6)")
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["hallucinate", "--seconds", "9"], ["9 s", "4 s window"]),
        (["hallucinate", "--max-new-tokens", "0"], ["--max-new-tokens", "0"]),
        (["ablate", "a.wav", "--samples", "x"], ["--samples", "not both"]),
        (["ablate", "--reference", "hello"], ["--reference", "--samples"]),
    ],
)
def test_study_commands_refuse_bad_arguments(tmp_path, capsys, args, names):
    from whisper_lens.cli import main

    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("whisper-lens: error:") and "\n" not in err and "Traceback" not in err
    for name in names:
        assert name in err, (name, err)
    assert not (tmp_path / "out").exists()
