"""Attribution and patching: the decomposition sums to the stream, DLA gives the logit, every patched cell
equals the same patch done alone with Edits and run, attribution patching ranks the cells as patching does."""

from __future__ import annotations

import json

import pytest
import torch

import whisper_lens as wl
from whisper_lens import attribution as A

from .conftest import DATA, SMALL, random_mel, random_tokens

PHRASE = " he was not an ill disposed young man"


@pytest.fixture(scope="module")
def pair(real_tiny_en):
    """Real speech and the same speech with the word 'young' silenced; the reference transcript as tokens.

    Returns (model, mel, corrupt mel, tokens, position whose logit predicts ' young', ' young', ' man').
    """
    model, tok = real_tiny_en, real_tiny_en.tokenizer
    audio = wl.load_audio(DATA / "austen-0880.flac")
    word = next(w for w in json.loads((DATA / "transcripts.json").read_text())["austen-0880.flac"]["words"]
                if w["word"] == "young")  # fmt: skip
    quiet = audio.copy()
    quiet[int(word["start"] * 16000) : int(word["end"] * 16000)] = 0
    mels = [wl.pad_or_trim(wl.log_mel_spectrogram(a), 3000) for a in (audio, quiet)]
    ids = [*tok.sot_sequence, tok.no_timestamps, *tok.encode(PHRASE)]
    young, man = tok.encode(" young")[0], tok.encode(" man")[0]
    return model, mels[0], mels[1], torch.tensor(ids), ids.index(young) - 1, young, man


@pytest.fixture(scope="module")
def patcher(pair):
    model, mel, mel_c, tokens, at, young, man = pair
    return A.Patcher(model, (mel, tokens), (mel_c, tokens), A.logit_diff(at, young, man))


def metric_of(logits, at, young, man):
    return float((logits[0, at, young] - logits[0, at, man]).detach())


# ----------------------------------------------------------------------------- decoder-only runs


def test_run_on_audio_features_equals_the_full_run(pair):
    model, mel, _, tokens, *_ = pair
    full = model.run(mel, tokens, trace=["encoder.ln_post", "decoder.blocks.*.cross_attn.z"])
    xa = full.trace["encoder.ln_post"]
    dec = model.run(tokens=tokens, audio_features=xa, trace=["decoder.blocks.*.cross_attn.z"])
    torch.testing.assert_close(dec.logits, full.logits, atol=1e-5, rtol=0)
    for name in full.trace.select("decoder.*"):
        torch.testing.assert_close(dec.trace[name], full.trace[name], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="either mel or audio_features"):
        model.run(mel, tokens, audio_features=xa)
    with pytest.raises(ValueError, match="skip the encoder"):
        model.run(tokens=tokens, audio_features=xa, edits=wl.Edits().skip("encoder", [0]))
    with pytest.raises(ValueError, match="audio_features must be"):
        model.run(tokens=tokens, audio_features=xa[:, :10])


# ----------------------------------------------------------------------------- decomposition and DLA


def test_components_sum_to_every_residual_point(pair):
    model, mel, _, tokens, *_ = pair
    L = model.dims.n_text_layer
    points = ["decoder.embed"] + [f"decoder.blocks.{i}.{s}" for i in range(L) for s in A._STAGES]
    points += ["encoder.blocks.1.resid_mid", f"encoder.blocks.{model.dims.n_audio_layer - 1}.resid_post"]
    names = sorted({n for p in points for n in A.decompose_names(model, p)})
    with torch.no_grad():
        trace = model.run(mel, tokens, trace=names).trace
        for point in points:
            comps = A.decompose(model, trace, point)
            x = trace[point]
            assert float((comps.sum() - x).norm() / x.norm()) < 1e-5, point
    comps = A.decompose(model, trace, f"decoder.blocks.{L - 1}.resid_post")
    H = model.dims.n_text_head
    assert len(comps.labels) == 1 + L * (2 * (H + 1) + 1) and comps.labels[:2] == ["embed", "L0.attn.H0"]
    assert comps.values.shape == (len(comps.labels), 1, len(tokens), model.dims.n_text_state)
    # per-head results plus the output bias are the layer's output
    out = model.run(mel, tokens, trace=["decoder.blocks.2.cross_attn.z", "decoder.blocks.2.cross_attn_out"]).trace
    result = A.head_results(model, out, "decoder.blocks.2.cross_attn.result")  # (B, T, H, D)
    bias = model.decoder.blocks[2].cross_attn.out.bias
    torch.testing.assert_close(result.sum(2) + bias, out["decoder.blocks.2.cross_attn_out"], atol=1e-5, rtol=1e-5)
    with pytest.raises(KeyError, match="decompose_names"):
        A.decompose(model, out, "decoder.blocks.3.resid_post")
    with pytest.raises(ValueError, match="residual point"):
        A.decompose(model, trace, "decoder.blocks.1.mlp_out")
    with pytest.raises(ValueError, match="no cross-attention"):
        A.decompose(model, trace, "encoder.blocks.1.resid_mid_cross")


