"""SAEs on real tiny.en: trained by SAELens's trainer on an export, read back by SAELens, spliced into the model.

One export of encoder block 3's residual stream over six real clips (encoder names only: no decoding)
and one small top-k SAE trained on it for a few steps serve every test.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import whisper_lens as wl
from whisper_lens.cli import main
from whisper_lens.distributed import export, find_clips
from whisper_lens.sae import train

from .conftest import DATA

NAME = "encoder.blocks.3.resid_post"
LATENTS = f"{NAME}.sae.latents"
CLIPS = ["austen-0880.flac", "austen-0930.flac", "cards-005.flac", "forever.flac", "goforward.flac", "austen-0890.flac"]
SETTINGS = {"width": 256, "k": 16, "steps": 24, "batch_size": 128, "checkpoints": 2, "lr": 1e-3}


@pytest.fixture(scope="module")
def exported(real_tiny_en, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sae") / "export"
    clips = find_clips([DATA / c for c in CLIPS], real_tiny_en)
    export(real_tiny_en, clips, out, [NAME], batch_size=6, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(exported, tmp_path_factory):
    return train(exported, NAME, tmp_path_factory.mktemp("sae") / "sae", **SETTINGS)


def test_the_trained_sae_is_read_by_saelens_and_its_metrics_are_the_measured_ones(exported, trained):
    from sae_lens import SAE, TopKSAE

    sae = SAE.load_from_disk(trained.out)
    assert isinstance(sae, TopKSAE) and (sae.cfg.d_in, sae.cfg.d_sae) == (384, 256)
    assert sae.cfg.metadata.hook_name == NAME
    for name, p in sae.state_dict().items():
        assert torch.equal(p, trained.sae.state_dict()[name])
    x = torch.cat([t for _, t in wl.load_activations(exported).tensors(NAME)])  # every speech position, [N, 384]
    with torch.no_grad():
        z = sae.encode(x)  # (N, 256)
        fvu = float((x - sae.decode(z)).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    m = trained.metrics
    assert m.rows == len(x) and m.d_sae == 256
    assert m.fvu == pytest.approx(fvu, rel=1e-4)
    assert m.l0 == pytest.approx(float((z != 0).sum(1).float().mean()), rel=1e-6) and 0 < m.l0 <= 16
    assert m.dead == int(((z != 0).sum(0) == 0).sum())
    assert fvu < 1.0  # it learnt something in 24 steps
    assert json.loads((trained.out / "metrics.json").read_text())["fvu"] == m.fvu


def test_a_run_resumed_from_its_first_checkpoint_ends_with_the_same_weights(exported, trained, tmp_path):
    copy = tmp_path / "sae"
    shutil.copytree(trained.out, copy)
    checkpoints = sorted((copy / "checkpoints").iterdir(), key=lambda p: int(p.name))
    assert len(checkpoints) == 2
    for p in [*(copy / f for f in ("cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "metrics.json")),
              checkpoints[1]]:  # fmt: skip
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # as if killed after the first checkpoint
    again = train(exported, NAME, copy, **SETTINGS)
    assert again.resumed_from == int(checkpoints[0].name) and again.steps == SETTINGS["steps"]
    for name, p in again.sae.state_dict().items():
        torch.testing.assert_close(p, trained.sae.state_dict()[name], rtol=0, atol=1e-6)
    assert train(exported, NAME, copy, **SETTINGS).resumed_from is None  # finished: nothing left to do


@pytest.mark.parametrize("architecture", ["standard", "jumprelu"])
def test_the_other_architectures_train_and_load(exported, tmp_path, architecture):
    from sae_lens import SAE

    done = train(exported, NAME, tmp_path / "sae", architecture=architecture, width=64, steps=3, batch_size=128,
                 checkpoints=0)  # fmt: skip
    sae = SAE.load_from_disk(tmp_path / "sae")
    assert sae.cfg.architecture() == architecture and sae.cfg.d_sae == 64
    assert 0 < done.metrics.fvu < 10 and done.metrics.l0 > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "encoder.blocks.9.resid_post"], "has no name 'encoder.blocks.9.resid_post'"),
        (["--name", NAME, "--width", "0"], "width must be a positive integer, got 0"),
        (["--name", NAME, "--width", "8", "--k", "9"], "k (9) must be at most the width (8 latents)"),
    ],
)
def test_the_command_says_what_is_wrong_in_one_line(exported, tmp_path, capsys, args, message):
    assert main(["sae", "train", str(exported), "--out", str(tmp_path / "sae"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_the_command_trains_and_a_changed_setting_is_refused_in_the_same_folder(exported, tmp_path, capsys):
    out = str(tmp_path / "sae")
    base = ["sae", "train", str(exported), "--name", NAME, "--out", out, "--batch-size", "128", "--steps", "2"]
    assert main([*base, "--width", "32", "--k", "4"]) == 0
    assert "2 steps: FVU" in capsys.readouterr().out
    assert main([*base, "--width", "64", "--k", "4"]) == 2
    assert "width 32 there, 64 here" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the splice


@pytest.fixture(scope="module")
def clip(real_tiny_en):
    model = real_tiny_en
    audio = wl.load_audio(DATA / "austen-0930.flac")
    mel = wl.pad_or_trim(wl.log_mel_spectrogram(audio), 2 * model.dims.n_audio_ctx)[None]  # (1, 80, 3000)
    result = model.generate(mel)[0]
    tokens = torch.tensor([list(model.tokenizer.sot_sequence) + [model.tokenizer.no_timestamps] + result.tokens])
    return mel, tokens, result


def test_splicing_with_the_error_term_changes_nothing_and_records_the_latents(real_tiny_en, trained, clip):
    model, sae = real_tiny_en, trained.sae
    mel, tokens, plain = clip
    base = model.run(mel, tokens, trace=[NAME])
    spliced = model.run(mel, tokens, trace=[NAME, LATENTS], edits=wl.Edits().splice(NAME, sae))
    torch.testing.assert_close(spliced.logits, base.logits, rtol=0, atol=1e-5)
    z = spliced.trace[LATENTS]
    assert z.shape == (1, model.dims.n_audio_ctx, 256)
    with torch.no_grad():
        torch.testing.assert_close(z, sae.encode(base.trace[NAME]), rtol=1e-5, atol=1e-5)
    assert int((z != 0).sum(-1).max()) <= 16
    generated = model.generate(mel, trace=[LATENTS], edits=wl.Edits().splice(NAME, sae))[0]
    assert generated.tokens == plain.tokens
    torch.testing.assert_close(generated.trace[LATENTS], z, rtol=1e-5, atol=1e-5)


def test_the_pure_reconstruction_and_edited_latents_change_the_outputs(real_tiny_en, trained, clip):
    model, sae = real_tiny_en, trained.sae
    mel, tokens, plain = clip
    base = model.run(mel, tokens, trace=[NAME])
    pure = model.run(mel, tokens, trace=[NAME], edits=wl.Edits().splice(NAME, sae, error=False))
    with torch.no_grad():
        recon = sae.decode(sae.encode(base.trace[NAME]))
    torch.testing.assert_close(pure.trace[NAME], recon, rtol=1e-5, atol=1e-5)  # the point holds decode(encode(x))
    assert (pure.logits - base.logits).abs().max() > 1e-2
    z = model.run(mel, tokens, trace=[LATENTS], edits=wl.Edits().splice(NAME, sae)).trace[LATENTS][0]  # (S, 256)
    top = int(z.sum(0).argmax())  # the latent most active on this clip
    zeroed = model.run(mel, tokens, trace=[LATENTS], edits=wl.Edits().splice(NAME, sae).clamp(LATENTS, [top], 0.0))
    assert float(zeroed.trace[LATENTS][..., top].detach().abs().max()) == 0.0
    assert (zeroed.logits - base.logits).abs().max() > 1e-3
    # the error term is kept: zeroing latent `top` moves the point by exactly its decoder direction's share
    with torch.no_grad():
        moved = model.run(mel, tokens, trace=[NAME], edits=wl.Edits().splice(NAME, sae).clamp(LATENTS, [top], 0.0))
        drop = torch.zeros_like(z)
        drop[:, top] = z[:, top]
        want = base.trace[NAME][0] - (sae.decode(z) - sae.decode(z - drop))
    torch.testing.assert_close(moved.trace[NAME][0], want, rtol=1e-4, atol=1e-4)
    steer = float(z[:, top].max()) * 20
    limit = len(plain.tokens) + 4  # a steered model may ramble: the first tokens show the change
    steered = model.generate(
        mel, max_new_tokens=limit, edits=wl.Edits().splice(NAME, sae).clamp(LATENTS, [top], steer)
    )[0]
    assert steered.tokens != plain.tokens  # clamping one latent everywhere changes the transcript
    one_hot = torch.zeros(256)
    one_hot[top] = steer
    added = model.generate(mel, max_new_tokens=limit, edits=wl.Edits().splice(NAME, sae).add(LATENTS, one_hot))[0]
    assert added.tokens != plain.tokens


def test_splice_errors_are_clear(real_tiny_en, trained, clip):
    mel, tokens, _ = clip
    with pytest.raises(ValueError, match="the SAE reads 384 features"):
        real_tiny_en.run(mel, tokens, edits=wl.Edits().splice("encoder.blocks.3.mlp.post", trained.sae))
    with pytest.raises(ValueError, match="already has an SAE"):
        wl.Edits().splice(NAME, trained.sae).splice(NAME, trained.sae)
    with pytest.raises(TypeError, match="encode and decode"):
        wl.Edits().splice(NAME, torch.nn.Linear(2, 2))
    with pytest.raises(IndexError, match="feature 300 is out of range"):
        real_tiny_en.run(mel, tokens, edits=wl.Edits().splice(NAME, trained.sae).clamp(LATENTS, [300], 1.0))
    with pytest.raises(KeyError, match="trace pattern"):
        real_tiny_en.run(mel, tokens, trace=[LATENTS])  # no SAE spliced: no latents to trace
