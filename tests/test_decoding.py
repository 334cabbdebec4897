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


@pytest.mark.parametrize("beam_size", [None, 3])
def test_rows_that_are_done_leave_the_batch_without_changing_a_result(small, beam_size, monkeypatch):
    """On the CPU an untraced call drops finished rows from its cache; a traced call keeps every row (fixed
    shapes). Both give the same tokens, scores and per-token log-probabilities, and the drop happens."""
    from whisper_lens.decoding import DecoderCache

    mel = varied_mel(8, seed=23)
    kept = []
    take_rows = DecoderCache.take_rows
    monkeypatch.setattr(DecoderCache, "take_rows", lambda self, rows: kept.append(len(rows)) or take_rows(self, rows))
    dropping = small.generate(mel, beam_size=beam_size, max_new_tokens=20)
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < 8 * (beam_size or 1)  # the batch shrank
    kept.clear()
    fixed = small.generate(mel, beam_size=beam_size, max_new_tokens=20, trace=["logits"])
    assert not kept  # traced: every row of every step
    assert len({len(r.tokens) for r in fixed}) > 2  # rows finish at different steps
    for a, b in zip(dropping, fixed, strict=True):
        assert a.tokens == b.tokens
        assert a.sum_logprob == pytest.approx(b.sum_logprob, rel=1e-6, abs=1e-5)  # a sum of up to 20 terms of ~-9
        assert a.no_speech_prob == pytest.approx(
            b.no_speech_prob, abs=1e-6
        )  # the prompt's logits at 2 positions, or all
        torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("beam_size", [None, 2])
def test_clips_at_different_decoder_depths_decode_as_each_alone(small, beam_size):
    """``decoder_blocks`` per clip (deepest first) gives each clip the tokens of ``Edits().skip`` of the blocks
    past its depth, decoded alone; 0 blocks is the embedding read out through ``ln``."""
    from whisper_lens import Edits

    L = SMALL.n_text_layer
    mel = varied_mel(6, seed=24)
    depths = [3, 3, 2, 1, 1, 0]
    together = small.generate(mel, beam_size=beam_size, max_new_tokens=15, decoder_blocks=depths)
    assert len({tuple(r.tokens) for r in together}) > 3  # the depths answer differently
    for i, d in enumerate(depths):
        edits = Edits().skip("decoder", list(range(d, L))) if d < L else None
        alone = small.generate(mel[i], beam_size=beam_size, max_new_tokens=15, edits=edits)[0]
        assert together[i].tokens == alone.tokens, f"clip {i}, depth {d}"
        assert together[i].sum_logprob == pytest.approx(alone.sum_logprob, rel=1e-6, abs=1e-5)
    same = small.generate(mel[:2], beam_size=beam_size, max_new_tokens=15, decoder_blocks=2)  # one depth for all
    assert [r.tokens for r in same] == [r.tokens for r in small.generate(mel[:2], beam_size=beam_size,
                                        max_new_tokens=15, edits=Edits().skip("decoder", [2]))]  # fmt: skip


def test_decoder_blocks_bad_input(small):
    mel = varied_mel(3, seed=25)
    with pytest.raises(ValueError, match="must not increase from clip to clip"):
        small.generate(mel, decoder_blocks=[1, 2, 0])
    with pytest.raises(ValueError, match="ints from 0 to 3"):
        small.generate(mel, decoder_blocks=[4, 2, 0])
    with pytest.raises(ValueError, match="ints from 0 to 3"):
        small.generate(mel, decoder_blocks=True)
    with pytest.raises(ValueError, match="has 2 entries for 3 clips"):
        small.generate(mel, decoder_blocks=[2, 1])
    with pytest.raises(ValueError, match="cannot be traced"):
        small.generate(mel, decoder_blocks=[2, 2, 1], trace=["logits"])


