"""Metrics against hand-worked examples; sweeps against plain decoding; rows in and out."""

from __future__ import annotations

import json

import pytest
import torch

from whisper_lens.experiments import (
    attention_stats,
    cer,
    compare_attention,
    edit_distance,
    format_table,
    hallucination_metrics,
    longest_repeat,
    max_consecutive_repeats,
    removal_sweep,
    save_rows,
    summarize,
    wer,
)
from whisper_lens.trace import Trace

from .test_lens import _inputs, byte_model  # noqa: F401  (fixture)


def test_error_rates_by_hand():
    # ref 4 words; hyp: one substitution (sat->sit), one deletion (the), one insertion (down)
    assert wer("the cat sat there", "cat sit there down") == pytest.approx(3 / 4)
    assert wer("a b c", "a b c") == 0.0
    assert wer("a b", "") == 1.0
    assert wer("a", "a b c d") == 3.0  # insertions can push WER above 1
    assert cer("kitten", "sitting") == pytest.approx(3 / 6)  # k->s, e->i, +g
    assert edit_distance("flaw", "lawn") == 2
    assert wer(["a b", "c d e"], ["a x", "c d e"]) == pytest.approx(1 / 5)  # corpus-level: 1 error in 5 words
    with pytest.raises(ValueError, match="the reference is empty"):
        wer("", "anything")
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        cer(["a", "b"], ["a"])


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


def test_sweep_with_nothing_removed_equals_plain_generate(byte_model):  # noqa: F811
    mel, _ = _inputs(byte_model, batch=3, seed=7)
    plain = byte_model.generate(mel, max_new_tokens=5)
    refs = ["x y z"] * 3
    rows = removal_sweep(byte_model, mel, "decoder", references=refs, removals=[[], [2], [0, 1, 2]],
                         max_new_tokens=5, seconds=[1.0] * 3)  # fmt: skip
    assert len(rows) == 9
    assert [r["text"] for r in rows[:3]] == [p.text.strip() for p in plain]
    assert rows[3]["blocks_removed"] == "2" and rows[8]["removed"] == 3
    from whisper_lens import Edits

    skip = byte_model.generate(mel, max_new_tokens=5, edits=Edits().skip("decoder", [2]))
    assert [r["text"] for r in rows[3:6]] == [s.text.strip() for s in skip]
    default = removal_sweep(byte_model, mel, "encoder", references=refs, max_new_tokens=5, seconds=[1.0] * 3)
    assert [r["removed"] for r in default] == [k for k in range(4) for _ in range(3)]
    assert [r["text"] for r in default[:3]] == [p.text.strip() for p in plain]
    summary = summarize(default, "removed", ["wer"])
    assert [s["removed"] for s in summary] == [0, 1, 2, 3]
    assert summary[1]["wer"] == pytest.approx(sum(r["wer"] for r in default[3:6]) / 3)
    with pytest.raises(IndexError, match=r"encoder blocks \[5\] out of range"):
        removal_sweep(byte_model, mel, "encoder", removals=[[5]], references=refs)
    with pytest.raises(ValueError, match="reference transcript is empty"):
        removal_sweep(byte_model, mel, "encoder", references=["a", "", "b"])


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
