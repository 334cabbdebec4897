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

# Each case: a one-line error raised by whisper_lens naming the file (or the argument) at fault; nothing is built.


def _copy_hf(folder: Path, to: Path) -> Path:
    import shutil

    to.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, to / f)
    return to


@pytest.fixture(scope="module")
def small_ct2(small_hf_dir, tmp_path_factory) -> Path:
    """The small random model converted by CTranslate2's converter (no tokenizer given, so its vocabulary.json is
    the converter's filler)."""
    from ctranslate2.converters import TransformersConverter

    out = tmp_path_factory.mktemp("small_ct2") / "ct2"
    TransformersConverter(str(small_hf_dir[0])).convert(str(out), quantization="int8")
    return out


def _ct2_copy(small_ct2: Path, to: Path, spec: str | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the converted folder; with ``spec`` or ``drop``, model.bin rewritten under that spec name or
    without those variables."""
    import shutil

    shutil.copytree(small_ct2, to)
    if spec is not None or drop:
        from whisper_lens.ct2 import read_model_bin

        stored_spec, _, variables = read_model_bin(to / "model.bin")
        skip = {"decoder/projection/weight", *drop}  # the projection is an alias of the embedding
        write_model_bin(to / "model.bin", spec or stored_spec, {k: v for k, v in variables.items() if k not in skip})
    return to


def write_model_bin(path: Path, spec: str, variables: dict, version: int = 6) -> None:
    """CTranslate2's model.bin layout (see whisper_lens/ct2.py), written from a dict of tensors, no aliases."""
    import struct

    import torch

    codes = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string(spec), struct.pack("<II", 3, len(variables))]
    for name, t in variables.items():
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # (a scalar as one element)
        out += [string(name), struct.pack("<B", t.dim()), struct.pack(f"<{t.dim()}I", *t.shape)]
        out += [struct.pack("<BI", codes.index(t.dtype), len(data)), data]
    path.write_bytes(b"".join(out) + struct.pack("<I", 0))


def test_ct2_truncated_model_bin(small_ct2, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2")
    data = (folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "model.bin"))
    assert (folder / "model.bin").read_bytes() == data[: len(data) // 2]  # read, never written


def test_ct2_unknown_format_version(small_ct2, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2")
    data = bytearray((folder / "model.bin").read_bytes())
    data[:4] = (7).to_bytes(4, "little")
    (folder / "model.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="format version 7") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "model.bin"))


def test_ct2_folder_of_another_model(small_ct2, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2", spec="TransformerDecoderModelSpec")
    with pytest.raises(CheckpointError, match="not Whisper") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "model.bin"), "TransformerDecoderModelSpec")


def test_ct2_int8_weight_without_its_scale(small_ct2, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    name = "decoder/layer_1/ffn/linear_0/weight"
    folder = _ct2_copy(small_ct2, tmp_path / "ct2", drop=(name + "_scale",))
    with pytest.raises(CheckpointError, match="int8 without") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "model.bin"), name)


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [("alignment_heads", [[1, 0], [9, 2]], "[9, 2]"), ("lang_ids", [50259, 90000], "lang_ids"),
     ("suppress_ids", "all", "suppress_ids"), ("alignment_heads", {"1": 0}, "alignment_heads")],
)  # fmt: skip
def test_ct2_config_that_contradicts_the_weights(small_ct2, tmp_path, key, value, named):
    import json

    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CheckpointError) as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "config.json"), named)


def test_ct2_config_that_is_not_an_object(small_ct2, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="JSON object") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "config.json"))


def test_ct2_vocabulary_that_is_not_whispers(small_ct2, tmp_path):
    """The converter, given a model without a tokenizer, writes a filler vocabulary.json: refused, and tokenizer=
    is the way out."""
    from whisper_lens import load_model
    from whisper_lens.loading import OFFICIAL_TOKENIZERS, CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "ct2")
    with pytest.raises(CheckpointError, match="tokenizer=") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "vocabulary.json"))
    assert load_model(folder, tokenizer=OFFICIAL_TOKENIZERS[51865]).tokenizer.n_vocab == 51865


def test_source_that_is_not_a_name_or_path():
    from whisper_lens import load_model

    with pytest.raises(TypeError) as excinfo:
        load_model(123)
    check_error(excinfo, "123")


@pytest.mark.parametrize("dtype", ["torch.int64", "int8", "half-precision"])
def test_dtype_that_is_not_a_float_type(small_hf_dir, dtype):
    import torch

    from whisper_lens import load_model

    with pytest.raises(ValueError, match="floating-point") as excinfo:
        load_model(small_hf_dir[0], dtype=torch.int64 if dtype == "torch.int64" else dtype)
    check_error(excinfo, dtype)


@pytest.mark.parametrize("device", ["tpu", "cuda", "cuda:0", 3.5])
def test_device_that_is_not_here(small_hf_dir, device, monkeypatch):
    import torch

    from whisper_lens import load_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(ValueError, match="device") as excinfo:
        load_model(small_hf_dir[0], device=device)
    check_error(excinfo, str(device))


def test_config_json_that_is_a_list(small_hf_dir, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _copy_hf(small_hf_dir[0], tmp_path / "hf")
    (folder / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match="JSON object") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "config.json"))


def test_config_json_that_contradicts_the_weights(small_hf_dir, tmp_path):
    import json

    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    folder = _copy_hf(small_hf_dir[0], tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "decoder_layers": config["decoder_layers"] + 1}))
    with pytest.raises(CheckpointError, match="missing") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder), "decoder.blocks.3")