@pytest.mark.parametrize("beam_size", [None, 2])
def test_rows_of_one_clip_decode_as_each_alone_and_share_its_audio(small, beam_size, monkeypatch):
    """``clips=``: rows decoding the same clip under settings given per row (depth, prompt) get the tokens and
    scores of that clip decoded alone with those settings; the clip's audio is encoded once and each layer
    holds its keys and values once, however many rows read them."""
    from whisper_lens import Edits
    from whisper_lens.decoding import KVCache

    L = SMALL.n_text_layer
    mel = varied_mel(3, seed=26)
    clips, depths = [2, 0, 2, 1, 0, 2, 1], [3, 3, 3, 2, 2, 1, 0]
    prompts = ["a b c", None, None, [100, 200], None, "x", None]
    held, encoded = [], []
    holding, encoder = KVCache.holding.__func__, type(small.encoder).forward
    monkeypatch.setattr(KVCache, "holding", classmethod(lambda cls, *a: held.append(holding(cls, *a)) or held[-1]))
    monkeypatch.setattr(
        type(small.encoder),
        "forward",
        lambda self, m, *a: encoded.append(0 if m.is_meta else len(m)) or encoder(self, m, *a),
    )
    together = small.generate(mel, clips=clips, decoder_blocks=depths, prompt=prompts, beam_size=beam_size,
                              max_new_tokens=15)  # fmt: skip
    assert [n for n in encoded if n] == [3]  # each clip encoded once (0: the shapes, found on the meta device)
    assert [c.rows for c in held] == [6, 5, 3]  # per layer, the rows that run it (depths > 0, > 1, > 2) ...
    assert [c.k.shape[0] for c in held] == [3, 3, 2]  # ... read the audio of these clips, held once each
    monkeypatch.undo()
    assert len({tuple(r.tokens) for r in together}) > 4  # the settings answer differently
    for i, (c, d, p) in enumerate(zip(clips, depths, prompts, strict=True)):
        edits = Edits().skip("decoder", list(range(d, L))) if d < L else None
        alone = small.generate(mel[c], beam_size=beam_size, max_new_tokens=15, edits=edits, prompt=p)[0]
        assert together[i].tokens == alone.tokens, f"row {i}: clip {c}, depth {d}"
        assert together[i].sum_logprob == pytest.approx(alone.sum_logprob, rel=1e-6, abs=1e-5)
        assert together[i].no_speech_prob == pytest.approx(alone.no_speech_prob, abs=1e-6)


def test_rows_of_one_clip_are_traced_as_each_alone(small):
    """A traced call with ``clips=`` gives each row the trace of its clip decoded alone with its settings:
    the encoder's names and the audio's keys and values are its clip's, the decoder's its own."""
    mel = varied_mel(2, seed=28)
    names = ["encoder.blocks.1.resid_post", "decoder.blocks.0.cross_attn.k", "decoder.blocks.1.cross_attn.pattern",
             "decoder.blocks.2.attn.pattern", "logits"]  # fmt: skip
    clips, prompts = [1, 0, 1], [None, None, "a b"]
    together = small.generate(mel, clips=clips, prompt=prompts, max_new_tokens=8, trace=names)
    for i, (c, p) in enumerate(zip(clips, prompts, strict=True)):
        alone = small.generate(mel[c], prompt=p, max_new_tokens=8, trace=names)[0]
        assert together[i].tokens == alone.tokens
        for name in names:
            torch.testing.assert_close(together[i].trace[name], alone.trace[name], atol=1e-4, rtol=1e-4, msg=name)


def test_clips_bad_input(small):
    mel = varied_mel(3, seed=27)
    with pytest.raises(ValueError, match="clips has 3, but the batch has 3 clips"):
        small.generate(mel, clips=[0, 3])
    with pytest.raises(ValueError, match="clips is empty"):
        small.generate(mel, clips=[])
    with pytest.raises(ValueError, match="ints >= 0"):
        small.generate(mel, clips=[0, True])
    with pytest.raises(ValueError, match="ints >= 0"):
        small.generate(mel, clips=[-1])
    with pytest.raises(TypeError, match="clips must be a list"):
        small.generate(mel, clips=2)
    with pytest.raises(ValueError, match="has 3 entries for 4 clips"):
        small.generate(mel, clips=[0, 0, 1, 1], decoder_blocks=[3, 2, 1])


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


