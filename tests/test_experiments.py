"""Metrics against hand-worked examples; sweeps against plain decoding; rows in and out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from whisper_lens import experiments
from whisper_lens.experiments import (
    attention_stats,
    cer,
    compare_attention,
    format_table,
    hallucination_metrics,
    longest_repeat,
    max_consecutive_repeats,
    removal_sweep,
    save_rows,
    summarize,
    text_normalizer,
    wer,
)
from whisper_lens.trace import Edits, Trace

from .test_lens import _inputs, byte_model  # noqa: F401  (fixture)


def test_error_rates_by_hand():
    # raw strings: ref 4 words; hyp: one substitution (sat->sit), one deletion (the), one insertion (down)
    assert wer("the cat sat there", "cat sit there down", normalize=None) == pytest.approx(3 / 4)
    assert wer("a b c", "a b c") == 0.0
    assert wer("a b", "") == 1.0
    assert wer("a", "a b c d") == 3.0  # insertions can push WER above 1
    assert cer("kitten", "sitting", normalize=None) == pytest.approx(3 / 6)  # k->s, e->i, +g
    assert wer(["a b", "c d e"], ["a x", "c d e"]) == pytest.approx(1 / 5)  # corpus-level: 1 error in 5 words
    with pytest.raises(ValueError, match="reference 0 is empty"):
        wer("", "anything")
    with pytest.raises(ValueError, match="reference 1 is empty .after english normalisation"):
        wer(["a", "(laughs) ?!"], ["a", "b"])  # nothing but a bracketed remark and punctuation
    with pytest.raises(ValueError, match=r"2 reference\(s\) but 1 hypothesis"):
        cer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="normalize must be one of"):
        wer("a", "a", normalize="french")


def test_error_rates_use_whispers_normalisation():
    """The issue's example: a perfect transcript of a LibriVox sentence against its lower-case reference."""
    ref = "and mister john dashwood had then leisure to consider how much there might be prudently in his power"
    hyp = "And Mr. John Dashwood had then leisure to consider how much there might be prudently in his power."
    assert wer(ref, hyp) == 0.0 and cer(ref, hyp) == 0.0
    # raw: And, Mr., John, Dashwood and power. differ from the reference: 5 substitutions in 18 words
    assert wer(ref, hyp, normalize=None) == pytest.approx(5 / 18)
    assert wer(ref, hyp, normalize="basic") == pytest.approx(1 / 18)  # the basic one keeps "mr" for "mister"
    # the English rules: British spellings, spelt-out numbers, contractions, fillers; the basic one has none
    assert wer("ten metres, the colour", "10 meters the color") == 0.0
    assert wer("i will go", "Hmm, uh, I'll go!") == 0.0
    assert wer("ten metres", "10 meters", normalize="basic") == 1.0
    # characters after normalisation: "It's" -> "it is" (5 characters) against "its" (3): 2 insertions in 3
    assert cer("its", "It's", normalize="english") == pytest.approx(2 / 3)


NORMALISER_CASES = [
    "And Mr. John Dashwood had then leisure.",
    "Ten meters, 10 metres, colour, twenty-five dollars $25",
    "Hmm, uh, I'll go [music] (laughs)",
    "It's the 1st of January 2020, at 3:30 p.m.",
    "Dr. St. John's cold-hearted, ill-disposed...",
    "Café naïve résumé — ¿Qué?",
    "two point five percent, $5.50 and £3",
]


@pytest.mark.parametrize("text", NORMALISER_CASES + [r["text"] for r in json.loads(
    (Path(__file__).parent / "data" / "transcripts.json").read_text()).values()])  # fmt: skip
def test_normalisers_equal_openai_whispers(text):
    """whisper-normalizer's two normalisers give openai-whisper's own (whisper.normalizers) output."""
    import whisper.normalizers

    assert text_normalizer("english")(text) == whisper.normalizers.EnglishTextNormalizer()(text)
    assert text_normalizer("basic")(text) == whisper.normalizers.BasicTextNormalizer()(text)
    assert text_normalizer(None)(text) == text


def test_repetition_metrics_by_hand():
    assert longest_repeat([1, 2, 3, 4]) == 0
    assert longest_repeat([1, 2, 3, 1, 2, 3]) == 3
    assert longest_repeat([7, 7, 7]) == 2  # (7, 7) occurs twice, overlapping
    assert max_consecutive_repeats([5, 6, 5, 6, 5, 6]) == 3
    assert max_consecutive_repeats([1, 2, 3]) == 1
    assert max_consecutive_repeats([]) == 0
    m = hallucination_metrics("ab" * 50, list(range(100)), 4.0)
    import zlib

    assert m["compression_ratio"] == pytest.approx(100 / len(zlib.compress(b"ab" * 50)))
    assert m["tokens_per_second"] == 25.0 and not m["empty"]
    assert hallucination_metrics(" ", [], 1.0)["empty"]
    with pytest.raises(ValueError, match="duration must be > 0"):
        hallucination_metrics("x", [1], 0)


