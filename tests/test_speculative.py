"""Speculative greedy decoding gives the plain loop's results: tokens, log-probabilities, no-speech probability.

A draft only decides how many tokens one fp32 pass yields; every token is chosen from the fp32
logits by the plain loop's rules. So the results must equal the plain loop's whatever the draft:
the bf16 copy on the real tiny.en and real speech, the fp32 model itself (every guess accepted),
and a random-weight decoder (almost every guess rejected). Token log-probabilities differ only by
the rounding of k + 1 rows in one product instead of one (checked within 1e-5).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from whisper_lens import fastpaths, load_model
from whisper_lens.audio import load_windows
from whisper_lens.decoding import filter_logits, make_plan
from whisper_lens.decoding import speculative as sp
from whisper_lens.model import ModelDims

from .conftest import ending_model, openai_model, save_openai

whisper = pytest.importorskip("whisper")

MULTI = os.path.join(os.path.dirname(whisper.__file__), "assets", "multilingual.tiktoken")
KINDS = ["copy", "head"]  # bf16; "int8" (the head in int8) is checked on real speech at batch 8 and on odd shapes
SHIPPED = Path(__file__).resolve().parent.parent / "whisper_lens" / "assets" / "speech"
# odd shapes: 5 heads of 8, three decoder blocks over a 24-position audio, a 40-token context
ODD = ModelDims(n_mels=80, n_audio_ctx=24, n_audio_state=40, n_audio_head=5, n_audio_layer=1, n_vocab=51865,
                n_text_ctx=40, n_text_state=40, n_text_head=5, n_text_layer=3)  # fmt: skip


def assert_same(plain, spec) -> None:
    """Every field of each result equal; log-probabilities within the rounding of a different row count."""
    assert len(plain) == len(spec)
    for a, b in zip(plain, spec, strict=True):
        assert b.tokens == a.tokens
        assert (b.text, b.language, b.temperature, b.compression_ratio) == (
            a.text, a.language, a.temperature, a.compression_ratio)  # fmt: skip
        assert b.language_probs == a.language_probs
        assert len(b.token_logprobs) == len(a.token_logprobs) == len(a.tokens)
        torch.testing.assert_close(torch.tensor(b.token_logprobs), torch.tensor(a.token_logprobs), atol=1e-5, rtol=1e-5)
        assert math.isclose(b.sum_logprob, a.sum_logprob, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(b.avg_logprob, a.avg_logprob, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(b.no_speech_prob, a.no_speech_prob, rel_tol=1e-5, abs_tol=1e-6)


# ----------------------------------------------------------------------------- the real tiny.en on real speech


@pytest.fixture(scope="module")
def real_features(real_tiny_en, real_clips) -> torch.Tensor:
    """The encoder output of every shipped and test clip: (17, 1500, 384)."""
    paths = sorted(SHIPPED.glob("*.flac")) + [p for p, _ in real_clips]
    mels = load_windows(paths, 80, 3000)[0]  # (17, 80, 3000)
    with torch.no_grad():
        return real_tiny_en.encoder(mels)


@pytest.fixture(scope="module")
def plain_results(real_tiny_en, real_features) -> dict[bool, list]:
    """The plain loop's results for every clip, one clip at a time, without and with timestamps (a batch of
    clips gives each the tokens it gets alone: tests/test_decoding.py)."""
    return {ts: [real_tiny_en.generate(audio_features=xa[None], timestamps=ts)[0] for xa in real_features]
            for ts in (False, True)}  # fmt: skip


@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("batch", [1, 8])
def test_real_speech_gives_the_plain_loops_results(real_tiny_en, real_features, plain_results, timestamps, batch):
    """Both bf16 drafts of the real tiny.en (the decoder's copy, its head), and at batch 8 the int8 head, over
    every clip: results equal, and most guesses accepted."""
    kinds = KINDS + ["int8"] if batch == 8 else KINDS
    assert sp.draft_for(real_tiny_en, "int8") is not None  # the CPU build tested has torch's int8 linear layer
    accepted, proposed = dict.fromkeys(kinds, 0), dict.fromkeys(kinds, 0)
    for first in range(0, len(real_features), batch):
        xa = real_features[first : first + batch]
        plain = plain_results[timestamps][first : first + batch]
        for kind in kinds:
            draft = sp.draft_for(real_tiny_en, kind)
            spec, pace = sp.decode(real_tiny_en, audio_features=xa, timestamps=timestamps, draft=draft, guesses=4)
            assert_same(plain, spec)
            assert pace.emitted == sum(len(r.tokens) + 1 for r in plain)  # every token and each EOT
            accepted[kind] += pace.accepted
            proposed[kind] += pace.accepted + pace.rejected
    for kind in kinds:  # bf16 and int8 agree with fp32 nearly always (not needed for equality: for the speed)
        assert accepted[kind] > 0.8 * proposed[kind], kind


def test_adaptive_pace_gives_the_plain_loops_results(real_tiny_en, real_features):
    """Without a fixed number of guesses (k chosen from this machine's timings), the same results."""
    xa = real_features[:3]
    spec, pace = sp.decode(real_tiny_en, audio_features=xa, timestamps=True)
    assert_same(real_tiny_en.generate(audio_features=xa, timestamps=True), spec)
    assert pace.emitted == sum(len(r.tokens) + 1 for r in spec)


# ----------------------------------------------------------------------------- random weights, odd shapes


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """A random model of odd shapes whose end-of-text is made likelier (rows end at various lengths)."""
    return ending_model(ODD, 5, 2.0, tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def odd_mel() -> torch.Tensor:
    """Eight clips that differ in level and spread, so the model answers each differently: (8, 80, 48)."""
    g = torch.Generator().manual_seed(6)
    mel = torch.randn(8, ODD.n_mels, 2 * ODD.n_audio_ctx, generator=g)
    return mel * torch.linspace(0.2, 3, 8)[:, None, None] + torch.linspace(-1, 1, 8)[:, None, None]


def itself(model, kind: str) -> sp.Draft:
    """The fp32 decoder (or its unembedding) as its own draft: every guess is the fp32 token."""
    if kind == "head":
        return sp.Draft(None, torch.float32, (), head=model.decoder.token_embedding.weight)
    return sp.Draft(model.decoder, torch.float32, ())


def stranger(tmp_path, kind: str) -> sp.Draft:
    """The decoder (or unembedding) of another random model of the same shape: its guesses are (almost) never
    the fp32 token."""
    other = load_model(save_openai(openai_model(ODD, seed=99), tmp_path / "other.pt"), tokenizer=MULTI)
    if kind == "head":
        return sp.Draft(None, torch.float32, (), head=other.decoder.token_embedding.weight)
    return sp.Draft(other.decoder, torch.float32, ())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timestamps", [False, True])
@pytest.mark.parametrize("guesses", [2, 3, 7])
def test_a_draft_that_always_agrees(odd, odd_mel, timestamps, guesses, kind):
    """Every guess accepted: each pass emits k + 1 tokens, and rows end (EOT or max_new_tokens) inside proposals."""
    options = dict(timestamps=timestamps, max_new_tokens=17, language="en")
    plain = odd.generate(odd_mel, **options)
    spec, pace = sp.decode(odd, odd_mel, draft=itself(odd, kind), guesses=guesses, **options)
    assert_same(plain, spec)
    assert pace.rejected == 0 and pace.accepted > 0
    lengths = [len(r.tokens) for r in plain]
    assert len(set(lengths)) > 2  # rows end at different selections
    # a row ends inside a proposal when its last token (EOT, or the 17th) is not the last of a pass's k + 1
    ends = [n + 1 if n < 17 else n for n in lengths]  # tokens taken, EOT included
    assert any((e - 1) % (guesses + 1) for e in ends)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("timestamps", [False, True])
def test_a_draft_that_always_disagrees(odd, odd_mel, timestamps, kind, tmp_path):
    """A random-weight draft: guesses rejected, each pass emits the fp32 token alone; results equal."""
    options = dict(timestamps=timestamps, max_new_tokens=17, language="en")
    plain = odd.generate(odd_mel, **options)
    spec, pace = sp.decode(odd, odd_mel, draft=stranger(tmp_path, kind), guesses=3, **options)
    assert_same(plain, spec)
    assert pace.accepted < 0.2 * (pace.accepted + pace.rejected)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_rows_decode_as_each_alone(odd, odd_mel, kind):
    """Rows accept different counts in one batch; each row's result is the one it gets alone."""
    options = dict(timestamps=True, max_new_tokens=17, language="en", guesses=3, draft=sp.draft_for(odd, kind))
    together, _ = sp.decode(odd, odd_mel, **options)
    for i in range(len(odd_mel)):
        alone, _ = sp.decode(odd, odd_mel[i : i + 1], **options)
        assert_same(alone, together[i : i + 1])


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_of_different_lengths(odd, odd_mel, kind):
    """Clips with prompts (previous text) of different lengths: each row at its own positions."""
    options = dict(prompt=["hello there", None, "a b c d e f", None], max_new_tokens=12, language="en")
    plain = odd.generate(odd_mel[:4], **options)
    spec, _ = sp.decode(odd, odd_mel[:4], draft=itself(odd, kind), guesses=5, **options)
    assert_same(plain, spec)


# ----------------------------------------------------------------------------- pieces


def test_filter_rows_equals_filter_logits_row_by_row(odd):
    """The per-row-length filters give each row what ``filter_logits`` gives it alone with its own history."""
    from whisper_lens.decoding import DecodingOptions

    tok = odd.tokenizer
    plan = make_plan(odd, DecodingOptions(timestamps=True, language="en"), n_clips=1)
    g = torch.Generator().manual_seed(3)
    M, W, V = 40, 6, odd.dims.n_vocab
    ts = tok.timestamp_begin
    # histories mixing text and timestamps (pairs, lone ones, decreasing ones), each row its own length
    sampled = torch.where(torch.rand(M, W, generator=g) < 0.5, torch.randint(ts, ts + 60, (M, W), generator=g),
                          torch.randint(0, 1000, (M, W), generator=g))  # fmt: skip
    n = torch.randint(0, W + 1, (M,), generator=g)
    logits = torch.randn(M, V, generator=g) * 3
    logits[::3, ts:] += 4  # some rows where timestamps are likelier
    vocab = torch.arange(V)
    got = sp.filter_rows(logits.clone(), sampled, n, plan, tok, vocab)
    for r in range(M):
        want = filter_logits(logits[r : r + 1].clone(), sampled[r : r + 1, : n[r]], plan, tok, vocab)
        assert torch.equal(got[r : r + 1], want), r


def test_the_draft_is_made_once_kept_off_the_model_and_made_again_after_an_edit(odd):
    keys = set(odd.state_dict())
    attributes = set(vars(odd))
    draft, head, int8 = sp.draft_for(odd), sp.draft_for(odd, "head"), sp.draft_for(odd, "int8")
    assert sp.draft_for(odd) is draft and sp.draft_for(odd, "head") is head and sp.draft_for(odd, "int8") is int8
    assert draft.decoder.token_embedding.weight.dtype == head.head.dtype == torch.bfloat16
    assert (draft.kind, head.kind, int8.kind) == ("copy", "head", "int8")
    x = torch.randn(3, ODD.n_text_state)  # the int8 head's logits follow the fp32 unembedding's to within int8's steps
    fp32 = x @ odd.decoder.token_embedding.weight.T  # (3, V)
    assert (int8.head_logits(x) - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert set(odd.state_dict()) == keys and set(vars(odd)) == attributes  # nothing set on the model
    with torch.no_grad():
        odd.decoder.blocks[0].mlp[0].weight.mul_(1.0)  # an in-place edit (same values, new version)
    assert sp.draft_for(odd) is not draft and sp.draft_for(odd, "head") is not head
    assert sp.draft_for(odd, "int8") is not int8


def test_pace_switches_drafting_off_when_it_does_not_pay():
    """The policy alone, on given measurements: no guesses for a draft that disagrees or costs as much as fp32;
    many for a cheap draft that agrees; none beyond what the rows may still take."""
    ones = torch.ones(1, dtype=torch.long)
    pace = sp.Pace()
    assert pace.next_k(room=10) == 0  # the first round is a plain step
    pace.record(0, 0.0, 0.010, ones * 0, ones)
    assert pace.next_k(room=10) == sp.FIRST_GUESSES
    pace.record(4, 4 * 0.003, 0.012, ones * 4, ones * 5)
    for _ in range(20):
        pace.record(4, 4 * 0.003, 0.012, ones * 4, ones * 5)
    assert pace.next_k(room=10) == sp.MAX_GUESSES  # cheap and always right
    assert pace.next_k(room=2) == 2
    disagrees = sp.Pace(rounds=5, draft_s=0.003, verify_s={0: 0.010, 4: 0.012}, accepted=0, rejected=40)
    assert disagrees.next_k(room=10) == 0
    costly = sp.Pace(rounds=5, draft_s=0.010, verify_s={0: 0.010, 4: 0.012}, accepted=30, rejected=10)
    assert costly.next_k(room=10) == 0


@pytest.mark.parametrize("choice", ["plain", "copy", "head", "int8"])
def test_every_choice_of_the_measured_fast_path_gives_the_same_numbers(odd, odd_mel, choice):
    """Whatever the one-off timing chose on this machine (a kind of draft, or none), the results are the same."""
    options = dict(timestamps=True, max_new_tokens=17, language="en")
    with fastpaths.forced(draft=choice):
        spec, pace = sp.decode(odd, odd_mel, **options)
    assert_same(odd.generate(odd_mel, **options), spec)
    assert (pace.accepted + pace.rejected == 0) == (choice == "plain")  # plain: plain steps, nothing guessed


def test_calibration_times_each_kind_and_the_plain_step(odd):
    """The one-off timing gives seconds per token for the plain step and each kind of draft."""
    seconds = sp.calibrate(odd, rows=2, repeats=1)
    assert set(seconds) == {"plain", "copy", "head", "int8"} and all(0 < s < math.inf for s in seconds.values())


# ----------------------------------------------------------------------------- generate and transcribe


@pytest.mark.parametrize("kind", KINDS)
def test_generate_speculative_gives_the_plain_loops_results(odd, odd_mel, kind, monkeypatch):
    """``generate(speculative=True)`` with a draft chosen gives the plain loop's results; beam search keeps it."""
    monkeypatch.setattr(sp, "chosen_draft", lambda model, rows: sp.draft_for(model, kind))
    options = dict(timestamps=True, max_new_tokens=17, language="en")
    assert_same(odd.generate(odd_mel, **options), odd.generate(odd_mel, speculative=True, **options))
    beams = dict(options, beam_size=2)  # beam search keeps the plain loop
    assert [r.tokens for r in odd.generate(odd_mel, speculative=True, **beams)] == [
        r.tokens for r in odd.generate(odd_mel, **beams)]  # fmt: skip


def test_transcribe_gives_the_same_segments_and_words(real_tiny_en, monkeypatch):
    """Long-form transcription with word timestamps, its greedy passes speculative or not: the same segments
    (text, times, tokens, log-probabilities) and the same words."""
    monkeypatch.setattr(sp, "chosen_draft", lambda model, rows: sp.draft_for(model, "head"))
    clips = [str(p) for p in sorted(SHIPPED.glob("*.flac"))[:2]]
    plain = real_tiny_en.transcribe(clips, word_timestamps=True)
    spec = real_tiny_en.transcribe(clips, word_timestamps=True, speculative=True)
    for a, b in zip(plain, spec, strict=True):
        assert b.text == a.text and len(b.segments) == len(a.segments) > 0
        for x, y in zip(a.segments, b.segments, strict=True):
            assert (y.start, y.end, y.text, y.tokens, y.temperature) == (
                x.start,
                x.end,
                x.text,
                x.tokens,
                x.temperature,
            )
            assert math.isclose(y.avg_logprob, x.avg_logprob, rel_tol=1e-5, abs_tol=1e-5)
            assert [(w.word, w.start, w.end) for w in y.words] == [(w.word, w.start, w.end) for w in x.words]
            p, q = torch.tensor([w.probability for w in y.words]), torch.tensor([w.probability for w in x.words])
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