def test_direct_logit_attribution_gives_the_logits(pair):
    model, mel, _, tokens, at, young, man = pair
    L = model.dims.n_text_layer
    run = model.run(mel, tokens, trace=A.decompose_names(model, f"decoder.blocks.{L - 1}.resid_post"))
    nxt = torch.cat([tokens[1:], tokens[-1:]])[None]  # (1, T): the next token at each position
    for token, other in [(nxt, None), (young, man), (man, None), (tokens[None], young)]:
        att = A.logit_attribution(model, run.trace, token, other)
        want = run.logits.gather(-1, torch.as_tensor(token).expand(1, len(tokens))[..., None])[..., 0]  # (1, T)
        if other is not None:
            want = want - run.logits[..., other]
        torch.testing.assert_close(att.total(), want, atol=1e-4, rtol=0)
    att = A.logit_attribution(model, run.trace, young, man)
    assert att.top(1, 0, at)[0][0].startswith(f"L{L - 1}.cross_attn.H")  # the word arrives by cross-attention
    raw = A.logit_attribution(model, run.trace, young, ln="none")
    W = model.decoder.token_embedding.weight[young]
    torch.testing.assert_close(raw.values.sum(0), run.trace[f"decoder.blocks.{L - 1}.resid_post"] @ W, atol=1e-3,
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="ln must be"):
        A.logit_attribution(model, run.trace, young, ln="apply")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        A.logit_attribution(model, run.trace, model.dims.n_vocab)


def test_dla_of_one_head_by_hand_on_a_random_model(small_model):
    model = small_model
    mel, tokens = random_mel(SMALL, batch=1, seed=3), random_tokens(SMALL, batch=1, length=5, seed=4)
    L, H = SMALL.n_text_layer, SMALL.n_text_head
    run = model.run(mel, tokens, trace=A.decompose_names(model, f"decoder.blocks.{L - 1}.resid_post"))
    att = A.logit_attribution(model, run.trace, 7, 11)
    Dh = SMALL.n_text_state // H
    x = run.trace[f"decoder.blocks.{L - 1}.resid_post"][0, 3].double()  # (D,) position 3
    sigma = (x.var(unbiased=False) + model.decoder.ln.eps).sqrt()
    g, W = model.decoder.ln.weight.double(), model.decoder.token_embedding.weight.double()
    u = W[7] - W[11]
    for layer, kind, h in [(1, "cross_attn", 2), (0, "attn", 0), (L - 1, "cross_attn", H - 1)]:
        z = run.trace[f"decoder.blocks.{layer}.{kind}.z"][0, 3, h].double()  # (Dh,)
        wo = getattr(model.decoder.blocks[layer], kind).out.weight.double()[:, h * Dh : (h + 1) * Dh]  # (D, Dh)
        r = wo @ z  # (D,): this head's write into the stream
        want = float((((r - r.mean()) / sigma * g) @ u).detach())
        got = float(att.values[att.labels.index(f"L{layer}.{kind}.H{h}"), 0, 3])
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    mlp = run.trace["decoder.blocks.1.mlp_out"][0, 3].double()
    want = float(((mlp - mlp.mean()) / sigma * g) @ u)
    assert float(att.values[att.labels.index("L1.mlp"), 0, 3]) == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert float(att.constant[0, 3]) == pytest.approx(float(model.decoder.ln.bias.double() @ u), rel=1e-5)


# ----------------------------------------------------------------------------- head-level edits, gradients


