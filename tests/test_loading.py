"""load_model: every source kind, the official dims, and one clear error for every bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from whisper_lens import ModelDims, load_model
from whisper_lens.loading import (
    OFFICIAL,
    CheckpointError,
    hf_to_openai,
    openai_to_hf,
    save_model,
    save_openai_checkpoint,
)
from whisper_lens.model import Whisper

from .conftest import SMALL, random_mel, random_tokens

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


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def _cli(*args: str, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-m", "whisper_lens.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)  # fmt: skip


# ----------------------------------------------------------------------------- bad input


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(CheckpointError, match=r"unknown model 'tiny\.fr'.*tiny\.en.*large-v3-turbo"):
        load_model("tiny.fr")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="unknown model .*does-not-exist.*not a path that exists"):
        load_model(str(tmp_path / "does-not-exist"))


def test_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello, I am text")
    with pytest.raises(CheckpointError, match="notes.pt is not a readable PyTorch checkpoint"):
        load_model(bad)
    other = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="not an OpenAI Whisper checkpoint"):
        load_model(other)


def test_directory_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_model(tmp_path)


def test_truncated_safetensors(small_hf_dir, tmp_path):
    for f in ("config.json", "model.safetensors"):
        shutil.copy(small_hf_dir[0] / f, tmp_path / f)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path)


def _small_checkpoint(tmp_path: Path, edit) -> Path:
    with torch.device("meta"):
        sd = {k: torch.zeros(v.shape) for k, v in Whisper(SMALL).state_dict().items()}
    sd = {k: torch.zeros(v.shape) for k, v in sd.items()}
    edit(sd)
    path = tmp_path / "edited.pt"
    from dataclasses import asdict

    torch.save({"dims": asdict(SMALL), "model_state_dict": sd}, path)
    return path


def test_missing_key_is_named(tmp_path):
    path = _small_checkpoint(tmp_path, lambda sd: sd.pop("decoder.blocks.1.mlp.2.bias"))
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): decoder\.blocks\.1\.mlp\.2\.bias"):
        load_model(path)


def test_unexpected_key_is_named(tmp_path):
    path = _small_checkpoint(tmp_path, lambda sd: sd.update({"decoder.blocks.9.attn.query.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): decoder\.blocks\.9\.attn\.query\.weight"):
        load_model(path)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    path = _small_checkpoint(tmp_path, lambda sd: sd.update({"encoder.conv1.weight": torch.zeros(64, 80, 5)}))
    with pytest.raises(
        CheckpointError, match=r"encoder\.conv1\.weight: checkpoint has \(64, 80, 5\), model wants \(64, 80, 3\)"
    ):
        load_model(path)


def test_bad_dims_in_checkpoint(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"dims": {"n_mels": 80}, "model_state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="'dims' must have the fields"):
        load_model(path)
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
