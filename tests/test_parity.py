"""Logits and encoder output equal transformers' and openai-whisper's on random weights of real shapes (fp32, 1e-4)."""

from __future__ import annotations

import pytest
import torch

from whisper_lens import load_model

from .conftest import BASE, SMALL, TINY, V3_LIKE, hf_model, openai_model, random_mel, random_tokens, save_openai

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
        forward = ours(mel, tokens)
    torch.testing.assert_close(run.trace["encoder.ln_post"], audio, atol=TOL, rtol=0)
    torch.testing.assert_close(run.logits, logits, atol=TOL, rtol=0)
    torch.testing.assert_close(forward, logits, atol=TOL, rtol=0)
    assert logits.abs().max() > 1.0


def test_fp64_model_matches_fp32_and_the_reference(tmp_path):
    """A model loaded in fp64 computes transformers' fp64 numbers, and the fp32 model's within fp32 rounding."""
    ref = hf_model(SMALL, seed=9)
    ref.save_pretrained(tmp_path)
    ours32, ours64 = load_model(tmp_path), load_model(tmp_path, dtype=torch.float64)
    mel, tokens = random_mel(SMALL, batch=2, seed=10), random_tokens(SMALL, batch=2, length=7, seed=11)
    with torch.no_grad():
        want = ref.double()(input_features=mel.double(), decoder_input_ids=tokens).logits  # (B, T, V) fp64
        got64, got32 = ours64(mel, tokens), ours32(mel, tokens)
    assert got64.dtype == torch.float32  # logits are returned in fp32 whatever the model's dtype
    torch.testing.assert_close(got64, want.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(got32, got64, atol=TOL, rtol=0)
    assert (got32 - got64).abs().max() > 0  # two computations, not one
    assert want.abs().max() > 1.0


def test_textbook_products_give_the_same_logits_and_trace(tmp_path):
    """Inside ``kernels.textbook()`` every product is F.linear / SDPA / the written-out softmax: the same numbers."""
    from whisper_lens.model import textbook

    ref = openai_model(TINY, seed=12)
    model = load_model(save_openai(ref, tmp_path / "tiny.pt"))
    mel, tokens = random_mel(TINY, batch=2, seed=13), random_tokens(TINY, batch=2, length=9, seed=14)
    names = ["encoder.blocks.3.resid_post", "decoder.blocks.*.attn.z", "decoder.ln", "logits"]
    with torch.no_grad():
        fast = model.run(mel, tokens, trace=names)
        with textbook():
            plain = model.run(mel, tokens, trace=names)
    for name in fast.trace.names():  # residual streams grow to ~15: 2e-5 is a few fp32 roundings there
        torch.testing.assert_close(plain.trace[name], fast.trace[name], atol=3e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(plain.logits, fast.logits, atol=1e-5, rtol=0)
    assert fast.logits.abs().max() > 1.0


def test_logits_at_some_positions_are_those_positions_of_all_logits(tmp_path):
    """Decoding's ``forward(at=...)`` (a prompt's pass unembeds only the positions it reads) gives those rows of
    the logits of every position."""
    from whisper_lens.decoding import Kernels, forward, new_cache

    model = load_model(save_openai(openai_model(TINY, seed=15), tmp_path / "tiny.pt"))
    mel, tokens = random_mel(TINY, batch=3, seed=16), random_tokens(TINY, batch=3, length=9, seed=17)
    at = torch.tensor([[0, 8], [3, 3], [5, 1]])  # (B, 2): per row, any positions, in any order
    with torch.no_grad():
        xa = model.encoder(mel)
        pos = torch.arange(9)[None]  # (1, T)
        every = model.decoder(tokens, xa=xa)  # (B, T, V)
        some = forward(model.decoder, Kernels(), tokens, pos, new_cache(model.decoder, xa, 9), at=at)  # (B, 2, V)
    assert some.shape == (3, 2, TINY.n_vocab)
    torch.testing.assert_close(some, every[torch.arange(3)[:, None], at], atol=1e-5, rtol=0)
    assert not torch.equal(some[0, 0], some[0, 1])


@pytest.mark.parametrize("rows", [1, 2, 4, 8, 40, 64, 65])
def test_decoding_kernels_pack_per_call_and_compute_the_same_products(rows):
    """``Kernels.for_decoding`` packs the unembedding (where the timing chose it; here forced) into an object of
    its own: every product is still x @ W^T + b, and nothing is set on the modules."""
    from whisper_lens import fastpaths
    from whisper_lens.decoding import Kernels, onednn_available
    from whisper_lens.model import TextDecoder

    torch.manual_seed(rows)
    dec = TextDecoder(n_vocab=1001, n_ctx=16, n_state=64, n_head=2, n_layer=2)
    before = {name: dict(vars(m)) for name, m in dec.named_modules()}
    layers = [m for m in dec.modules() if isinstance(m, torch.nn.Linear)] + [dec.token_embedding]
    with torch.no_grad(), fastpaths.forced(unembedding="packed"):
        ops = Kernels.for_decoding(dec, rows)
        assert onednn_available()  # this build of torch has oneDNN's linear: the packed path is tested
        assert set(ops.packed) == {dec.token_embedding}
        for m in layers:
            x = torch.randn(rows, m.weight.shape[1])
            b = getattr(m, "bias", None)
            want = (x.double() @ m.weight.double().T + (0 if b is None else b.double())).float()
            torch.testing.assert_close(ops.linear(x, m), want, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(ops.linear(x[:1], m), want[:1], atol=2e-5, rtol=2e-5)  # other rows: unpacked
    assert {name: dict(vars(m)) for name, m in dec.named_modules()} == before
    with fastpaths.forced(unembedding="packed"):
        assert not Kernels.for_decoding(dec, 8).packed  # autograd on: oneDNN's op has no gradient, nothing packed
        with torch.no_grad():
            assert not Kernels.for_decoding(dec.double(), 8).packed
    with torch.no_grad(), fastpaths.forced(unembedding="plain"):
        assert not Kernels.for_decoding(dec, rows).packed


@pytest.mark.parametrize("T", [1, 4])
def test_cached_attention_equals_the_fused_kernel(T):
    """A decoding step's attention over a ``KVCache`` is SDPA's on the keys and values it was given, with one
    mask for all rows or one per row, in and out of ``textbook()``."""
    import torch.nn.functional as F

    from whisper_lens.decoding import KVCache
    from whisper_lens.model import textbook

    g = torch.Generator().manual_seed(T)
    B, H, S, Dh = 3, 4, 50, 16
    q, k, v = (
        torch.randn(B, H, T, Dh, generator=g),
        torch.randn(B, S, H, Dh, generator=g),
        torch.randn(B, S, H, Dh, generator=g),
    )
    cache = KVCache.holding(k, v)
    assert torch.equal(cache.keys(), k.transpose(1, 2)) and torch.equal(cache.values(), v.transpose(1, 2))
    shared = (torch.arange(S) <= torch.arange(40, 40 + T)[:, None])[None, None]  # (1, 1, T, S), as a step's
    per_row = (torch.arange(S) <= (torch.tensor([[20], [30], [45]]) + torch.arange(T))[..., None])[
        :, None
    ]  # (B, 1, T, S)
    for mask in (None, shared, per_row):
        want = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        torch.testing.assert_close(cache.attend(q, mask), want, atol=1e-6, rtol=1e-5)
        with textbook():
            torch.testing.assert_close(cache.attend(q, mask), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 3])
def test_a_cache_shared_by_beams_attends_as_its_copies(T):
    """A clip's beams share its audio keys/values (``shared_by``): attention, keys, values and dropping whole
    clips (``select_rows``) are those of the cache copied once per beam (``repeat_rows``)."""
    from whisper_lens.decoding import KVCache

    g = torch.Generator().manual_seed(30 + T)
    B, n, H, S, Dh = 3, 4, 2, 40, 8
    k, v = torch.randn(B, S, H, Dh, generator=g), torch.randn(B, S, H, Dh, generator=g)
    q = torch.randn(B * n, H, T, Dh, generator=g)
    shared, copied = KVCache.holding(k, v).shared_by(n), KVCache.holding(k, v).repeat_rows(n)
    assert shared.k.shape[0] == B and copied.k.shape[0] == B * n and shared.grid[0] is None  # no reordering
    torch.testing.assert_close(shared.attend(q, None), copied.attend(q, None), atol=1e-6, rtol=1e-5)
    assert torch.equal(shared.keys(), copied.keys()) and torch.equal(shared.values(), copied.values())
    rows = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])  # clips 0 and 2 go on, clip 1 is done
    kept_shared, kept_copied = shared.select_rows(rows), copied.select_rows(rows)
    assert kept_shared.k.shape[0] == 2
    torch.testing.assert_close(kept_shared.attend(q[rows], None), kept_copied.attend(q[rows], None), atol=1e-6,
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="without a mask"):
        shared.attend(q, torch.ones(1, 1, T, S, dtype=torch.bool))