def test_trace_with_skipped_blocks_equals_run(small):
    """A skipped block (encoder or decoder) computes nothing: generate's trace holds only its streams, as run's."""
    mel = varied_mel(2, seed=45)
    edits = Edits().skip("encoder", 2).skip("decoder", 0)
    results = small.generate(mel, max_new_tokens=6, trace=True, edits=edits)
    for i, r in enumerate(results):
        tokens = torch.tensor(initial_tokens(small, r, False) + r.tokens)
        with torch.no_grad():
            run = small.run(mel[i], tokens, trace=True, edits=edits)
        assert r.trace.names() == run.trace.names()
        assert "encoder.blocks.2.resid_post" in run.trace and "encoder.blocks.2.attn.pattern" not in run.trace
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
        assert r.tokens, "the edited model writes something for this clip"
        steps = run.logits[0, len(tokens) - len(r.tokens) - 1 : -1].argmax(-1)
        assert (steps == tokens[-len(r.tokens) :]).float().mean() > 0.5
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
    """The packed copies of the weights (``Kernels.for_decoding``) are made per call: an edit through ``.data``
    (which no version counter sees) changes the next generate exactly as it changes ``run``; and generate
    sets nothing on the modules."""
    modules = {name: dict(vars(m)) for name, m in small.named_modules()}
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
    assert {name: dict(vars(m)) for name, m in small.named_modules()} == modules


def test_compiled_step_gives_the_same_tokens(small):
    mel = varied_mel(2, seed=31)
    plain = small.generate(mel, max_new_tokens=6)
    compiled = small.generate(mel, max_new_tokens=6, compile=True)
    assert [r.tokens for r in compiled] == [r.tokens for r in plain]


def test_sampling_draws_from_the_tempered_distribution(small):
    """Sampling with a seed replays by hand: each token is torch.multinomial's draw from softmax(logits / T)
    of the teacher-forced logits (with openai-whisper's always-suppressed specials removed), same generator."""
    mel, T, seed = varied_mel(1, seed=26), 0.8, 7
    options = {"temperature": T, "seed": seed, "max_new_tokens": 10, "suppress_tokens": None, "suppress_blank": False}
    result = small.generate(mel, **options)[0]
    assert small.generate(mel, **options)[0].tokens == result.tokens  # reproducible
    assert result.temperature == T and len(result.tokens) >= 3
    tok = small.tokenizer
    banned = [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech]
    gen = torch.Generator().manual_seed(seed)
    seq, replay = initial_tokens(small, result, False), []
    while len(replay) < 10:
        with torch.no_grad():
            logits = small.run(mel, torch.tensor([seq])).logits[0, -1]  # (V,)
        logits[banned] = float("-inf")
        nxt = int(torch.multinomial(torch.softmax(logits / T, dim=-1)[None], 1, generator=gen)[0, 0])
        if nxt == tok.eot:
            break
        replay.append(nxt)
        seq.append(nxt)
    assert replay == result.tokens


# ----------------------------------------------------------------------------- one prompt and language per clip

# clip 0: text; 1: nothing; 2: token ids (20 of them: its default limit, what the 48-token context leaves, is lower);
# 3: a short text. Languages: given, identified, given, identified.
PROMPTS = ["hello there friend", None, list(range(1000, 1020)), "so"]
LANGUAGES = ["fr", None, "de", None]


