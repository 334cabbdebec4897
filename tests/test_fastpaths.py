"""Fast paths chosen by timing on this machine (whisper_lens.fastpaths): the numbers never depend on the choice,
choices are kept across processes, a broken cache file is ignored, and `whisper-lens info` lists them.
No test asserts a time: which candidate wins depends on the machine."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from whisper_lens import fastpaths
from whisper_lens.audio import load_windows
from whisper_lens.decoding import onednn_available
from whisper_lens.model import ModelDims

from .conftest import ending_model

whisper = pytest.importorskip("whisper")

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "whisper_lens" / "assets" / "speech"
LITTLE = ModelDims(n_mels=80, n_audio_ctx=16, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=51865,
                   n_text_ctx=32, n_text_state=32, n_text_head=2, n_text_layer=2)  # fmt: skip
CHOICES = [(u, d) for u in ("plain", "packed") for d in ("plain", "copy", "head")]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Every test here keeps its choices in a cache folder of its own and starts with none in memory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(fastpaths.ENV, raising=False)
    monkeypatch.setattr(fastpaths, "_MEMORY", {})
    monkeypatch.setattr(fastpaths, "_RETIMED", set())
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def little(tmp_path_factory):
    """A small random model whose end-of-text is made likelier (rows end at various lengths)."""
    return ending_model(LITTLE, 3, 1.5, tmp_path_factory.mktemp("little"))


def assert_same_numbers(want, got) -> None:
    """Tokens identical; log-probabilities equal up to the rounding of a product of another row count."""
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for a, b in zip(want, got, strict=True):
        assert math.isclose(b.sum_logprob, a.sum_logprob, rel_tol=1e-5, abs_tol=1e-5)
        assert math.isclose(b.no_speech_prob, a.no_speech_prob, rel_tol=1e-5, abs_tol=1e-6)


def decode_with_each_choice(model, **options) -> dict:
    """generate's results with every forced (unembedding, draft) choice, speculation on."""
    out = {}
    for unembedding, draft in CHOICES:
        with fastpaths.forced(unembedding=unembedding, draft=draft):
            out[unembedding, draft] = model.generate(speculative=True, **options)
    return out


def count_measure(calls: list, seconds: dict):
    def measure():
        calls.append(1)
        return dict(seconds)

    return measure


# ----------------------------------------------------------------------------- the numbers never change


def test_every_choice_gives_the_same_numbers_on_a_random_model(little):
    assert onednn_available()  # the packed candidate really runs here
    mel = torch.randn(4, 80, 2 * LITTLE.n_audio_ctx, generator=torch.Generator().manual_seed(1))  # (4, 80, 32)
    mel = mel * torch.linspace(0.3, 2, 4)[:, None, None]
    options = dict(mel=mel, max_new_tokens=20, language="en", timestamps=True)
    with fastpaths.forced(unembedding="plain"):
        want = little.generate(**options)
    with fastpaths.forced(unembedding="packed"):  # the plain loop with the packed unembedding
        assert_same_numbers(want, little.generate(**options))
    runs = decode_with_each_choice(little, **options)
    for choice, got in runs.items():
        assert len(got) == 4, choice
        assert_same_numbers(want, got)
    assert len({len(r.tokens) for r in want}) > 1  # rows ended at different lengths


def test_every_choice_gives_the_same_numbers_on_real_tiny_en(real_tiny_en):
    mel = load_windows([sorted(SHIPPED.glob("*.flac"))[0]], 80, 3000)[0]  # (1, 80, 3000)
    with torch.no_grad():
        xa = real_tiny_en.encoder(mel)  # (1, 1500, 384)
    options = dict(audio_features=xa, max_new_tokens=24)
    with fastpaths.forced(unembedding="plain"):
        want = real_tiny_en.generate(**options)
    assert len(want[0].tokens) == 24 and want[0].text.strip()
    with fastpaths.forced(unembedding="packed"):
        assert_same_numbers(want, real_tiny_en.generate(**options))
    for got in decode_with_each_choice(real_tiny_en, **options).values():
        assert_same_numbers(want, got)


# ----------------------------------------------------------------------------- choosing and keeping


def test_the_fastest_candidate_wins_only_by_a_margin_and_a_failed_timing_keeps_the_plain_op():
    assert fastpaths.choose("a", "cpu", "n=1", lambda: {"plain": 2e-3, "fast": 1e-3}) == "fast"
    assert fastpaths.choose("b", "cpu", "n=1", lambda: {"plain": 1e-3, "fast": 0.99e-3}) == "plain"  # noise

    def broken():
        raise RuntimeError("no such kernel here")

    assert fastpaths.choose("c", "cpu", "n=1", broken) == "plain"
    calls = []
    assert fastpaths.choose("a", "cpu", "n=1", count_measure(calls, {"plain": 1.0})) == "fast"  # kept: no timing
    assert not calls
    with fastpaths.forced(a="other"):
        assert fastpaths.choose("a", "cpu", "n=1", count_measure(calls, {"plain": 1.0})) == "other"
    assert not calls
    assert fastpaths.choose("a", "cpu", "n=2", count_measure(calls, {"plain": 1.0, "fast": 2.0})) == "plain"
    assert calls == [1]  # another shape is another choice
    assert {(c.what, c.shape, c.chosen) for c in fastpaths.choices()} == {
        ("a", "n=1", "fast"), ("b", "n=1", "plain"), ("c", "n=1", "plain"), ("a", "n=2", "plain")}  # fmt: skip


