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


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("out_features", [384, 51865])  # splits into thread blocks / odd (a vocabulary)
@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 1), (8, 1), (5, 3), (64,), (65,), (3, 40)])
def test_linear_equals_f_linear(lead, out_features, threads):
    """Every layout ``model.linear`` picks (one row split or padded, (W @ x^T)^T, plain) is x @ W^T + b."""
    from whisper_lens.model import linear

    g = torch.Generator().manual_seed(out_features + len(lead))
    x = torch.randn(*lead, 96, generator=g)
    w = torch.randn(out_features, 96, generator=g) / 10
    b = torch.randn(out_features, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (b, None):
            got = linear(x, w, bias)
            want = (x.double() @ w.double().T + (0 if bias is None else bias.double())).float()
            assert got.shape == (*lead, out_features) and got.is_contiguous()
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 2, 8, 40, 64, 65])
def test_packed_weights_compute_the_same_products(rows):
    """Inside ``packed_weights`` (oneDNN's blocked copies, used for 2-64 rows) every projection and the
    unembedding is still x @ W^T + b; on exit nothing stays packed; other row counts or fp64 pack nothing."""
    from whisper_lens.model import Linear, TextDecoder, linear, packed_weights

    torch.manual_seed(rows)
    dec = TextDecoder(n_vocab=1001, n_ctx=16, n_state=64, n_head=2, n_layer=2)
    linears = [m for m in dec.modules() if isinstance(m, Linear)]
    audio = [m for n, m in dec.named_modules() if n.endswith(("cross_attn.key", "cross_attn.value"))]
    step = [m for m in linears if all(m is not a for a in audio)]
    with torch.no_grad(), packed_weights(dec, rows):
        assert all(m.packed is not None for m in step) == (1 < rows <= 64)
        assert all(m.packed is None for m in audio)  # used once, before the steps, on all audio frames
        assert (dec.packed_unembedding is not None) == (1 < rows <= 64)
        for m in [*linears, None]:
            w = dec.token_embedding.weight if m is None else m.weight
            b = None if m is None else m.bias
            x = torch.randn(rows, w.shape[1])
            got = linear(x, w, packed=dec.packed_unembedding) if m is None else m(x)
            want = (x.double() @ w.double().T + (0 if b is None else b.double())).float()
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    assert all(m.packed is None for m in linears) and dec.packed_unembedding is None
    with packed_weights(dec, 8):  # autograd on: oneDNN's op has no gradient, so nothing may be packed
        assert all(m.packed is None for m in linears) and dec.packed_unembedding is None
    with torch.no_grad(), packed_weights(dec.double(), 8):
        assert all(m.packed is None for m in linears) and dec.packed_unembedding is None


@pytest.mark.parametrize("T", [1, 4])
def test_attention_over_transposed_values_equals_the_fused_kernel(T):
    """A decoding step's attention (``attend_cached``, values stored (Dh, S)) is SDPA's on the plain layout."""
    import torch.nn.functional as F

    from whisper_lens.model import Attention, attend_cached
    from whisper_lens.trace import IDLE

    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(3, 4, n, 16, generator=g) for n in (T, 50, 50))
    mask = torch.arange(50)[None, :] <= torch.arange(40, 40 + T)[:, None]  # (T, S), as a step's
    vt = v.mT.contiguous()  # (B, H, Dh, S): the cache's storage
    for m in (None, mask):
        torch.testing.assert_close(attend_cached(q, k, vt, m), F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
    attn = Attention(64, 4).eval()
    x = torch.randn(3, T, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, k, vt.mT, IDLE, mask=mask), attn(x, k, v, IDLE, mask=mask),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip


def test_linear_gradients_and_other_dtypes():
    """Autograd flows through the few-row layouts, and many rows fall back to F.linear when it is needed
    (oneDNN's product has no gradient); fp64 (not the fp32 fast path) is exactly F.linear."""
    from whisper_lens.model import linear

    for rows in (1, 100):
        x = torch.randn(1, rows, 32, requires_grad=True)
        w = torch.randn(64, 32, requires_grad=True)
        b = torch.randn(64, requires_grad=True)
        linear(x, w, b).square().sum().backward()
        grads = [t.grad.clone() for t in (x, w, b)]
        for t in (x, w, b):
            t.grad = None
        torch.nn.functional.linear(x, w, b).square().sum().backward()
        for got, t in zip(grads, (x, w, b), strict=True):
            torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)
    x64, w64 = x.detach().double(), w.detach().double()
    assert torch.equal(linear(x64, w64), torch.nn.functional.linear(x64, w64))
