"""The main job and the study commands, end to end on the shipped model; their bad-input errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from whisper_lens.loading import SHIPPED
from whisper_lens.study import output_folder

REPO = Path(__file__).resolve().parent.parent
SAMPLES = SHIPPED["toy"] / "samples"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "whisper_lens", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)  # fmt: skip


def sample_paths() -> list[str]:
    return [str(SAMPLES / name) for name in json.loads((SAMPLES / "transcripts.json").read_text())]


def test_demo_writes_the_report(tmp_path):
    out = tmp_path / "report"
    done = cli("demo", "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr
    report = (out / "report.md").read_text()
    for section in ("## 1. Transcripts", "## 2. Decoder logit lens", "## 3. Layer removal", "## 4. Attention",
                    "## 5. Clip explorer", "## 6. No-speech lens", "## Files"):  # fmt: skip
        assert section in report
    images = [line.split("(")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(images) >= 6
    for name in images:
        assert (out / name).stat().st_size > 10_000, name  # every picture the report shows exists and is drawn
    links = set(re.findall(r"\]\(([^)]+)\)", report))
    written = {p.name for p in out.iterdir() if not p.name.startswith(".")} - {"report.md"}
    assert written <= links and links <= written  # every file written is linked, every link is a file
    assert len([f for f in written if f.endswith(".html")]) == len(
        json.loads((SAMPLES / "transcripts.json").read_text())
    )
    assert "Corpus WER 0.000" in report  # the shipped model transcribes its samples exactly
    assert "_other" not in report and "broken" not in report  # runs are named by what they are
    assert re.search(r"last \d encoder blocks? removed|last encoder block removed", report)
    no_speech = report.split("## 6. No-speech lens")[1].split("## Files")[0]
    assert "| 0.000 |" not in no_speech and re.search(r"\| \d\.\d+e-0\d \||\| 0\.000\d", no_speech)  # not zeros
    assert "demo:" not in done.stderr  # --no-progress: no bar
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_study_commands(tmp_path):
    paths = sample_paths()[:2]
    lens = cli("lens", *paths, "--model", "toy", "--out", str(tmp_path / "lens"))
    assert lens.returncode == 0, lens.stderr
    assert "top1_agreement" in lens.stdout and (tmp_path / "lens" / "clip0_lens.png").exists()
    ablate = cli("ablate", *paths, "--stack", "decoder", "--out", str(tmp_path / "ablate"))
    assert ablate.returncode == 0, ablate.stderr
    assert (tmp_path / "ablate" / "removal.png").exists() and (tmp_path / "ablate" / "ablate.csv").exists()
    attention = cli("attention", paths[0], "--model", "toy", "--out", str(tmp_path / "att"))
    assert attention.returncode == 0, attention.stderr
    assert (tmp_path / "att" / "clip0_cross_over_mel.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ablate", "{sample}", "--reference", ""], "reference transcript is empty"),
        (["ablate", "{sample}", "--reference", "a", "--reference", "b"], "give one --reference per audio file"),
        (["lens", "{missing}", "--model", "toy"], "no-such.wav"),
        (["demo", "--out", "{file}"], "exists and is a file"),
        (["attention", "{sample}", "--model", "toy", "--layer", "9"], "out of range"),
    ],
)
def test_bad_input_is_one_line(tmp_path, args, message):
    file = tmp_path / "a-file"
    file.write_text("x")
    subs = {"{sample}": sample_paths()[0], "{missing}": str(tmp_path / "no-such.wav"), "{file}": str(file)}
    done = cli(*[subs.get(a, a) for a in args])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert message in done.stderr
    assert file.read_text() == "x"


def test_output_folder_is_replaced_only_on_success(tmp_path):
    out = tmp_path / "out"
    with output_folder(out, "demo") as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), output_folder(out, "demo") as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == [".whisper-lens.json", "old.txt"]  # untouched
    with output_folder(out, "demo") as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == [".whisper-lens.json", "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_shipped_model_behaves_like_the_study_says():
    """Measured on the shipped model, asserted loosely: removal breaks it, the lens sharpens with depth."""
    import torch

    import whisper_lens as wl
    from whisper_lens.audio import load_windows
    from whisper_lens.experiments import removal_sweep, summarize
    from whisper_lens.lens import decoder_lens_from_trace, lens_names

    model = wl.load_model()
    refs = json.loads((SAMPLES / "transcripts.json").read_text())
    mels, seconds = load_windows(sample_paths(), model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    L = model.dims.n_text_layer
    rows = removal_sweep(model, mels, "decoder", references=list(refs.values()), seconds=seconds,
                         removals=[[], list(range(L))])  # fmt: skip
    wer = {s["removed"]: s["wer"] for s in summarize(rows, "removed", ["wer"])}
    assert wer[0] <= 0.05 and wer[L] >= 0.8, wer
    with torch.no_grad():
        agreement = torch.stack([decoder_lens_from_trace(model, r.trace).agreement()
                                 for r in model.generate(mels, trace=lens_names(model))]).mean(0)  # fmt: skip
    assert agreement[-1] == 1.0 and agreement[0] < 0.3
    assert all(b >= a - 0.1 for a, b in zip(agreement[:-1], agreement[1:], strict=True)), agreement.tolist()
