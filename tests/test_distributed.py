"""Dataset-scale sweeps and exports: N ranks give one process's rows, runs resume, the reader gives run's tensors.

Runs are on the shipped toy model and four of its samples, with one thread per process (the rows
are compared bit for bit; CPU matrix products may round differently on other thread counts).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import whisper_lens as wl
from whisper_lens.audio import load_windows
from whisper_lens.distributed import Ranks, export, find_clips, load_activations, position_axes, sweep
from whisper_lens.experiments import removal_sweep

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "weights" / "toy" / "samples"
REMOVALS = [0, 2]  # a few settings keep the CI run short
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "whisper_lens"]  # fmt: skip


@pytest.fixture(scope="module")
def model():
    return wl.load_model()


@pytest.fixture(autouse=True)
def one_thread():
    """As a torchrun rank runs (torchrun sets OMP_NUM_THREADS=1): same products, same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(folder: Path, names=("a.wav", "b.wav", "c.wav", "d.wav")) -> Path:
    """Four of the toy's samples under new names, in a sub-folder for two of them, with their transcripts."""
    folder.mkdir(parents=True)
    truth = json.loads((SAMPLES / "transcripts.json").read_text())
    refs = {}
    for i, name in enumerate(names):
        target = folder / ("more" if i >= 2 else "") / name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(SAMPLES / f"sample{i + 1}.wav", target)
        refs[target.relative_to(folder).as_posix()] = truth[f"sample{i + 1}.wav"]
    (folder / "transcripts.json").write_text(json.dumps(refs))
    return folder


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "rows.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "clips")


@pytest.fixture(scope="module")
def one_process(model, dataset, tmp_path_factory):
    """The sweep in this process, batches of two: the rows every other run must reproduce."""
    torch.set_num_threads(1)
    clips = find_clips([dataset], model, references=dataset / "transcripts.json")
    out = tmp_path_factory.mktemp("sweep") / "one"
    result = sweep(model, clips, out, stack="both", removals=REMOVALS, batch_size=2, progress=False)
    return out, clips, result


def test_sweep_rows_are_removal_sweep_rows_in_clip_order(model, one_process):
    """Batches through experiments.removal_sweep, rows ordered by stack, k, clip; the summary their means."""
    out, clips, result = one_process
    assert [c.id for c in clips] == ["a.wav", "b.wav", "more/c.wav", "more/d.wav"]
    expected, L = [], 4
    for start in (0, 2):  # each batch's two stacks in one sweep
        batch = clips[start : start + 2]
        mels, seconds = load_windows([c.path for c in batch], 80, 400)
        removals = dict.fromkeys(("encoder", "decoder"), [list(range(L - k, L)) for k in REMOVALS])
        found = removal_sweep(model, mels, ["encoder", "decoder"], references=[c.reference for c in batch],
                              removals=removals, seconds=seconds)  # fmt: skip
        expected += [r | {"clip": batch[r["clip"]].id} for r in found]
    order = {c.id: i for i, c in enumerate(clips)}
    expected.sort(key=lambda r: (r["stack"] == "decoder", r["removed"], order[r["clip"]]))
    assert read_rows(out) == [{k: str(v) for k, v in r.items()} for r in expected]
    wer = {(s["stack"], s["removed"]): s["wer"] for s in result.summary}
    for (stack, k), value in wer.items():
        rows = [r for r in expected if r["stack"] == stack and r["removed"] == k]
        assert value == pytest.approx(sum(r["wer"] for r in rows) / 4, abs=1e-12)
    assert len(result.summary) == 4 and result.new_clips == 4
    assert (out / "removal.png").stat().st_size > 0