def test_pickle_that_runs_code_is_refused_in_one_line(tmp_path):
    import torch

    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    class Payload:
        def __reduce__(self):
            return (print, ("this ran",))

    path = tmp_path / "model.pt"
    torch.save({"dims": Payload(), "model_state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="weights only") as excinfo:
        load_model(path)
    check_error(excinfo, str(path))


def test_file_that_is_not_a_checkpoint(tmp_path):
    import torch

    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    text = tmp_path / "notes.pt"
    text.write_text("hello, I am text")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint") as excinfo:
        load_model(text)
    check_error(excinfo, str(text))
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an OpenAI Whisper checkpoint") as excinfo:
        load_model(other)
    check_error(excinfo, str(other))
    dims = tmp_path / "dims.pt"
    torch.save({"dims": {"n_mels": 80}, "model_state_dict": {}}, dims)
    with pytest.raises(CheckpointError, match="'dims' must have the fields") as excinfo:
        load_model(dims)
    check_error(excinfo, str(dims))


def test_unknown_name_and_missing_path(tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    with pytest.raises(CheckpointError, match=r"tiny\.en.*large-v3-turbo") as excinfo:
        load_model("tiny.fr")
    check_error(excinfo, "'tiny.fr'")
    with pytest.raises(CheckpointError, match="not a path that exists") as excinfo:
        load_model(str(tmp_path / "does-not-exist"))
    check_error(excinfo, str(tmp_path / "does-not-exist"))


def test_folder_without_weights_and_truncated_safetensors(small_hf_dir, tmp_path):
    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing") as excinfo:
        load_model(tmp_path / "empty")
    check_error(excinfo, str(tmp_path / "empty"))
    folder = _copy_hf(small_hf_dir[0], tmp_path / "hf")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as excinfo:
        load_model(folder)
    check_error(excinfo, str(folder / "model.safetensors"))


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape", "integer"])
def test_pt_whose_keys_do_not_fit_its_dims(tmp_path, case):
    from dataclasses import asdict

    import torch

    from whisper_lens import load_model
    from whisper_lens.loading import CheckpointError
    from whisper_lens.model import Whisper

    from .conftest import SMALL

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Whisper(SMALL).state_dict().items()}
    state = {k: torch.zeros(shape) for k, shape in shapes.items()}
    key = {"missing": "decoder.blocks.1.mlp.2.bias", "unexpected": "decoder.blocks.9.attn.query.weight",
           "shape": "encoder.conv1.weight", "integer": "decoder.ln.weight"}[case]  # fmt: skip
    if case == "missing":
        del state[key]
    elif case == "unexpected":
        state[key] = torch.zeros(2)
    elif case == "shape":
        state[key] = torch.zeros(64, 80, 5)
    else:
        state[key] = torch.zeros(shapes[key], dtype=torch.int64)
    path = tmp_path / f"{case}.pt"
    torch.save({"dims": asdict(SMALL), "model_state_dict": state}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_model(path)
    check_error(excinfo, str(path), key)


def test_tokenizer_of_another_vocabulary(small_hf_dir):
    from whisper_lens import load_model, load_tokenizer
    from whisper_lens.loading import OFFICIAL_TOKENIZERS

    english = load_tokenizer(OFFICIAL_TOKENIZERS[51864], n_vocab=51864)
    with pytest.raises(ValueError, match="n_vocab") as excinfo:
        load_model(small_hf_dir[0], tokenizer=english)  # the model's vocabulary is the multilingual 51865
    check_error(excinfo, "51864", "51865")


# ----------------------------------------------------------------------------- the model, run and generate


@pytest.fixture(scope="module")
def toy_batch():
    """The shipped model (a 4 s window, byte-level vocabulary of 1864 tokens) and a batch of two log-mels."""
    import torch

    import whisper_lens as wl

    model = wl.load_model()
    d = model.dims
    mel = torch.rand(2, d.n_mels, 2 * d.n_audio_ctx, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return model, mel


def test_beam_as_wide_as_the_vocabulary_is_refused_up_front(toy_batch):
    model, mel = toy_batch
    with pytest.raises(ValueError) as excinfo:
        model.generate(mel, beam_size=model.dims.n_vocab)
    check_error(excinfo, "beam_size", str(model.dims.n_vocab))


def test_transcribe_command_refuses_a_beam_as_wide_as_the_vocabulary(capsys):
    from whisper_lens.cli import main

    sample = PACKAGE.parent / "weights" / "toy" / "samples" / "sample1.wav"
    assert main(["transcribe", str(sample), "--beam-size", "5000", "-m", "toy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "--beam-size 5000" in err  # the flag, not the keyword


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_mel_is_refused(toy_batch, bad):
    import torch

    model, mel = toy_batch
    mel = mel.clone()
    mel[1, 3, 7] = bad
    tokens = torch.tensor([[model.tokenizer.sot]] * 2)
    for call in (lambda: model.generate(mel), lambda: model.run(mel, tokens), lambda: model(mel, tokens)):
        with pytest.raises(ValueError) as excinfo:
            call()
        check_error(excinfo, "mel", "NaN or infinite", "clip 1")


def test_non_finite_audio_features_are_refused(toy_batch):
    import torch

    model, mel = toy_batch
    with torch.no_grad():
        xa = model.encoder(mel)
    xa[0, 5, 2] = float("nan")
    with pytest.raises(ValueError) as excinfo:
        model.generate(audio_features=xa)
    check_error(excinfo, "audio_features", "NaN or infinite", "clip 0")


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "1.0"])
def test_bad_max_initial_timestamp_is_refused(toy_batch, bad):
    model, mel = toy_batch
    with pytest.raises(ValueError) as excinfo:
        model.generate(mel, timestamps=True, max_initial_timestamp=bad)
    check_error(excinfo, "max_initial_timestamp", repr(bad))


def test_run_on_an_empty_batch_is_refused(toy_batch):
    model, mel = toy_batch
    with pytest.raises(ValueError) as excinfo:
        model.run(mel[:0], mel.new_zeros(0, 1).long())
    check_error(excinfo, "mel", "empty batch")


@pytest.mark.parametrize("name", ["beam_size", "max_new_tokens", "seed"])
@pytest.mark.parametrize("bad", [True, 2.0, "3"])
def test_integer_options_take_integers_only(toy_batch, name, bad):
    model, mel = toy_batch
    with pytest.raises(TypeError) as excinfo:
        model.generate(mel, **{name: bad})
    check_error(excinfo, name, repr(bad))


@pytest.mark.parametrize("name", ["temperature", "patience", "length_penalty"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True])
def test_real_options_must_be_finite_and_in_range(toy_batch, name, bad):
    model, mel = toy_batch
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
def test_per_clip_prompts_and_languages_are_checked(toy_batch, options, names):
    model, mel = toy_batch
    with pytest.raises((ValueError, TypeError)) as excinfo:
        model.generate(mel, **options)
    check_error(excinfo, *names)


# ---------------------------------------------------------------- CLI, output files, audio, tokenizer files, edits
# (the CLI's exit status and one-line stderr for every command: tests/test_cli.py)

import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

import whisper_lens as wl  # noqa: E402
from whisper_lens import cli, files  # noqa: E402
from whisper_lens.audio import load_audio, load_windows  # noqa: E402
from whisper_lens.files import MARKER, atomic_write, output_folder  # noqa: E402
from whisper_lens.loading import SHIPPED, save_model  # noqa: E402
from whisper_lens.toy.train import MODEL_FILES, fit, init_weights, train, write_byte_vocab  # noqa: E402

SAMPLES = SHIPPED["toy"] / "samples"
REPO = PACKAGE.parent


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to assert that nothing of the user's changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def raises_whisper_lens_error(call, *args, **kwargs) -> BaseException | None:
    """Run ``call``; None if it worked, else the error after checking that it is whisper_lens' own, on one line."""
    try:
        call(*args, **kwargs)
    except (ValueError, TypeError, KeyError, IndexError, OSError) as e:
        info = pytest.ExceptionInfo.from_exception(e)
        check_error(info)
        event(f"{getattr(call, '__name__', 'call')}: {type(e).__name__}")
        return e
    event(f"{getattr(call, '__name__', 'call')}: worked")
    return None


@contextmanager
def alarm(seconds: int):
    """Fail instead of hanging for ever (a named pipe opened for reading blocks until a writer comes)."""

    def fail(signum, frame):
        raise AssertionError(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def toy():
    return wl.load_model()


@pytest.fixture(scope="module")
def toy_inputs(toy):
    mels, _ = load_windows([SAMPLES / "sample1.wav"], toy.dims.n_mels, 2 * toy.dims.n_audio_ctx)
    tokens = torch.tensor([[toy.tokenizer.sot, toy.tokenizer.no_timestamps, 72, 105]])
    return mels, tokens


# ----- output folders: nothing of the user's lost, nothing half-written, nothing left behind


def test_out_naming_a_folder_of_the_users_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """`lens a.wav --out clips` and `demo --samples mysamples --out mysamples` deleted the user's files."""
    monkeypatch.chdir(tmp_path)
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "a.wav").write_bytes((SAMPLES / "sample1.wav").read_bytes())
    mysamples = tmp_path / "mysamples"
    mysamples.mkdir()
    for f in SAMPLES.iterdir():
        (mysamples / f.name).write_bytes(f.read_bytes())
    before = tree(tmp_path)
    with pytest.raises(FileExistsError) as excinfo, output_folder(clips, "lens"):
        pytest.fail("the body ran: work started before the folder was checked")
    check_error(excinfo, "clips", "a.wav")
    assert cli.main(["lens", "clips/a.wav", "--out", "clips"]) == 2
    assert cli.main(["demo", "--samples", "mysamples", "--model", "toy", "--out", "mysamples"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "clips" in err[0] and "mysamples" in err[1]
    assert tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clips", "mysamples"]


def test_previous_output_with_a_file_added_is_refused(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "lens") as tmp:
        (tmp / "table.csv").write_text("a,b\n")
    (out / "my-notes.txt").write_text("mine")
    with pytest.raises(FileExistsError) as excinfo, output_folder(out, "lens"):
        pass
    check_error(excinfo, "out", "my-notes.txt")
    with pytest.raises(FileExistsError) as excinfo, output_folder(tmp_path / "out", "ablate"):
        pass
    check_error(excinfo, "out", "lens")
    (out / MARKER).write_text('{"tool": "someone else"}')  # not ours: the whole folder is the user's
    with pytest.raises(FileExistsError) as excinfo, output_folder(out, "lens"):
        pass
    check_error(excinfo, "out")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "my-notes.txt", "table.csv"]


def test_out_dot_the_current_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "mine.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    for out in (".", str(tmp_path), ".."):
        with pytest.raises(ValueError) as excinfo, output_folder(out, "lens"):
            pytest.fail("work started")
        check_error(excinfo, out, "current folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]


def test_out_a_symlink_replaces_the_folder_it_points_to(tmp_path):
    real = tmp_path / "real"
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(FileNotFoundError) as excinfo, output_folder(link, "lens"):
        pass
    check_error(excinfo, "link", "does not exist")
    real.mkdir()
    for text in ("first", "second"):
        with output_folder(link, "lens") as tmp:
            (tmp / "x.txt").write_text(text)
    assert link.is_symlink() and (link / "x.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no .link.old-* nor hidden folder


def test_a_folder_that_cannot_be_replaced_leaves_nothing_behind(tmp_path, monkeypatch):
    """A rename that fails (a busy or protected folder): a one-line error, the old output intact, no leftovers."""
    out = tmp_path / "out"
    with output_folder(out, "lens") as tmp:
        (tmp / "x.txt").write_text("old")

    def refuse(*args):
        raise OSError(16, "Device or resource busy", str(out))

    real_rename = os.rename

    def rename_refusing_temporaries(a, b):  # the new output cannot be put in place; putting the old back works
        new = Path(b) == out and (Path(a) / "x.txt").read_text() == "new"
        return refuse() if new else real_rename(a, b)

    for exchange_works in (True, False):  # renameat2 exchange, or the two-rename fallback
        if exchange_works:
            monkeypatch.setattr(files, "_exchange", refuse)
        else:
            monkeypatch.setattr(files, "_exchange", lambda a, b: False)
            monkeypatch.setattr(files.os, "rename", rename_refusing_temporaries)
        with pytest.raises(OSError) as excinfo, output_folder(out, "lens") as tmp:
            (tmp / "x.txt").write_text("new")
        check_error(excinfo, "out")
        assert (out / "x.txt").read_text() == "old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        monkeypatch.undo()


def test_the_two_rename_fallback_replaces_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)  # a filesystem without RENAME_EXCHANGE
    out = tmp_path / "out"
    for text in ("first", "second"):
        with output_folder(out, "lens") as tmp:
            (tmp / "x.txt").write_text(text)
    assert (out / "x.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False])
def test_ctrl_c_during_the_switch_waits_until_it_is_done(tmp_path, monkeypatch, exchange):
    """Ctrl-C between the two renames left no `out` at all: the switch now holds signals back until it is over."""
    out = tmp_path / "out"
    with output_folder(out, "lens") as tmp:
        (tmp / "x.txt").write_text("old")
    real = files._exchange if exchange else (lambda a, b: False)

    def interrupted(a, b):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right in the middle
        time.sleep(0.05)
        return real(a, b)

    monkeypatch.setattr(files, "_exchange", interrupted)
    with pytest.raises(KeyboardInterrupt), output_folder(out, "lens") as tmp:
        (tmp / "x.txt").write_text("new")
    assert (out / "x.txt").read_text() == "new"  # the switch completed before the interrupt was delivered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_runs_finishing_together_leave_one_complete_output(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "lens") as tmp:
        (tmp / "x.txt").write_text("before")
    barrier, errors = threading.Barrier(4), []

    def run(i: int) -> None:
        try:
            with output_folder(out, "lens") as tmp:
                for k in range(20):
                    (tmp / f"{k}.txt").write_text(str(i))
                barrier.wait(timeout=60)  # all four finish together
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    contents = {p.read_text() for p in out.glob("*.txt")}
    assert len(contents) == 1 and len(list(out.glob("*.txt"))) == 20  # one run's complete output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no orphans


def test_a_killed_runs_temporary_folder_is_swept_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.whisper-lens-{dead.pid}-0000"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"tool": "whisper-lens", "command": "lens", "pid": dead.pid,
                                            "host": os.uname().nodename}))  # fmt: skip
    (stale / "half.png").write_bytes(b"\x89PNG")
    alive = tmp_path / f".out.whisper-lens-{os.getpid()}-0000"  # a run still going: kept
    alive.mkdir()
    (alive / MARKER).write_text(json.dumps({"tool": "whisper-lens", "command": "lens", "pid": os.getpid(),
                                            "host": os.uname().nodename}))  # fmt: skip
    with output_folder(out, "lens") as tmp:
        (tmp / "x.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "out"]


def test_a_failed_run_removes_its_temporary_folder_and_the_parents_it_made(tmp_path):
    with pytest.raises(RuntimeError), output_folder(tmp_path / "a" / "b" / "out", "lens") as tmp:
        (tmp / "half.png").write_bytes(b"\x89PNG")
        raise RuntimeError("the study failed")
    assert list(tmp_path.iterdir()) == []


def default_signals() -> None:
    """In the child: SIGINT as in a terminal (a test run started in the background inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    ("sig", "code", "named"),
    [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, -signal.SIGINT, "SIGINT"), (signal.SIGHUP, 129, "SIGHUP")],
)
def test_sigterm_or_ctrl_c_mid_run_leaves_no_half_written_folder(tmp_path, sig, code, named):
    """SIGTERM exits with 143, SIGHUP (a terminal closing; it left the hidden partial folder behind) with 129; after
    Ctrl-C the process ends by SIGINT (a shell's status 130); all cleaned up, the signal named."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "whisper_lens", "demo", "--out", "report"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)  # fmt: skip
    deadline = time.time() + 300
    while not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")] and proc.poll() is None:
        assert time.time() < deadline, "the demo never started writing"
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the work
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and named in err, err
    assert list(tmp_path.iterdir()) == []  # no report/, no hidden temporary folder


# ----- file modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "report.md", lambda p: Path(p).write_text("# report"))
        model = wl.load_model()
        vocab = write_byte_vocab(tmp_path / "bytes.tiktoken")
        save_model(model, tmp_path / "model", tokenizer_file=vocab)
        with output_folder(tmp_path / "study", "lens") as tmp:
            (tmp / "table.csv").write_text("a\n")
    finally:
        os.umask(old)
    for name in ("report.md", "bytes.tiktoken", "model/model.safetensors", "model/config.json",
                 "model/bytes.tiktoken", "study/.whisper-lens.json"):  # fmt: skip
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "study").stat().st_mode & 0o777 == 0o777 & ~umask


def test_atomic_write_into_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        atomic_write(tmp_path / "missing" / "x.txt", lambda p: Path(p).write_text("x"))
    check_error(excinfo, "missing", "x.txt")
    assert list(tmp_path.iterdir()) == []


# ----- train-toy: no code from a checkpoint, every argument checked before any work


class Payload:
    """A pickle that runs code when loaded (what a crafted runs/toy/checkpoint.pt holds)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "pwned"))


def test_a_crafted_checkpoint_is_refused_and_runs_no_code(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    pwned = tmp_path / "pwned"
    with open(runs / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Payload(pwned)}, f)
    torch.save({"model": Payload(pwned)}, runs / "zip.pt")
    for name in ("checkpoint.pt", "zip.pt"):
        os.replace(runs / name, runs / "checkpoint.pt")
        files.mark_written(runs, ["checkpoint.pt"], "train-toy")  # crafted inside a runs folder train-toy wrote
        with pytest.raises(ValueError) as excinfo:
            train(tmp_path / "out", data_dir=tmp_path / "data", run_dir=runs, steps=10)
        check_error(excinfo, "checkpoint.pt", "nothing in it was run")
    assert not pwned.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # refused before any synthesis or output


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"steps": 0}, ValueError, ["steps", "0"]),
        ({"steps": 2.5}, ValueError, ["steps", "2.5"]),
        ({"batch_size": 0}, ValueError, ["batch_size", "0"]),
        ({"n_train": 0}, ValueError, ["n_train", "0"]),
        ({"lr": float("nan")}, ValueError, ["lr", "nan"]),
        ({"lr": -1.0}, ValueError, ["lr", "-1.0"]),
        ({"device": "tpu"}, ValueError, ["tpu"]),
        ({"device": "cuda:7"}, ValueError, ["cuda:7"]),
    ],
)
def test_train_toy_arguments_are_checked_before_any_work(tmp_path, kwargs, error, names):
    with pytest.raises(error) as excinfo:
        train(tmp_path / "out", data_dir=tmp_path / "data", run_dir=tmp_path / "runs", **kwargs)
    check_error(excinfo, *names)
    assert list(tmp_path.iterdir()) == []


def test_train_toy_out_that_is_a_file_or_someone_elses_model_is_refused_first(tmp_path):
    file = tmp_path / "a-file"
    file.write_text("x")
    theirs = tmp_path / "their-model"
    theirs.mkdir()
    (theirs / "model.safetensors").write_bytes(b"their weights")
    before = tree(tmp_path)
    for out, names in ((file, ["a-file"]), (theirs, ["their-model", "model.safetensors"])):
        with pytest.raises((NotADirectoryError, FileExistsError)) as excinfo:
            train(out, data_dir=tmp_path / "data", run_dir=tmp_path / "runs", steps=1)
        check_error(excinfo, *names)
    assert tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "their-model"]
    files.check_can_write(SHIPPED["toy"], MODEL_FILES, "train-toy")  # the shipped folder is train-toy's to rewrite


def test_a_checkpoint_past_the_steps_asked_for_is_refused(tmp_path):
    tok = wl.load_tokenizer(write_byte_vocab(tmp_path / "b.tiktoken"), 1864)
    dims = wl.ModelDims(80, 8, 16, 2, 1, 1864, 8, 16, 2, 1)
    torch.manual_seed(0)
    model = init_weights(wl.Whisper(dims))
    mels = torch.randn(4, 80, 16)
    fit(model, tok, mels, ["ab", "cd", "", "e"], steps=3, batch_size=2, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(ValueError) as excinfo:
        fit(model, tok, mels, ["ab", "cd", "", "e"], steps=2, batch_size=2, checkpoint=tmp_path / "c.pt")
    check_error(excinfo, "c.pt", "step 3")


# ----- audio: named pipes, arrays of the wrong rank


def test_a_named_pipe_is_refused_not_read_for_ever(tmp_path):
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    with alarm(30):
        for call in (wl.load_audio, wl.log_mel_spectrogram, lambda p: load_windows([p], 80, 400)):
            with pytest.raises(ValueError) as excinfo:
                call(fifo)
            check_error(excinfo, "fifo.wav", "not a regular file")
        with pytest.raises(ValueError) as excinfo:
            wl.load_tokenizer(fifo)
        check_error(excinfo, "fifo.wav")


def test_load_windows_wants_one_dimensional_clips():
    with pytest.raises(ValueError) as excinfo:
        load_windows([np.zeros((16000, 80), np.float32)], 80, 400)  # gave [1, 16000, 80, 300] before
    check_error(excinfo, "(16000, 80)")
    with pytest.raises(TypeError) as excinfo:
        load_windows(str(SAMPLES / "sample1.wav"), 80, 400)  # a path, not a list: was read letter by letter
    check_error(excinfo, "sample1.wav")
    with pytest.raises(ValueError) as excinfo:
        load_windows([np.zeros(100, np.float32)], 80, 0)
    check_error(excinfo, "frames")


@pytest.mark.parametrize("path", [123, None, ["a.wav"]])
def test_load_audio_wants_a_path(path):
    with pytest.raises(TypeError) as excinfo:
        wl.load_audio(path)
    check_error(excinfo, type(path).__name__)


# ----- tokenizer files


def test_load_tokenizer_on_a_binary_file_or_a_wav_names_it(tmp_path):
    blob = tmp_path / "weights.bin"
    blob.write_bytes(bytes(range(256)) * 4)
    for path in (blob, SAMPLES / "sample1.wav"):
        with pytest.raises(ValueError) as excinfo:
            wl.load_tokenizer(path, 1864)
        check_error(excinfo, path.name, "not a text file")


def test_the_english_vocabulary_with_a_multilingual_n_vocab_is_refused():
    """gpt2.tiktoken (50256 ranks) with n_vocab=51865 would give 100 languages: no Whisper has that layout."""
    english = PACKAGE / "assets" / "gpt2.tiktoken"
    with pytest.raises(ValueError) as excinfo:
        wl.load_tokenizer(english, 51865)
    check_error(excinfo, "n_vocab=51865", "50256", "51864")
    assert wl.load_tokenizer(english, 51864).num_languages == 99


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('{"a": 0,', ["vocab.json", "not valid JSON", "line 1"]),
        ("[1, 2]", ["vocab.json", "list"]),
        ('{"a": "zero"}', ["vocab.json", "'a'", "'zero'"]),
        ('{"a": 1.5}', ["vocab.json", "1.5"]),
        ('{"a": true}', ["vocab.json", "True"]),
        ('{"<|endoftext|>": "x"}', ["vocab.json", "<|endoftext|>"]),
        ('{"a b": 0}', ["vocab.json", "'a b'"]),
    ],
)
def test_a_bad_vocab_json_names_the_file(tmp_path, text, names):
    (tmp_path / "vocab.json").write_text(text)
    with pytest.raises(ValueError) as excinfo:
        wl.load_tokenizer(tmp_path)
    check_error(excinfo, *names)


def byte_ranks(order: list[int]) -> str:
    return "".join(
        f"{base64.b64encode(bytes([b])).decode()} {rank}\n" for b, rank in zip(range(256), order, strict=True)
    )


def test_tiktoken_ranks_that_repeat_or_skip_say_which(tmp_path):
    path = tmp_path / "bad.tiktoken"
    path.write_text(byte_ranks([0] * 256))  # said "distinct integers 0..0" before
    with pytest.raises(ValueError) as excinfo:
        wl.load_tokenizer(path, 1864)
    check_error(excinfo, "bad.tiktoken", "rank 0", "two tokens")
    path.write_text(byte_ranks([*range(255), 300]))
    with pytest.raises(ValueError) as excinfo:
        wl.load_tokenizer(path, 1864)
    check_error(excinfo, "bad.tiktoken", "255 is missing", "300")
    path.write_text(byte_ranks(list(range(256))) + "YQ== 256\n")  # b"a" a second time
    with pytest.raises(ValueError) as excinfo:
        wl.load_tokenizer(path, 1865)
    check_error(excinfo, "bad.tiktoken:257", "b'a'", "line 98")


@pytest.mark.parametrize(("ids", "name"), [([1.5], "1.5"), ([True], "True"), (["a"], "'a'"), (7, "int")])
def test_decode_wants_integer_ids(toy, ids, name):
    with pytest.raises(TypeError) as excinfo:
        toy.tokenizer.decode(ids)
    check_error(excinfo, name)


# ----- edits: checked when built, and against the run's shapes before it computes anything


@pytest.mark.parametrize(
    ("build", "error", "names"),
    [
        (lambda: wl.Edits().skip("encoder", [1.7]), TypeError, ["1.7"]),  # became block 1
        (lambda: wl.Edits().skip("encoder", [-1]), ValueError, ["-1"]),  # AttributeError
        (lambda: wl.Edits().skip("encoder", True), TypeError, ["True"]),
        (lambda: wl.Edits().skip("encoder", "12"), TypeError, ["'12'"]),  # was blocks 1 and 2
        (lambda: wl.Edits().ablate_heads("decoder.blocks.0.attn", [0.5]), TypeError, ["0.5"]),
        (lambda: wl.Edits().ablate_heads("decoder.blocks.0.attn", []), ValueError, ["no heads"]),
        (lambda: wl.Edits().replace("logits", torch.zeros(1), positions=[2.0]), TypeError, ["2.0"]),
        (lambda: wl.Edits().replace("logits", torch.zeros(1), positions=[-1]), ValueError, ["-1"]),
        (lambda: wl.Edits().replace("logits", torch.zeros(1), positions=[]), ValueError, ["positions"]),
        (lambda: wl.Edits().add("logits", "steer"), TypeError, ["logits", "str"]),
        (lambda: wl.Edits().add("logits", torch.zeros(2, dtype=torch.complex64)), TypeError, ["complex64"]),
        (lambda: wl.Edits().add("logits", torch.tensor([float("nan")])), ValueError, ["logits", "NaN"]),
        (lambda: wl.Edits().add(7, torch.zeros(1)), TypeError, ["int"]),
        (lambda: wl.Edits().local_window(2.5), TypeError, ["2.5"]),
        (lambda: wl.Edits().local_window(-3), ValueError, ["-3"]),
    ],
)
def test_edits_refuse_bad_arguments_when_built(build, error, names):
    with pytest.raises(error) as excinfo:
        build()
    check_error(excinfo, *names)


def test_edit_positions_beyond_the_run_are_refused_before_any_compute(toy, toy_inputs):
    mels, tokens = toy_inputs  # 4 tokens; the encoder has 200 positions
    calls = []
    spy = wl.Edits().apply("encoder.conv1", lambda x: calls.append(1) or x)
    for name, position in (("decoder.blocks.1.resid_post", 100), ("decoder.blocks.1.resid_post", 4),
                           ("encoder.blocks.0.mlp.post", 200), ("decoder.blocks.0.attn.pattern", 4)):  # fmt: skip
        edits = wl.Edits(ops={k: list(v) for k, v in spy.ops.items()})
        edits.replace(name, torch.zeros(1), positions=[1, position])
        with pytest.raises(IndexError) as excinfo:
            toy.run(mels, tokens, edits=edits)
        check_error(excinfo, name, str(position))
    assert calls == []  # refused before the encoder's first step
    edits = wl.Edits().replace("decoder.blocks.1.resid_post", torch.zeros(2, 5, 192))
    with pytest.raises(ValueError) as excinfo:
        toy.run(mels, tokens, edits=edits)
    check_error(excinfo, "(2, 5, 192)", "(1, 4, 192)")


def test_edit_positions_of_a_pattern_are_query_positions(toy, toy_inputs):
    mels, tokens = toy_inputs
    name = "decoder.blocks.3.attn.pattern"
    run = toy.run(mels, tokens, trace=[name])
    uniform = torch.full((4,), 0.25)
    edited = toy.run(mels, tokens, trace=[name], edits=wl.Edits().replace(name, uniform, positions=[3]))
    torch.testing.assert_close(edited.trace[name][:, :, 3], uniform.expand(1, 4, 4))
    torch.testing.assert_close(edited.trace[name][:, :, :3], run.trace[name][:, :, :3])  # other queries as they were
    torch.testing.assert_close(edited.logits[:, :3], run.logits[:, :3])


def test_edit_values_may_be_numpy_arrays_or_numbers(toy, toy_inputs):
    mels, tokens = toy_inputs
    name = "decoder.blocks.2.resid_post"
    vector = np.linspace(-1, 1, 192)
    as_numpy = toy.run(mels, tokens, edits=wl.Edits().add(name, vector)).logits  # AttributeError before
    as_torch = toy.run(mels, tokens, edits=wl.Edits().add(name, torch.from_numpy(vector).float())).logits
    torch.testing.assert_close(as_numpy, as_torch, rtol=0, atol=0)
    zeroed = toy.run(mels, tokens, trace=[name], edits=wl.Edits().replace(name, 0, positions=[1]))
    assert zeroed.trace[name][:, 1].abs().max() == 0 and zeroed.trace[name][:, 0].abs().max() > 0


def test_an_edit_function_changing_the_dtype_is_named(toy, toy_inputs):
    mels, tokens = toy_inputs
    with pytest.raises(ValueError) as excinfo:
        toy.run(mels, tokens, edits=wl.Edits().apply("decoder.blocks.0.mlp_out", lambda x: x.double()))
    check_error(excinfo, "decoder.blocks.0.mlp_out", "torch.float64", "torch.float32")


# ----- properties: any input either works or raises whisper_lens' own one-line error

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.binary(max_size=2000), header=st.sampled_from([b"", b"RIFF", b"RIFF\x24\x08\x00\x00WAVEfmt ", b"fLaC",
                                                                 b"OggS", b"ID3"]))  # fmt: skip
def test_load_audio_on_any_bytes(tmp_path, data, header):
    path = tmp_path / "fuzz.wav"
    path.write_bytes(header + data)
    error = raises_whisper_lens_error(wl.load_audio, path)
    if error is None:
        audio = wl.load_audio(path)
        assert audio.dtype == np.float32 and audio.ndim == 1 and np.isfinite(audio).all()
    else:
        assert "fuzz.wav" in str(error)


@FUZZ
@given(
    samples=hnp.arrays(np.float32, st.integers(0, 3000), elements=st.floats(-1, 1, width=32)),
    rate=st.sampled_from([8000, 16000, 22050, 44100]),
    channels=st.integers(1, 3),
    subtype=st.sampled_from(["PCM_16", "PCM_U8", "FLOAT", "PCM_24"]),
    sr=st.sampled_from([16000, 8000, 44100]) | st.one_of(st.integers(-5, 50000), st.floats(), st.booleans()),
)
def test_load_audio_on_any_wav_and_rate(tmp_path, samples, rate, channels, subtype, sr):
    path = tmp_path / "clip.wav"
    if subtype == "PCM_U8":
        soundfile.write(path, np.repeat(samples[:, None], channels, 1), rate, subtype=subtype, format="WAV")
    else:
        soundfile.write(path, np.repeat(samples[:, None], channels, 1), rate, subtype=subtype)
    if raises_whisper_lens_error(wl.load_audio, path, sr=sr) is None:
        audio = wl.load_audio(path, sr=sr)
        assert audio.ndim == 1 and np.isfinite(audio).all()
        assert abs(len(audio) - len(samples) * sr / rate) <= 1


samples_shapes = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),  # scalars, stereo-like, too short
    st.tuples(st.integers(0, 3000)),  # one clip
    st.tuples(st.integers(0, 3), st.integers(150, 1200)),  # a batch
)
arrays = hnp.arrays(
    dtype=st.sampled_from(
        [
            np.float16,
            np.float32,
            np.float64,
            np.int16,
            np.int32,
            np.uint8,
            np.int64,
            np.complex64,
            np.bool_,
            np.dtype(">f4"),
        ]
    ),  # fmt: skip
    shape=samples_shapes,
    elements={"allow_nan": False, "allow_infinity": False, "allow_subnormal": False},
) | hnp.arrays(np.float32, samples_shapes)  # any float32, NaN and inf included


@FUZZ
@given(audio=arrays, n_mels=st.sampled_from([80, 128]) | st.one_of(st.integers(-2, 200), st.floats(), st.none()),
       padding=st.integers(0, 1000) | st.one_of(st.integers(-10, 1000), st.floats()),
       as_tensor=st.booleans())  # fmt: skip
def test_log_mel_spectrogram_on_any_array(audio, n_mels, padding, as_tensor):
    if as_tensor and audio.dtype.isnative and audio.dtype != np.uint16:
        audio = torch.from_numpy(audio.copy())
    if raises_whisper_lens_error(wl.log_mel_spectrogram, audio, n_mels=n_mels, padding=padding) is None:
        mel = wl.log_mel_spectrogram(audio, n_mels=n_mels, padding=padding)
        assert mel.dtype == torch.float32 and mel.shape[-2] == n_mels and torch.isfinite(mel).all()
        assert mel.shape[-1] == (audio.shape[-1] + padding) // 160


BYTE_LINES = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
rank_lines = st.one_of(
    st.text(max_size=30),
    st.builds(lambda b, r: f"{base64.b64encode(b).decode()} {r}", st.binary(max_size=3), st.integers(-3, 300)),
)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.sampled_from(["drop", "replace", "insert"]), st.integers(0, 256), rank_lines),
                   max_size=3),
    n_vocab=st.one_of(st.sampled_from([1864, 1865, 1863]), st.integers(1500, 2000), st.floats(), st.booleans()),
)  # fmt: skip
def test_load_tokenizer_on_any_rank_file(tmp_path, edits, n_vocab):
    """A valid byte-level rank file with a few lines dropped, changed or added."""
    lines = list(BYTE_LINES)
    for op, at, line in edits:
        at = min(at, len(lines) - 1) if lines else 0
        if op == "drop" and lines:
            del lines[at]
        elif op == "replace" and lines:
            lines[at] = line
        else:
            lines.insert(at, line)
    path = tmp_path / "fuzz.tiktoken"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    if raises_whisper_lens_error(wl.load_tokenizer, path, n_vocab) is None:
        tok = wl.load_tokenizer(path, n_vocab)
        assert tok.decode(tok.encode("the cat")) == "the cat"


@FUZZ
@given(vocab=st.dictionaries(st.text(max_size=6), st.one_of(st.integers(-2, 300), st.floats(), st.text(max_size=3),
                                                            st.booleans(), st.none()), max_size=20))  # fmt: skip
def test_load_tokenizer_on_any_vocab_json(tmp_path, vocab):
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    error = raises_whisper_lens_error(wl.load_tokenizer, tmp_path, 51865)
    assert error is not None and "vocab.json" in str(error)  # 20 entries can never be a byte-level vocabulary


@FUZZ
@given(text=st.one_of(st.text(), st.binary(), st.integers(), st.none()),
       ids=st.one_of(st.lists(st.one_of(st.integers(-5, 3000), st.floats(), st.booleans(), st.text(max_size=2))),
                     st.integers(), st.text(max_size=3)))  # fmt: skip
def test_tokenizer_on_any_text_and_ids(toy, text, ids):
    tok = toy.tokenizer
    if raises_whisper_lens_error(tok.encode, text) is None:
        assert isinstance(text, str)
    if raises_whisper_lens_error(tok.decode, ids) is None:
        assert all(isinstance(i, int) and 0 <= i < tok.n_vocab for i in ids)


good_indices = st.one_of(st.integers(0, 3), st.lists(st.integers(0, 3), min_size=1, max_size=3))
indices = good_indices | st.one_of(st.integers(-3, 9), st.floats(-3, 9), st.booleans(), st.text(max_size=2), st.none(),
                                   st.lists(st.one_of(st.integers(-3, 9), st.floats(-3, 9), st.booleans()),
                                            max_size=3))  # fmt: skip
names = st.sampled_from(["decoder.blocks.1.resid_post", "encoder.blocks.0.mlp.post", "decoder.blocks.3.attn.pattern",
                         "encoder.blocks.2.attn.z", "logits", "decoder.blocks.9.resid_post", "nothing"])  # fmt: skip
values = st.one_of(st.floats(-2, 2), st.floats(), st.integers(-3, 3), st.text(max_size=2), st.none(),
                   hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.complex64, np.bool_]),
                              hnp.array_shapes(min_dims=0, max_dims=4, max_side=5)))  # fmt: skip


@settings(FUZZ, max_examples=80)
@given(stack=st.sampled_from(["encoder", "decoder", "middle"]), layers=indices, heads=indices, name=names,
       value=values, positions=st.one_of(st.none(), indices),
       kind=st.sampled_from(["replace", "add", "apply"]))  # fmt: skip
def test_edits_on_any_arguments(toy, toy_inputs, stack, layers, heads, name, value, positions, kind):
    """Built and run on the toy model: either it runs, or whisper_lens names what is wrong (never torch)."""
    mels, tokens = toy_inputs

    def build_and_run() -> None:
        edits = wl.Edits().skip(stack, layers).ablate_heads(f"{stack}.blocks.0.attn", heads)
        if kind == "apply":
            edits.apply(name, lambda x: x * value if isinstance(value, float) else x)
        else:
            getattr(edits, kind)(name, value, positions=positions)
        toy.run(mels, tokens, edits=edits)

    raises_whisper_lens_error(build_and_run)


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
    for path, error, name in ((tmp_path / "pipe.wav", ValueError, "regular file"), (tmp_path, OSError, "directory")):
        with pytest.raises(error) as excinfo:
            toy_model.transcribe(path)  # a named pipe would block for ever
        check_error(excinfo, str(path), name)


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


@pytest.mark.parametrize(
    "options, names",
    [
        (dict(logprob_threshold=float("nan")), ["logprob_threshold", "nan"]),
        (dict(logprob_threshold=float("-inf")), ["logprob_threshold", "-inf", "finite"]),
        (dict(compression_ratio_threshold=float("inf")), ["compression_ratio_threshold", "inf", "finite"]),
        (dict(hallucination_silence_threshold=float("inf")), ["hallucination_silence_threshold", "finite"]),
        (dict(no_speech_threshold=5), ["no_speech_threshold", "5", "from 0 to 1"]),
        (dict(no_speech_threshold="0.5"), ["no_speech_threshold", "'0.5'"]),
        (dict(logprob_threshold="-1"), ["logprob_threshold", "'-1'"]),
        (dict(prepend_punctuations=None), ["prepend_punctuations", "None"]),
        (dict(append_punctuations=None), ["append_punctuations", "None"]),
        (dict(seed="1"), ["seed", "'1'"]),
        (dict(seed=1.5), ["seed", "1.5"]),
        (dict(seed=2**70, temperature=0.5), ["seed", str(2**70)]),  # torch's "Overflow when unpacking long long"
        (dict(beam_size=5, temperature=0.5), ["beam_size=5", "temperature=0.5"]),  # the beam was ignored
        (dict(beam_size=5, temperature=(0.2, 0.4)), ["beam_size=5", "temperature=(0.2, 0.4)"]),
        (dict(suppress_tokens=True), ["suppress_tokens", "True"]),  # "'bool' object is not iterable" (Hypothesis)
        (dict(best_of=2**70), ["best_of", str(2**70)]),  # a list of 2**70 rows
    ],
)
def test_transcribe_options_are_checked_before_any_window(toy_model, options, names, monkeypatch):
    """Every option is refused before the first window is read or decoded, in one line naming the keyword."""
    from whisper_lens import longform

    monkeypatch.setattr(longform, "run_streams", lambda *a, **k: pytest.fail("a window was decoded before the check"))
    with pytest.raises((ValueError, TypeError)) as excinfo:
        toy_model.transcribe(SHIPPED["toy"] / "samples" / "sample1.wav", **options)
    check_error(excinfo, *names)


def test_seed_none_is_unseeded_sampling_in_transcribe_as_in_generate(toy_model):
    """`generate(seed=None)` samples unseeded, `transcribe(seed=None)` was refused ("seed must be an int")."""
    import whisper_lens as wl

    sample = SHIPPED["toy"] / "samples" / "sample1.wav"
    mel, _ = wl.audio.load_windows([sample], 80, 400)
    assert toy_model.generate(mel, temperature=0.5, seed=None)[0].tokens
    t = toy_model.transcribe(sample, temperature=0.5, seed=None)
    assert [w.result.temperature for w in t.windows] == [0.5] and t.text.strip()
    seeded = [toy_model.transcribe(sample, temperature=1.0, seed=3).text for _ in range(2)]
    assert seeded[0] == seeded[1]  # a seed still fixes the samples


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
    check_error(excinfo, "talk.srt", "--overwrite")
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
        plot.cross_attention_over_mel(np.zeros((80, 20)), np.ones((2, 10)) / 10, ["a", "b"], seconds=-1.0)
    check_error(excinfo, "seconds", "-1.0")
    with pytest.raises(ValueError) as excinfo:
        plot.attention_grid(np.ones((1, 3, 3)) / 3, crop=0)
    check_error(excinfo, "crop", "0")
    with pytest.raises(ValueError) as excinfo:
        plot.head_grid({"self": np.zeros((4, 6)), "cross": np.zeros((4, 5))})
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


# ============================================================================= round 2 (issue 27)
# Each test names the case it covers; every one failed on the main of the day it was written.

# ----- class 1: nothing the tool did not write is ever touched (one rule, files.check_can_write/check_replaceable)


def test_train_toy_runs_folder_of_the_users_is_refused_untouched(tmp_path):
    """`train-toy --runs u` with u/bytes.tiktoken of the user's: write_byte_vocab overwrote it."""
    runs = tmp_path / "u"
    runs.mkdir()
    (runs / "bytes.tiktoken").write_text("MINE\n")
    with pytest.raises(FileExistsError) as excinfo:
        train(tmp_path / "tt", data_dir=tmp_path / "d", run_dir=runs, steps=1, n_train=8)
    check_error(excinfo, "--runs", str(runs), "bytes.tiktoken")
    assert (runs / "bytes.tiktoken").read_text() == "MINE\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u"]  # refused before any synthesis or output


def test_train_toy_out_a_non_empty_folder_of_the_users_is_refused(tmp_path):
    """`train-toy --out user/project` beside the user's data.csv: four model files and a marker landed there."""
    project = tmp_path / "user" / "project"
    project.mkdir(parents=True)
    (project / "data.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FileExistsError) as excinfo:
        train(project, data_dir=tmp_path / "d", run_dir=tmp_path / "r", steps=1, n_train=8)
    check_error(excinfo, "--out", str(project), "data.csv")
    assert sorted(p.name for p in project.iterdir()) == ["data.csv"]


def test_train_toy_data_and_runs_in_one_folder_of_the_users_is_refused(tmp_path, capsys):
    """`--data` and `--runs` naming the same user folder: 38 MB of caches and a checkpoint were written into it."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    argv = ["train-toy", "--steps", "1", "--clips", "8", "--out", str(tmp_path / "tt"), "--data", str(mine),
            "--runs", str(mine)]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("whisper-lens: error: --data") and str(mine) in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"] and tree(mine) == {"notes.txt": b"my notes"}


def test_train_toy_may_rewrite_its_own_folders_but_not_a_file_edited_since(tmp_path):
    """The marker records content hashes: train-toy's own runs folder passes, a vocabulary edited since does not."""
    runs = tmp_path / "runs"
    runs.mkdir()
    write_byte_vocab(runs / "bytes.tiktoken")
    files.mark_written(runs, ["bytes.tiktoken"], "train-toy")
    files.check_can_write(runs, ["bytes.tiktoken", "checkpoint.pt"], "train-toy", what="--runs")  # its own: fine
    (runs / "bytes.tiktoken").write_text("edited\n")
    with pytest.raises(FileExistsError) as excinfo:
        train(tmp_path / "out", data_dir=tmp_path / "data", run_dir=runs, steps=1)
    check_error(excinfo, "--runs", "bytes.tiktoken", "edited")
    assert (runs / "bytes.tiktoken").read_text() == "edited\n"


def test_a_transcript_the_user_edited_is_kept_and_named(tmp_path):
    """A transcript written by an earlier run and edited by hand was replaced on the next run without a word.
    Transcript files follow openai-whisper's folders (no hidden marker): any existing one stops the run, named,
    unless --overwrite is given."""
    from whisper_lens.writers import OutputFolder

    folder = OutputFolder(tmp_path / "subs")
    [[srt, txt]] = folder.plan(["talk"], ("srt", "txt"))
    folder.write(srt, "1\n00:00:00,000 --> 00:00:01,000\nhello\n\n")
    folder.write(txt, "hello\n")
    srt.write_text("1\n00:00:00,000 --> 00:00:01,000\nhello, corrected by hand\n\n")
    with pytest.raises(FileExistsError) as excinfo:
        OutputFolder(tmp_path / "subs").plan(["talk"], ("srt", "txt"))
    check_error(excinfo, "talk.srt", "--overwrite")
    assert "corrected by hand" in srt.read_text()
    assert sorted(p.name for p in (tmp_path / "subs").iterdir()) == ["talk.srt", "talk.txt"]  # no marker


def test_a_full_disk_or_file_size_limit_names_the_file(tmp_path):
    """`ulimit -f` gave "[Errno 27] File too large" without the file (after 4 of 5 subtitle files were written)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    target = tmp_path / "talk.json"
    target.write_text("old")
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # Python ignores SIGXFSZ: the write fails with EFBIG
    try:
        with pytest.raises(OSError) as excinfo:
            files.write_text(target, "x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    check_error(excinfo, str(target), "as it was")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["talk.json"]


# ----- class 3: signals (SIGHUP: test_sigterm_or_ctrl_c_mid_run_leaves_no_half_written_folder above)


def test_the_synthesis_pool_prints_no_traceback_under_the_clis_handlers(capfd):
    """Every train-toy run that synthesised data printed 2-4 `Process ForkPoolWorker-N ... raise Terminated`
    tracebacks: the pool's workers inherited the CLI's SIGTERM handler, and the pool ends them with SIGTERM.
    Here a worker is busy when the pool is terminated, as synth.build's pool is when Ctrl-C or an error ends it."""
    from multiprocessing import get_context

    from whisper_lens.toy import synth

    previous = {sig: signal.signal(sig, cli._terminate) for sig in cli.ENDING_SIGNALS}  # as `whisper-lens train-toy`
    try:
        pool = get_context("fork").Pool(2, initializer=synth._one_thread)  # synth.build's pool
        busy = pool.apply_async(time.sleep, (60,))
        time.sleep(1.0)
        pool.terminate()
        pool.join()
        time.sleep(0.5)  # the workers' last words, if any, are written asynchronously
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Terminated" not in err, err
    assert not busy.ready()


# ----- class 6: resume by content; an export's index names only its own shards, each checked by its checksum


def test_a_clip_edited_in_place_is_swept_again(dataset_toy, clips_dir, tmp_path):
    """Resume decided "done" by size and reference: a WAV edited in place (same size) kept its old rows."""
    from whisper_lens.distributed import find_clips, sweep

    out = tmp_path / "out"
    sweep(dataset_toy, find_clips([clips_dir], dataset_toy), out, stack="encoder", removals=[0], progress=False)
    audio, rate = soundfile.read(clips_dir / "sample2.wav", dtype="int16")
    size = (clips_dir / "sample2.wav").stat().st_size
    soundfile.write(clips_dir / "sample2.wav", (audio // 2).astype(np.int16), rate, subtype="PCM_16")  # quieter
    assert (clips_dir / "sample2.wav").stat().st_size == size
    done = sweep(dataset_toy, find_clips([clips_dir], dataset_toy), out, stack="encoder", removals=[0], progress=False)
    assert done.new_clips == 1  # sample2 again, sample1 kept


@pytest.mark.parametrize("content", ['{"clips": 5, "rows": []}', "[1, 2]", '{"clips": {"a.wav": "k"}, "rows": [3]}'])
def test_a_sweep_part_that_is_not_one_is_named(dataset_toy, clips_dir, tmp_path, content):
    """`{"clips": 5, "rows": []}` gave an AttributeError traceback; a list, "list indices must be integers"."""
    from whisper_lens.distributed import find_clips, sweep

    clips = find_clips([clips_dir], dataset_toy)
    out = tmp_path / "out"
    sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
    bad = out / "parts" / "zz-bad.json"
    bad.write_text(content)
    with pytest.raises(ValueError) as excinfo:
        sweep(dataset_toy, clips, out, stack="encoder", removals=[0], progress=False)
    check_error(excinfo, str(bad), "move it away")
    assert bad.read_text() == content


def test_a_failed_sweep_leaves_out_as_it_was(dataset_toy, clips_dir, tmp_path, monkeypatch):
    """A sweep that failed (`--max-new-tokens 0`) had already claimed --out: the corrected rerun was refused."""
    from whisper_lens import distributed
    from whisper_lens.distributed import find_clips, sweep

    clips = find_clips([clips_dir], dataset_toy)
    out = tmp_path / "out"
    with pytest.raises(ValueError) as excinfo:
        sweep(dataset_toy, clips, out, stack="encoder", removals=[0], max_new_tokens=0, progress=False)
    check_error(excinfo, "max_new_tokens", "0")
    assert not out.exists()

    def fail(*args, **kwargs):
        raise ValueError("the first batch failed")

    monkeypatch.setattr(distributed, "_sweep_batch", fail)  # any failure before a result: nothing is claimed
    (tmp_path / "empty").mkdir()
    for folder in (out, tmp_path / "empty"):
        with pytest.raises(ValueError, match="first batch"):
            sweep(dataset_toy, clips, folder, stack="encoder", removals=[0], progress=False)
    assert not out.exists() and list((tmp_path / "empty").iterdir()) == []
    monkeypatch.undo()
    done = sweep(dataset_toy, clips, out, stack="encoder", removals=[0], max_new_tokens=8, progress=False)
    assert done.new_clips == 2


@pytest.fixture(scope="module")
def one_export(tmp_path_factory):
    """An export of the two samples (encoder.ln_post), made once; tests copy it before changing it."""
    import shutil

    from whisper_lens.distributed import export, find_clips

    folder = tmp_path_factory.mktemp("export")
    clips = folder / "clips"
    clips.mkdir()
    for name in ("sample1.wav", "sample2.wav"):
        shutil.copy(SAMPLES / name, clips / name)
    model = wl.load_model()
    export(model, find_clips([clips], model), folder / "x", "encoder.ln_post", progress=False, shard_clips=1)
    return folder / "x"


@pytest.fixture
def export_copy(one_export, tmp_path):
    import shutil

    return Path(shutil.copytree(one_export, tmp_path / "x"))


def _edit_index(folder: Path, change) -> Path:
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))
    return folder / "index.json"


def test_a_shard_with_flipped_bytes_is_named_not_read(export_copy):
    """Flipped bytes in a shard went undetected."""
    from whisper_lens.distributed import load_activations

    shard = sorted((export_copy / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a tensor's byte: the file still parses
    shard.write_bytes(bytes(data))
    acts = load_activations(export_copy)
    with pytest.raises(ValueError) as excinfo:
        [x for _, x in acts.tensors("encoder.ln_post")]
    check_error(excinfo, str(shard), "checksum")


def test_an_edited_index_entry_cannot_return_another_clips_tensor(export_copy):
    """An edited index.json entry returned another clip's tensor."""
    from whisper_lens.distributed import load_activations

    def swap(index):
        index["tensors"][0]["key"] = index["tensors"][1]["key"]
        index["tensors"][0]["shard"] = index["tensors"][1]["shard"]

    path = _edit_index(export_copy, swap)
    with pytest.raises(ValueError) as excinfo:
        load_activations(export_copy)
    check_error(excinfo, str(path), "sample2.wav/encoder.ln_post")


@pytest.mark.parametrize("shard", ["../../x.wav", "/etc/passwd", "shards/../../x.safetensors", "index.json"])
def test_an_index_entry_outside_the_export_is_refused_unopened(export_copy, shard):
    """An entry pointing at `../../x.wav` was opened outside the export."""
    from whisper_lens.distributed import load_activations

    def point(index):
        index["tensors"][0]["shard"] = shard

    path = _edit_index(export_copy, point)
    with pytest.raises(ValueError) as excinfo:
        load_activations(export_copy)
    check_error(excinfo, str(path), shard, "inside the export")


def test_a_truncated_shard_names_its_path(export_copy):
    """A truncated shard gave safetensors' SafetensorError without the path (an export whose index has no
    checksums, as version 1 wrote them, is still read: the error names the shard)."""
    from whisper_lens.distributed import load_activations

    _edit_index(export_copy, lambda index: index.pop("sha256", None))
    shard = sorted((export_copy / "shards").iterdir())[0]
    shard.write_bytes(shard.read_bytes()[:50])
    acts = load_activations(export_copy)
    with pytest.raises(ValueError) as excinfo:
        [x for _, x in acts.tensors("encoder.ln_post")]
    check_error(excinfo, str(shard))


@pytest.mark.parametrize("field", ["tensors", "clips", "names"])
def test_an_index_missing_a_field_is_one_line(export_copy, field):
    """An index without "tensors" gave a bare `KeyError 'tensors'`."""
    from whisper_lens.distributed import load_activations

    path = _edit_index(export_copy, lambda index: index.pop(field))
    with pytest.raises(ValueError) as excinfo:
        load_activations(export_copy)
    check_error(excinfo, str(path), field)


def test_indexing_an_export_by_clip_alone_says_how(export_copy):
    """`acts["sample1.wav"]` said "has no name None"."""
    from whisper_lens.distributed import load_activations

    acts = load_activations(export_copy)
    with pytest.raises(TypeError) as excinfo:
        acts["sample1.wav"]
    check_error(excinfo, "acts[clip, name]", "sample1.wav")
    assert acts["sample1.wav", "encoder.ln_post"].shape[-1] == acts.index["dims"]["n_audio_state"]


# ----- class 7: loading messages


@pytest.mark.parametrize("text", ["model: tiny\n", "(1, 2)\n", "cat dog\nfoo\n"])
def test_a_text_file_as_model_is_not_called_unsafe_to_retry(tmp_path, text):
    """A text file as --model got torch's advice to retry with weights_only=False (unsafe, and the wrong diagnosis)."""
    from whisper_lens.loading import CheckpointError

    path = tmp_path / "model.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError) as excinfo:
        wl.load_model(path)
    check_error(excinfo, str(path), "not a PyTorch checkpoint")
    assert "weights_only" not in str(excinfo.value) and "add_safe_globals" not in str(excinfo.value)


def test_two_tokenizer_files_beside_the_weights_are_named(tmp_path):
    """Two *.tiktoken files beside the weights left the model without a tokenizer and no reason."""
    import shutil

    from whisper_lens.loading import CheckpointError

    folder = Path(shutil.copytree(SHIPPED["toy"], tmp_path / "toy", ignore=shutil.ignore_patterns("samples")))
    shutil.copy(folder / "bytes.tiktoken", folder / "other.tiktoken")
    with pytest.raises(CheckpointError) as excinfo:
        wl.load_model(folder)
    check_error(excinfo, str(folder), "bytes.tiktoken", "other.tiktoken", "tokenizer=")
    assert wl.load_model(folder, tokenizer=folder / "bytes.tiktoken").tokenizer is not None


def test_a_folder_with_both_layouts_is_named(small_ct2, tmp_path):
    """A folder with both model.bin and model.safetensors gave "no 'num_mel_bins'"."""
    from whisper_lens.loading import CheckpointError

    folder = _ct2_copy(small_ct2, tmp_path / "both")
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(CheckpointError) as excinfo:
        wl.load_model(folder)
    check_error(excinfo, str(folder), "model.bin", "model.safetensors")


@pytest.mark.parametrize("source", ["", "  "])
def test_an_empty_model_name_does_not_read_the_current_folder(tmp_path, monkeypatch, source):
    """`load_model('')` read the current folder."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as excinfo:
        wl.load_model(source)
    check_error(excinfo, "empty")


# ----- class 7: every option checked before work, one line naming it (keyword names in Python)


@pytest.mark.parametrize(
    "call, error, names",
    [
        (lambda m, mel, tok: m.run(mel.long(), tok), ValueError, ["mel", "int64"]),
        (lambda m, mel, tok: m.generate(mel.to(torch.int32)), ValueError, ["mel", "int32"]),
        (lambda m, mel, tok: m.run(mel.to("meta"), tok), ValueError, ["mel", "meta"]),
        (lambda m, mel, tok: m.run(mel, tok, trace=True, trace_dtype=torch.int8), ValueError, ["trace_dtype", "int8"]),
        (lambda m, mel, tok: m.run(mel, tok, trace=True).trace.stack("*"), ValueError, ["stack('*')", "shapes"]),
        (lambda m, mel, tok: m.run(mel, tok, trace=123), TypeError, ["trace=", "123"]),
        (lambda m, mel, tok: m.run(mel, tok, trace=True, trace_device="cuda:7"), ValueError, ["trace_device", "cuda"]),
        (lambda m, mel, tok: wl.pad_or_trim(np.zeros(100, np.float32), True), ValueError, ["length", "True"]),
    ],
)
def test_run_and_trace_arguments_are_one_line_errors(toy, toy_inputs, call, error, names):
    """An integer mel was cast silently, trace_dtype=torch.int8 truncated the activations, and meta tensors,
    trace=123, trace_device='cuda' without CUDA (an AssertionError), trace.stack over names of different shapes
    and pad_or_trim(a, True) gave raw errors or wrong output."""
    mels, tokens = toy_inputs
    with pytest.raises(error) as excinfo:
        call(toy, mels, tokens)
    check_error(excinfo, *names)


@pytest.mark.parametrize("peak", [1e6, 32767.0])
def test_samples_far_outside_full_scale_are_refused(tmp_path, peak):
    """Samples far outside [-1, 1] were accepted (and overflowing audio blamed the internal audio_features)."""
    audio = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32) * peak
    with pytest.raises(ValueError) as excinfo:
        load_windows([audio], 80, 400)
    check_error(excinfo, "[-1, 1]", "32768")
    path = tmp_path / "loud.wav"
    soundfile.write(path, audio, 16000, subtype="FLOAT")
    with pytest.raises(ValueError) as excinfo:
        load_windows([path], 80, 400)
    check_error(excinfo, str(path), "[-1, 1]")
    assert load_windows([audio / peak * 1.2], 80, 400)[0].isfinite().all()  # resampling's overshoot above 1 is fine


# ----- class 4: no silent NaN or inf (the weights, at load)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load(tmp_path, bad):
    """NaN weights decoded as 62 copies of token 0 (avg_logprob nan) or got "audio_features has NaN; check the
    audio": the wrong culprit. A checkpoint with a non-finite weight is refused when loaded, naming the weight."""
    from whisper_lens.loading import CheckpointError

    model = wl.load_model()
    with torch.no_grad():
        model.decoder.blocks[1].mlp[0].weight[3, 5] = bad
    save_model(model, tmp_path / "bad")
    with pytest.raises(CheckpointError) as excinfo:
        wl.load_model(tmp_path / "bad")
    check_error(excinfo, str(tmp_path / "bad"), "decoder.blocks.1.mlp.0.weight", "NaN or infinite")


# ----- class 8: properties of the export reader


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["../../x.wav", "/etc/passwd", "shards/x.safetensors", "sample2.wav/encoder.ln_post"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def _paths(obj, prefix=()):
    """Every place in a JSON document: (path of keys/indices)."""
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, (*prefix, k))


@FUZZ
@given(data=st.data())
def test_export_reader_on_any_edited_index_or_shard(one_export, tmp_path_factory, data):
    """Whatever is changed in an export (a value anywhere in index.json, bytes of a shard), reading it either
    gives exactly the tensors exported, or raises whisper_lens' own one-line error; never another clip's tensor,
    never a file outside the export."""
    import shutil

    from whisper_lens.distributed import load_activations

    original = load_activations(one_export)
    expected = {(c, n): x.clone() for c, n, x in original}
    folder = Path(shutil.copytree(one_export, tmp_path_factory.mktemp("fuzz") / "x"))
    if data.draw(st.booleans(), label="edit the index"):
        index = json.loads((folder / "index.json").read_text())
        where = data.draw(st.sampled_from(list(_paths(index))[1:]), label="where")
        value = data.draw(JSON_VALUES, label="value")
        parent = index
        for k in where[:-1]:
            parent = parent[k]
        parent[where[-1]] = value
        (folder / "index.json").write_text(json.dumps(index))
    else:
        shard = data.draw(st.sampled_from(sorted((folder / "shards").iterdir())), label="shard")
        raw = bytearray(shard.read_bytes())
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        if data.draw(st.booleans(), label="truncate"):
            raw = raw[:at]
        else:
            raw[at] ^= data.draw(st.integers(1, 255), label="xor")
        shard.write_bytes(bytes(raw))

    def read_all():
        return {(c, n): x for c, n, x in load_activations(folder)}

    if raises_whisper_lens_error(read_all) is None:
        got = read_all()
        for key, x in got.items():
            assert key in expected and torch.equal(x, expected[key]), key


# ----- class 4: no silent NaN or inf (edits)


def test_an_infinite_steering_vector_is_refused_when_built():
    """An infinite vector in add() decoded 62 copies of token 0 (avg_logprob nan)."""
    with pytest.raises(ValueError) as excinfo:
        wl.Edits().add("decoder.blocks.1.resid_post", torch.full((192,), float("inf")))
    check_error(excinfo, "decoder.blocks.1.resid_post", "infinite")


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda e: e.apply("decoder.blocks.2.mlp_out", lambda x: x / 0.0), ["apply", "decoder.blocks.2.mlp_out"]),
        (lambda e: e.apply("encoder.blocks.0.resid_post", lambda x: x * float("nan")), ["apply", "encoder.blocks.0"]),
    ],
)
def test_an_edit_that_makes_nan_or_inf_is_named(toy, toy_inputs, make, names):
    """An apply() returning NaN decoded 62 copies of token 0 (avg_logprob nan), with no error."""
    mels, tokens = toy_inputs
    for call in (lambda e: toy.run(mels, tokens, edits=e), lambda e: toy.generate(mels, edits=e)):
        with pytest.raises(ValueError) as excinfo:
            call(make(wl.Edits()))
        check_error(excinfo, *names)
    masked = wl.Edits().replace("decoder.blocks.0.attn.scores", torch.full((1, 4, 4, 4), float("-inf")).triu(1))
    assert toy.run(mels, tokens, edits=masked).logits.isfinite().all()  # -inf in scores masks: allowed


# ----- class 7: audio cut short


def test_a_wav_cut_short_is_named_not_decoded_shorter(tmp_path):
    """A WAV with half its data cut decoded as 0.7 s with no warning."""
    data = (SAMPLES / "sample1.wav").read_bytes()
    half = tmp_path / "half.wav"
    half.write_bytes(data[: len(data) // 2])
    for call in (wl.load_audio, lambda p: load_windows([p], 80, 400)):
        with pytest.raises(ValueError) as excinfo:
            call(half)
        check_error(excinfo, str(half), "cut short", "1.37 s")
    padded = tmp_path / "odd.wav"  # a complete file with a chunk after the data still reads
    soundfile.write(padded, np.zeros(1001, np.float32), 16000, subtype="PCM_16")
    assert len(wl.load_audio(padded)) == 1001


def test_a_c_decoders_warnings_stay_off_the_terminal(tmp_path, capfd):
    """libmpg123's C warnings ("[src/libmpg123/id3.c:...] warning: ID3v2: ...") broke the one-line error."""
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"ID3" + bytes(range(256)) * 20)
    with pytest.raises(ValueError) as excinfo:
        wl.load_audio(junk)
    check_error(excinfo, str(junk))
    captured = capfd.readouterr()
    assert "libmpg123" not in captured.err and "warning" not in captured.err, captured.err


# ----- class 5: one model, one behaviour (its defaults travel with its files)


def test_the_toys_decoding_defaults_travel_with_its_files(tmp_path):
    """The CLI recognised the toy only by the literal name `toy`: loaded by path, it decoded with timestamps."""
    import shutil

    from whisper_lens.loading import CheckpointError
    from whisper_lens.toy.train import TOY_DEFAULTS

    by_name, by_path = wl.load_model("toy"), wl.load_model(str(SHIPPED["toy"]))
    assert by_name.transcribe_defaults == by_path.transcribe_defaults == TOY_DEFAULTS
    save_model(by_path, tmp_path / "copy")  # and a copy saved from it keeps them
    assert wl.load_model(tmp_path / "copy").transcribe_defaults == TOY_DEFAULTS
    folder = Path(shutil.copytree(tmp_path / "copy", tmp_path / "bad"))
    config = json.loads((folder / "config.json").read_text())
    config["whisper_lens_transcribe"] = {"timestamps": "no"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as excinfo:
        wl.load_model(folder)
    check_error(excinfo, str(folder / "config.json"), "whisper_lens_transcribe")


# ----- class 2: bounded memory for traces of long recordings


def test_a_long_trace_is_refused_with_the_size_it_would_need(toy_model, monkeypatch):
    """`transcribe(path, trace=True)` kept every window's trace: 610 MB for 2 minutes of audio on the toy, no limit,
    no warning. Past the limit it stops after the first window, saying how much the whole trace would need."""
    one = load_audio(SAMPLES / "sample1.wav")
    long = np.concatenate([one, np.zeros(16000 * 2, np.float32)] * 12)  # 40 s: 10 of the toy's windows
    first = toy_model.transcribe(one, trace="encoder.*")  # encoder names: recorded once a window, fast
    per_window = first.windows[0].trace.nbytes
    monkeypatch.setenv("WHISPER_LENS_TRACE_LIMIT", str(3 * per_window))
    calls = []
    real = type(toy_model).generate
    monkeypatch.setattr(type(toy_model), "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(ValueError) as excinfo:
        toy_model.transcribe(long, trace="encoder.*")
    check_error(excinfo, "GB", "WHISPER_LENS_TRACE_LIMIT", "docs/long-recordings.md")
    assert len(calls) <= 2  # stopped after the first window (one decoding, maybe one fallback), not at the end
    monkeypatch.setenv("WHISPER_LENS_TRACE_LIMIT", "lots")
    with pytest.raises(ValueError) as excinfo:
        toy_model.transcribe(one, trace="encoder.*")
    check_error(excinfo, "WHISPER_LENS_TRACE_LIMIT", "lots")
    monkeypatch.delenv("WHISPER_LENS_TRACE_LIMIT")
    assert toy_model.transcribe(one, trace="encoder.ln_post").windows[0].trace["encoder.ln_post"].shape[-1] == 192


@pytest.mark.parametrize("variant", ["16-bit", "8-bit", "96 kHz"])
def test_transcribe_and_the_lens_agree_on_a_clip_of_one_window(tmp_path, variant):
    """Loaded by path (or with the API's defaults) the toy decoded with timestamps, its segment ending at 0.58 s
    instead of 1.36 s. On the 8-bit and 96 kHz copies transcribe and the lens still read different text: transcribe
    padded the last window's mel with zeros, the lens pads the audio with silence, as the toy was trained (its
    config now says so: "pad_with_silence"). Whisper's own models keep openai-whisper's zeros (test_transcribe)."""
    import librosa

    audio, _ = soundfile.read(SAMPLES / "sample1.wav", dtype="float32")
    path = tmp_path / "clip.wav"
    if variant == "96 kHz":
        soundfile.write(path, librosa.resample(audio, orig_sr=16000, target_sr=96000), 96000, subtype="PCM_16")
    else:
        soundfile.write(path, audio, 16000, subtype="PCM_U8" if variant == "8-bit" else "PCM_16")
    model = wl.load_model(str(SHIPPED["toy"]))  # by its path: the defaults come from its config, not its name
    transcript = model.transcribe(path)
    mel, _ = load_windows([path], model.dims.n_mels, 2 * model.dims.n_audio_ctx)  # what lens and generate see
    result = model.generate(mel)[0]
    assert transcript.text.strip().startswith("my rice") and result.text.strip().startswith("my rice")
    assert transcript.segments[0].tokens == result.tokens and transcript.text == result.text  # the same reading
    assert [(s.start, s.end) for s in transcript.segments] == [(0.0, 1.36)]


def test_word_timestamps_never_erase_the_text(toy_model):
    """`--word-timestamps --alignment-heads 0:1` reported "no speech" and erased the transcript: head (0, 1) puts
    every word at 0.0 s, the segment shrank to [0.0, 0.0] and an instantaneous segment loses its text."""
    sample = SHIPPED["toy"] / "samples" / "sample1.wav"
    plain = toy_model.transcribe(sample)
    timed = toy_model.transcribe(sample, word_timestamps=True, alignment_heads=[(0, 1)])
    assert timed.text == plain.text == "my rice is funny"
    assert [s.text for s in timed.segments] == [s.text for s in plain.segments]
    assert [w.word for s in timed.segments for w in s.words] == ["my", " rice", " is", " funny"]
    assert [(s.start, s.end) for s in timed.segments] == [(s.start, s.end) for s in plain.segments]  # not [(0, 0)]


def test_audio_after_the_last_word_is_not_decoded_again(toy_model):
    """With heads from find_alignment_heads the next window started after the last word, inside audio already
    transcribed: "our painter drops three stones" + "es". A window whose text runs to the end is the last."""
    from whisper_lens.heads import find_alignment_heads

    samples = SHIPPED["toy"] / "samples"
    expected = json.loads((samples / "transcripts.json").read_text())
    paths = [samples / name for name in expected]
    heads = find_alignment_heads(toy_model, paths).heads
    timed_all = toy_model.transcribe(paths, word_timestamps=True, alignment_heads=heads)
    for path, timed in zip(paths, timed_all, strict=True):
        assert timed.text == expected[path.name] and len(timed.windows) == 1, (path.name, timed.text)
        words = [w for s in timed.segments for w in s.words]
        assert " ".join(w.word.strip() for w in words) == expected[path.name]
        assert all(0 <= w.start <= w.end <= len(wl.load_audio(path)) / 16000 + 0.02 for w in words)
    long = np.concatenate([wl.load_audio(p) for p in paths[:3]])  # 7 s: two of the toy's 4 s windows
    timed = toy_model.transcribe(long, word_timestamps=True, alignment_heads=heads)
    assert len(timed.windows) == 2 and timed.windows[-1].seek + timed.windows[-1].frames == len(long) // 160
    assert timed.text == toy_model.transcribe(long).text  # the end of the last window is read once


# ----- class 4: no silent NaN or inf (while decoding)


def test_nan_weights_in_memory_stop_decoding_naming_the_weight(toy_inputs):
    """NaN weights: generate returned 62 copies of token 0 with avg_logprob nan, no error; transcribe said
    "audio_features has NaN ...; check the audio" (an internal name, and the wrong culprit)."""
    model = wl.load_model()
    mels, _ = toy_inputs
    with torch.no_grad():
        model.decoder.blocks[2].mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError) as excinfo:
        model.generate(mels)
    check_error(excinfo, "decoder.blocks.2.mlp.0.weight", "weights")
    with torch.no_grad():
        model.decoder.blocks[2].mlp[0].weight[0, 0] = 0.0
        model.encoder.blocks[0].attn.query.weight[0, 0] = float("inf")
    with pytest.raises(ValueError) as excinfo:
        model.generate(mels)
    check_error(excinfo, "encoder.blocks.0.attn.query.weight", "encoder's output")


def test_suppressing_every_token_is_refused(toy, toy_inputs):
    """Suppressing every token decoded 62 copies of token 0, avg_logprob nan."""
    mels, _ = toy_inputs
    for bad in (list(range(toy.dims.n_vocab)), [1.5, 2]):
        with pytest.raises(ValueError) as excinfo:
            toy.generate(mels, suppress_tokens=bad)
        check_error(excinfo, "suppress_tokens")


# ----- class 7: alignment heads as integer pairs in range


@pytest.mark.parametrize(
    "heads, error, names",
    [
        ([(0.9, 1.5)], ValueError, ["alignment_heads", "(0.9, 1.5)", "whole numbers"]),
        ([(1, 2, 3)], ValueError, ["alignment_heads", "(1, 2, 3)"]),
        ([1], ValueError, ["alignment_heads", "1"]),
        ("1:0", TypeError, ["alignment_heads", "'1:0'"]),
        ([(True, 0)], ValueError, ["alignment_heads", "True"]),
    ],
)
def test_alignment_heads_are_integer_pairs(toy_model, heads, error, names, monkeypatch):
    """Fractional heads (0.9, 1.5) were truncated to (0, 1); heads that did not unpack gave raw unpack errors."""
    from whisper_lens import model as model_module

    monkeypatch.setattr(model_module.Whisper, "generate", lambda *a, **k: pytest.fail("decoded before the check"))
    with pytest.raises(error) as excinfo:
        toy_model.transcribe(np.full(16000, 0.1, np.float32), word_timestamps=True, alignment_heads=heads)
    check_error(excinfo, *names)