def test_replace_heads_patches_only_those_heads(small_model):
    model = small_model
    mel, tokens = random_mel(SMALL, batch=1, seed=5), random_tokens(SMALL, batch=1, length=6, seed=6)
    other = random_mel(SMALL, batch=1, seed=7)
    name = "decoder.blocks.1.cross_attn.z"
    clean = model.run(other, tokens, trace=[name]).trace[name]  # (1, T, H, Dh)
    edits = wl.Edits().replace(name, clean[:, [2, 4]][:, :, [1, 3]], positions=[2, 4], heads=[1, 3])
    got = model.run(mel, tokens, trace=[name], edits=edits).trace[name]
    base = model.run(mel, tokens, trace=[name]).trace[name]
    want = base.clone()
    for p in (2, 4):
        for h in (1, 3):
            want[0, p, h] = clean[0, p, h]
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    pattern = "decoder.blocks.0.attn.pattern"  # heads come before positions there
    ones = torch.full((1, 1, 6, 6), 1 / 6)
    got = model.run(mel, tokens, trace=[pattern], edits=wl.Edits().replace(pattern, ones, heads=[2])).trace[pattern]
    assert torch.equal(got[:, 2], ones[:, 0]) and not torch.equal(got[:, 1], ones[:, 0])
    with pytest.raises(ValueError, match="per-head name"):
        model.run(mel, tokens, edits=wl.Edits().replace("decoder.blocks.1.resid_post", clean, heads=[0]))
    with pytest.raises(ValueError, match="out of range"):
        model.run(mel, tokens, edits=wl.Edits().replace(name, clean[:, :, :1], heads=[SMALL.n_text_head]))
    with pytest.raises(ValueError, match="does not fit"):
        model.run(mel, tokens, edits=wl.Edits().replace(name, clean, heads=[0]))


def test_a_converted_trace_keeps_the_graph(small_model):
    model = small_model
    mel, tokens = random_mel(SMALL, batch=1, seed=8), random_tokens(SMALL, batch=1, length=4, seed=9)
    name = "decoder.blocks.1.resid_post"
    grads = []
    for kwargs in ({}, {"trace_dtype": torch.float64, "trace_device": "cpu"}):
        model.zero_grad()
        run = model.run(mel, tokens, trace=[name], **kwargs)
        assert run.trace[name].requires_grad
        run.trace[name].pow(2).sum().backward()
        grads.append(model.decoder.blocks[0].mlp[0].weight.grad.clone())
    model.zero_grad()
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- patching


def naive(model, clean, corrupt, tokens, name, pos, head, metric):
    """The same patch done alone: one run with Edits. ``clean``: the clean run's trace; ``corrupt``: the corrupt
    mel, or for a decoder patch its audio features (the encoder's output, which the patch does not change)."""
    value = clean[name][:, pos] if head is None else clean[name][:, pos][:, :, [head]]
    edits = wl.Edits().replace(name, value, positions=pos, heads=None if head is None else [head])
    if name.startswith("encoder."):
        return metric(model.run(corrupt, tokens, edits=edits).logits)
    return metric(model.run(tokens=tokens, audio_features=corrupt, edits=edits).logits)


def test_patched_cells_equal_patches_done_alone(pair, patcher):
    model, mel, mel_c, tokens, at, young, man = pair
    metric = lambda logits: metric_of(logits, at, young, man)  # noqa: E731
    assert patcher.baseline["clean"] == pytest.approx(metric(model.run(mel, tokens).logits), abs=1e-4)
    assert patcher.baseline["corrupt"] == pytest.approx(metric(model.run(mel_c, tokens).logits), abs=1e-4)
    scale = max(1.0, abs(patcher.baseline["clean"] - patcher.baseline["corrupt"]))
    heads = patcher.sweep("decoder.blocks.*.cross_attn.z", heads=[1, 3], positions=[at - 1, at, at + 1])
    assert heads.dims == ("name", "head", "position") and heads.shape == (model.dims.n_text_layer, 2, 3)
    assert heads.coords["head"] == [1, 3] and heads.coords["position"] == [at - 1, at, at + 1]
    assert heads.coords["name"][2] == "decoder.blocks.2.cross_attn.z"
    # after the metric's position a patch cannot change it (the decoder is causal)
    assert torch.all(heads.values[..., 2] == patcher.baseline["corrupt"])
    names = ["decoder.blocks.*.resid_pre", "decoder.blocks.2.attn_out", "decoder.blocks.1.mlp_out",
             "decoder.blocks.3.resid_mid_cross", "decoder.blocks.*.cross_attn.z"]  # fmt: skip
    clean = model.run(mel, tokens, trace=names).trace
    xa_c = model.run(mel_c, tokens, trace=["encoder.ln_post"]).trace["encoder.ln_post"]
    for layer, h, p in [(3, 3, at), (2, 1, at), (0, 3, at - 1)]:
        name = f"decoder.blocks.{layer}.cross_attn.z"
        want = naive(model, clean, xa_c, tokens, name, [p], h, metric)
        cell = heads[name][[1, 3].index(h), [at - 1, at, at + 1].index(p)]
        assert float(cell) == pytest.approx(want, abs=1e-5 * scale), (name, h, p)
    grid = patcher.sweep(names[:-1], positions=[at - 2, at])
    assert grid.dims == ("name", "position") and grid.shape == (model.dims.n_text_layer + 3, 2)
    for name, j in [("decoder.blocks.0.resid_pre", 1), ("decoder.blocks.3.resid_pre", 0),
                    ("decoder.blocks.2.attn_out", 1), ("decoder.blocks.1.mlp_out", 1),
                    ("decoder.blocks.3.resid_mid_cross", 0)]:  # fmt: skip
        p = [at - 2, at][j]
        want = naive(model, clean, xa_c, tokens, name, [p], None, metric)
        assert float(grid[name][j]) == pytest.approx(want, abs=1e-5 * scale), (name, p)
    assert float(grid["decoder.blocks.3.resid_mid_cross"][1]) == pytest.approx(patcher.baseline["clean"], abs=1e-4)
    fig = heads.plot()
    assert len(fig.axes) == 2  # the heatmap and its colour bar


