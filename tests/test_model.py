"""model.py as a reference: names and shapes from the dims, ``run(audio_features=)``, a debugger's path through it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

import whisper_lens as wl
from whisper_lens import model as model_module
from whisper_lens.model import ModelDims, Whisper, textbook

from .conftest import SMALL, random_mel, random_tokens, randomize_

MODEL_PY = Path(model_module.__file__)

DIMS = [
    SMALL,
    ModelDims(8, 6, 16, 2, 3, 50, 10, 16, 4, 1),  # deeper encoder than decoder, unequal head counts
    ModelDims(4, 5, 12, 1, 1, 30, 7, 12, 3, 4),  # one encoder block, four decoder blocks, odd context
]


def toy(dims: ModelDims, seed: int = 0) -> Whisper:
    return randomize_(Whisper(dims), seed).eval()


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize(("batch", "n_tokens"), [(1, 1), (2, 3)])
def test_names_and_shapes_from_the_dims_are_what_a_full_trace_records(dims, batch, n_tokens):
    model = toy(dims)
    with torch.no_grad():
        run = model.run(random_mel(dims, batch), random_tokens(dims, batch, n_tokens), trace=True)
    assert model.names() == run.trace.names()  # the same names, in the order the forward computes them
    assert model.shapes(batch, n_tokens) == {name: tuple(x.shape) for name, x in run.trace.items()}


def test_a_plain_run_computes_no_names(monkeypatch):
    """With nothing traced or edited, a run resolves no names and builds no shape table."""
    model = toy(SMALL)
    mel, tokens = random_mel(SMALL, 1), random_tokens(SMALL, 1, 4)
    with torch.no_grad():
        want = model(mel, tokens)
        monkeypatch.setattr(model_module, "activation_shapes", lambda *a: pytest.fail("names computed"))
        torch.testing.assert_close(model(mel, tokens), want, atol=0, rtol=0)
        with pytest.raises(pytest.fail.Exception, match="names computed"):
            model.run(mel, tokens, trace=["logits"])


def test_run_from_audio_features_equals_the_full_run():
    model = toy(SMALL, seed=3)
    mel, tokens = random_mel(SMALL, 2, seed=4), random_tokens(SMALL, 2, 5, seed=5)
    names = ["encoder.ln_post", "decoder.blocks.1.cross_attn.pattern", "decoder.blocks.2.resid_post"]
    edits = wl.Edits().ablate_heads("decoder.blocks.0.attn", [1]).add("decoder.blocks.1.resid_mid", torch.ones(64))
    with torch.no_grad():
        full = model.run(mel, tokens, trace=names, edits=edits)
        xa = full.trace["encoder.ln_post"]  # (B, S, D)
        part = model.run(tokens=tokens, audio_features=xa, trace=names[1:], edits=edits)
        one = model.run(tokens=tokens[1], audio_features=xa[1], trace=names[1:])  # unbatched, no edits
    torch.testing.assert_close(part.logits, full.logits, atol=1e-6, rtol=0)
    for name in names[1:]:
        torch.testing.assert_close(part.trace[name], full.trace[name], atol=1e-6, rtol=0)
    assert part.logits.abs().max() > 1.0
    with torch.no_grad():
        plain = model.run(mel, tokens, trace=names[1:])
    torch.testing.assert_close(one.logits[0], plain.logits[1], atol=1e-6, rtol=0)
    assert not torch.allclose(plain.logits, full.logits, atol=1e-3)  # the edits did something


def test_run_from_audio_features_bad_input():
    model = toy(SMALL)
    mel, tokens = random_mel(SMALL, 1), random_tokens(SMALL, 1, 3)
    xa = torch.zeros(1, SMALL.n_audio_ctx, SMALL.n_audio_state)
    with pytest.raises(ValueError, match="either mel or audio_features"):
        model.run(mel, tokens, audio_features=xa)
    with pytest.raises(ValueError, match="either mel or audio_features"):
        model.run(tokens=tokens)
    with pytest.raises(ValueError, match="'encoder.blocks.0.resid_post' is in the encoder"):
        model.run(tokens=tokens, audio_features=xa, trace=["encoder.blocks.0.resid_post", "logits"])
    with pytest.raises(ValueError, match="is in the encoder"):
        model.run(tokens=tokens, audio_features=xa, edits=wl.Edits().skip("encoder", 1))
    with pytest.raises(ValueError, match=r"audio_features must be \[batch, 60, 64\]"):
        model.run(tokens=tokens, audio_features=xa[:, :10])


def test_model_py_imports_no_decoding_and_no_transcription():
    """model.py is the network: at import time it reads neither the decoding package nor transcribe.py."""
    tree = ast.parse(MODEL_PY.read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    modules = {n.module or "" for n in top if isinstance(n, ast.ImportFrom)} | {a.name for n in top for a in n.names}
    assert not {m for m in modules if "decoding" in m or "transcribe" in m or "kernels" in m}, modules
    assert len(MODEL_PY.read_text().splitlines()) <= 350


def lines_of(*snippets: str) -> dict[str, int]:
    """The line of model.py holding each snippet (exactly one each)."""
    text = MODEL_PY.read_text().splitlines()
    found = {}
    for s in snippets:
        hits = [i + 1 for i, line in enumerate(text) if s in line]
        assert len(hits) == 1, (s, hits)
        found[s] = hits[0]
    return found


PRODUCTS = ("self.conv1(mel)", "self.conv2(x.transpose(1, 2))", 'rec("q", self.query(x)', 'rec("k", self.key(x)',
            'rec("v", self.value(x)', "self.out(z.flatten(2))", "@ k.mT", "self.pattern(q, k, mask, rec) @ v",
            "torch.softmax(scores, dim=-1, out=scores)", "fc1(self.mlp_ln(x))", "fc2(post)",
            "F.linear(x, self.token_embedding.weight)")  # fmt: skip


def stepped(fn) -> tuple[set[int], set[str], set[tuple[str, str]]]:
    """Run ``fn`` under ``sys.settrace`` (what a debugger's ``step`` follows): the lines of model.py it executes,
    the files of every frame it enters, and those frames as (file name, function)."""
    lines, files, frames = set(), set(), set()

    def tracer(frame, event, arg):
        files.add(frame.f_code.co_filename)
        frames.add((Path(frame.f_code.co_filename).name, frame.f_code.co_name))
        if event == "line" and frame.f_code.co_filename == str(MODEL_PY):
            lines.add(frame.f_lineno)
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return lines, files, frames


def test_stepping_through_a_run_in_textbook_reaches_every_product_and_the_softmax_in_model_py():
    model = toy(SMALL, seed=6)
    mel, tokens = random_mel(SMALL, 1), random_tokens(SMALL, 1, 4)
    want = lines_of(*PRODUCTS, "F.scaled_dot_product_attention(")
    sdpa = want.pop("F.scaled_dot_product_attention(")
    with torch.no_grad(), textbook():
        lines, files, _ = stepped(lambda: model.run(mel, tokens))
    missing = [s for s, line in want.items() if line not in lines]
    assert not missing, missing
    assert sdpa not in lines  # no fused kernel: the formula is stepped through
    ours = sorted({Path(f).name for f in files if "/whisper_lens/" in f})
    assert ours == ["inputs.py", "model.py", "trace.py"], ours  # nothing of decoding, no kernel module
    with torch.no_grad():
        lines, _, _ = stepped(lambda: model.run(mel, tokens))
    assert sdpa in lines and want["torch.softmax(scores, dim=-1, out=scores)"] not in lines  # outside: SDPA


def test_stepping_through_generate_in_textbook_reaches_the_softmax_in_model_py(real_tiny_en):
    """Decoding, too, attends in model.py inside textbook(): each step's softmax is written out there, and the
    unembedding is the model's own (no product of the packed-product module runs)."""
    mel = torch.zeros(1, real_tiny_en.dims.n_mels, 2 * real_tiny_en.dims.n_audio_ctx) - 0.5
    want = lines_of("torch.softmax(scores, dim=-1, out=scores)", "F.linear(x, self.token_embedding.weight)")
    with torch.no_grad(), textbook():
        lines, _, frames = stepped(lambda: real_tiny_en.generate(mel, max_new_tokens=2, beam_size=2))
    assert set(want.values()) <= lines
    assert not {("packed.py", f) for f in ("linear", "onednn_linear")} & frames
    assert not {(file, f) for file, f in frames if file == "cache.py" and f in ("attend", "product")}