def test_sweep_with_nothing_removed_equals_plain_generate(byte_model, monkeypatch):  # noqa: F811
    mel, _ = _inputs(byte_model, batch=3, seed=7)
    plain = byte_model.generate(mel, max_new_tokens=5)
    refs = ["x y z"] * 3
    rows = removal_sweep(byte_model, mel, "decoder", references=refs, removals=[[], [2], [0, 1, 2]],
                         max_new_tokens=5, seconds=[1.0] * 3)  # fmt: skip
    assert len(rows) == 9
    assert [r["text"] for r in rows[:3]] == [p.text.strip() for p in plain]
    assert rows[3]["blocks_removed"] == "2" and rows[8]["removed"] == 3
    skip = byte_model.generate(mel, max_new_tokens=5, edits=Edits().skip("decoder", [2]))
    assert [r["text"] for r in rows[3:6]] == [s.text.strip() for s in skip]
    default = removal_sweep(byte_model, mel, "encoder", references=refs, max_new_tokens=5, seconds=[1.0] * 3)
    assert [r["removed"] for r in default] == [k for k in range(4) for _ in range(3)]
    assert [r["text"] for r in default[:3]] == [p.text.strip() for p in plain]
    monkeypatch.setattr(experiments, "SWEEP_ROWS", 6)  # the four settings' 12 clips in batches of 6, not one of 12
    split = removal_sweep(byte_model, mel, "decoder", references=refs, removals=[[], [2], [0, 1, 2]],
                          max_new_tokens=5, seconds=[1.0] * 3)  # fmt: skip
    assert [r["text"] for r in split] == [r["text"] for r in rows]
    chunked = removal_sweep(byte_model, mel, "encoder", references=refs, max_new_tokens=5, seconds=[1.0] * 3)
    assert [(r["removed"], r["text"], r["n_tokens"]) for r in chunked] == [
        (r["removed"], r["text"], r["n_tokens"]) for r in default
    ]
    # other batch shapes sum in another order: scores agree to float rounding
    assert [r["avg_logprob"] for r in chunked] == pytest.approx([r["avg_logprob"] for r in default], rel=1e-6)
    # the last k encoder blocks come from one recorded pass, other sets run the encoder: both equal skipping
    for removed, rows_k in [([2], default[3:6]), ([0, 1, 2], default[9:12])]:
        skip = byte_model.generate(mel, max_new_tokens=5, edits=Edits().skip("encoder", removed))
        assert [r["text"] for r in rows_k] == [s.text.strip() for s in skip]
        assert [r["n_tokens"] for r in rows_k] == [len(s.tokens) for s in skip]
    middle = removal_sweep(byte_model, mel, "encoder", references=refs, removals=[[1]], max_new_tokens=5)
    skip = byte_model.generate(mel, max_new_tokens=5, edits=Edits().skip("encoder", [1]))
    assert [r["text"] for r in middle] == [s.text.strip() for s in skip]
    assert [r["wer"] for r in middle] == [wer("x y z", s.text.strip()) for s in skip]
    summary = summarize(default, "removed", ["wer"])
    assert [s["removed"] for s in summary] == [0, 1, 2, 3]
    assert summary[1]["wer"] == pytest.approx(sum(r["wer"] for r in default[3:6]) / 3)
    with pytest.raises(IndexError, match=r"encoder blocks \[5\] out of range"):
        removal_sweep(byte_model, mel, "encoder", removals=[[5]], references=refs)
    with pytest.raises(ValueError, match="reference transcript is empty"):
        removal_sweep(byte_model, mel, "encoder", references=["a", "", "b"])