def test_encoder_windows_equal_patches_done_alone(pair, patcher):
    model, mel, mel_c, tokens, at, young, man = pair
    metric = lambda logits: metric_of(logits, at, young, man)  # noqa: E731
    windows = [(100, 120), (0, 50)]  # "young" is at 2.11-2.33 s: frames 105-117
    name = "encoder.blocks.2.resid_post"
    grid = patcher.sweep(name, windows=windows)
    assert grid.dims == ("name", "window") and grid.coords["window"] == windows
    scale = max(1.0, abs(patcher.baseline["clean"] - patcher.baseline["corrupt"]))
    clean = model.run(mel, tokens, trace=[name]).trace
    for j, (a, b) in enumerate(windows):
        want = naive(model, clean, mel_c, tokens, name, list(range(a, b)), None, metric)
        assert float(grid[name][j]) == pytest.approx(want, abs=1e-5 * scale)
    assert grid.normalized()[0, 0] > 0.5 > abs(float(grid.normalized()[0, 1]))  # the word's frames carry it


def test_bad_sweeps_get_one_line_errors(patcher):
    cases = [
        (dict(names="decoder.blocks.*.cros_attn.z"), KeyError, "matches no activation name"),
        (dict(names="decoder.blocks.*.cross_attn.z", heads=[6]), ValueError, "out of range"),
        (dict(names="decoder.blocks.*.resid_pre", heads=[0]), ValueError, "per-head names"),
        (dict(names="decoder.blocks.*.cross_attn.k"), ValueError, "cannot patch"),
        (dict(names=["decoder.blocks.0.resid_pre", "encoder.blocks.0.resid_pre"]), ValueError, "one stack"),
        (dict(names="decoder.blocks.0.resid_pre", positions=[99]), ValueError, "out of range"),
        (dict(names="encoder.blocks.0.resid_pre"), ValueError, "needs windows"),
        (dict(names="encoder.blocks.0.resid_pre", windows=[(10, 5)]), ValueError, "start < stop"),
        (dict(names="encoder.blocks.0.resid_pre", windows=[(0, 1501)]), ValueError, "start < stop"),
        (dict(names="encoder.blocks.0.resid_pre", windows=0), ValueError, "window width"),
        (dict(names="decoder.blocks.0.resid_pre", windows=10), ValueError, "positions="),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match) as info:
            patcher.sweep(**kwargs)
        assert "\n" not in str(info.value)


def test_attribution_patching_ranks_the_top_cells_as_patching(pair, patcher):
    model, *_, at, _, _ = pair
    positions = list(range(2, at + 1))
    real = patcher.sweep("decoder.blocks.*.cross_attn.z", positions=positions)
    est = patcher.attribute("decoder.blocks.*.cross_attn.z", positions=positions)
    assert est.dims == real.dims and est.coords == real.coords
    assert est.corrupt == pytest.approx(patcher.baseline["corrupt"], abs=1e-4)
    a, b = real.values.flatten() - real.corrupt, est.values.flatten() - est.corrupt
    r = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    print(f"attribution patching vs patching, {a.numel()} head x position cells: r = {r:.3f}")
    assert r > 0.9
    top_real = [c for c, _ in real.top(3)]
    top_est = [c for c, _ in est.top(3)]
    assert top_real == top_est
    model.requires_grad_(False)  # gradients reach the activations without the parameters'
    try:
        again = patcher.attribute("decoder.blocks.*.cross_attn.z", positions=positions)
    finally:
        model.requires_grad_(True)
    torch.testing.assert_close(again.values, est.values)
    # the function form encodes the pair itself; an encoder window's estimate from the same backward pass
    _, mel, mel_c, tokens, _, young, man = pair
    enc = A.attribution_patch(model, (mel, tokens), (mel_c, tokens), A.logit_diff(at, young, man),
                              "encoder.blocks.2.resid_post", windows=[(100, 120), (0, 50)])  # fmt: skip
    assert enc.dims == ("name", "window") and enc.values[0, 0] > enc.values[0, 1]


