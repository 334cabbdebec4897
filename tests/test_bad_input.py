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


@pytest.fixture(scope="module")
def dataset_toy_model():
    import whisper_lens as wl

    return wl.load_model()


@pytest.fixture
def dataset_toy(dataset_toy_model):
    """The shipped model, on one thread (a small model's products gain nothing from two busy cores)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield dataset_toy_model
    torch.set_num_threads(threads)


@pytest.fixture
def clips_dir(tmp_path):
    """Two of the toy's samples in a folder, with their transcripts."""
    import json
    import shutil

    samples = PACKAGE.parent / "weights" / "toy" / "samples"
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("sample1.wav", "sample2.wav"):
        shutil.copy(samples / name, folder / name)
    truth = json.loads((samples / "transcripts.json").read_text())
    (folder / "refs.json").write_text(json.dumps({k: truth[k] for k in ("sample1.wav", "sample2.wav")}))
    return folder


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sweep_an_empty_folder_is_named(dataset_toy, tmp_path):
    from whisper_lens.distributed import find_clips

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not audio")
    with pytest.raises(FileNotFoundError) as excinfo:
        find_clips([tmp_path / "empty"], dataset_toy)
    check_error(excinfo, str(tmp_path / "empty"))


@pytest.mark.parametrize("kind", ["text", "empty", "too long", "fifo"])
def test_sweep_an_unreadable_clip_is_named_before_any_work(dataset_toy, clips_dir, kind):
    import os

    import numpy as np
    import soundfile as sf

    from whisper_lens.distributed import find_clips

    bad = clips_dir / "bad.wav"
    if kind == "text":
        bad.write_text("this is not audio")
    elif kind == "empty":
        sf.write(bad, np.zeros(0, np.float32), 16000)
    elif kind == "too long":
        sf.write(bad, np.zeros(16000 * 5, np.float32), 16000)  # the toy's window is 4 s
    else:
        os.mkfifo(bad)  # reading it would block for ever
    with pytest.raises((ValueError, OSError)) as excinfo:
        find_clips([clips_dir / "sample1.wav", bad], dataset_toy)
    check_error(excinfo, str(bad))


def test_sweep_references_without_a_clip_are_refused(dataset_toy, clips_dir):
    import json

    from whisper_lens.distributed import find_clips

    refs = clips_dir / "refs.json"
    refs.write_text(json.dumps({"sample1.wav": "my rice is funny"}))
    with pytest.raises(ValueError) as excinfo:
        find_clips([clips_dir], dataset_toy, references=refs)
    check_error(excinfo, "sample2.wav", str(refs))
    refs.write_text("[1, 2]")
    with pytest.raises(ValueError) as excinfo:
        find_clips([clips_dir], dataset_toy, references=refs)
    check_error(excinfo, str(refs))


def test_sweep_an_out_holding_another_studys_rows_is_refused_untouched(dataset_toy, clips_dir, tmp_path):
    from whisper_lens.distributed import export, find_clips, sweep

    clips = find_clips([clips_dir], dataset_toy, references=clips_dir / "refs.json")
    out = tmp_path / "out"
    sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
    before = snapshot(out)
    with pytest.raises(FileExistsError) as excinfo:  # another stack
        sweep(dataset_toy, clips, out, stack="decoder", removals=[0], progress=False)
    check_error(excinfo, str(out), "another sweep")
    with pytest.raises(FileExistsError) as excinfo:  # another command
        export(dataset_toy, clips, out, "encoder.ln_post", progress=False)
    check_error(excinfo, str(out), "sweep")
    assert snapshot(out) == before


