"""The trace: every named activation equals the references', the algebra between names holds, edits do what they say."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import whisper_lens as wl
from whisper_lens import load_model
from whisper_lens.trace import IDLE

from .conftest import SMALL, TINY, hf_model, openai_model, random_mel, random_tokens, save_openai

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    ref = hf_model(TINY, seed=11)
    folder = tmp_path_factory.mktemp("tiny_hf")
    ref.save_pretrained(folder)
    return ref, load_model(folder)


def test_every_stream_and_pattern_matches_transformers(tiny_pair):
    ref, ours = tiny_pair
    mel, tokens = random_mel(TINY, batch=1, seed=1), random_tokens(TINY, batch=1, length=6, seed=2)
    with torch.no_grad():
        out = ref(input_features=mel, decoder_input_ids=tokens, output_hidden_states=True, output_attentions=True)
        tr = ours.run(mel, tokens, trace=True).trace
    for stack, hidden, attns in [
        ("encoder", out.encoder_hidden_states, out.encoder_attentions),
        ("decoder", out.decoder_hidden_states, out.decoder_attentions),
    ]:
        n = len(attns)
        for i in range(n):
            torch.testing.assert_close(tr[f"{stack}.blocks.{i}.resid_pre"], hidden[i], atol=TOL, rtol=0)
            torch.testing.assert_close(tr[f"{stack}.blocks.{i}.attn.pattern"], attns[i], atol=TOL, rtol=0)
        final = "encoder.ln_post" if stack == "encoder" else "decoder.ln"
        torch.testing.assert_close(tr[final], hidden[n], atol=TOL, rtol=0)
    for i, cross in enumerate(out.cross_attentions):
        torch.testing.assert_close(tr[f"decoder.blocks.{i}.cross_attn.pattern"], cross, atol=TOL, rtol=0)
    torch.testing.assert_close(tr["logits"], out.logits, atol=TOL, rtol=0)


@pytest.fixture
def openai_explicit_attention():
    """openai-whisper returns its pre-softmax scores (qk) only when it does not use SDPA."""
    import whisper.model

    old = whisper.model.MultiHeadAttention.use_sdpa
    whisper.model.MultiHeadAttention.use_sdpa = False
    yield
    whisper.model.MultiHeadAttention.use_sdpa = old


def test_every_traced_tensor_matches_openai_step_by_step(tmp_path, openai_explicit_attention):
    ref = openai_model(TINY, seed=12)
    ours = load_model(save_openai(ref, tmp_path / "tiny.pt"))
    mel, tokens = random_mel(TINY, batch=1, seed=3), random_tokens(TINY, batch=1, length=5, seed=4)
    with torch.no_grad():
        tr = ours.run(mel, tokens, trace=True).trace
        got = {}
        enc = ref.encoder
        x = F.gelu(enc.conv1(mel))
        got["encoder.conv1"] = x.transpose(1, 2)
        x = F.gelu(enc.conv2(x)).permute(0, 2, 1)
        got["encoder.conv2"] = x
        x = x + enc.positional_embedding
        got["encoder.embed"] = x
        for i, block in enumerate(enc.blocks):
            x = _openai_block(block, x, None, None, f"encoder.blocks.{i}", got)
        xa = enc.ln_post(x)
        got["encoder.ln_post"] = xa
        dec = ref.decoder
        x = dec.token_embedding(tokens) + dec.positional_embedding[: tokens.shape[1]]
        got["decoder.embed"] = x
        mask = dec.mask[: tokens.shape[1], : tokens.shape[1]]
        for i, block in enumerate(dec.blocks):
            x = _openai_block(block, x, xa, mask, f"decoder.blocks.{i}", got)
        x = dec.ln(x)
        got["decoder.ln"] = x
        got["logits"] = x @ dec.token_embedding.weight.T
    missing = set(tr.names()) - set(got)
    assert not missing, f"names not checked against openai-whisper: {sorted(missing)[:5]}"
    for name, value in got.items():
        torch.testing.assert_close(tr[name], value.to(tr[name].dtype), atol=TOL, rtol=0, msg=name)


def _openai_block(block, x, xa, mask, prefix, got):
    """One openai-whisper ResidualAttentionBlock, step by step, storing every intermediate under our names."""
    got[prefix + ".resid_pre"] = x
    _openai_attention(block.attn, block.attn_ln(x), None, mask, prefix + ".attn", got)
    a = block.attn(block.attn_ln(x), mask=mask)[0]
    got[prefix + ".attn_out"] = a
    x = x + a
    got[prefix + ".resid_mid"] = x
    if block.cross_attn is not None:
        _openai_attention(block.cross_attn, block.cross_attn_ln(x), xa, None, prefix + ".cross_attn", got)
        c = block.cross_attn(block.cross_attn_ln(x), xa)[0]
        got[prefix + ".cross_attn_out"] = c
        x = x + c
        got[prefix + ".resid_mid_cross"] = x
    pre = block.mlp[0](block.mlp_ln(x))
    post = block.mlp[1](pre)
    out = block.mlp[2](post)
    got.update({prefix + ".mlp.pre": pre, prefix + ".mlp.post": post, prefix + ".mlp_out": out})
    x = x + out
    got[prefix + ".resid_post"] = x
    return x


def _openai_attention(attn, x, xa, mask, prefix, got):
    src = x if xa is None else xa
    B, T, D = x.shape
    H = attn.n_head

    def heads(t):  # (B, T, D) -> (B, T, H, Dh): position before head, as recorded
        return t.view(t.shape[0], t.shape[1], H, -1)

    q, k, v = heads(attn.query(x)), heads(attn.key(src)), heads(attn.value(src))
    _, qk = attn.qkv_attention(attn.query(x), attn.key(src), attn.value(src), mask)
    pattern = qk.float().softmax(dim=-1)
    got.update({prefix + ".q": q, prefix + ".k": k, prefix + ".v": v, prefix + ".scores": qk})
    got.update({prefix + ".pattern": pattern, prefix + ".z": (pattern @ v.transpose(1, 2)).transpose(1, 2)})


# ----------------------------------------------------------------------------- algebra on a small model


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small_alg")
    hf_model(SMALL, seed=21).save_pretrained(folder)
    model = load_model(folder)
    mel, tokens = random_mel(SMALL, seed=5), random_tokens(SMALL, length=9, seed=6)
    with torch.no_grad():
        run = model.run(mel, tokens, trace=True)
    return model, mel, tokens, run


def test_residual_algebra(small_run):
    model, _, _, run = small_run
    tr = run.trace
    for stack, n, cross in [("encoder", SMALL.n_audio_layer, False), ("decoder", SMALL.n_text_layer, True)]:
        for i in range(n):
            p = f"{stack}.blocks.{i}."
            torch.testing.assert_close(tr[p + "resid_mid"], tr[p + "resid_pre"] + tr[p + "attn_out"])
            mid = tr[p + "resid_mid_cross"] if cross else tr[p + "resid_mid"]
            if cross:
                torch.testing.assert_close(mid, tr[p + "resid_mid"] + tr[p + "cross_attn_out"])
            torch.testing.assert_close(tr[p + "resid_post"], mid + tr[p + "mlp_out"])
            torch.testing.assert_close(tr[p + "mlp.post"], F.gelu(tr[p + "mlp.pre"]))
            block = getattr(model, stack).blocks[i]
            for attn_name, module in [("attn", block.attn)] + ([("cross_attn", block.cross_attn)] if cross else []):
                a = f"{p}{attn_name}."
                z = tr[a + "z"]  # (B, T, H, Dh)
                out = z.flatten(2) @ module.out.weight.T + module.out.bias
                torch.testing.assert_close(tr[p + attn_name + "_out"], out, atol=1e-5, rtol=1e-5)
                pattern = tr[a + "pattern"]
                torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
                torch.testing.assert_close(pattern, tr[a + "scores"].softmax(-1))
                torch.testing.assert_close(
                    z, (pattern @ tr[a + "v"].transpose(1, 2)).transpose(1, 2), atol=1e-5, rtol=1e-5
                )
                q, k = tr[a + "q"].transpose(1, 2), tr[a + "k"].transpose(1, 2)  # (B, H, T, Dh), (B, H, S, Dh)
                scores = tr[a + "scores"]
                visible = scores > float("-inf")
                torch.testing.assert_close(
                    scores[visible], (q @ k.mT / q.shape[-1] ** 0.5)[visible], atol=1e-5, rtol=1e-5
                )
            if i + 1 < n:
                assert torch.equal(tr[p + "resid_post"], tr[f"{stack}.blocks.{i + 1}.resid_pre"])
        assert torch.equal(tr[f"{stack}.embed"], tr[f"{stack}.blocks.0.resid_pre"])
    pattern, scores = tr["decoder.blocks.1.attn.pattern"], tr["decoder.blocks.1.attn.scores"]
    above = torch.ones(pattern.shape[-2:], dtype=torch.bool).triu(1)
    assert (pattern[..., above] == 0).all() and (scores[..., above] == float("-inf")).all()
    assert (pattern[..., ~above] > 0).all()
    W = model.decoder.token_embedding.weight
    torch.testing.assert_close(tr["logits"], tr["decoder.ln"] @ W.T, atol=1e-5, rtol=1e-5)
    assert torch.equal(tr["logits"], run.logits)


def test_recording_changes_nothing(small_run):
    model, mel, tokens, run = small_run
    with torch.no_grad():
        plain = model.run(mel, tokens).logits
        streams = model.run(mel, tokens, trace=["*.resid_*", "*.mlp.pre", "*.attn.z", "*.attn.q", "logits"])
        some = model.run(mel, tokens, trace=["*.attn.pattern", "decoder.blocks.0.mlp.pre"])
    # recording anything but scores/patterns leaves the computation as it is, bit for bit
    assert torch.equal(plain, streams.logits) and torch.equal(plain, streams.trace["logits"])
    # a recorded pattern makes that layer's attention explicit: the same numbers up to float rounding
    torch.testing.assert_close(plain, run.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(plain, some.logits, atol=1e-5, rtol=0)
    assert len(model.run(mel, tokens).trace) == 0
    assert set(some.trace.names()) == {f"encoder.blocks.{i}.attn.pattern" for i in range(3)} | {
        f"decoder.blocks.{i}.attn.pattern" for i in range(3)
    } | {"decoder.blocks.0.mlp.pre"}


def test_trace_utilities(small_run):
    model, mel, tokens, run = small_run
    tr = run.trace
    stacked = tr.stack("decoder.blocks.*.resid_post")
    assert stacked.shape == (SMALL.n_text_layer, 2, 9, SMALL.n_text_state)
    assert torch.equal(stacked[2], tr["decoder.blocks.2.resid_post"])
    sub = tr.select("*.cross_attn.pattern")
    assert sub.names() == [f"decoder.blocks.{i}.cross_attn.pattern" for i in range(3)]
    assert tr.nbytes == sum(x.numel() * 4 for x in tr.values())
    half = tr.to(dtype=torch.float16)
    assert half.nbytes == tr.nbytes // 2 and half["logits"].dtype == torch.float16
    with torch.no_grad():
        stored = model.run(mel, tokens, trace=["decoder.ln"], trace_dtype=torch.bfloat16, trace_device="cpu")
    assert stored.trace["decoder.ln"].dtype == torch.bfloat16
    torch.testing.assert_close(stored.trace["decoder.ln"].float(), tr["decoder.ln"], atol=0.05, rtol=0.02)
    assert model.names() == list(tr.names())


# ----------------------------------------------------------------------------- edits


def test_skipping_a_block_equals_running_the_others_by_hand(small_run):
    model, mel, tokens, run = small_run
    with torch.no_grad():
        edited = model.run(mel, tokens, trace=["encoder.ln_post"], edits=wl.Edits().skip("encoder", 1))
        x = run.trace["encoder.embed"]
        for i in (0, 2):
            x, _ = model.encoder.blocks[i](x, IDLE)
        torch.testing.assert_close(edited.trace["encoder.ln_post"], model.encoder.ln_post(x))
        dec = model.run(mel, tokens, trace=["decoder.ln"], edits=wl.Edits().skip("decoder", [0, 2]))
        y = model.decoder.token_embedding(tokens) + model.decoder.positional_embedding[: tokens.shape[1]]
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
        y, _ = model.decoder.blocks[1](y, IDLE, mask=causal, xa=run.trace["encoder.ln_post"])
        torch.testing.assert_close(dec.trace["decoder.ln"], model.decoder.ln(y))
    assert not torch.allclose(dec.logits, run.logits, atol=1e-2)


def test_zero_ablating_every_head_leaves_only_the_bias(small_run):
    model, mel, tokens, _ = small_run
    edits = wl.Edits().ablate_heads("decoder.blocks.1.cross_attn", range(SMALL.n_text_head))
    with torch.no_grad():
        run = model.run(mel, tokens, trace=["decoder.blocks.1.cross_attn_out"], edits=edits)
    bias = model.decoder.blocks[1].cross_attn.out.bias
    torch.testing.assert_close(run.trace["decoder.blocks.1.cross_attn_out"], bias.expand(2, 9, -1))


def test_mean_ablation_and_partial_zero(small_run):
    model, mel, tokens, run = small_run
    z = run.trace["encoder.blocks.0.attn.z"]
    mean = z[:, :, [1, 3]].mean(dim=(0, 1))
    with torch.no_grad():
        a = model.run(mel, tokens, trace=["encoder.blocks.0.attn.z"], edits=wl.Edits().ablate_heads(
            "encoder.blocks.0.attn", [1, 3], how="mean"))  # fmt: skip
        b = model.run(mel, tokens, trace=["encoder.blocks.0.attn.z"], edits=wl.Edits().ablate_heads(
            "encoder.blocks.0.attn", [1, 3], how="mean", mean=mean))  # fmt: skip
    za = a.trace["encoder.blocks.0.attn.z"]
    torch.testing.assert_close(za[:, :, [1, 3]], mean.expand_as(za[:, :, [1, 3]]))
    torch.testing.assert_close(za[:, :, [0, 2]], z[:, :, [0, 2]], atol=1e-5, rtol=0)  # untouched heads
    torch.testing.assert_close(a.logits, b.logits)


def test_patching_a_whole_layer_reproduces_the_source_run(small_run):
    model, mel, tokens, run_a = small_run
    other_mel, other_tokens = random_mel(SMALL, seed=40), random_tokens(SMALL, length=9, seed=41)
    with torch.no_grad():
        # encoder layer 1 from run A into a run on other audio: the encoder output, and so the logits, become A's
        edits = wl.Edits()
        for name in run_a.trace.select("encoder.blocks.1.*"):
            edits.replace(name, run_a.trace[name])
        patched = model.run(other_mel, tokens, trace=["encoder.ln_post"], edits=edits)
        torch.testing.assert_close(patched.trace["encoder.ln_post"], run_a.trace["encoder.ln_post"])
        torch.testing.assert_close(patched.logits, run_a.logits)
        # decoder layer 1 from run A into a run with other tokens on the same audio
        edits = wl.Edits()
        for name in run_a.trace.select("decoder.blocks.1.*"):
            edits.replace(name, run_a.trace[name])
        patched = model.run(mel, other_tokens, edits=edits)
        unpatched = model.run(mel, other_tokens).logits
    torch.testing.assert_close(patched.logits, run_a.logits)
    assert not torch.allclose(unpatched, run_a.logits, atol=1e-2)


def test_patching_at_positions(small_run):
    model, mel, tokens, run = small_run
    name = "decoder.blocks.0.resid_post"
    value = torch.zeros(2, 2, SMALL.n_text_state)
    with torch.no_grad():
        patched = model.run(mel, tokens, trace=[name], edits=wl.Edits().replace(name, value, positions=[3, 5]))
    got = patched.trace[name]
    assert (got[:, [3, 5]] == 0).all()
    torch.testing.assert_close(got[:, :3], run.trace[name][:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(patched.logits[:, :3], run.logits[:, :3])  # causal: earlier positions unchanged


def test_steering_and_functions(small_run):
    model, mel, tokens, run = small_run
    name = "decoder.blocks.2.resid_mid"
    with torch.no_grad():
        plain = model.run(mel, tokens).logits
        zero = model.run(mel, tokens, edits=wl.Edits().add(name, torch.zeros(SMALL.n_text_state)))
        ident = model.run(mel, tokens, edits=wl.Edits().apply(name, lambda x: x.clone()))
        steer = model.run(mel, tokens, trace=[name], edits=wl.Edits().add(name, torch.ones(SMALL.n_text_state)))
        twice = model.run(mel, tokens, trace=[name], edits=wl.Edits().add(name, torch.ones(1)).add(name, torch.ones(1)))
    assert torch.equal(zero.logits, plain) and torch.equal(ident.logits, plain)
    torch.testing.assert_close(steer.trace[name], run.trace[name] + 1, atol=1e-5, rtol=0)
    torch.testing.assert_close(twice.trace[name], steer.trace[name] + 1)


def test_editing_the_pattern_changes_the_output_through_the_hand_path(small_run):
    model, mel, tokens, run = small_run
    name = "encoder.blocks.0.attn.pattern"
    with torch.no_grad():
        same = model.run(mel, tokens, edits=wl.Edits().apply(name, lambda p: p.clone()))
        uniform = model.run(
            mel, tokens, trace=[name], edits=wl.Edits().apply(name, lambda p: torch.full_like(p, 1 / p.shape[-1]))
        )
    torch.testing.assert_close(same.logits, run.logits, atol=1e-5, rtol=1e-5)
    assert torch.allclose(uniform.trace[name], torch.tensor(1 / (SMALL.n_audio_ctx)))
    assert not torch.allclose(uniform.logits, run.logits, atol=1e-3)


def test_local_window(small_run):
    model, mel, tokens, run = small_run
    with torch.no_grad():
        wide = model.run(mel, tokens, edits=wl.Edits().local_window(SMALL.n_audio_ctx))
        zero = model.run(mel, tokens, trace=["encoder.blocks.*.attn.pattern"], edits=wl.Edits().local_window(0))
        some = model.run(
            mel, tokens, trace=["encoder.blocks.*.attn.pattern"], edits=wl.Edits().local_window(2, layers=[1])
        )
    torch.testing.assert_close(wide.logits, run.logits, atol=1e-5, rtol=1e-5)
    eye = torch.eye(SMALL.n_audio_ctx)
    assert torch.equal(zero.trace["encoder.blocks.2.attn.pattern"][0, 0], eye)
    p = some.trace["encoder.blocks.1.attn.pattern"]
    far = (torch.arange(SMALL.n_audio_ctx)[:, None] - torch.arange(SMALL.n_audio_ctx)[None]).abs() > 2
    assert (p[..., far] == 0).all() and (p[..., ~far] > 0).all()
    assert torch.equal(some.trace["encoder.blocks.0.attn.pattern"], run.trace["encoder.blocks.0.attn.pattern"])


# ----------------------------------------------------------------------------- bad input


def test_bad_requests_raise_clear_errors(small_run):
    model, mel, tokens, _ = small_run
    with pytest.raises(KeyError, match=r"'decoder\.blocks\.\*\.resid_psot' matches no activation name; closest: "):
        model.run(mel, tokens, trace=["decoder.blocks.*.resid_psot"])
    with pytest.raises(
        KeyError, match=r"cannot edit 'decoder\.blocks\.0\.resid_mdi'.*closest: 'decoder\.blocks\.0\.resid_mid'"
    ):
        model.run(mel, tokens, edits=wl.Edits().add("decoder.blocks.0.resid_mdi", torch.ones(1)))
    with pytest.raises(IndexError, match=r"encoder block 3 out of range: the encoder has 3 blocks \(0-2\)"):
        model.run(mel, tokens, edits=wl.Edits().skip("encoder", 3))
    with pytest.raises(IndexError, match=r"decoder block 7 out of range"):
        model.run(mel, tokens, edits=wl.Edits().ablate_heads("decoder.blocks.7.attn", [0]))
    with pytest.raises(ValueError, match=r"heads \[4\] out of range \(the layer has 4 heads\)"):
        model.run(mel, tokens, edits=wl.Edits().ablate_heads("decoder.blocks.0.attn", [4]))
    with pytest.raises(
        ValueError, match=r"replace at 'decoder\.ln': value of shape \(3, 9, 64\) does not fit .* \(2, 9, 64\)"
    ):
        model.run(mel, tokens, edits=wl.Edits().replace("decoder.ln", torch.zeros(3, 9, 64)))
    with pytest.raises(ValueError, match=r"edit function at 'decoder\.ln' returned \(2, 9\), want shape \(2, 9, 64\)"):
        model.run(mel, tokens, edits=wl.Edits().apply("decoder.ln", lambda x: x.sum(-1)))
    with pytest.raises(KeyError, match=r"'decoder\.blocks\.0\.attn\.pattern' was not recorded"):
        model.run(mel, tokens, trace=["decoder.ln"]).trace["decoder.blocks.0.attn.pattern"]
    with pytest.raises(ValueError, match=r"mel must be \[batch, 80, 120\] for this model, got \[2, 80, 100\]"):
        model.run(mel[..., :100], tokens)
    with pytest.raises(ValueError, match=r"token id 51865 is outside the vocabulary \[0, 51865\)"):
        model.run(mel, torch.full((2, 3), 51865))
    with pytest.raises(ValueError, match=r"tokens must have 1 to 48 positions, got 49"):
        model.run(mel, torch.zeros(2, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="mel has batch 2 but tokens have batch 1"):
        model.run(mel, tokens[:1])
    with pytest.raises(ValueError, match="stack must be 'encoder' or 'decoder'"):
        wl.Edits().skip("middle", 1)


def test_gradients_flow_through_recorded_patterns(small_run):
    """Attribution through patterns: the gradient of one recorded attention weight with respect to a steering
    vector is its derivative (finite differences, fp64), and the logits' gradient through the written-out
    attention equals the gradient through the fused kernel."""
    model, mel, tokens, _ = small_run
    name, pattern = "decoder.blocks.0.resid_mid", "decoder.blocks.2.cross_attn.pattern"
    model64 = copy.deepcopy(model).double()

    def weight(steer: torch.Tensor) -> torch.Tensor:  # one cross-attention weight of the last block
        run = model64.run(mel, tokens, trace=[pattern], edits=wl.Edits().add(name, steer))
        return run.trace[pattern][0, 1, 4, 7]

    steer = torch.zeros(SMALL.n_text_state, dtype=torch.float64, requires_grad=True)
    weight(steer).backward()
    direction = torch.randn(SMALL.n_text_state, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        slope = (weight(eps * direction) - weight(-eps * direction)) / (2 * eps)
    assert abs(slope) > 1e-4  # the weight does depend on the steering vector
    torch.testing.assert_close(steer.grad @ direction, slope, atol=1e-8, rtol=1e-5)

    grads = []
    for trace in (["*.pattern"], None):  # written out where recorded, else the fused kernel
        steer = torch.zeros(SMALL.n_text_state, requires_grad=True)
        model.run(mel, tokens, trace=trace, edits=wl.Edits().add(name, steer)).logits[0, -1, 7].backward()
        grads.append(steer.grad)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
