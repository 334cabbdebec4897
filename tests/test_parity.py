"""Logits and encoder output equal transformers' and openai-whisper's on random weights of real shapes (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from whisper_lens import load_model

from .conftest import BASE, TINY, V3_LIKE, hf_model, openai_model, random_mel, random_tokens, save_openai

SHAPES = {"tiny": TINY, "base": BASE, "v3-like": V3_LIKE}
TOL = 1e-4


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_transformers(name, tmp_path):
    dims = SHAPES[name]
    ref = hf_model(dims, seed=3)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.dims == dims
    mel, tokens = random_mel(dims, batch=2, seed=4), random_tokens(dims, batch=2, length=12, seed=5)
    with torch.no_grad():
        out = ref(input_features=mel, decoder_input_ids=tokens)
        run = ours.run(mel, tokens, trace=["encoder.ln_post"])
    torch.testing.assert_close(run.trace["encoder.ln_post"], out.encoder_last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(run.logits, out.logits, atol=TOL, rtol=0)
    assert out.logits.abs().max() > 1.0  # the comparison is not between two near-zero tensors


@pytest.mark.parametrize("name", list(SHAPES))
def test_matches_openai_whisper(name, tmp_path):
    dims = SHAPES[name]
    ref = openai_model(dims, seed=6)
    ours = load_model(save_openai(ref, tmp_path / "model.pt"))
    mel, tokens = random_mel(dims, batch=2, seed=7), random_tokens(dims, batch=2, length=12, seed=8)
    with torch.no_grad():
        audio = ref.encoder(mel)
        logits = ref.decoder(tokens, audio)
        run = ours.run(mel, tokens, trace=["encoder.ln_post"])
    torch.testing.assert_close(run.trace["encoder.ln_post"], audio, atol=TOL, rtol=0)
    torch.testing.assert_close(run.logits, logits, atol=TOL, rtol=0)
    assert logits.abs().max() > 1.0


def test_forward_equals_run_logits(small_model):
    from .conftest import SMALL

    mel, tokens = random_mel(SMALL), random_tokens(SMALL)
    with torch.no_grad():
        assert torch.equal(small_model(mel, tokens), small_model.run(mel, tokens).logits)