def test_sweep_an_out_with_files_it_did_not_write_is_refused_untouched(dataset_toy, clips_dir, tmp_path):
    from whisper_lens.distributed import find_clips, sweep

    clips = find_clips([clips_dir], dataset_toy)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    sweep(dataset_toy, clips, tmp_path / "marked", stack="encoder", removals=[0], progress=False)
    (tmp_path / "marked" / "parts" / "notes.txt").write_text("my notes")
    for out in (tmp_path / "mine", tmp_path / "marked"):
        before = snapshot(out)
        with pytest.raises(FileExistsError) as excinfo:
            sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
        check_error(excinfo, str(out), "notes.txt")
        assert snapshot(out) == before
    (tmp_path / "file").write_text("mine")
    with pytest.raises(NotADirectoryError) as excinfo:
        sweep(dataset_toy, clips, tmp_path / "file", stack="encoder", removals=[0], progress=False)
    check_error(excinfo, str(tmp_path / "file"))


def test_sweep_an_out_in_use_by_another_run_is_refused(dataset_toy, clips_dir, tmp_path):
    import fcntl

    from whisper_lens.distributed import MARKER, find_clips, sweep

    clips = find_clips([clips_dir], dataset_toy)
    out = tmp_path / "out"
    sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
    with open(out / MARKER) as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as a running sweep holds it
        with pytest.raises(BlockingIOError) as excinfo:
            sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
    check_error(excinfo, str(out), "in use")


@pytest.mark.parametrize(
    "options, names",
    [
        ({"stack": "encoder", "removals": [5]}, ["encoder", "[5]"]),
        ({"stack": "middle"}, ["middle"]),
        ({"stack": "both", "batch_size": 0}, ["batch size", "0"]),
    ],
)
def test_sweep_bad_settings_are_refused_before_any_work(dataset_toy, clips_dir, tmp_path, options, names):
    from whisper_lens.distributed import find_clips, sweep

    with pytest.raises(ValueError) as excinfo:
        sweep(dataset_toy, find_clips([clips_dir], dataset_toy), tmp_path / "out", progress=False, **options)
    check_error(excinfo, *names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "trace, options, names, error",
    [
        ("encoder.blocks.9.resid_post", {}, ["encoder.blocks.9.resid_post"], KeyError),
        ("encoder.ln_post", {"positions": "some"}, ["some"], ValueError),
        ("encoder.ln_post", {"dtype": "int8"}, ["torch.int8"], ValueError),
        ("encoder.ln_post", {"shard_clips": 0}, ["0"], ValueError),
    ],
)
def test_export_bad_settings_are_refused_before_work(dataset_toy, clips_dir, tmp_path, trace, options, names, error):
    import torch

    from whisper_lens.distributed import export, find_clips

    if "dtype" in options:
        options = {"dtype": getattr(torch, options["dtype"])}

    with pytest.raises(error) as excinfo:
        export(dataset_toy, find_clips([clips_dir], dataset_toy), tmp_path / "out", trace, progress=False, **options)
    check_error(excinfo, *names)
    assert not (tmp_path / "out").exists()


def test_export_reader_names_what_is_missing(dataset_toy, clips_dir, tmp_path):
    from whisper_lens.distributed import export, find_clips, load_activations

    with pytest.raises(FileNotFoundError) as excinfo:
        load_activations(clips_dir)
    check_error(excinfo, str(clips_dir))
    export(dataset_toy, find_clips([clips_dir], dataset_toy), tmp_path / "x", "encoder.ln_post", progress=False)
    acts = load_activations(tmp_path / "x")
    for key, name in [(("nope.wav", "encoder.ln_post"), "nope.wav"), (("sample1.wav", "logits"), "logits")]:
        with pytest.raises(KeyError) as excinfo:
            acts[key]
        check_error(excinfo, name)


def test_sweep_cli_bad_input_is_one_line_exit_2(clips_dir, tmp_path, capsys):
    from whisper_lens.cli import main

    (tmp_path / "empty").mkdir()
    cases = [
        (["sweep", str(tmp_path / "empty"), "--stack", "both", "--out", str(tmp_path / "o")], "empty"),
        (["sweep", str(clips_dir), "--stack", "encoder", "--removals", "9", "--out", str(tmp_path / "o")], "9"),
        (["export", str(clips_dir), "--trace", "nothing.like.this", "--out", str(tmp_path / "o")], "nothing.like.this"),
    ]
    for argv, named in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("whisper-lens: error:") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "o").exists()