SCRIPT = """
import json, torch
from whisper_lens import fastpaths
from whisper_lens.decoding import packed
from whisper_lens.model import TextDecoder

calls, packings = [], []
timing = packed.time_packing
packed.time_packing = lambda w, rows: packings.append(rows) or timing(w, rows)
chosen = fastpaths.choose("demo", "cpu", "n=3", lambda: calls.append(1) or {"plain": 2e-3, "fast": 1e-3})
dec = TextDecoder(n_vocab=3000, n_ctx=8, n_state=64, n_head=2, n_layer=1)
with torch.no_grad():
    packs = bool(packed.Kernels.for_decoding(dec, 8).packed)
print(json.dumps({"chosen": chosen, "calls": len(calls), "packings": len(packings), "packs": packs}))
"""


def run_script(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    return env


def test_a_choice_is_kept_for_the_next_process(own_cache):
    first = run_script(subprocess_env())
    assert first["chosen"] == "fast" and first["calls"] == 1 and first["packings"] == 1
    kept = json.loads((own_cache / "whisper-lens" / fastpaths.FILE).read_text())
    assert {c["what"] for c in kept["choices"]} == {"demo", "unembedding"}
    second = run_script(subprocess_env())  # a fresh process: the file's choices, nothing timed
    assert second == dict(first, calls=0, packings=0)
    again = run_script(subprocess_env(WHISPER_LENS_FASTPATHS="retime"))
    assert again["calls"] == 1 and again["packings"] == 1


def test_memory_mode_writes_no_file_and_plain_mode_times_nothing(own_cache, monkeypatch):
    monkeypatch.setenv(fastpaths.ENV, "memory")
    calls = []
    assert fastpaths.choose("m", "cpu", "n=1", count_measure(calls, {"plain": 2.0, "fast": 1.0})) == "fast"
    assert fastpaths.choose("m", "cpu", "n=1", count_measure(calls, {"plain": 2.0, "fast": 1.0})) == "fast"
    assert calls == [1] and not own_cache.exists()
    monkeypatch.setenv(fastpaths.ENV, "plain")
    assert fastpaths.choose("p", "cpu", "n=1", count_measure(calls, {"plain": 2.0, "fast": 1.0})) == "plain"
    assert calls == [1]
    monkeypatch.setenv(fastpaths.ENV, "sometimes")
    with pytest.raises(ValueError, match="WHISPER_LENS_FASTPATHS"):
        fastpaths.choose("p", "cpu", "n=1", count_measure(calls, {"plain": 1.0}))


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe\x00garbage", b"[]", b'{"format": 99, "choices": []}',
     b'{"format": 1, "choices": [{"what": 3}, 7, {"what": "x", "device": "cpu", "shape": "s", "chosen": 1, '
     b'"seconds": {}, "when": ""}]}', None],
)  # fmt: skip
def test_a_corrupt_or_unreadable_cache_file_is_ignored(own_cache, content):
    path = fastpaths.cache_file()
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()  # not a file at all: unreadable and unwritable
    else:
        path.write_bytes(content)
    calls = []
    assert fastpaths.choose("k", "cpu", "n=1", count_measure(calls, {"plain": 2.0, "fast": 1.0})) == "fast"
    assert calls == [1]  # timed, not an error
    if content is not None:  # the file is whole again, with the new choice
        kept = json.loads(path.read_text())
        assert [(c["what"], c["chosen"]) for c in kept["choices"]] == [("k", "fast")]


# ----------------------------------------------------------------------------- whisper-lens info


def info(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "whisper_lens", "info", *args], env=env or subprocess_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_info_lists_the_machine_and_the_choices():
    fastpaths.choose("demo", "cpu", "rows=3", lambda: {"plain": 2e-3, "fast": 1e-3})
    out = info()
    assert out.returncode == 0, out.stderr
    assert "cpu:" in out.stdout and f"torch:  {torch.__version__}" in out.stdout
    assert "demo rows=3: fast  (plain 2 ms, fast 1 ms; timed in " in out.stdout


def test_info_calibrate_times_batch_1_and_8_and_bad_input_is_one_line():
    out = info("--calibrate", "toy")
    assert out.returncode == 0, out.stderr
    timed = out.stdout.split("timed now")[1].split("fast paths chosen")[0]
    for what in ("draft rows=1 ", "draft rows=8 ", "unembedding rows=1 ", "unembedding rows=8 "):
        assert what in timed
    plain, unknown = subprocess_env(WHISPER_LENS_FASTPATHS="plain"), subprocess_env(WHISPER_LENS_FASTPATHS="fastest")
    for bad in (info("--calibrate", "no-such-model"), info("--calibrate", env=plain), info(env=unknown)):
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("whisper-lens: error:") and len(bad.stderr.strip().splitlines()) == 1
