"""Decoding: tokens identical to openai-whisper's decode, batching invariance, traces and edits equal to run.

Random weights of real shapes. The end-of-text token is made likelier (its unembedding row is
pushed along the final LayerNorm's bias) so that sequences end at different lengths and the
finished-row and finished-beam paths are exercised, not only the length limit.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from whisper_lens import Edits, load_model
from whisper_lens.loading import save_model

from .conftest import BASE, SMALL, TINY, openai_model, random_mel, save_openai

whisper = pytest.importorskip("whisper")
import whisper.decoding as wd  # noqa: E402

ASSETS = os.path.join(os.path.dirname(whisper.__file__), "assets")
MULTI, ENGLISH = os.path.join(ASSETS, "multilingual.tiktoken"), os.path.join(ASSETS, "gpt2.tiktoken")
SAMPLE_LEN = 24


def eot_biased(dims, seed: int, eot: int, alpha: float = 18.0):
    """openai-whisper model with random weights whose EOT logit is raised by about ``alpha``."""
    ref = openai_model(dims, seed=seed)
    with torch.no_grad():
        bias = ref.decoder.ln.bias
        ref.decoder.token_embedding.weight[eot] += alpha * bias / bias.norm() ** 2
    return ref


def pair(dims, seed, tmp_path, vocab_file, alpha=18.0):
    """(openai-whisper model, our model loaded from its .pt) with the same random weights."""
    eot = 50257 if dims.n_vocab >= 51865 else 50256
    ref = eot_biased(dims, seed, eot, alpha)
    ours = load_model(save_openai(ref, tmp_path / "model.pt"), tokenizer=vocab_file)
    assert ours.tokenizer.eot == eot
    return ref, ours


CASES = {
    # name: (dims, vocabulary, openai options, our options)
    "tiny-greedy-ts": (TINY, MULTI, {}, {"timestamps": True}),
    "tiny-greedy-text": (TINY, MULTI, {"without_timestamps": True}, {}),
    "tiny-beam-ts": (TINY, MULTI, {"beam_size": 5}, {"beam_size": 5, "timestamps": True}),
    "tiny-beam-text": (TINY, MULTI, {"beam_size": 5, "without_timestamps": True}, {"beam_size": 5}),
    "tiny.en-greedy-ts": (replace(TINY, n_vocab=51864), ENGLISH, {"language": "en"}, {"timestamps": True}),
    "tiny.en-beam-text": (
        replace(TINY, n_vocab=51864),
        ENGLISH,
        {"language": "en", "beam_size": 5, "without_timestamps": True},
        {"beam_size": 5},
    ),
    "base-greedy-ts": (BASE, MULTI, {}, {"timestamps": True}),
    "base-beam-text": (BASE, MULTI, {"beam_size": 5, "without_timestamps": True}, {"beam_size": 5}),
    "tiny-beam-options": (
        TINY,
        MULTI,
        {
            "beam_size": 3,
            "patience": 2.0,
            "length_penalty": 0.5,
            "prompt": "hello there",
            "prefix": "so",
            "language": "fr",
            "task": "translate",
            "without_timestamps": True,
        },  # fmt: skip
        {
            "beam_size": 3,
            "patience": 2.0,
            "length_penalty": 0.5,
            "prompt": "hello there",
            "prefix": "so",
            "language": "fr",
            "task": "translate",
        },  # fmt: skip
    ),
    "tiny-greedy-no-filters": (
        TINY,
        MULTI,
        {"suppress_tokens": "", "suppress_blank": False, "max_initial_timestamp": None},
        {"suppress_tokens": None, "suppress_blank": False, "max_initial_timestamp": None, "timestamps": True},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tokens_equal_openai_whisper(case, tmp_path):
    dims, vocab, ref_opts, our_opts = CASES[case]
    ref, ours = pair(dims, 11, tmp_path, vocab)
    mel = random_mel(dims, batch=2, seed=12)
    ours_out = ours.generate(mel, max_new_tokens=SAMPLE_LEN, **our_opts)  # the clips together
    options = wd.DecodingOptions(fp16=False, sample_len=SAMPLE_LEN, **ref_opts)
    lengths = []
    for i in range(len(mel)):  # openai-whisper's beam search takes one clip at a time
        want = wd.decode(ref, mel[i], options)
        got = ours_out[i]
        assert got.tokens == want.tokens, f"clip {i}"
        assert got.text == want.text
        assert got.language == want.language
        assert abs(got.avg_logprob - want.avg_logprob) < 1e-4
        assert abs(got.no_speech_prob - want.no_speech_prob) < 1e-4
        assert abs(got.compression_ratio - want.compression_ratio) < 1e-9
        lengths.append(len(got.tokens))
    assert max(lengths) > 0


def test_language_probabilities_equal_openai_whisper(tmp_path):
    ref, ours = pair(TINY, 13, tmp_path, MULTI)
    mel = random_mel(TINY, batch=3, seed=14)
    got = ours.generate(mel, max_new_tokens=1)
    tokenizer = whisper.tokenizer.get_tokenizer(True, num_languages=99)
    with torch.no_grad():
        _, want = ref.detect_language(mel, tokenizer)
    for g, w in zip(got, want, strict=True):
        assert set(g.language_probs) == set(w)
        assert max(abs(g.language_probs[c] - w[c]) for c in w) < 1e-4
        assert g.language == max(w, key=w.get)
    assert ours.generate(mel[:1], max_new_tokens=1, language="de")[0].language_probs is None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random model (SMALL dims, multilingual vocabulary) whose sequences end at various lengths."""
    eot = 50257
    ref = eot_biased(SMALL, 21, eot, alpha=0.45)
    path = save_openai(ref, tmp_path_factory.mktemp("small") / "small.pt")
    return load_model(path, tokenizer=MULTI)