@pytest.mark.parametrize("T", [1, 2])
def test_rows_reading_clips_in_any_order_attend_as_their_own_copies(T):
    """Query rows may read any clip, in any order and any number of times (``holding(k, v, owner)``, as
    ``generate(clips=...)`` makes): each row's attention is SDPA over its clip's keys and values. Clips no
    row reads are not held, and a clip leaves the cache when its last row does (``select_rows``)."""
    import torch.nn.functional as F

    from whisper_lens.decoding import KVCache

    g = torch.Generator().manual_seed(40 + T)
    C, H, S, Dh = 4, 2, 30, 8
    k, v = torch.randn(C, S, H, Dh, generator=g), torch.randn(C, S, H, Dh, generator=g)
    owner = torch.tensor([2, 0, 2, 3, 0, 2])  # clip 1 is read by no row; clip 2 by three
    q = torch.randn(len(owner), H, T, Dh, generator=g)

    def want(rows):
        o = owner[rows]
        return F.scaled_dot_product_attention(q[rows], k[o].transpose(1, 2), v[o].transpose(1, 2))

    cache = KVCache.holding(k, v, owner)
    assert cache.k.shape[0] == 3 and cache.rows == 6 and cache.grid[1] == 3  # clips 0, 2, 3; three slots each
    assert torch.equal(cache.keys(), k[owner].transpose(1, 2)) and torch.equal(cache.values(), v[owner].transpose(1, 2))
    torch.testing.assert_close(cache.attend(q, None), want(torch.arange(6)), atol=1e-6, rtol=1e-5)
    rows = torch.tensor([0, 2, 3, 5])  # the rows of clip 0 are done: it leaves
    kept = cache.select_rows(rows)
    assert kept.k.shape[0] == 2 and kept.rows == 4 and torch.equal(kept.k, cache.k[[1, 2]])
    torch.testing.assert_close(kept.attend(q[rows], None), want(rows), atol=1e-6, rtol=1e-5)
    assert KVCache.holding(k, v, torch.arange(C)).owner is None  # one row per clip, in order: nothing shared
    assert torch.equal(kept.select_rows(torch.tensor([2])).k, cache.k[[2]])  # only clip 3's row is left