@pytest.mark.parametrize("beam_size", [None, 3])
def test_a_prompt_per_clip_gives_each_clip_its_tokens_alone(small, beam_size):
    """Clips with prompts of different lengths decode together exactly as each alone (tokens, scores, trace)."""
    mel = varied_mel(4, seed=40)
    names = ["logits", "decoder.blocks.1.attn.pattern", "decoder.blocks.2.attn.k"]
    together = small.generate(mel, prompt=PROMPTS, language=LANGUAGES, beam_size=beam_size, trace=names)
    plain = small.generate(mel, beam_size=beam_size)
    assert [r.tokens for r in together] != [r.tokens for r in plain]  # the prompts change the transcripts
    assert together[2].language == "de" and together[1].language_probs is not None
    for i in range(4):
        alone = small.generate(mel[i], prompt=PROMPTS[i], language=LANGUAGES[i], beam_size=beam_size)[0]
        got = together[i]
        assert got.tokens == alone.tokens, f"clip {i}"
        assert got.language == alone.language and (got.language_probs is None) == (LANGUAGES[i] is not None)
        assert abs(got.avg_logprob - alone.avg_logprob) < 1e-5 and abs(got.no_speech_prob - alone.no_speech_prob) < 1e-5
        torch.testing.assert_close(
            torch.tensor(got.token_logprobs), torch.tensor(alone.token_logprobs), atol=1e-5, rtol=0
        )
        fed = torch.tensor(prompt_of(small, got, PROMPTS[i]) + got.tokens)
        with torch.no_grad():
            run = small.run(mel[i], fed, trace=names)
        for name in names:  # the stitched trace is the teacher-forced one: positions follow each clip's prompt
            torch.testing.assert_close(got.trace[name], run.trace[name], atol=1e-5, rtol=0, msg=name)
    assert len(together[2].tokens) <= SMALL.n_text_ctx - len(prompt_of(small, together[2], PROMPTS[2]))


def prompt_of(model, result, prompt) -> list[int]:
    """The tokens generate fed before ``result``'s transcript, written out by hand (text mode, no prefix)."""
    tok = model.tokenizer
    previous = (
        [] if prompt is None else [tok.sot_prev, *(tok.encode(" " + prompt) if isinstance(prompt, str) else prompt)]
    )
    return [*previous, *tok.sot_sequence_for(result.language, "transcribe"), tok.no_timestamps]


@pytest.mark.parametrize("beam_size", [None, 3])
def test_a_prompt_per_clip_equals_openai_whisper(tmp_path, beam_size):
    ref, ours = pair(TINY, 17, tmp_path, MULTI)
    mel = random_mel(TINY, batch=2, seed=18)
    prompts, languages = ["hello there", [1012, 2345, 220, 4000]], [None, "fr"]
    got = ours.generate(mel, prompt=prompts, language=languages, beam_size=beam_size, max_new_tokens=SAMPLE_LEN)
    for i in range(2):
        options = wd.DecodingOptions(fp16=False, sample_len=SAMPLE_LEN, without_timestamps=True, prompt=prompts[i],
                                     language=languages[i], beam_size=beam_size)  # fmt: skip
        want = wd.decode(ref, mel[i], options)
        assert got[i].tokens == want.tokens, f"clip {i}"
        assert got[i].language == want.language
        assert abs(got[i].avg_logprob - want.avg_logprob) < 1e-4
    assert max(len(r.tokens) for r in got) > 0