def varied_mel(batch: int, seed: int) -> torch.Tensor:
    """Clips of SMALL's shape that differ in level and spread, so the small model answers each differently."""
    mel = random_mel(SMALL, batch=batch, seed=seed)  # (B, n_mels, frames)
    return mel * torch.linspace(0.2, 3, batch)[:, None, None] + torch.linspace(-1, 1, batch)[:, None, None]


@pytest.mark.parametrize("beam_size", [None, 4])
@pytest.mark.parametrize("timestamps", [False, True])
def test_batch_of_eight_equals_one_at_a_time(small, beam_size, timestamps):
    mel = varied_mel(8, seed=22)
    together = small.generate(mel, beam_size=beam_size, timestamps=timestamps, max_new_tokens=20)
    lengths = {len(r.tokens) for r in together}
    assert len(lengths) > 2  # rows finish at different steps
    for i in range(8):
        alone = small.generate(mel[i], beam_size=beam_size, timestamps=timestamps, max_new_tokens=20)[0]
        assert alone.tokens == together[i].tokens
        assert alone.language == together[i].language
        assert abs(alone.avg_logprob - together[i].avg_logprob) < 1e-5


def initial_tokens(model, result, timestamps: bool) -> list[int]:
    tok = model.tokenizer
    seq = list(tok.sot_sequence_for(result.language, "transcribe"))
    return seq if timestamps else seq + [tok.no_timestamps]


@pytest.mark.parametrize("beam_size", [None, 3])
def test_trace_equals_run_on_final_sequence(small, beam_size):
    mel = varied_mel(3, seed=23)
    results = small.generate(mel, beam_size=beam_size, max_new_tokens=12, trace=True)
    plain = small.generate(mel, beam_size=beam_size, max_new_tokens=12)
    for i, r in enumerate(results):
        assert r.tokens == plain[i].tokens  # recording changes nothing
        tokens = torch.tensor(initial_tokens(small, r, False) + r.tokens)
        with torch.no_grad():
            run = small.run(mel[i], tokens, trace=True)
        assert r.trace.names() == run.trace.names()
        for name in run.trace.names():
            torch.testing.assert_close(r.trace[name], run.trace[name], atol=1e-5, rtol=0, msg=name)


def test_edits_during_generate_equal_edits_in_run(small):
    mel = varied_mel(2, seed=24)
    D = SMALL.n_text_state
    steer = torch.randn(D, generator=torch.Generator().manual_seed(25))
    edits = (
        Edits()
        .ablate_heads("decoder.blocks.0.attn", [1, 2])
        .skip("decoder", 1)
        .add("decoder.blocks.2.resid_mid", steer)
        .apply("decoder.blocks.0.mlp.post", lambda x: 0.5 * x)
        .local_window(5)
    )
    edited = small.generate(mel, max_new_tokens=10, trace=["logits"], edits=edits)
    plain = small.generate(mel, max_new_tokens=10, trace=["logits"])
    for i, r in enumerate(edited):
        tokens = torch.tensor(initial_tokens(small, r, False) + r.tokens)
        with torch.no_grad():
            run = small.run(mel[i], tokens, trace=["logits", "decoder.blocks.1.resid_post"], edits=edits)
            unedited = small.run(mel[i], tokens).logits
        torch.testing.assert_close(r.trace["logits"], run.logits, atol=1e-5, rtol=0)
        assert (run.logits - unedited).abs().max() > 0.1  # the edits do change the model
        # the chosen tokens are the argmax of the edited logits wherever no filter intervened
        steps = run.logits[0, len(tokens) - len(r.tokens) - 1 : -1].argmax(-1)
        assert (steps == tokens[-len(r.tokens) :]).float().mean() > 0.5 if r.tokens else True
    assert [r.tokens for r in edited] != [r.tokens for r in plain]


@pytest.mark.parametrize("beam_size", [None, 3])
def test_audio_features_decode_as_the_mel(small, beam_size):
    mel = varied_mel(3, seed=28)
    with torch.no_grad():
        xa = small.encoder(mel)  # (B, S, D)
    names = ["decoder.blocks.1.cross_attn.pattern", "logits"]
    from_mel = small.generate(mel, beam_size=beam_size, max_new_tokens=12, trace=names)
    from_xa = small.generate(audio_features=xa, beam_size=beam_size, max_new_tokens=12, trace=names)
    for a, b in zip(from_mel, from_xa, strict=True):
        assert a.tokens == b.tokens and a.language == b.language
        assert a.avg_logprob == b.avg_logprob and a.no_speech_prob == b.no_speech_prob
        for name in names:
            assert torch.equal(a.trace[name], b.trace[name]), name
    one = small.generate(audio_features=xa[1], beam_size=beam_size, max_new_tokens=12)  # unbatched (S, D)
    assert one[0].tokens == from_mel[1].tokens


