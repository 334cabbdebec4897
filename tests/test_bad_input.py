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


@pytest.fixture(scope="module")
def toy_model():
    import whisper_lens as wl

    return wl.load_model("toy")


def bad_audio(case: str):
    """A bad recording, the error transcribe must raise, and what its message must name."""
    import numpy as np

    return {
        "nan": (np.array([0.0, np.nan, 0.1] * 2000, np.float32), ValueError, ["NaN"]),
        "stereo": (np.zeros((2, 16000), np.float32), ValueError, ["(2, 16000)"]),
        "int16": (np.zeros(16000, np.int16), TypeError, ["int16"]),
        "missing": ("no/such/file.wav", FileNotFoundError, ["no/such/file.wav"]),
        "number": (123, TypeError, ["int"]),
    }[case]


@pytest.mark.parametrize("case", ["nan", "stereo", "int16", "missing", "number"])
def test_transcribe_refuses_bad_audio(toy_model, case):
    import numpy as np

    audio, error, names = bad_audio(case)
    with pytest.raises(error) as excinfo:
        toy_model.transcribe([np.zeros(1000, np.float32), audio])  # checked before any work
    check_error(excinfo, *names)


def test_transcribe_refuses_a_fifo_and_a_folder(toy_model, tmp_path):
    import os

    os.mkfifo(tmp_path / "pipe.wav")
    for path in (tmp_path / "pipe.wav", tmp_path):
        with pytest.raises(ValueError) as excinfo:
            toy_model.transcribe(path)  # a named pipe would block for ever
        check_error(excinfo, str(path), "regular file")


@pytest.mark.parametrize(
    "options, error, names",
    [
        (dict(word_timestamps=True), ValueError, ["alignment_heads"]),  # the toy has no published heads
        (dict(word_timestamps=True, alignment_heads=[(4, 0)]), ValueError, ["(4, 0)", "4 layers"]),
        (dict(word_timestamps=True, alignment_heads=[]), ValueError, ["alignment_heads"]),
        (dict(word_timing="attention"), ValueError, ["word_timing", "attention"]),
        (dict(temperature=-0.5), ValueError, ["temperature", "-0.5"]),
        (dict(temperature=[]), ValueError, ["temperature"]),
        (dict(batch_size=0), ValueError, ["batch_size", "0"]),
        (dict(beam_size=1864), ValueError, ["beam_size", "1864"]),
        (dict(best_of=0), ValueError, ["best_of"]),
        (dict(language="fr"), ValueError, ["fr"]),  # the toy is English only
        (dict(task="summarize"), ValueError, ["summarize"]),
        (dict(trace=["decoder.blocks.9.*"]), KeyError, ["decoder.blocks.9.*"]),
    ],
)
def test_transcribe_refuses_bad_options(toy_model, options, error, names):
    import numpy as np

    with pytest.raises(error) as excinfo:
        toy_model.transcribe(np.zeros(16000, np.float32), **options)
    check_error(excinfo, *names)


def test_transcribe_refuses_a_batch_dependent_edit(toy_model):
    import numpy as np

    import whisper_lens as wl

    edits = wl.Edits().ablate_heads("encoder.blocks.1.attn", [0], how="mean")
    with pytest.raises(ValueError) as excinfo:
        toy_model.transcribe(np.zeros(16000, np.float32), edits=edits)
    check_error(excinfo, "encoder.blocks.1.attn.z", "mean=")


def test_find_alignment_heads_needs_speech(toy_model):
    import numpy as np

    from whisper_lens import find_alignment_heads

    for audio, name in (([], "non-empty list"), ([np.zeros(16000, np.float32)], "no speech"), ("a.wav", "list")):
        with pytest.raises(ValueError) as excinfo:
            find_alignment_heads(toy_model, audio)
        check_error(excinfo, name)


def test_output_files_never_replace_the_users(tmp_path):
    from whisper_lens.writers import OutputFolder, formats

    (tmp_path / "talk.srt").write_text("my own subtitles")
    with pytest.raises(FileExistsError) as excinfo:
        OutputFolder(tmp_path).plan(["talk"], ("srt", "txt"))
    check_error(excinfo, "talk.srt", "not written by whisper-lens")
    assert (tmp_path / "talk.srt").read_text() == "my own subtitles" and not (tmp_path / "talk.txt").exists()
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        with pytest.raises(NotADirectoryError) as excinfo:
            OutputFolder(out).plan(["talk"], ("srt",))
        check_error(excinfo, str(out), "not a folder")
    with pytest.raises(ValueError) as excinfo:
        formats("docx")
    check_error(excinfo, "docx", "srt")


def test_cli_transcribe_bad_arguments_exit_2(tmp_path, capsys):
    import numpy as np
    import soundfile

    from whisper_lens.cli import main

    soundfile.write(tmp_path / "a.wav", np.zeros(8000, np.float32), 16000)
    (tmp_path / "a.txt").write_text("mine")
    cases = [
        (["--alignment-heads", "1-0", "--word-timestamps"], "--alignment-heads"),
        (["-o", str(tmp_path), "-f", "txt"], "a.txt"),
        (["-o", str(tmp_path / "a.wav")], "not a folder"),
        (["--batch-size", "0"], "--batch-size"),
        (["--temperature", "1.5"], "--temperature"),
    ]
    for extra, name in cases:
        assert main(["transcribe", str(tmp_path / "a.wav"), "--no-progress", *extra]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as exit_info:  # argparse's own check of the choices
        main(["transcribe", str(tmp_path / "a.wav"), "-f", "docx"])
    assert exit_info.value.code == 2 and "docx" in capsys.readouterr().err
    assert (tmp_path / "a.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- dataset-scale sweeps and exports
