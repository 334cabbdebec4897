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
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as excinfo:
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


# ---------------------------------------------------------------- CLI, output files, audio, tokenizer files, edits


# ----------------------------------------------------------------------------- long-form transcription and its writers


# ----------------------------------------------------------------------------- dataset-scale sweeps and exports
