"""The CLI's contract for bad arguments: exit status 2, one line on stderr, no traceback, nothing of the user's touched.

Every command is run in this process through ``cli.main`` (an uncaught exception would fail the
test with its traceback); ``test_a_real_process_...`` checks the same from a shell's point of view.
``transcribe``'s long-form arguments are tried further in tests/test_bad_input.py and test_transcribe.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from whisper_lens import cli
from whisper_lens.loading import SHIPPED

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(SHIPPED["toy"] / "samples" / "sample1.wav")


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with the things bad arguments point at; returns the substitutions for {names}."""
    import soundfile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "text.wav").write_text("this is not audio")
    soundfile.write(tmp_path / "long.wav", np.zeros(5 * 16000, np.float32), 16000)  # the toy's window is 4 s
    os.mkfifo(tmp_path / "pipe.wav")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "config.json").write_text("{}")
    return {"{sample}": SAMPLE, "{file}": "a-file", "{mine}": "mine"}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    return code, capsys.readouterr().err


BAD = [
    # (arguments, a piece of the message that names the fault)
    ([], "COMMAND"),
    (["no-such-command"], "no-such-command"),
    (["download"], "name"),
    (["download", "not a model!"], "not a model!"),
    (["names", "--batch", "-1"], "--batch"),
    (["names", "--batch", "0"], "--batch"),
    (["names", "--tokens", "-5"], "--tokens"),
    (["names", "--tokens", "100000"], "100000"),
    (["names", "--tokens", "x"], "'x'"),
    (["names", "no.such.name*"], "no.such.name*"),
    (["names", "--model", "no-such-model"], "no-such-model"),
    (["names", "--device", "cpu"], "--device"),
    (["transcribe"], "audio"),
    (["transcribe", "missing.wav"], "missing.wav"),
    (["transcribe", "pipe.wav"], "pipe.wav"),
    (["transcribe", "text.wav"], "text.wav"),
    (["transcribe", "{sample}", "-o", "{file}"], "a-file"),
    (["transcribe", "{sample}", "-o", "{mine}", "-f", "txt", "--word-timestamps", "-m", "toy"], "--alignment-heads"),
    (["transcribe", "."], "directory"),
    (["transcribe", "{sample}", "--beam-size", "0"], "--beam-size"),
    (["transcribe", "{sample}", "--beam-size", "-1"], "--beam-size"),
    (["transcribe", "{sample}", "--batch-size", "0"], "--batch-size"),
    (["transcribe", "{sample}", "--output-format", "docx"], "docx"),
    (["transcribe", "{sample}", "--language", "klingon"], "klingon"),
    (["transcribe", "{sample}", "--device", "tpu"], "tpu"),
    (["transcribe", "{sample}", "--device", "cuda:9"], "cuda:9"),
    (["transcribe", "{sample}", "--model", "no-such-model"], "no-such-model"),
    (["demo", "--out", "{file}"], "a-file"),
    (["demo", "--out", "{mine}"], "mine"),
    (["demo", "--out", "."], "current folder"),
    (["demo", "--samples", "{mine}"], "mine has no audio files"),
    (["demo", "--samples", "no-such-folder", "--model", "toy"], "no-such-folder"),
    (["demo", "--device", "tpu"], "tpu"),
    (["lens", "missing.wav", "--model", "toy", "--out", "lens-out"], "missing.wav"),
    (["lens", "pipe.wav", "--model", "toy", "--out", "lens-out"], "pipe.wav"),
    (["lens", "{sample}", "--out", "{mine}"], "mine"),
    (["lens", "{sample}", "--out", "{file}"], "a-file"),
    (["lens", "{sample}", "--device", "tpu"], "tpu"),
    (["ablate", "{sample}", "--stack", "middle"], "middle"),
    (["ablate", "{sample}", "--reference", "a", "--reference", "b"], "--reference"),
    (["ablate", "{sample}", "--out", "{mine}"], "mine"),
    (["attention", "{sample}", "--model", "toy", "--layer", "99", "--out", "att"], "99"),
    (["attention", "{sample}", "--model", "toy", "--layer", "-1", "--out", "att"], "-1"),
    (["attention", "{sample}", "--out", "{mine}"], "mine"),
    (["train-toy", "--steps", "0"], "steps"),
    (["train-toy", "--steps", "-3"], "steps"),
    (["train-toy", "--batch-size", "0"], "--batch-size"),
    (["train-toy", "--clips", "0"], "--clips"),
    (["train-toy", "--lr", "0"], "lr"),
    (["train-toy", "--lr", "nan"], "nan"),
    (["train-toy", "--device", "tpu"], "tpu"),
    (["train-toy", "--device", "cuda"], "cuda"),
    (["train-toy", "--out", "{file}"], "a-file"),
    (["train-toy", "--out", "{mine}"], "config.json"),
    (["train-toy", "--data", "{file}"], "a-file"),
    (["train-toy", "--runs", "{file}"], "a-file"),
    (["train-toy", "--runs", "{mine}"], "--runs mine is not empty"),  # it overwrote the user's bytes.tiktoken
    (["train-toy", "--data", "{mine}", "--runs", "{mine}"], "--data mine is not empty"),
]


