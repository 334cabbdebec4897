"""Hallucination experiments: the non-speech signals, the rows and rates, the head sweep, the lens along a loop.

Signals and metrics are checked against numbers worked out by hand (levels, frequencies, pulse
counts, repeats, decision layers); the head sweep against ``generate`` with the same edit; the real
tiny.en against openai-whisper on the same weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import whisper_lens as wl
from whisper_lens.audio import SAMPLE_RATE, load_windows
from whisper_lens.experiments import wer
from whisper_lens.hallucination import (
    decision_layers,
    decision_summary,
    decoder_heads,
    hallucination_rate,
    hallucination_rows,
    head_summary,
    head_sweep,
    non_speech,
    repeated_tokens,
    repetition_lens,
    skipped_as_silence,
)
from whisper_lens.lens import sot_lens

from .test_lens import _inputs, byte_model  # noqa: F401  (fixture)


def db(x: np.ndarray) -> float:
    return 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_non_speech_signals_by_hand():
    signals = non_speech(seconds=10.0, seed=0)
    assert list(signals) == ["silence", "white-50dB", "white-30dB", "pink-50dB", "pink-30dB", "tone-440Hz",
                             "tone-1kHz", "hum-50Hz", "hum-60Hz", "clicks-1Hz", "clicks-4Hz"]  # fmt: skip
    assert all(x.dtype == np.float32 and x.shape == (160_000,) for x in signals.values())
    assert not signals["silence"].any()
    # levels: RMS in dB of full scale (the 10 ms fades take 0.13 % of the energy: -0.006 dB)
    for name, level in [("white-50dB", -50), ("white-30dB", -30), ("pink-30dB", -30), ("tone-440Hz", -20),
                        ("hum-60Hz", -20)]:  # fmt: skip
        assert db(signals[name]) == pytest.approx(level, abs=0.02), name
    # tones and hum: spectral peaks where they belong (0.1 Hz bins), the hum's harmonics at 1, 1/2, 1/3, 1/4
    spectrum = {name: np.abs(np.fft.rfft(signals[name])) for name in ("tone-440Hz", "tone-1kHz", "hum-50Hz")}
    assert np.argmax(spectrum["tone-440Hz"]) / 10 == 440.0 and np.argmax(spectrum["tone-1kHz"]) / 10 == 1000.0
    hum = spectrum["hum-50Hz"]
    assert hum[[500, 1000, 1500, 2000]] / hum[500] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4], rel=1e-3)
    # pink: power falls as 1/f, a slope of -1 in log-log between 20 Hz and 4 kHz
    f = np.fft.rfftfreq(160_000, 1 / SAMPLE_RATE)
    band = (f > 20) & (f < 4000)
    power = np.abs(np.fft.rfft(signals["pink-30dB"].astype(np.float64))) ** 2
    assert np.polyfit(np.log(f[band]), np.log(power[band]), 1)[0] == pytest.approx(-1.0, abs=0.05)
    # clicks: 1 ms pulses of 0.5, 10 and 40 of them in 10 s, the first half a period in
    for name, count, first in [("clicks-1Hz", 10, 8000), ("clicks-4Hz", 40, 2000)]:
        onsets = np.flatnonzero(np.diff(signals[name], prepend=0) > 0)
        assert len(onsets) == count and onsets[0] == first and signals[name].max() == 0.5
        assert int((signals[name] > 0).sum()) == count * 16  # 16 samples = 1 ms each


def test_non_speech_is_seeded():
    a, b, c = non_speech(2.0, seed=0), non_speech(2.0, seed=0), non_speech(2.0, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    for name in a:  # a seed changes the noises only
        assert np.array_equal(a[name], c[name]) != name.startswith(("white", "pink")), name
    with pytest.raises(ValueError, match="seconds must be"):
        non_speech(0)
    with pytest.raises(ValueError, match="seed must be"):
        non_speech(1.0, seed=-1)


def test_repeated_tokens_and_decision_layers_by_hand():
    comma, you = 11, 345
    assert repeated_tokens([comma, you, comma, you, comma, you]) == [False, False, False, True, True, True]
    assert repeated_tokens([7, 7, 7, 7]) == [False, False, True, True]  # pairs may overlap
    assert repeated_tokens([1, 2, 3, 2, 1]) == [False] * 5  # the same tokens, never the same pair
    assert repeated_tokens([]) == []
    a, b, c, x = 1, 2, 3, 9
    top1 = torch.tensor([[a, c, c, c], [b, c, x, c], [c, c, c, c], [c, c, c, x]])  # (L+1 = 4 readouts, T = 4)
    emitted = torch.tensor([c, c, c, c])
    # t0: c from readout 2 on; t1: from the embeddings on; t2: readout 1 disagrees, so 2; t3: the final
    # readout prefers x (a logit filter chose c): L + 1 = 4
    assert decision_layers(top1, emitted).tolist() == [2, 0, 2, 4]
    rows = [{"repeat": r, "decision_layer": d} for r, d in [(False, 2), (True, 0), (True, 3), (False, 4)]]
    assert decision_summary(rows) == {"repeats": 2, "others": 2, "decision_repeats": 1.5, "decision_others": 3.0}


def result(text: str, n_tokens: int, no_speech_prob: float, avg_logprob: float) -> SimpleNamespace:
    return SimpleNamespace(text=text, tokens=list(range(n_tokens)), no_speech_prob=no_speech_prob,
                           avg_logprob=avg_logprob)  # fmt: skip


def test_hallucination_rows_by_hand():
    results = [
        result(" you", 1, 0.95, -0.4),  # hallucinated; p(nospeech) high but the text is confident: kept
        result(" You", 1, 0.82, -1.7),  # hallucinated, but transcribe drops the window
        result("...", 1, 0.9, -2.0),  # no words
        result(" [BLANK_AUDIO]", 4, 0.3, -0.2),  # a bracketed remark: no words
        result(" I'm going to go.", 6, 0.5, -1.9),  # p(nospeech) 0.5: transcribe keeps it
    ]
    rows = hallucination_rows(results, list("abcde"), [10.0] * 5)
    assert [r["hallucinated"] for r in rows] == [True, True, False, False, True]
    assert [r["skipped"] for r in rows] == [False, True, True, False, False]
    assert [r["hallucinated_in_transcribe"] for r in rows] == [True, False, False, False, True]
    assert hallucination_rate(rows) == 3 / 5 and hallucination_rate(rows, "hallucinated_in_transcribe") == 2 / 5
    assert rows[4]["tokens_per_second"] == 0.6 and rows[0]["name"] == "a"
    assert skipped_as_silence(0.61, -1.01) and not skipped_as_silence(0.6, -1.01) and not skipped_as_silence(0.9, -1)
    with pytest.raises(ValueError, match="no rows"):
        hallucination_rate([])
    with pytest.raises(ValueError, match="5 results for 4 names"):
        hallucination_rows(results, list("abcd"), [1.0] * 5)


def test_head_sweep_equals_generate_with_each_ablation(byte_model, monkeypatch):  # noqa: F811
    mel, _ = _inputs(byte_model, batch=5, seed=11)
    speech, noise = mel[:2], mel[2:]
    refs = ["a b c", "d e"]
    heads = [("attn", 0, 1), ("cross_attn", 2, 3)]
    calls = []
    generate = byte_model.generate
    monkeypatch.setattr(byte_model, "generate", lambda *a, **k: calls.append(k) or generate(*a, **k))
    rows = head_sweep(byte_model, speech, noise, references=refs, heads=heads, max_new_tokens=6, seconds=[1.0] * 3)
    monkeypatch.undo()
    assert len(calls) == 3 and all(c["audio_features"].shape[0] == 5 for c in calls)  # one batched call a setting
    assert len(rows) == 3 * 5
    settings = [None, *(wl.Edits().ablate_heads(f"decoder.blocks.{l}.{k}", [h]) for k, l, h in heads)]
    for s, edits in enumerate(settings):
        direct = byte_model.generate(torch.cat([noise, speech]), edits=edits, max_new_tokens=6)
        mine = rows[5 * s : 5 * s + 5]
        assert [r["text"] for r in mine] == [d.text.strip() for d in direct]
        assert [r["speech"] for r in mine] == [False] * 3 + [True] * 2
        expected = [wer(ref, d.text.strip()) for ref, d in zip(refs, direct[3:], strict=True)]
        assert [r["wer"] for r in mine[3:]] == expected
    summary = head_summary(rows)
    assert [(s["kind"], s["layer"], s["head"]) for s in summary][0] == ("none", -1, -1)
    for s in summary:
        mine = [r for r in rows if (r["kind"], r["layer"], r["head"]) == (s["kind"], s["layer"], s["head"])]
        hyps = [r["text"] for r in mine if r["speech"]]
        assert s["wer"] == pytest.approx(wer(refs, hyps))  # corpus WER, from the per-clip rows
        assert s["hallucination_rate"] == sum(r["hallucinated"] for r in mine if not r["speech"]) / 3
        assert s["d_wer"] == pytest.approx(s["wer"] - summary[0]["wer"])
    keys = [(s["in_transcribe"], s["hallucination_rate"], -s["no_speech_prob"], s["wer"]) for s in summary[1:]]
    assert keys == sorted(keys)


def test_head_sweep_caps_edited_settings(byte_model):  # noqa: F811
    mel, _ = _inputs(byte_model, batch=2, seed=5)
    rows = head_sweep(byte_model, mel[:1], mel[1:], references=["a"], heads=[("attn", 1, 0)])
    longest = max(r["n_tokens"] for r in rows if r["kind"] == "none")
    cap = min(2 * longest + 16, byte_model.dims.n_text_ctx // 2)
    assert all(r["n_tokens"] <= cap for r in rows if r["kind"] != "none")
    assert len(decoder_heads(byte_model)) == 2 * 3 * 4  # kinds x layers x heads
    with pytest.raises(ValueError, match="is not a decoder head"):
        head_sweep(byte_model, mel[:1], mel[1:], heads=[("attn", 3, 0)])
    with pytest.raises(ValueError, match="needs speech and non-speech"):
        head_sweep(byte_model, mel[:0], mel[1:])


# ----------------------------------------------------------------------------- the real tiny.en


def test_tiny_en_hallucinates_on_non_speech_as_openai_whisper(real_tiny_en, real_tiny_en_openai):
    """tiny.en writes "you" for silence and white noise: the same tokens and no-speech probability as openai-whisper."""
    import whisper

    signals = non_speech(10.0)
    names = ["silence", "white-30dB"]
    mels, seconds = load_windows([signals[n] for n in names], 80, 3000)
    ours = real_tiny_en.generate(mels)
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    with torch.no_grad():
        theirs = whisper.decode(real_tiny_en_openai, mels, options)
    for a, b in zip(ours, theirs, strict=True):
        assert a.tokens == b.tokens
        assert a.no_speech_prob == pytest.approx(b.no_speech_prob, abs=1e-4)
    rows = hallucination_rows(ours, names, seconds)
    assert [r["text"].lower() for r in rows] == ["you", "you"] and all(r["hallucinated"] for r in rows)
    assert [r["skipped"] for r in rows] == [skipped_as_silence(b.no_speech_prob, b.avg_logprob) for b in theirs]
    # the no-speech lens: its last readout is the probability decoding reports
    p = sot_lens(real_tiny_en, mels)["no_speech"]  # (L+1, 2)
    assert p[-1].tolist() == pytest.approx([r.no_speech_prob for r in ours], abs=1e-5)


def test_lens_along_a_real_loop(real_tiny_en, real_clips):
    """Without its encoder blocks tiny.en loops (", you, you, ..."); the lens along the loop is the model's own."""
    mel, _ = load_windows([real_clips[0][0]], 80, 3000)
    edits = wl.Edits().skip("encoder", range(4))
    res = real_tiny_en.generate(mel, edits=edits, max_new_tokens=24)[0]
    prompt = list(real_tiny_en.tokenizer.sot_sequence_including_notimestamps)
    rows = repetition_lens(real_tiny_en, mel[0], prompt, res.tokens, edits=edits)
    assert [r["token"] for r in rows] == res.tokens and len(rows) == 24
    assert sum(r["repeat"] for r in rows) >= 20  # a loop: all but its first few tokens repeat
    assert all(r["top_4"] == r["token"] for r in rows)  # greedy: the final readout's top-1 is what was written
    assert all(0 <= r["decision_layer"] <= 4 for r in rows)
    run = real_tiny_en.run(mel, torch.tensor([prompt + res.tokens[:-1]]), edits=edits)
    p = run.logits[0, len(prompt) - 1 :].softmax(-1)[torch.arange(24), torch.tensor(res.tokens)]  # (24,)
    assert [r["p_4"] for r in rows] == pytest.approx(p.tolist(), abs=1e-5)