@pytest.mark.parametrize("beam_size", [None, 3])
def test_token_logprobs_are_those_of_the_filtered_teacher_forced_logits(small, beam_size):
    """``token_logprobs[j]``: log-softmax at the position before token j, the always-suppressed specials removed."""
    mel = varied_mel(3, seed=43)
    results = small.generate(mel, beam_size=beam_size, max_new_tokens=12, suppress_tokens=None, suppress_blank=False)
    tok = small.tokenizer
    banned = [tok.transcribe, tok.translate, tok.sot, tok.sot_prev, tok.sot_lm, tok.no_speech]
    assert sum(len(r.tokens) for r in results) > 10
    for i, r in enumerate(results):
        assert len(r.token_logprobs) == len(r.tokens)
        fed = initial_tokens(small, r, False) + r.tokens
        with torch.no_grad():
            logits = small.run(mel[i], torch.tensor(fed)).logits[0]  # (T, V)
        logits[:, banned] = float("-inf")
        logp = logits.log_softmax(dim=-1)[len(fed) - len(r.tokens) - 1 : -1]  # (n, V): the positions before
        want = logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.token_logprobs), want, atol=1e-4, rtol=0)
        eot = logits.log_softmax(dim=-1)[-1, tok.eot] if len(r.tokens) < 12 else 0.0  # ended by EOT, or the limit
        assert abs(sum(r.token_logprobs) + float(eot) - r.sum_logprob) < 1e-4


# ----------------------------------------------------------------------------- kernels and threads


@pytest.mark.parametrize("beam_size", [None, 3])
def test_textbook_kernels_give_the_same_tokens_and_logits(small, beam_size):
    """``kernels.textbook()`` (F.linear everywhere) and the fast paths (oneDNN, the packed unembedding) decode alike.

    On these small widths oneDNN and MKL may sum in the same order and agree to the bit, so equality
    is allowed; ``test_parity`` checks that the packed products are computed (and correct)."""
    from whisper_lens.model import textbook

    mel = varied_mel(8, seed=41)
    fast = small.generate(mel, beam_size=beam_size, max_new_tokens=12, trace=["logits"])
    with textbook():
        plain = small.generate(mel, beam_size=beam_size, max_new_tokens=12, trace=["logits"])
        untraced = small.generate(mel, beam_size=beam_size, max_new_tokens=12)
    assert [r.tokens for r in fast] == [r.tokens for r in plain] == [r.tokens for r in untraced]
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a.trace["logits"], b.trace["logits"], atol=1e-5, rtol=0)


def test_without_onednn_private_ops_the_tokens_are_the_same(small, monkeypatch):
    """oneDNN's private ops are used only after a check that runs them; removed, the public ops give the same tokens."""
    import types

    from whisper_lens import fastpaths
    from whisper_lens.decoding import packed as kernels

    mel = varied_mel(8, seed=44)
    runs = {}
    for removed in (False, True):
        with monkeypatch.context() as m:
            if removed:
                m.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # no _linear_pointwise, no _reorder_...
            kernels.onednn_available.cache_clear()
            assert kernels.onednn_available() is not removed
            with fastpaths.forced(unembedding="packed"):  # packed wherever oneDNN is there, whatever the timing
                with torch.no_grad():
                    assert bool(kernels.Kernels.for_decoding(small.decoder, 8).packed) is not removed
                runs[removed] = [small.generate(mel, beam_size=b, max_new_tokens=12) for b in (None, 2)]
        kernels.onednn_available.cache_clear()
    for with_ops, without in zip(runs[False], runs[True], strict=True):
        assert [r.tokens for r in with_ops] == [r.tokens for r in without]


def test_threads_share_one_model(small):
    """Four threads decoding with one model at once (batch and beam sizes differ) get the sequential tokens."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [
        (varied_mel(1, seed=50), None, None),
        (varied_mel(3, seed=51), 2, None),
        (varied_mel(8, seed=52), None, ["logits"]),
        (varied_mel(2, seed=53), 4, None),
    ]

    def decode(job) -> list[list[int]]:
        mel, beam_size, trace = job
        return [r.tokens for r in small.generate(mel, beam_size=beam_size, max_new_tokens=12, trace=trace)]

    want = [decode(job) for job in jobs]
    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(decode, jobs)) == want


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
    with pytest.raises(ValueError, match="positions"):  # a value for two positions, one named
        small.generate(mel, edits=Edits().add("decoder.blocks.0.resid_post", torch.ones(1, 2, 64), positions=[1]))
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