@pytest.mark.parametrize(("argv", "names"), BAD, ids=[" ".join(a) or "(none)" for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(place, capsys, tmp_path, argv, names):
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_fifo()}
    code, err = run_cli([place.get(a, a) for a in argv], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("whisper-lens: error: "), err
    assert names in lines[0], err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_fifo()}
    assert after == before  # nothing of the user's changed, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "long.wav", "mine", "pipe.wav", "text.wav"]


def test_a_real_process_exits_2_with_one_line_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for argv in (["names", "--batch", "-1"], ["names", "--tokens", "-5"], ["lens", SAMPLE, "--out", "."]):
        done = subprocess.run([sys.executable, "-m", "whisper_lens", *argv], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_names_lists_shapes_for_the_batch_and_tokens_asked(capsys):
    code = cli.main(["names", "--batch", "3", "--tokens", "7", "decoder.blocks.1.resid_post", "logits"])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert [line.split()[0] for line in out] == ["decoder.blocks.1.resid_post", "logits"]
    assert out[0].endswith("[3, 7, 192]") and out[1].endswith("[3, 7, 1864]")  # toy: width 192, 1864 tokens


def test_a_rerun_replaces_its_own_output_and_keeps_nothing_stale(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attention", SAMPLE, "--model", "toy", "--out", "att"]) == 0
    marker = json.loads((tmp_path / "att" / ".whisper-lens.json").read_text())
    assert marker["command"] == "attention" and "clip0_attention.csv" in marker["files"]
    first = sorted(p.name for p in (tmp_path / "att").iterdir())
    assert cli.main(["attention", SAMPLE, "--model", "toy", "--out", "att"]) == 0
    assert sorted(p.name for p in (tmp_path / "att").iterdir()) == first
    assert (tmp_path / "att" / "clip0_attention.csv").read_text().startswith("name,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att"]  # no temporary or .old folder left
    capsys.readouterr()


def test_a_file_of_its_output_the_user_edited_is_kept_and_named(tmp_path, capsys, monkeypatch):
    """The marker recorded names, not contents: a lens CSV edited by hand was replaced without a word."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["attention", SAMPLE, "--model", "toy", "--out", "att"]) == 0
    (tmp_path / "att" / "clip0_attention.csv").write_text("edited by hand")
    before = {p.name: p.read_bytes() for p in (tmp_path / "att").iterdir()}
    capsys.readouterr()
    assert cli.main(["attention", SAMPLE, "--model", "toy", "--out", "att"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clip0_attention.csv" in err and "edited" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "att").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att"]


def test_a_file_named_like_a_flag_is_explained(tmp_path, capsys, monkeypatch):
    """`transcribe -dash.wav` said "the following arguments are required: audio"."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copy(SAMPLE, tmp_path / "-dash.wav")
    code, err = run_cli(["transcribe", "-dash.wav"], capsys)
    assert code == 2 and err.count("\n") == 1 and "-dash.wav" in err and "./-dash.wav" in err, err


def test_errors_of_the_python_api_name_the_flags(capsys):
    """The CLI suggested Python syntax (`alignment_heads=`, `beam_size=`) for a flag."""
    for argv, flag, keyword in [
        (["transcribe", SAMPLE, "--word-timestamps", "-m", "toy"], "--alignment-heads", "alignment_heads"),
        (["transcribe", SAMPLE, "--beam-size", "5000", "-m", "toy"], "--beam-size 5000", "beam_size"),
    ]:
        code, err = run_cli(argv, capsys)
        assert code == 2 and flag in err and f"{keyword}=" not in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--logprob-threshold", "nan"], ["--logprob-threshold", "nan"]),
        (["--logprob_threshold=-inf"], ["--logprob-threshold", "-inf"]),
        (["--no-speech-threshold", "5"], ["--no-speech-threshold", "5"]),
        (["--compression-ratio-threshold", "inf"], ["--compression-ratio-threshold", "inf"]),
        (["--no_speech_threshold", "0.5x"], ["--no_speech_threshold", "0.5x"]),
        (["--beam-size", "5", "--temperature", "0.5"], ["--beam-size 5", "--temperature (0.5, 0.7, 0.9)"]),
        (["--beam_size=5", "--temperature", "0.5", "--temperature_increment_on_fallback", "None"], ["--beam-size 5"]),
        (["--seed", str(2**70), "--temperature", "0.5"], ["error: --seed must be", str(2**70)]),
    ],
)
def test_transcribe_options_are_refused_before_any_window_in_flag_names(flags, named, capsys, monkeypatch, tmp_path):
    """`--beam-size 5 --temperature 0.5` ignored the beam (the API refuses it); NaN or out-of-range thresholds are
    refused before any window is decoded, in the command's flag names, not Python's keywords."""
    from whisper_lens import longform

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(longform, "run_streams", lambda *a, **k: pytest.fail("a window was decoded before the check"))
    code, err = run_cli(["transcribe", SAMPLE, "-m", "toy", "--no-progress", *flags], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert all(n in err for n in named) and "_threshold=" not in err and "beam_size=" not in err, err
    assert list(tmp_path.iterdir()) == []


def test_transcribe_command_word_timestamps_keep_the_text_and_seed_none_samples(capsys, tmp_path, monkeypatch):
    """`--word-timestamps --alignment-heads 0:1` printed "no speech" and wrote an empty transcript (head (0, 1) puts
    every word at 0 s); `--seed None` samples unseeded, as the API's seed=None. `--temperature 0.5` alone is not
    refused: the default beam (5, openai-whisper's) acts only at temperature 0."""
    monkeypatch.chdir(tmp_path)
    argv = ["transcribe", SAMPLE, "-m", "toy", "--no-progress", "-f", "json", "--word-timestamps",
            "--alignment-heads", "0:1"]  # fmt: skip
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "no speech" not in out and "my rice is funny" in out, out
    result = json.loads((tmp_path / "sample1.json").read_text())
    assert result["text"] == "my rice is funny" and [w["word"] for w in result["segments"][0]["words"]] == [
        "my", " rice", " is", " funny"]  # fmt: skip
    for extra in (["--seed", "None", "--temperature", "0.5"], ["--temperature", "0.5"]):
        assert cli.main(["transcribe", SAMPLE, "-m", "toy", "--no-progress", "-f", "txt", "--overwrite", *extra]) == 0
        assert (tmp_path / "sample1.txt").read_text().strip()
    capsys.readouterr()