def test_two_ranks_give_the_rows_of_one_process(one_process, dataset, tmp_path):
    """torchrun, two gloo ranks (clips sharded by rank, rows gathered on rank 0): the same files, byte for byte."""
    reference, _, _ = one_process
    out = tmp_path / "two"
    args = ["sweep", str(dataset), "--stack", "both", "--removals", *map(str, REMOVALS), "--batch-size", "2",
            "--references", str(dataset / "transcripts.json"), "--out", str(out)]  # fmt: skip
    done = subprocess.run(TORCHRUN + args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "swept 4 of 4 clips" in done.stdout and "2 ranks" in done.stdout
    assert (out / "rows.csv").read_bytes() == (reference / "rows.csv").read_bytes()
    assert (out / "summary.csv").read_bytes() == (reference / "summary.csv").read_bytes()
    assert len(list((out / "parts").glob("*.json"))) == 2  # one per batch, both written by rank 0


def test_a_killed_run_resumes_and_finishes_with_the_same_rows(model, one_process, dataset, tmp_path):
    reference, clips, _ = one_process
    out = tmp_path / "killed"
    args = ["sweep", str(dataset), "--stack", "both", "--removals", *map(str, REMOVALS), "--batch-size", "2",
            "--references", str(dataset / "transcripts.json"), "--out", str(out)]  # fmt: skip
    run = subprocess.Popen([sys.executable, "-m", "whisper_lens", *args], env=ENV, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        while run.poll() is None and not list((out / "parts").glob("*.json")):
            time.sleep(0.01)
        run.send_signal(signal.SIGKILL)  # no clean-up of any kind
    finally:
        run.wait()
    assert run.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(list((out / "parts").glob("*.json"))) == 1 and not (out / "rows.csv").exists()
    resumed = sweep(model, clips, out, stack="both", removals=REMOVALS, batch_size=2, progress=False)
    assert resumed.new_clips == 2  # the first batch was not swept again
    assert (out / "rows.csv").read_bytes() == (reference / "rows.csv").read_bytes()
    again = sweep(model, clips, out, stack="both", removals=REMOVALS, batch_size=2, progress=False)
    assert again.new_clips == 0 and (out / "rows.csv").read_bytes() == (reference / "rows.csv").read_bytes()


def nan_clip(path: Path) -> Path:
    """A clip whose header is fine and whose samples are not: found only when a rank decodes it."""
    audio = np.zeros(16000, np.float32)
    audio[100] = np.nan
    sf.write(path, audio, 16000, subtype="FLOAT")
    return path


def test_a_failing_rank_stops_the_run_with_one_line_and_leaves_resumable_state(model, tmp_path):
    data = make_dataset(tmp_path / "clips")
    nan_clip(data / "b.wav")  # batch 1 of 4 (one clip each): rank 1's in the first round
    out = tmp_path / "out"
    args = ["sweep", str(data), "--stack", "encoder", "--removals", "0", "2", "--batch-size", "1", "--out", str(out)]
    done = subprocess.run(TORCHRUN + args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if "whisper-lens: error:" in line]
    assert len(ours) == 1 and "b.wav" in ours[0], done.stderr[-3000:]
    assert "whisper_lens/" not in done.stderr  # no traceback through our code, from any rank
    parts = [json.loads(p.read_text()) for p in (out / "parts").glob("*.json")]
    assert [list(p["clips"]) for p in parts] == [["a.wav"]]  # rank 0's batch of that round was kept
    shutil.copy(SAMPLES / "sample2.wav", data / "b.wav")  # fixed: another size, so swept anew
    clips = find_clips([data], model)
    resumed = sweep(model, clips, out, stack="encoder", removals=[0, 2], batch_size=1, progress=False)
    assert resumed.new_clips == 3
    assert sorted({r["clip"] for r in read_rows(out)}) == ["a.wav", "b.wav", "more/c.wav", "more/d.wav"]


# ----------------------------------------------------------------------------- export

NAMES = ["encoder.conv1", "encoder.blocks.1.resid_post", "encoder.blocks.2.attn.pattern",
         "decoder.blocks.0.attn.pattern", "decoder.blocks.1.cross_attn.q", "decoder.blocks.1.cross_attn.pattern",
         "logits"]  # fmt: skip


def reference_trace(model, clip, tokens: list[int]):
    mel, _ = load_windows([clip.path], model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    return model.run(mel, torch.tensor([tokens]), trace=NAMES).trace


def test_export_reader_returns_exactly_the_traced_tensors_of_run(model, dataset, tmp_path):
    """Batches of one, whole windows, fp32: every tensor equals model.run's on the clip and its transcript."""
    clips = find_clips([dataset], model)
    done = export(model, clips, tmp_path / "x", NAMES, positions="all", batch_size=1, shard_clips=3, progress=False)
    acts = load_activations(tmp_path / "x")
    assert done.new_clips == 4 and len(acts) == 4 * len(NAMES) and acts.names == NAMES
    assert len(list((tmp_path / "x" / "shards").glob("*.safetensors"))) == 2  # 3 clips, then 1
    for clip, record in zip(clips, acts.clips, strict=True):
        assert record["clip"] == clip.id
        result = model.generate(load_windows([clip.path], 80, 400)[0])[0]
        fed = record["tokens"]
        assert record["text"] == result.text.strip() and fed[len(fed) - len(result.tokens) :] == result.tokens
        trace = reference_trace(model, clip, record["tokens"])
        for name in NAMES:
            assert torch.equal(acts[clip.id, name], trace[name][0]), (clip.id, name)
    assert done.bytes == sum(x.numel() * 4 for _, _, x in acts)


def test_export_keeps_the_speech_positions_in_the_dtype_asked(model, dataset, tmp_path):
    """Batches of three, fp16, speech only: each audio axis cut to ceil(seconds * positions per second)."""
    clips = find_clips([dataset], model)
    export(model, clips, tmp_path / "x", NAMES, dtype=torch.float16, batch_size=3, shard_clips=2, progress=False)
    acts = load_activations(tmp_path / "x")
    axes = acts.axes
    assert axes["encoder.blocks.1.resid_post"] == ["audio", None]
    assert axes["encoder.blocks.2.attn.pattern"] == [None, "audio", "audio"]
    assert axes["decoder.blocks.1.cross_attn.pattern"] == [None, "text", "audio"]
    assert axes["logits"] == ["text", None]
    for clip, record in zip(clips, acts.clips, strict=True):
        trace = reference_trace(model, clip, record["tokens"])
        for name in NAMES:
            full = trace[name][0]
            expected = full
            for axis, kind in enumerate(axes[name]):
                if kind == "audio":  # a 4 s window: 50 positions per second (100 for conv1's 2 x n_audio_ctx)
                    seconds = Fraction(round(clip.seconds * 16000), 16000)
                    expected = expected.narrow(axis, 0, math.ceil(seconds * Fraction(full.shape[axis], 4)))
            got = acts[clip.id, name]
            assert got.dtype == torch.float16 and got.shape == expected.shape, (clip.id, name)
            torch.testing.assert_close(got.float(), expected.half().float(), atol=2e-3, rtol=2e-3)


def test_position_axes_follow_the_shapes_whatever_the_head_layout(model):
    """q/k/v/z may put heads before or after positions: the text axis is the one whose length is T."""
    mel, _ = load_windows([SAMPLES / "sample1.wav"], 80, 400)
    names = [f"decoder.blocks.0.{kind}.{p}" for kind in ("attn", "cross_attn") for p in "qkvz"]
    axes = position_axes(model.dims, names + ["encoder.blocks.0.attn.q"])
    for T in (3, 5):
        trace = model.run(mel, torch.zeros(1, T, dtype=torch.long), trace=names).trace
        for name in names:
            shape = trace[name].shape[1:]
            text_axes = [a for a, kind in enumerate(axes[name]) if kind == "text"]
            audio_axes = [a for a, kind in enumerate(axes[name]) if kind == "audio"]
            audio = name.endswith(("cross_attn.k", "cross_attn.v"))  # the audio's keys and values
            positions = model.dims.n_audio_ctx if audio else T
            assert [shape[a] for a in text_axes + audio_axes] == [positions]
    assert axes["encoder.blocks.0.attn.q"].count("audio") == 1


def test_export_resumes_after_a_failed_batch(model, tmp_path):
    """The batch that failed is redone; the clips finished before it are not; the result is a clean export's."""
    data = make_dataset(tmp_path / "clips")
    good = find_clips([data], model)
    clean = export(model, good, tmp_path / "clean", NAMES[:2], batch_size=1, progress=False)
    nan_clip(data / "more" / "c.wav")
    with pytest.raises(ValueError, match="c.wav"):
        export(model, find_clips([data], model), tmp_path / "x", NAMES[:2], batch_size=1, shard_clips=4, progress=False)
    assert not (tmp_path / "x" / "index.json").exists()
    assert len(list((tmp_path / "x" / "shards").glob("*.safetensors"))) == 1  # a and b, flushed when c failed
    shutil.copy(SAMPLES / "sample3.wav", data / "more" / "c.wav")  # the same audio as in the clean run
    resumed = export(model, find_clips([data], model), tmp_path / "x", NAMES[:2], batch_size=1, progress=False)
    assert resumed.new_clips == 2
    a, b = load_activations(clean.index.parent), load_activations(tmp_path / "x")
    assert [c["clip"] for c in b.clips] == [c["clip"] for c in a.clips]
    for (clip, name, x), (_, _, y) in zip(a, b, strict=True):
        assert torch.equal(x, y), (clip, name)


def test_two_ranks_export_what_one_process_exports(model, dataset, tmp_path):
    clips = find_clips([dataset], model)
    export(model, clips, tmp_path / "one", NAMES[:2], batch_size=1, progress=False)
    args = ["export", str(dataset), "--trace", *NAMES[:2], "--batch-size", "1", "--out", str(tmp_path / "two")]
    done = subprocess.run(TORCHRUN + args, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = load_activations(tmp_path / "one"), load_activations(tmp_path / "two")
    assert len(list((tmp_path / "two" / "shards").glob("*"))) == 2  # one per rank
    assert len(one) == len(two) == 8
    for (clip, name, x), (clip2, name2, y) in zip(one, two, strict=True):
        assert (clip, name) == (clip2, name2) and torch.equal(x, y)


def test_ranks_without_torchrun_are_one_process():
    with Ranks.join("cpu") as ranks:
        assert (ranks.rank, ranks.size) == (0, 1)
        assert ranks.gather("x") == ["x"] and ranks.first(lambda: 7) == 7


def test_every_file_is_written_with_the_mode_the_umask_gives(model, dataset, tmp_path):
    """Rows, summary, plot, parts, marker, shards and index: 0666 / 0777 less the umask (not tempfile's 0600)."""
    clips = find_clips([dataset], model)
    old = os.umask(0o027)
    try:
        sweep(model, clips[:2], tmp_path / "sweep", stack="encoder", removals=[0], progress=False)
        export(model, clips[:2], tmp_path / "export", ["encoder.ln_post"], progress=False)
    finally:
        os.umask(old)
    found = [p for p in tmp_path.rglob("*")] + [tmp_path / "sweep", tmp_path / "export"]
    assert {p.name for p in found} >= {"rows.csv", "summary.csv", "removal.png", "index.json", ".whisper-lens.json"}
    for p in found:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p
    assert not [p for p in found if p.name.endswith(".tmp")]