def test_a_sweep_of_both_stacks_equals_one_sweep_per_stack(byte_model, monkeypatch):  # noqa: F811
    """``removal_sweep`` over both stacks decodes every 'last k blocks' setting in one ``generate`` call (the full
    model once for both) and gives the rows of one sweep per stack: the same texts and tokens, scores to float
    rounding. Cut into calls by ``SWEEP_ROWS`` or by the audio held (``SWEEP_AUDIO_BYTES``) it gives them too."""
    mel, _ = _inputs(byte_model, batch=3, seed=8)
    refs, secs = ["x y z"] * 3, [1.0] * 3
    Le, Ld = byte_model.dims.n_audio_layer, byte_model.dims.n_text_layer
    calls = []
    generate = type(byte_model).generate
    monkeypatch.setattr(type(byte_model), "generate",
                        lambda self, *a, **k: calls.append(k.get("clips")) or generate(self, *a, **k))  # fmt: skip
    both = removal_sweep(byte_model, mel, ("encoder", "decoder"), references=refs, max_new_tokens=5, seconds=secs)
    assert len(calls) == 1 and len(calls[0]) == 3 * (Le + 1 + Ld)  # the full model's rows decode once
    assert max(calls[0]) == 3 * (Le + 1) - 1  # the audio of each encoder depth, once per clip
    apart = [r for s in ("encoder", "decoder") for r in removal_sweep(byte_model, mel, s, references=refs,
                                                                         max_new_tokens=5, seconds=secs)]  # fmt: skip
    key = ("stack", "removed", "clip", "text", "n_tokens", "wer")
    assert len(both) == 3 * (Le + Ld + 2) and [[r[k] for k in key] for r in both] == [
        [r[k] for k in key] for r in apart
    ]
    assert [r["avg_logprob"] for r in both] == pytest.approx([r["avg_logprob"] for r in apart], rel=1e-5)
    for limit in ("SWEEP_ROWS", "SWEEP_AUDIO_BYTES"):
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(experiments, limit, 6 if limit == "SWEEP_ROWS" else 1)
            cut = removal_sweep(byte_model, mel, ["encoder", "decoder"], references=refs, max_new_tokens=5,
                                seconds=secs)  # fmt: skip
        pairs = Le + 1 + Ld  # distinct (encoder depth, decoder depth) settings
        assert len(calls) == (math.ceil(pairs / 2) if limit == "SWEEP_ROWS" else pairs)  # 2 settings a call, or 1
        assert [[r[k] for k in key] for r in cut] == [[r[k] for k in key] for r in both]
    mixed = removal_sweep(byte_model, mel, ["decoder", "encoder"], references=refs, max_new_tokens=5, seconds=secs,
                          removals={"decoder": [[1], [Ld - 1]], "encoder": [[0, 1]]})  # fmt: skip
    assert [(r["stack"], r["blocks_removed"]) for r in mixed[::3]] == [("decoder", "1"), ("decoder", str(Ld - 1)),
                                                                       ("encoder", "0 1")]  # fmt: skip
    for stack, removed, rows in [("decoder", [1], mixed[:3]), ("decoder", [Ld - 1], mixed[3:6]),
                                 ("encoder", [0, 1], mixed[6:])]:  # fmt: skip
        skip = byte_model.generate(mel, max_new_tokens=5, edits=Edits().skip(stack, removed))
        assert [r["text"] for r in rows] == [s.text.strip() for s in skip]


def test_sweep_stacks_and_removals_bad_input(byte_model):  # noqa: F811
    mel, _ = _inputs(byte_model, batch=2, seed=9)
    refs = ["a b", "c d"]
    for stack in (["encoder", "encoder"], "both", [], ("decoder", "text")):
        with pytest.raises(ValueError, match="stack must be 'encoder', 'decoder' or a list of them"):
            removal_sweep(byte_model, mel, stack, references=refs)
    with pytest.raises(TypeError, match="removals must be a dict from stack to block sets"):
        removal_sweep(byte_model, mel, ["encoder", "decoder"], references=refs, removals=[[1]])
    with pytest.raises(ValueError, match=r"removals names stacks not swept: \['decoder'\]"):
        removal_sweep(byte_model, mel, "encoder", references=refs, removals={"decoder": [[1]]})
    with pytest.raises(IndexError, match=r"decoder blocks \[9\] out of range"):
        removal_sweep(byte_model, mel, ["encoder", "decoder"], references=refs, removals={"decoder": [[9]]})


def test_attention_stats_by_hand():
    # one cross-attention head that walks diagonally, one uniform head; 4 text positions over 4 audio positions
    diag = torch.eye(4)
    uniform = torch.full((4, 4), 0.25)
    trace = Trace({"decoder.blocks.0.cross_attn.pattern": torch.stack([diag, uniform])[None]})
    rows = attention_stats(trace, audio_positions=3)
    assert rows[0]["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["entropy"] == pytest.approx(float(torch.log(torch.tensor(4.0))))
    assert rows[0]["padding_share"] == pytest.approx(0.25)  # the last query looks at the padding position 3
    assert rows[1]["padding_share"] == pytest.approx(0.25)
    assert rows[0]["monotonicity"] == 1.0 and rows[0]["diagonality"] == pytest.approx(1.0)
    side = compare_attention(rows, [dict(r, entropy=r["entropy"] + 1) for r in rows])
    assert [s["change"] for s in side] == pytest.approx([1.0, 1.0])


def test_rows_save_and_print(tmp_path):
    rows = [{"a": 1, "b": 0.5}, {"a": 2, "b": 0.25, "c": "x|y"}]
    save_rows(rows, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == rows
    save_rows(rows, tmp_path / "r.csv")
    assert (tmp_path / "r.csv").read_text().splitlines() == ["a,b,c", "1,0.5,", "2,0.25,x|y"]
    assert format_table(rows, ["a", "b", "c"]).splitlines()[3] == "| 2 | 0.250 | x\\|y |"
    with pytest.raises(ValueError, match="saved as .csv or .json"):
        save_rows(rows, tmp_path / "r.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_rows(rows, tmp_path / "missing" / "r.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json"]  # no temporary files left
