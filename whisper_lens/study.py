"""The study this project grew from, as functions that write pictures and tables into a folder.

- ``lens_study``: the decoder logit lens of a transcript (heatmap + per-layer curves) and the
  encoder lens (the transcript's token probabilities when only the first k encoder blocks run).
- ``ablate_study``: remove the last k blocks of the encoder or decoder, decode, measure WER/CER
  and the signs of hallucination (repetition, compression ratio, empty output).
- ``attention_study``: attention grids (encoder self, decoder self, decoder cross), cross-attention
  over the spectrogram, per-head statistics.
- ``demo``: all of it on the shipped toy model and its samples, into ``report/``.

Each writes into a folder built beside the destination and renamed into place at the end, so
an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import plot
from .audio import HOP_LENGTH, SAMPLE_RATE, load_windows
from .experiments import (
    attention_stats,
    cer,
    compare_attention,
    format_table,
    removal_sweep,
    save_rows,
    summarize,
    wer,
)
from .files import atomic_write, output_folder
from .lens import decoder_lens_from_trace, encoder_lens, lens_names, sot_lens
from .model import Whisper
from .trace import Edits

# ----------------------------------------------------------------------------- inputs and outputs


def write_text(path: Path, text: str) -> Path:
    atomic_write(path, lambda p: Path(p).write_text(text))
    return path


def token_label(tok, token: int) -> str:
    """A short printable name for one token id (specials abbreviated)."""
    names = {
        tok.sot: "SOT",
        tok.eot: "EOT",
        tok.no_timestamps: "NOTS",
        tok.no_speech: "NOSP",
        tok.sot_prev: "PREV",
        tok.transcribe: "TRANSCRIBE",
        tok.translate: "TRANSLATE",
    }
    if token in names:
        return names[token]
    if token >= tok.timestamp_begin:
        return f"<{(token - tok.timestamp_begin) * 0.02:.2f}>"
    if token in tok.all_language_tokens:
        return f"<{tok.language_code(token)}>"
    return tok.decode([token])


def prompt_tokens(model: Whisper, language: str | None) -> list[int]:
    """The tokens ``generate`` fed before a transcript in text mode: sot [language transcribe] notimestamps.

    ``language``: the result's (detected or given) language; ignored by English-only models.
    """
    tok = model.tokenizer
    sot = tok.sot_sequence_for(language, "transcribe") if tok.multilingual else tok.sot_sequence
    return [*sot, tok.no_timestamps]


# ----------------------------------------------------------------------------- the three studies


def lens_study(model: Whisper, mel: torch.Tensor, out: Path, name: str = "clip") -> dict:
    """Decoder and encoder logit lens of one clip's greedy transcript; writes ``{name}_lens*.png`` and a table."""
    tok = model.tokenizer
    res = model.generate(mel[None], trace=lens_names(model))[0]
    seq = prompt_tokens(model, res.language) + res.tokens  # the fed positions; the last one predicts EOT
    lens = decoder_lens_from_trace(model, res.trace)
    labels = [token_label(tok, t) for t in seq]
    top = [[token_label(tok, int(t)) for t in row] for row in lens.top_ids[:, 0, :, 0]]
    plot.lens_heatmap(
        lens.final_prob[:, 0].cpu().numpy(),
        top,
        out / f"{name}_lens.png",
        layer_labels=lens.labels,
        position_labels=labels,
        title=f"Decoder logit lens: {res.text.strip()!r}",
    )
    per_layer = [
        {"layer": lab, "top1_agreement": float(a), "p_final": float(p), "kl": float(k), "entropy": float(e)}
        for lab, a, p, k, e in zip(
            lens.labels,
            lens.agreement(),
            lens.final_prob.mean(dim=(1, 2)),
            lens.kl.mean(dim=(1, 2)),
            lens.entropy.mean(dim=(1, 2)),
            strict=True,
        )
    ]
    enc = encoder_lens(model, mel[None], torch.tensor([seq + [tok.eot]]))[:, 0]  # (L+1, T)
    enc_labels = ["none"] + [str(k) for k in range(1, model.dims.n_audio_layer + 1)]
    enc_top = [[token_label(tok, t) for t in seq[1:] + [tok.eot]]] * enc.shape[0]
    plot.lens_heatmap(
        enc.cpu().numpy(),
        enc_top,
        out / f"{name}_encoder_lens.png",
        layer_labels=enc_labels,
        position_labels=labels,
        title="Encoder lens: p(token) with only the first k encoder blocks",
    )
    save_rows(per_layer, out / f"{name}_lens.csv")
    return {"text": res.text.strip(), "per_layer": per_layer, "encoder_lens": enc.cpu().numpy().tolist()}


