"""The study's inputs (shipped speech, samples folders, non-speech windows) and the hallucinate command end to end."""

from __future__ import annotations

import fnmatch
import json
import shutil
import tomllib
from pathlib import Path

import pytest

from whisper_lens import load_model
from whisper_lens.cli import main
from whisper_lens.experiments import wer
from whisper_lens.loading import SHIPPED
from whisper_lens.study import (
    SPEECH,
    default_samples,
    hallucination_report,
    load_clips,
    non_speech_clips,
    read_samples,
    window_seconds,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="module")
def toy():
    return load_model()


def test_shipped_speech_is_the_public_domain_test_speech_and_installed():
    files = sorted(p.name for p in SPEECH.iterdir())
    assert files == ["README.md", "austen-0870.flac", "austen-0880.flac", "austen-0890.flac", "austen-0920.flac",
                     "austen-0930.flac", "transcripts.json"]  # fmt: skip
    assert sum(p.stat().st_size for p in SPEECH.iterdir()) < 1_000_000
    tests = json.loads((DATA / "transcripts.json").read_text())
    for name, text in json.loads((SPEECH / "transcripts.json").read_text()).items():
        assert (SPEECH / name).read_bytes() == (DATA / name).read_bytes() and text == tests[name]["text"]
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for p in SPEECH.iterdir():  # every file is package data, so a wheel installs it
        assert any(fnmatch.fnmatch(str(p.relative_to(REPO / "whisper_lens")), g) for g in patterns["whisper_lens"])


def test_samples_folders(toy, tmp_path):
    paths, refs = read_samples(SPEECH)  # {file: text}
    assert [p.name for p in paths][:2] == ["austen-0870.flac", "austen-0880.flac"] and refs[1].startswith("he was")
    paths, refs = read_samples(DATA)  # {file: {"text": ..., "words": [...]}}
    assert len(paths) == 12 and refs[-1] == "feels like these days go on forever"
    for name in ("b.wav", "a.wav"):
        shutil.copy(SHIPPED["toy"] / "samples" / "sample1.wav", tmp_path / name)
    (tmp_path / "notes.txt").write_text("not audio")
    paths, refs = read_samples(tmp_path)  # no transcripts.json: every audio file, sorted, no references
    assert [p.name for p in paths] == ["a.wav", "b.wav"] and refs is None
    assert default_samples(toy) == SHIPPED["toy"] / "samples"  # the shipped speech does not fit its 4 s window
    clips = load_clips(toy)
    assert clips.names == [f"sample{i}.wav" for i in range(1, 6)] and clips.mels.shape == (5, 80, 400)
    assert (
        clips.references[0] == json.loads((SHIPPED["toy"] / "samples" / "transcripts.json").read_text())["sample1.wav"]
    )
    noise = non_speech_clips(toy)
    assert window_seconds(toy) == 4.0 and noise.seconds == [4.0] * 11 and noise.references is None


def test_tiny_en_on_the_shipped_speech(real_tiny_en):
    """The shipped clips are the default for a 30 s model; after normalisation tiny.en makes 3 errors in 71 words."""
    clips = load_clips(real_tiny_en)
    assert default_samples(real_tiny_en) == SPEECH and clips.mels.shape == (5, 80, 3000)
    assert clips.seconds == pytest.approx([7.1, 2.99, 5.3, 6.05, 3.29], abs=0.01)
    hyps = [r.text for r in real_tiny_en.generate(clips.mels)]
    # "old-sposed" for "ill disposed" (2 substitutions), "a more amiable" for "a more a amiable" (1 deletion)
    assert wer(clips.references, hyps) == pytest.approx(3 / 71)
    assert wer(clips.references, hyps, normalize=None) > 0.2  # raw strings: case and punctuation count as errors


def report_images(folder: Path) -> list[str]:
    lines = (folder / "report.md").read_text().splitlines()
    return [line.split("(")[1].rstrip(")") for line in lines if line.startswith("![")]


def test_hallucination_report_on_the_toy(toy, tmp_path):
    """Every section, picture and table, with two heads in the sweep (every head is the CLI's default)."""
    heads = [("attn", 0, 1), ("cross_attn", 3, 2)]
    report = hallucination_report(toy, tmp_path, load_clips(toy), non_speech_clips(toy), title="toy", heads=heads)
    text = report.read_text()
    for section in ("## Non-speech inputs", "## The no-speech probability, layer by layer", "## Head sweep",
                    "## Attention during a hallucination", "## The logit lens along a repetition loop"):  # fmt: skip
        assert section in text
    images = report_images(tmp_path)
    assert {"no_speech_layers.png", "heads_hallucination.png", "heads_wer.png"} <= set(images)
    for name in images:
        assert (tmp_path / name).stat().st_size > 10_000, name
    sweep = (tmp_path / "head_sweep.csv").read_text().splitlines()
    assert len(sweep) == 1 + 3 * (11 + 5)  # header + (unedited + 2 heads) x (11 non-speech + 5 speech)
    assert len((tmp_path / "heads.csv").read_text().splitlines()) == 1 + 3
    assert "against the references" in text


def test_hallucinate_samples_without_transcripts(tmp_path, capsys):
    samples = tmp_path / "clips"
    samples.mkdir()
    for i in (1, 2):
        shutil.copy(SHIPPED["toy"] / "samples" / f"sample{i}.wav", samples)
    out = tmp_path / "h"
    assert main(["hallucinate", "--samples", str(samples), "--no-heads", "--seconds", "2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {out}/report.md"
    report = (out / "report.md").read_text()
    assert "## Head sweep" not in report and "against the full model's own transcripts" in report
    assert "Speech: 2 clips (sample1.wav, sample2.wav)" in report and "clips of 2 s" in report
    assert sorted(p.name for p in samples.iterdir()) == ["sample1.wav", "sample2.wav"]  # nothing written there
