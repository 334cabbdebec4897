"""The logit lens: exact at the last layer, equal to a by-hand readout elsewhere, consistent with generate."""

from __future__ import annotations

import pytest
import torch

import whisper_lens as wl
from whisper_lens.lens import (
    decoder_lens,
    decoder_lens_from_trace,
    encoder_lens,
    lens_names,
    readout,
    restricted_lens,
    sot_lens,
)
from whisper_lens.model import ModelDims, Whisper
from whisper_lens.toy.train import write_byte_vocab

from .conftest import randomize_

BYTE_DIMS = ModelDims(80, 40, 64, 4, 3, 1864, 32, 64, 4, 3)


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """A random model with the byte-level toy tokenizer (English-only layout)."""
    torch.manual_seed(0)
    model = randomize_(Whisper(BYTE_DIMS), seed=3).eval()
    model.tokenizer = wl.load_tokenizer(write_byte_vocab(tmp_path_factory.mktemp("vocab") / "b.tiktoken"), 1864)
    return model


def _inputs(model, batch=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = model.dims
    mel = torch.rand(batch, d.n_mels, 2 * d.n_audio_ctx, generator=g) * 2 - 1
    tokens = torch.randint(0, 256, (batch, length), generator=g)
    tokens[:, 0] = model.tokenizer.sot
    return mel, tokens


def test_last_layer_readout_is_the_model_logits(byte_model):
    mel, tokens = _inputs(byte_model)
    with torch.no_grad():
        run = byte_model.run(mel, tokens, trace=lens_names(byte_model))
    last = readout(byte_model, run.trace[lens_names(byte_model)[-1]])
    assert torch.equal(last, run.logits)
    lens = decoder_lens_from_trace(byte_model, run.trace)
    assert torch.equal(lens.final_token, run.logits.argmax(-1))
    assert (lens.final_rank[-1] == 0).all() and torch.allclose(lens.kl[-1], torch.zeros(()), atol=1e-5)
    assert lens.agreement()[-1] == 1.0


def test_lens_equals_a_by_hand_readout(byte_model):
    mel, tokens = _inputs(byte_model, seed=1)
    lens = decoder_lens(byte_model, mel, tokens, k=3)
    with torch.no_grad():
        tr = byte_model.run(mel, tokens, trace=["decoder.blocks.*.resid_pre", "logits"]).trace
    W, ln = byte_model.decoder.token_embedding.weight, byte_model.decoder.ln
    for layer in range(BYTE_DIMS.n_text_layer):
        x = tr[f"decoder.blocks.{layer}.resid_pre"]
        mu, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
        logits = ((x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias) @ W.T  # LayerNorm written out
        p = logits.softmax(-1)
        final = tr["logits"].softmax(-1)
        torch.testing.assert_close(lens.top_probs[layer], p.topk(3, dim=-1).values, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lens.final_prob[layer], p.gather(-1, final.argmax(-1, keepdim=True))[..., 0],
                                   atol=1e-5, rtol=1e-4)  # fmt: skip
        kl = (final * (final.log() - p.log())).sum(-1)
        torch.testing.assert_close(lens.kl[layer], kl, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lens.entropy[layer], -(p * p.log()).sum(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lens.logit_norm[layer], logits.norm(dim=-1), atol=1e-3, rtol=1e-4)
        rank = (p > p.gather(-1, final.argmax(-1, keepdim=True))).sum(-1)
        assert torch.equal(lens.final_rank[layer], rank)


def test_lens_during_generate_equals_teacher_forced(byte_model):
    mel, _ = _inputs(byte_model, batch=2, seed=2)
    results = byte_model.generate(mel, max_new_tokens=6, trace=lens_names(byte_model))
    tok = byte_model.tokenizer
    for i, res in enumerate(results):
        seq = torch.tensor([[tok.sot, tok.no_timestamps, *res.tokens]])
        forced = decoder_lens(byte_model, mel[i : i + 1], seq)
        during = decoder_lens_from_trace(byte_model, res.trace)
        torch.testing.assert_close(during.final_prob, forced.final_prob, atol=1e-5, rtol=1e-4)
        assert torch.equal(during.top_ids[..., 0], forced.top_ids[..., 0])
        assert during.final_prob.shape == (BYTE_DIMS.n_text_layer + 1, 1, 2 + len(res.tokens))


def test_restricted_and_sot_lens(byte_model):
    mel, tokens = _inputs(byte_model, seed=4)
    with torch.no_grad():
        tr = byte_model.run(mel, tokens, trace=lens_names(byte_model)).trace
    ids = [10, 20, 30]
    within, mass = restricted_lens(byte_model, tr, ids, position=2)
    full = torch.stack([readout(byte_model, tr[n][:, 2]).softmax(-1) for n in lens_names(byte_model)])
    torch.testing.assert_close(mass, full[..., ids].sum(-1))
    torch.testing.assert_close(within, full[..., ids] / full[..., ids].sum(-1, keepdim=True))
    sot = sot_lens(byte_model, mel)
    assert sot["no_speech"].shape == (BYTE_DIMS.n_text_layer + 1, 2)
    res = byte_model.generate(mel, max_new_tokens=2)
    torch.testing.assert_close(sot["no_speech"][-1], torch.tensor([r.no_speech_prob for r in res]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="token set is empty"):
        restricted_lens(byte_model, tr, [], 0)


def test_encoder_lens_full_depth_is_the_model(byte_model):
    mel, tokens = _inputs(byte_model, seed=5)
    rows = encoder_lens(byte_model, mel, tokens)
    assert rows.shape == (BYTE_DIMS.n_audio_layer + 1, 2, 6)
    with torch.no_grad():
        logp = byte_model(mel, tokens).log_softmax(-1)
        skip_all = byte_model.run(mel, tokens, edits=wl.Edits().skip("encoder", [0, 1, 2])).logits.log_softmax(-1)
    expected = logp[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].exp()
    torch.testing.assert_close(rows[-1], expected)
    torch.testing.assert_close(rows[0], skip_all[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].exp())


def test_lens_needs_the_streams(byte_model):
    mel, tokens = _inputs(byte_model)
    with torch.no_grad():
        tr = byte_model.run(mel, tokens, trace=["decoder.ln"]).trace
    with pytest.raises(KeyError, match="the trace lacks 'decoder.blocks.0.resid_pre'"):
        decoder_lens_from_trace(byte_model, tr)