def ablate_study(
    model: Whisper,
    mels: torch.Tensor,
    seconds: Sequence[float],
    out: Path,
    stacks: Sequence[str] = ("encoder", "decoder"),
    references: Sequence[str] | None = None,
) -> list[dict]:
    """Remove the last k blocks (k = 0..L) of each stack, decode all clips (one batch per k), measure; plot."""
    rows = []
    for stack in stacks:
        rows += removal_sweep(model, mels, stack, references=references, seconds=seconds)
    cols = ["wer", "cer", "compression_ratio", "max_repeats", "tokens_per_second", "empty"]
    summary = []
    for stack in stacks:
        summary += [{"stack": stack, **s} for s in summarize([r for r in rows if r["stack"] == stack], "removed", cols)]
    curves = {s: [(r["removed"], r["wer"]) for r in summary if r["stack"] == s] for s in stacks}
    plot.removal_curves(curves, out / "removal.png", metric="WER", title="Removing the last k blocks")
    save_rows(rows, out / "ablate.csv")
    save_rows(summary, out / "ablate_summary.csv")
    return summary


def attention_study(
    model: Whisper,
    mel: torch.Tensor,
    seconds: float,
    out: Path,
    name: str = "clip",
    layer: int | None = None,
    edits: Edits | None = None,
) -> list[dict]:
    """Attention pictures and per-head statistics of one clip's greedy decoding (optionally under ``edits``)."""
    tok = model.tokenizer
    enc_layer = model.dims.n_audio_layer - 1 if layer is None else layer
    dec_layer = model.dims.n_text_layer - 1 if layer is None else layer
    for stack, i, n in [
        ("encoder", enc_layer, model.dims.n_audio_layer),
        ("decoder", dec_layer, model.dims.n_text_layer),
    ]:
        if not 0 <= i < n:
            raise IndexError(f"layer {i} out of range: the {stack} has {n} blocks (0-{n - 1})")
    # an encoder pattern is S x S per head (3.5 GB for all of medium's layers): record the drawn layer only
    request = [f"encoder.blocks.{enc_layer}.attn.pattern", "decoder.blocks.*.pattern"]
    res = model.generate(mel[None], trace=request, edits=edits)[0]
    tr = res.trace
    labels = [token_label(tok, t) for t in prompt_tokens(model, res.language) + res.tokens]
    for stack, i, kind in [
        ("encoder", enc_layer, "attn"),
        ("decoder", dec_layer, "attn"),
        ("decoder", dec_layer, "cross_attn"),
    ]:
        key = f"{stack}.blocks.{i}.{kind}.pattern"
        if key in tr:
            plot.attention_grid(
                tr[key][0].cpu().numpy(),
                out / f"{name}_{stack}_{i}_{kind}.png",
                title=f"{key} ({res.text.strip()[:40]!r})",
            )
    cross = f"decoder.blocks.{dec_layer}.cross_attn.pattern"
    if cross in tr:
        plot.cross_attention_over_mel(
            mel.cpu().numpy(),
            tr[cross][0].mean(0).cpu().numpy(),
            labels,
            out / f"{name}_cross_over_mel.png",
            title=f"{cross}, mean over heads: {res.text.strip()[:50]!r}",
        )
    audio_positions = int(np.ceil(seconds * SAMPLE_RATE / HOP_LENGTH / 2))
    stats = attention_stats(tr, audio_positions=audio_positions)
    save_rows(stats, out / f"{name}_attention.csv")
    return stats


# ----------------------------------------------------------------------------- the demo


