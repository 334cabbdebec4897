"""Activation batches for SAEs: every row once per epoch, deterministic per seed, memory bounded by the buffer.

The exports here are written by the exporter's own shard writer and index (synthetic tensors whose
values name their clip and position), so that an export several times the buffer costs no model runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import whisper_lens as wl
from whisper_lens.distributed import EXPORT_CONTENTS, Clip, ShardWriter, _write_index, claim, position_axes

NAME = "encoder.blocks.0.resid_post"
DIMS = wl.ModelDims(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1, n_vocab=64,
                    n_text_ctx=8, n_text_state=64, n_text_head=2, n_text_layer=1)  # fmt: skip


def synthetic_export(folder: Path, lengths: list[int], shard_clips: int = 16) -> Path:
    """An export of ``NAME`` whose row p of clip c is (c, p, c * 1000 + p, 0, 0, ...)."""
    axes = position_axes(DIMS, [NAME])
    clips = [Clip(f"c{c:04d}.wav", f"/nowhere/c{c:04d}.wav", 100 + c, n / 50) for c, n in enumerate(lengths)]
    with claim(folder, "export", {"synthetic": True}, EXPORT_CONTENTS) as out:
        writer = ShardWriter(out / "shards", shard_clips)
        (out / "shards").mkdir()
        for c, (clip, n) in enumerate(zip(clips, lengths, strict=True)):
            x = torch.zeros(n, DIMS.n_audio_state)
            x[:, 0], x[:, 1] = c, torch.arange(n)
            x[:, 2] = c * 1000 + torch.arange(n)
            writer.add([({"clip": clip.id, "key": clip.key, "seconds": clip.seconds}, {NAME: x})])
        writer.flush()
        _write_index(out, clips, {"model": {}, "dtype": "float32", "positions": "speech", "max_new_tokens": None},
                     DIMS, axes)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    lengths = [int(n) for n in torch.randint(1, 300, (40,), generator=torch.Generator().manual_seed(1))]
    return synthetic_export(tmp_path_factory.mktemp("sae") / "small", lengths, shard_clips=7)


def test_every_row_comes_out_exactly_once_per_epoch_with_its_clip_and_position(small):
    acts = wl.load_activations(small)
    batches = acts.batches(NAME, 64, shuffle=True, seed=3, buffer=500, with_rows=True)
    seen = []
    for x, rows in batches:
        assert x.shape[1] == DIMS.n_audio_state and x.dtype == torch.float32
        assert torch.equal(x[:, :2].long(), rows)  # each row's (clip, position) is the row's own
        seen += [tuple(r) for r in rows.tolist()]
    expected = [(c, p) for c, n in enumerate(batches.lengths) for p in range(n)]
    assert len(seen) == len(expected) == batches.rows
    assert sorted(seen) == expected  # once each, none missing
    assert seen != expected  # shuffled across clips
    clips_in_first = {c for c, _ in seen[:64]}
    assert len(clips_in_first) > 3  # a batch mixes clips
    assert len(list(acts.batches(NAME, 64, seed=3, buffer=500))) == len(batches)


def test_the_same_seed_gives_the_same_batches_and_another_seed_others(small):
    acts = wl.load_activations(small)
    a = [x[:, 2] for x in acts.batches(NAME, 50, seed=7, buffer=300)]
    b = [x[:, 2] for x in acts.batches(NAME, 50, seed=7, buffer=300)]
    c = [x[:, 2] for x in acts.batches(NAME, 50, seed=8, buffer=300)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    assert torch.equal(torch.cat(a).sort().values, torch.cat(c).sort().values)


def test_unshuffled_batches_are_the_export_in_order_and_drop_last_drops_the_short_batch(small):
    acts = wl.load_activations(small)
    rows = torch.cat([x[:, 2] for x in acts.batches(NAME, 64, shuffle=False)])
    assert torch.equal(rows, torch.cat([x[:, 2] for _, x in acts.tensors(NAME)]))
    dropped = list(acts.batches(NAME, 64, shuffle=False, drop_last=True))
    assert all(len(x) == 64 for x in dropped) and len(dropped) == len(rows) // 64


def test_bad_requests_are_one_line_errors(small):
    acts = wl.load_activations(small)
    with pytest.raises(KeyError, match="no name 'encoder.blocks.9.resid_post'"):
        acts.batches("encoder.blocks.9.resid_post", 8)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        acts.batches(NAME, 0)


def _anon_kib() -> int:
    return int(re.search(r"RssAnon:\s+(\d+)", Path("/proc/self/status").read_text())[1])


def test_memory_stays_bounded_by_the_buffer_on_an_export_many_times_larger(tmp_path):
    lengths = [1000] * 160  # 160,000 rows of 64 floats: 41 MB, 20x the buffer's 2 MB
    folder = synthetic_export(tmp_path / "large", lengths, shard_clips=16)
    acts = wl.load_activations(folder)
    export_mib = sum(lengths) * DIMS.n_audio_state * 4 / 2**20
    base, peak, total = _anon_kib(), 0, 0
    for x in acts.batches(NAME, 256, seed=0, buffer=8192):
        total += len(x)
        peak = max(peak, _anon_kib() - base)
    assert total == sum(lengths)
    buffer_mib = (8192 + 1000) * DIMS.n_audio_state * 4 / 2**20  # the buffer and one clip
    assert peak / 1024 < 4 * buffer_mib + 4, (peak / 1024, buffer_mib, export_mib)  # not the export's 41 MB