def test_cache_writes_each_row_at_its_positions():
    from whisper_lens.decoding import KVCache

    cache = KVCache.empty(batch=2, heads=3, length=6, head_dim=4, like=torch.zeros(()))
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)  # (B, T, H, Dh)
    cache.write(torch.tensor([[1, 2], [3, 4]]), k, v)  # row 0 at positions 1, 2; row 1 at 3, 4
    assert torch.equal(cache.keys()[0, :, 1:3], k[0].transpose(0, 1)) and torch.equal(
        cache.keys()[1, :, 3:5], k[1].transpose(0, 1)
    )
    assert torch.equal(cache.values()[1, :, 3:5], v[1].transpose(0, 1))
    assert cache.keys()[0, :, 3:].abs().sum() == 0 and cache.keys()[1, :, :3].abs().sum() == 0
    cache.write(torch.tensor([[0, 5]]), k, v)  # (1, T): the same positions for every row
    assert torch.equal(cache.keys()[:, :, 5], k[:, 1]) and torch.equal(cache.values()[:, :, 0], v[:, 0])
    cache.take_rows(torch.tensor([1, 1]), upto=6)  # beam search: row 0 takes row 1's history
    assert torch.equal(cache.keys()[0], cache.keys()[1]) and torch.equal(cache.values()[0], cache.values()[1])