def demo(
    out: str | os.PathLike = "report",
    model_name: str | None = None,
    samples: str | os.PathLike | None = None,
    progress: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The whole study on a model and sample clips (default: the shipped toy model and its samples).

    ``samples``: a folder with wav files and ``transcripts.json`` ({file name: reference text}).
    Writes ``out/report.md`` with its pictures and tables.
    """
    from tqdm import tqdm

    from .loading import SHIPPED, load_model

    started = time.time()
    folder = Path(samples) if samples is not None else SHIPPED["toy"] / "samples"
    if not (folder / "transcripts.json").exists():
        raise FileNotFoundError(f"the demo needs sample clips with {folder / 'transcripts.json'}")
    md: list[str] = []
    threads = torch.get_num_threads()
    try:
        with output_folder(out, "demo") as tmp:  # checks the destination before any work
            model = load_model(model_name, device=device, dtype=dtype)
            if sum(p.numel() for p in model.parameters()) < 20_000_000:
                # a small model's ops are too short to share between threads: one thread is as fast, and
                # much faster when the other core is busy (threads then wait for each other)
                torch.set_num_threads(1)
            transcripts = json.loads((folder / "transcripts.json").read_text())
            paths = [folder / f for f in transcripts]
            refs = [transcripts[f] for f in transcripts]
            mels, seconds = load_windows(paths, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
            stages = ["transcribe", "decoder lens", "encoder removal", "decoder removal", "attention", "no-speech lens"]
            bar = tqdm(stages, desc="demo", unit="stage", disable=not progress)
            bar.set_postfix_str("transcribing")
            results = model.generate(mels)
            hyps = [r.text.strip() for r in results]
            rows = [
                {"clip": p.name, "reference": r, "transcript": h, "wer": wer(r, h), "cer": cer(r, h)}
                for p, r, h in zip(paths, refs, hyps, strict=True)
            ]
            md += [
                "# whisper-lens demo report",
                "",
                f"Model: {model_name or 'the shipped toy Whisper'} ({model.dims.n_audio_layer} encoder + "
                f"{model.dims.n_text_layer} decoder blocks, width {model.dims.n_text_state}), {len(paths)} clips.",
                "",
                "## 1. Transcripts (greedy)",
                "",
                format_table(rows),
                "",
                f"Corpus WER {wer(refs, hyps):.3f}, CER {cer(refs, hyps):.3f}.",
                "",
            ]
            bar.update()

            bar.set_postfix_str("lens")
            lens = lens_study(model, mels[0], tmp, name="sample0")
            agreements = [
                lens_study(model, mels[i], tmp, name=f"sample{i}")["per_layer"] if i else lens["per_layer"]
                for i in range(len(paths))
            ]
            mean_rows = [
                {
                    "layer": row["layer"],
                    **{
                        k: float(np.mean([a[j][k] for a in agreements]))
                        for k in ("top1_agreement", "p_final", "kl", "entropy")
                    },
                }
                for j, row in enumerate(agreements[0])
            ]
            plot.layer_lines(
                {
                    "top-1 agreement with the final output": [r["top1_agreement"] for r in mean_rows],
                    "p(final token)": [r["p_final"] for r in mean_rows],
                },
                tmp / "lens_layers.png",
                labels=[r["layer"] for r in mean_rows],
                ylabel="mean over positions",
                title="Decoder logit lens, all samples",
            )
            md += [
                "## 2. Decoder logit lens",
                "",
                "Each block's input read through the final LayerNorm and the unembedding. Colour: the probability "
                "of the token the full model predicts; text: each layer's top token.",
                "",
                "![decoder lens](sample0_lens.png)",
                "",
                "![lens per layer](lens_layers.png)",
                "",
                format_table(mean_rows),
                "",
                "Encoder lens: probability of each transcript token when only the first k encoder blocks run "
                "(ln_post still applied).",
                "",
                "![encoder lens](sample0_encoder_lens.png)",
                "",
            ]
            bar.update()

            bar.set_postfix_str("removal")
            summary = ablate_study(model, mels, seconds, tmp, stacks=("encoder", "decoder"), references=refs)
            bar.update(2)
            md += [
                "## 3. Layer removal",
                "",
                "The last k blocks of one stack are skipped (the residual passes through; the encoder's ln_post "
                "stays). All samples are decoded in one batch per k.",
                "",
                "![removal](removal.png)",
                "",
                format_table(summary),
                "",
            ]

            bar.set_postfix_str("attention")
            enc_rows = [r for r in summary if r["stack"] == "encoder" and r["removed"] > 0]
            changed = [r for r in enc_rows if r["wer"] > 0] or enc_rows[-1:]  # settings that change the transcripts
            worst = max(changed, key=lambda r: (r["max_repeats"], r["compression_ratio"], r["wer"]))
            k = int(worst["removed"])
            L = model.dims.n_audio_layer
            normal = attention_study(model, mels[0], seconds[0], tmp, name="normal")
            broken = attention_study(
                model, mels[0], seconds[0], tmp, name="broken", edits=Edits().skip("encoder", range(L - k, L))
            )
            cross = [r for r in compare_attention(normal, broken, "entropy") if "cross_attn" in r["name"]]
            padding = [r for r in compare_attention(normal, broken, "padding_share") if "cross_attn" in r["name"]]
            md += [
                "## 4. Attention, normal vs broken",
                "",
                f"The broken run removes the last {k} encoder blocks (of the settings that change the "
                "transcripts, the one with the most repetition). "
                "Cross-attention of the last decoder block, mean over heads, over the spectrogram:",
                "",
                "![normal](normal_cross_over_mel.png)",
                "",
                "![broken](broken_cross_over_mel.png)",
                "",
                "Cross-attention per head, normal vs broken: share of attention on the padding after the audio,",
                "",
                format_table(padding),
                "",
                "and entropy (nats):",
                "",
                format_table(cross),
                "",
            ]
            bar.update()

            bar.set_postfix_str("no-speech")
            frames = 2 * model.dims.n_audio_ctx
            silence, _ = load_windows([np.zeros(SAMPLE_RATE, np.float32)], model.dims.n_mels, frames)  # 1 s of zeros
            sot = sot_lens(model, torch.cat([mels[:1], silence.to(mels)]))
            layers = [r["layer"] for r in lens["per_layer"]]
            ns_rows = [
                {"layer": lab, "speech": a, "silence": b}
                for lab, (a, b) in zip(layers, sot["no_speech"].tolist(), strict=True)
            ]
            md += [
                "## 5. No-speech lens",
                "",
                "Probability of <|nospeech|> at the <|startoftranscript|> position, read at each decoder layer, "
                "for a speech sample and for silence:",
                "",
                format_table(ns_rows),
                "",
            ]
            bar.update()
            md += [f"Written in {time.time() - started:.1f} s."]
            write_text(tmp / "report.md", "\n".join(md) + "\n")
        bar.close()
    finally:
        torch.set_num_threads(threads)
    return Path(out) / "report.md"