def test_local_window_per_head(small_model):
    model = small_model
    mel, tokens = random_mel(SMALL, batch=1, seed=10), random_tokens(SMALL, batch=1, length=3, seed=11)
    name = "encoder.blocks.1.attn.pattern"
    base = model.run(mel, tokens, trace=[name]).trace[name]  # (1, H, S, S)
    got = model.run(mel, tokens, trace=[name], edits=wl.Edits().local_window(3, layers=[1], heads=[0, 2])).trace[name]
    S = SMALL.n_audio_ctx
    far = (torch.arange(S)[:, None] - torch.arange(S)[None, :]).abs() > 3  # (S, S)
    assert torch.all(got[:, [0, 2]][..., far] == 0) and torch.all(got[:, [0, 2]][..., ~far] > 0)
    torch.testing.assert_close(got[:, [1, 3]], base[:, [1, 3]], atol=1e-6, rtol=0)  # the other heads as before
    whole = model.run(mel, tokens, trace=[name], edits=wl.Edits().local_window(3, layers=[1])).trace[name]
    assert torch.all(whole[..., far] == 0)
    with pytest.raises(ValueError, match="out of range"):
        model.run(mel, tokens, edits=wl.Edits().local_window(3, heads=[SMALL.n_audio_head]))


# ----------------------------------------------------------------------------- edits while generating


def test_generate_with_edits_at_positions_equals_the_teacher_forced_run(pair):
    model, mel, mel_c, tokens, at, young, man = pair
    prompt = [*model.tokenizer.sot_sequence_including_notimestamps]
    plain = model.generate(mel)[0].tokens
    other = model.run(mel_c, tokens, trace=["decoder.blocks.2.cross_attn.z", "encoder.blocks.1.resid_post"]).trace
    P = len(prompt)
    z = other["decoder.blocks.2.cross_attn.z"][:, [P + 1, P + 2]][:, :, [1, 4]]  # (1, 2, 2, Dh)
    steer = 100 * model.decoder.token_embedding.weight[man]  # pushes ' man' at the positions it is added
    edits = (wl.Edits()
             .add("decoder.blocks.3.resid_post", steer, positions=[P + 5])
             .replace("decoder.blocks.2.cross_attn.z", z, positions=[P + 1, P + 2], heads=[1, 4])
             .replace("encoder.blocks.1.resid_post", other["encoder.blocks.1.resid_post"][:, 100:120],
                      positions=range(100, 120)))  # fmt: skip
    names = ["decoder.blocks.3.resid_post", "decoder.blocks.2.cross_attn.z", "decoder.blocks.0.mlp_out"]
    result = model.generate(mel, edits=edits, trace=names)[0]
    assert result.tokens != plain  # the edits change the transcript
    assert result.tokens[6] == man  # the token the steered position predicts
    full = torch.tensor([*prompt, *result.tokens])
    run = model.run(mel, full, edits=edits, trace=names)
    assert run.logits[0, P - 1 : -1].argmax(-1).tolist() == result.tokens
    for name in names:  # the generated positions: every step saw the edits the run applies there
        got, want = result.trace[name][:, : len(full) - 1], run.trace[name][:, : len(full) - 1]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the first k generated tokens, whatever the prompt's length: here positions P .. P + k - 1
    first = wl.Edits().add("decoder.blocks.3.resid_post", steer, positions=wl.Edits.generated(6))
    absolute = wl.Edits().add("decoder.blocks.3.resid_post", steer, positions=range(P, P + 6))
    steered = model.generate(mel, edits=first, max_new_tokens=8)[0].tokens
    assert steered == model.generate(mel, edits=absolute, max_new_tokens=8)[0].tokens != plain[:8]
    with pytest.raises(ValueError, match="absolute positions"):
        model.run(mel, tokens, edits=first)
    with pytest.raises(ValueError, match="fits"):
        model.generate(mel, edits=wl.Edits().add("decoder.blocks.3.resid_post", torch.zeros(1, 3, 384), positions=[4]))
