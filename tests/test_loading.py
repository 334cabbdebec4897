"""load_model: every source kind, the official dims, and one clear error for every bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from whisper_lens import ModelDims, load_model
from whisper_lens.loading import (
    OFFICIAL,
    hf_to_openai,
    openai_to_hf,
    save_model,
    save_openai_checkpoint,
)
from whisper_lens.model import Whisper

from .conftest import SMALL, hf_model, random_mel, random_tokens, real_tiny_en_folder

REPO = Path(__file__).resolve().parent.parent

# Whisper paper, Table 1 (layers, width, heads), plus the published vocabularies and mel bins.
PAPER = {"tiny": (4, 384, 6), "base": (6, 512, 8), "small": (12, 768, 12), "medium": (24, 1024, 16),
         "large-v1": (32, 1280, 20), "large-v2": (32, 1280, 20), "large-v3": (32, 1280, 20)}  # fmt: skip
# Parameter counts as the hub's model cards publish them (weights incl. the encoder's positions), in millions.
PUBLISHED_PARAMS = {"tiny": 37.8, "base": 72.6, "small": 242, "medium": 764, "large-v2": 1540, "large-v3-turbo": 809}


def test_official_table_covers_all_thirteen_names():
    sizes = ["tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en"]
    assert sorted(OFFICIAL) == sorted(sizes + ["large-v1", "large-v2", "large-v3", "large-v3-turbo", "turbo"])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_dims_are_the_published_ones(name):
    repo, d = OFFICIAL[name]
    size = name.removesuffix(".en")
    size = "large-v3" if size in ("turbo", "large-v3-turbo") else size
    assert (d.n_audio_layer, d.n_audio_state, d.n_audio_head) == PAPER[size]
    assert (d.n_text_state, d.n_text_head) == PAPER[size][1:]
    assert d.n_text_layer == (4 if "turbo" in name else PAPER[size][0])
    assert (d.n_audio_ctx, d.n_text_ctx) == (1500, 448)
    assert d.n_vocab == (51864 if name.endswith(".en") else 51866 if "v3" in name or name == "turbo" else 51865)
    assert d.n_mels == (128 if d.n_vocab == 51866 else 80)
    assert repo.startswith("openai/whisper-")


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_official_dims_give_the_published_parameter_counts(name):
    with torch.device("meta"):
        model = Whisper(OFFICIAL[name][1])
    count = sum(p.numel() for p in model.parameters()) + model.encoder.positional_embedding.numel()
    assert count / 1e6 == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


def test_rename_table_round_trips_every_key():
    with torch.device("meta"):
        model = Whisper(SMALL)
    for key in model.state_dict():
        assert hf_to_openai(openai_to_hf(key)) == key


def test_hf_directory_and_pt_and_save_round_trip(small_hf_dir, tmp_path):
    folder, ref = small_hf_dir
    model = load_model(folder)
    assert model.dims == SMALL and model.training is False
    mel, tokens = random_mel(SMALL), random_tokens(SMALL)
    with torch.no_grad():
        expected = model(mel, tokens)
        save_model(model, tmp_path / "hf")
        save_openai_checkpoint(model, tmp_path / "model.pt")
        assert torch.equal(load_model(tmp_path / "hf")(mel, tokens), expected)
        assert torch.equal(load_model(tmp_path / "model.pt")(mel, tokens), expected)
        assert torch.equal(load_model(tmp_path / "hf" / "config.json")(mel, tokens), expected)
        # transformers reads what we save
        from transformers import WhisperForConditionalGeneration

        hf = WhisperForConditionalGeneration.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
        torch.testing.assert_close(hf(input_features=mel, decoder_input_ids=tokens).logits, expected, atol=1e-4, rtol=0)


def test_dtype_and_device_placement(small_hf_dir):
    model = load_model(small_hf_dir[0], dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.encoder.positional_embedding.dtype == torch.float64
    with torch.no_grad():
        logits = model(random_mel(SMALL), random_tokens(SMALL))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_official_name_resolves_from_a_hub_cache_offline(small_hf_dir, tmp_path):
    """A hub cache laid out as huggingface-hub lays it out; no network needed."""
    folder = small_hf_dir[0]
    snapshot = tmp_path / "models--openai--whisper-tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, snapshot / f)
    (tmp_path / "models--openai--whisper-tiny" / "refs").mkdir()
    (tmp_path / "models--openai--whisper-tiny" / "refs" / "main").write_text("0123abcd")
    code = "import whisper_lens as wl; m = wl.load_model('tiny'); print(m.dims.n_text_layer, m.dims.n_audio_ctx)"
    out = _run_python(code, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(SMALL.n_text_layer), str(SMALL.n_audio_ctx)]  # the cached files were read


def hub_cache_entry(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay files out as huggingface-hub's cache does: a snapshot folder of links, named by refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).symlink_to(source)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


@pytest.fixture
def empty_disk(tmp_path, monkeypatch) -> Path:
    """Empty caches for this test: a temporary HOME, XDG_CACHE_HOME and hub cache, and the hub offline."""
    import huggingface_hub.constants

    for name in ("home", "xdg", "hub"):
        (tmp_path / name).mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path


CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")  # a faster-whisper repository's


def test_official_names_resolve_from_disk_in_order(empty_disk, real_tiny_en_pt, real_tiny_en_hf, monkeypatch):
    """tiny.en: faster-whisper's hub cache when it is all there is; openai-whisper's cache before it (only with
    the published SHA256: ours is a stand-in, so the table is patched to its hash); the hub cache before both."""
    from whisper_lens import loading

    ct2 = real_tiny_en_folder()
    faster = hub_cache_entry(empty_disk / "hub", "Systran/faster-whisper-tiny.en", {f: ct2 / f for f in CT2_FILES})
    assert loading.resolve("tiny.en") == loading.Found(folder=faster, name="tiny.en")
    model = load_model("tiny.en")
    assert model.alignment_heads == loading.OFFICIAL_ALIGNMENT_HEADS["tiny.en"]
    assert model.tokenizer is not None and model.dims == OFFICIAL["tiny.en"][1]

    cached_pt = empty_disk / "xdg" / "whisper" / "tiny.en.pt"  # $XDG_CACHE_HOME/whisper, as openai-whisper keeps it
    cached_pt.parent.mkdir()
    cached_pt.symlink_to(real_tiny_en_pt)
    assert loading.resolve("tiny.en").folder == faster  # not OpenAI's file: its SHA256 differs
    monkeypatch.setitem(loading.OPENAI_CHECKPOINTS, "tiny.en", ("tiny.en.pt", loading.file_sha256(real_tiny_en_pt)))
    assert loading.resolve("tiny.en") == loading.Found(pt_file=cached_pt, name="tiny.en")
    monkeypatch.delenv("XDG_CACHE_HOME")  # then openai-whisper's cache is ~/.cache/whisper
    (empty_disk / "home" / ".cache").mkdir()
    (empty_disk / "xdg" / "whisper").rename(empty_disk / "home" / ".cache" / "whisper")
    assert loading.resolve("tiny.en").pt_file == empty_disk / "home" / ".cache" / "whisper" / "tiny.en.pt"

    hf_folder = real_tiny_en_hf[0]
    files = {f: hf_folder / f for f in ("config.json", "model.safetensors")}
    hub = hub_cache_entry(empty_disk / "hub", "openai/whisper-tiny.en", files)
    assert loading.resolve("tiny.en") == loading.Found(folder=hub, name="tiny.en")


def test_official_name_offline_with_nothing_on_disk_names_every_place_looked(tmp_path):
    hub = tmp_path / "hf" / "hub"
    env = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg"), "HF_HUB_CACHE": str(hub)}
    out = _cli("names", "--model", "base.en", **env, HF_HUB_OFFLINE="1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    places = [str(hub), "openai/whisper-base.en", str(tmp_path / "xdg" / "whisper" / "base.en.pt"),
              "Systran/faster-whisper-base.en"]  # fmt: skip
    assert all(place in lines[0] for place in places), lines[0]


def test_faster_whisper_hub_id_resolves_like_any_hub_id(tmp_path):
    """`Systran/faster-whisper-tiny.en` from a hub cache laid out as the hub lays it out (offline)."""
    ct2 = real_tiny_en_folder()
    hub_cache_entry(tmp_path, "Systran/faster-whisper-tiny.en", {f: ct2 / f for f in CT2_FILES})
    code = ("import whisper_lens as wl; m = wl.load_model('Systran/faster-whisper-tiny.en'); "
            "print(m.dims.n_vocab, m.tokenizer.encode(' hello'), m.alignment_heads[:2])")  # fmt: skip
    out = _run_python(code, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "51864 [23748] [(1, 0), (2, 0)]"


def test_alignment_heads_table_is_openai_whispers(small_hf_dir, tmp_path):
    """The shipped table equals openai-whisper's base85/gzip masks, decoded here by openai-whisper's own code;
    a .pt named as openai-whisper names it, or dims that one official model alone has, get that model's heads."""
    import whisper
    import whisper.model

    from whisper_lens.loading import OFFICIAL_ALIGNMENT_HEADS, OPENAI_CHECKPOINTS, Found, alignment_heads_for

    for name, (_, dims) in OFFICIAL.items():
        holder = torch.nn.Module()  # all that openai-whisper's set_alignment_heads uses of its model
        holder.dims = whisper.model.ModelDimensions(**dataclasses.asdict(dims))
        whisper.model.Whisper.set_alignment_heads(holder, whisper._ALIGNMENT_HEADS[name])
        heads = [tuple(p) for p in holder.alignment_heads.to_dense().nonzero().tolist()]
        assert OFFICIAL_ALIGNMENT_HEADS[name] == heads
        file = tmp_path / OPENAI_CHECKPOINTS[name][0]
        assert alignment_heads_for(Found(pt_file=file), dims) == heads
        shared = name in ("large-v1", "large-v2")  # the same dims, different heads
        assert alignment_heads_for(Found(folder=tmp_path), dims) == (None if shared else heads)
    assert load_model(small_hf_dir[0]).alignment_heads is None  # dims of no official model, nothing beside