def test_weights_edited_between_calls_are_used(small):
    """The packed copies of the weights (``packed_weights``) are made per call: an edit through ``.data``
    (which no version counter sees) changes the next generate exactly as it changes ``run``."""
    from whisper_lens.model import Linear

    mel = varied_mel(2, seed=30)
    before = small.generate(mel, max_new_tokens=8, trace=["logits"])
    weight = small.decoder.blocks[1].mlp[0].weight
    saved = weight.detach().clone()
    try:
        weight.data.mul_(4)
        after = small.generate(mel, max_new_tokens=8, trace=["logits"])
        for i, r in enumerate(after):
            tokens = torch.tensor(initial_tokens(small, r, False) + r.tokens)
            with torch.no_grad():
                run = small.run(mel[i], tokens)
            torch.testing.assert_close(r.trace["logits"], run.logits, atol=1e-5, rtol=0)
            n = min(r.trace["logits"].shape[1], before[i].trace["logits"].shape[1])
            assert (r.trace["logits"][:, :n] - before[i].trace["logits"][:, :n]).abs().max() > 0.1
    finally:
        weight.data.copy_(saved)
    assert all(m.packed is None for m in small.modules() if isinstance(m, Linear))


def test_compiled_step_gives_the_same_tokens(small):
    mel = varied_mel(2, seed=31)
    plain = small.generate(mel, max_new_tokens=6)
    compiled = small.generate(mel, max_new_tokens=6, compile=True)
    assert [r.tokens for r in compiled] == [r.tokens for r in plain]


def test_sampling_with_a_seed_is_reproducible(small):
    mel = varied_mel(2, seed=26)
    a = small.generate(mel, temperature=1.0, seed=7, max_new_tokens=10)
    b = small.generate(mel, temperature=1.0, seed=7, max_new_tokens=10)
    c = small.generate(mel, temperature=1.0, seed=8, max_new_tokens=10)
    greedy = small.generate(mel, max_new_tokens=10)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert [r.tokens for r in a] != [r.tokens for r in c] or [r.tokens for r in a] != [r.tokens for r in greedy]
    assert all(r.temperature == 1.0 for r in a)


def test_bad_input(small, tmp_path):
    mel = random_mel(SMALL, batch=1, seed=27)
    with pytest.raises(ValueError, match="empty batch"):
        small.generate(mel[:0])
    with pytest.raises(ValueError, match="mel must be"):
        small.generate(mel[:, :40])
    with pytest.raises(ValueError, match="mel must be"):
        small.generate(mel[..., :-2])
    with pytest.raises(ValueError, match="max_new_tokens"):
        small.generate(mel, max_new_tokens=SMALL.n_text_ctx)
    with pytest.raises(ValueError, match="prompt has"):
        small.generate(mel, prompt=list(range(SMALL.n_text_ctx)))
    with pytest.raises(ValueError, match="not a text token"):
        small.generate(mel, prefix=[small.tokenizer.sot])
    with pytest.raises(ValueError, match="positions"):
        small.generate(mel, edits=Edits().add("decoder.blocks.0.resid_post", torch.ones(64), positions=[1]))
    with pytest.raises(ValueError, match="beam search is deterministic"):
        small.generate(mel, beam_size=2, temperature=0.5)
    with pytest.raises(ValueError, match="unknown language"):
        small.generate(mel, language="klingon")
    xa = torch.zeros(1, SMALL.n_audio_ctx, SMALL.n_audio_state)
    with pytest.raises(ValueError, match="either mel or audio_features"):
        small.generate()
    with pytest.raises(ValueError, match="either mel or audio_features"):
        small.generate(mel, audio_features=xa)
    with pytest.raises(ValueError, match="audio_features must be"):
        small.generate(audio_features=xa[:, :-1])
    with pytest.raises(ValueError, match="empty batch"):
        small.generate(audio_features=xa[:0])
    with pytest.raises(ValueError, match="skip the encoder"):
        small.generate(audio_features=xa, trace=["encoder.blocks.0.resid_post"])
    with pytest.raises(ValueError, match="skip the encoder"):
        small.generate(audio_features=xa, edits=Edits().skip("encoder", 0))
    with pytest.raises(ValueError, match="skip the encoder"):
        small.generate(audio_features=xa, edits=Edits().local_window(3))
    bare = load_model(save_model(small, tmp_path / "bare"))
    bare.tokenizer = None  # n_vocab 51865 gets OpenAI's tokenizer; a model of an unknown vocabulary has none
    with pytest.raises(ValueError, match="no tokenizer"):
        bare.generate(mel)