def test_generation_config_alignment_heads(small_hf_dir, tmp_path):
    for f in ("config.json", "model.safetensors"):
        (tmp_path / f).symlink_to(small_hf_dir[0] / f)
    (tmp_path / "generation_config.json").write_text('{"alignment_heads": [[2, 3], [1, 0]]}')
    assert load_model(tmp_path).alignment_heads == [(2, 3), (1, 0)]


def test_dtype_by_name_and_old_format_pt(small_hf_dir, tmp_path):
    """dtype="bfloat16" is torch.bfloat16; a .pt in torch's pre-1.6 format (not a zip) loads without mmap."""
    model = load_model(small_hf_dir[0], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    reference = load_model(small_hf_dir[0])
    checkpoint = {"dims": dataclasses.asdict(SMALL), "model_state_dict": reference.state_dict()}
    torch.save(checkpoint, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    old = load_model(tmp_path / "old.pt").state_dict()
    assert all(torch.equal(old[k], v) for k, v in reference.state_dict().items())


def test_tokenizer_files_of_a_faster_whisper_folder():
    """tokenizer.json, vocabulary.txt and the folder itself give openai-whisper's English tokenizer: its ids for
    text, its special tokens."""
    import whisper.tokenizer

    from whisper_lens import load_tokenizer

    reference = whisper.tokenizer.get_tokenizer(multilingual=False)
    text = " Feels like these days go on forever... 10 of clubs, naïve café — ünïcödé 日本語 ♪"
    folder = real_tiny_en_folder()
    for source in (folder / "tokenizer.json", folder / "vocabulary.txt", folder):
        tok = load_tokenizer(source, n_vocab=51864)
        assert tok.encode(text) == reference.encode(text), source.name
        assert (tok.eot, tok.sot, tok.no_timestamps, tok.timestamp_begin) == (
            reference.eot, reference.sot, reference.no_timestamps, reference.timestamp_begin
        )  # fmt: skip


# ----------------------------------------------------------------------------- CTranslate2 folders (faster-whisper)

# CTranslate2's quantisations -> the float type of what stays unquantised (biases, norms, positions)
QUANTISATIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int8": torch.float32, "int8_float16": torch.float16, "int8_bfloat16": torch.bfloat16,
                 "int16": torch.float32}  # fmt: skip
SMALL_EN = dataclasses.replace(SMALL, n_vocab=51864)  # English-only: the real tiny.en's tokenizer.json fits it


@pytest.fixture(scope="module")
def ct2_source(tmp_path_factory):
    """A random-weight transformers Whisper of small dims with tiny.en's tokenizer.json, ready for the converter."""
    model = hf_model(SMALL_EN, seed=31)
    folder = tmp_path_factory.mktemp("ct2_source")
    model.save_pretrained(folder)
    shutil.copy(real_tiny_en_folder() / "tokenizer.json", folder)
    return folder, model


def convert_with_ctranslate2(source: Path, out: Path, quantization: str) -> dict[str, torch.Tensor]:
    """Convert with CTranslate2's own converter; return the variables it wrote, by name (aliases resolved)."""
    from ctranslate2.converters import TransformersConverter

    written = {}

    class Capture(TransformersConverter):
        def _load(self):  # the spec that convert() then quantises and saves, in place
            written["spec"] = super()._load()
            return written["spec"]

    Capture(str(source)).convert(str(out), quantization=quantization)
    variables = written["spec"].variables()

    def tensor(value) -> torch.Tensor:
        if isinstance(value, str):  # an alias: the name of the variable it repeats
            return tensor(variables[value])
        if hasattr(value, "tensor"):
            return value.tensor
        return torch.from_numpy(np.asarray(value.array if hasattr(value, "array") else value))  # numpy scalars too

    return {name: tensor(value) for name, value in variables.items()}


@pytest.mark.parametrize("quantization", list(QUANTISATIONS))
def test_ct2_folder_of_every_quantisation(quantization, ct2_source, tmp_path):
    """For each quantisation of CTranslate2's converter: our reader returns exactly the variables it wrote; the
    loaded weights are the original ones (cast to the stored float type, or within one quantisation step); and
    CTranslate2's own runtime on the folder (weights in fp32) gives our encoder output and our logits."""
    import ctranslate2

    from whisper_lens.ct2 import read_model_bin

    source, hf = ct2_source
    folder = tmp_path / quantization
    written = convert_with_ctranslate2(source, folder, quantization)
    spec, _, variables = read_model_bin(folder / "model.bin")
    assert spec == "WhisperSpec" and variables.keys() == written.keys()
    for name, value in written.items():
        assert variables[name].dtype == value.dtype, name
        assert torch.equal(variables[name], value.reshape(variables[name].shape)), name

    model = load_model(folder)
    _assert_weights_are_the_originals(model, hf, quantization)
    assert model.tokenizer.encode(" go forward ten meters") == [467, 2651, 3478, 10700]  # from vocabulary.json
    config = json.loads((folder / "config.json").read_text())
    assert model.alignment_heads == [tuple(p) for p in config["alignment_heads"]]

    runtime = ctranslate2.models.Whisper(str(folder), compute_type="float32")
    mel = random_mel(SMALL_EN, batch=2, seed=9)
    features = ctranslate2.StorageView.from_array(mel.numpy())
    prompt = [model.tokenizer.sot, model.tokenizer.no_timestamps]
    generated = runtime.generate(features, [prompt] * 2, beam_size=1, max_length=8, suppress_tokens=[],
                                 suppress_blank=False, return_logits_vocab=True)  # fmt: skip
    encoded = torch.from_numpy(np.asarray(runtime.encode(features, to_cpu=True)))
    for i, result in enumerate(generated):
        tokens = torch.tensor([prompt + result.sequences_ids[0]])
        with torch.no_grad():
            run = model.run(mel[i : i + 1], tokens, trace=["encoder.ln_post"])
        torch.testing.assert_close(run.trace["encoder.ln_post"][0], encoded[i], atol=1e-5, rtol=0)
        logits = torch.stack([torch.from_numpy(np.asarray(step)).flatten() for step in result.logits[0]])
        ours = run.logits[0, len(prompt) - 1 : len(prompt) - 1 + len(logits)]  # the steps' predictions
        torch.testing.assert_close(ours, logits, atol=1e-5, rtol=0)


def _assert_weights_are_the_originals(model, hf, quantization: str) -> None:
    """Unquantised tensors equal the original cast to the stored float type; int8 weights lie within half a step
    (row max / 127) of the original, int16 ones within half of (largest weight / 1024)."""
    original = {hf_to_openai(k): v for k, v in hf.state_dict().items() if k != "proj_out.weight"}
    integer = quantization.startswith("int")
    quantised = {k for k, v in original.items() if integer and k.endswith("weight") and v.dim() > 1}
    largest = max((original[k].abs().max() for k in quantised), default=None)
    for key, value in model.state_dict().items():
        w = original[key]
        if key not in quantised:
            assert torch.equal(value, w.to(QUANTISATIONS[quantization]).float()), key
            continue
        row_max = w.abs().flatten(1).amax(dim=1).view(-1, *[1] * (w.dim() - 1))
        step = row_max / 127 if quantization.startswith("int8") else largest / 2**10
        assert bool(((value - w).abs() <= step / 2 * (1 + 1e-5)).all()), key
        assert not torch.equal(value, w)  # really quantised


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def _cli(*args: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "whisper_lens.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)  # fmt: skip


# ----------------------------------------------------------------- errors through the CLI (the rest: test_bad_input.py)


def test_dims_must_divide_by_head_counts():
    with pytest.raises(ValueError, match="must divide by head counts"):
        ModelDims(80, 10, 64, 5, 1, 100, 10, 64, 4, 1)


def test_no_network_and_nothing_cached_says_so(tmp_path):
    out = _cli("download", "tiny", HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    assert "cannot download 'openai/whisper-tiny' (no network?) and it is not in the hub cache" in lines[0]
    assert "local directory" in lines[0]


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    out = _cli("names", "--model", "no-such-model")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()]
    assert "unknown model 'no-such-model'" in out.stderr


def test_cli_names_lists_every_name_with_its_shape(small_hf_dir):
    out = _cli("names", "--model", str(small_hf_dir[0]), "--tokens", "5", "decoder.blocks.2.*")
    assert out.returncode == 0, out.stderr
    rows = dict(line.split(None, 1) for line in out.stdout.strip().splitlines())
    assert rows["decoder.blocks.2.cross_attn.pattern"] == f"[1, {SMALL.n_text_head}, 5, {SMALL.n_audio_ctx}]"
    assert rows["decoder.blocks.2.mlp.pre"] == f"[1, 5, {4 * SMALL.n_text_state}]"
    assert all(name.startswith("decoder.blocks.2.") for name in rows)


def test_special_ids_follow_the_vocabulary():
    from whisper_lens.loading import special_ids

    assert special_ids(51864) == (50257, 50256)  # English-only: gpt2 ranks (50256), then eot
    assert special_ids(51865) == (50258, 50257)  # multilingual: 50257 ranks
    assert special_ids(51866) == (50258, 50257)  # v3: one more language
    assert special_ids(1864) == (257, 256)  # the toy model's byte vocabulary
