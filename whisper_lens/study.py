"""The study this project grew from, as functions that write pictures and tables into a folder.

- ``load_clips`` / ``non_speech_clips``: what is studied. A samples folder (default: the real
  speech shipped in ``assets/speech`` for models with a 30 s window, the toy's samples for the
  toy) and deterministic inputs without speech (``hallucination.non_speech``).
- ``lens_study``: the decoder logit lens of a transcript (heatmap + per-layer curves) and the
  encoder lens (the transcript's token probabilities when only the first k encoder blocks run).
- ``ablate_study``: remove the last k blocks of the encoder or decoder, decode, measure WER/CER
  and the signs of hallucination (repetition, compression ratio, empty output).
- ``attention_study``: attention grids (encoder self, decoder self, decoder cross), cross-attention
  over the spectrogram, per-head statistics.
- ``hallucination_sections``: what non-speech decodes to, the no-speech probability per layer,
  the head sweep, attention during a hallucination, the logit lens along a loop;
  ``hallucination_report`` writes them as ``report.md`` (``whisper-lens hallucinate``).
- ``demo``: the lens, removal and attention studies on the shipped toy model and its samples, a clip
  explorer page per clip (``pages.explorer``), and a report that links every file it writes.

Each writes into a folder built beside the destination and renamed into place at the end, so
an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import plot
from .audio import AUDIO_SUFFIXES, HOP_LENGTH, SAMPLE_RATE, load_audio, load_windows
from .experiments import (
    attention_stats,
    cer,
    compare_attention,
    format_table,
    removal_sweep,
    require_tokenizer,
    save_rows,
    summarize,
    wer,
)
from .files import output_folder, write_text
from .hallucination import (
    decision_summary,
    hallucination_rate,
    head_summary,
    head_sweep,
    non_speech,
    repetition_lens,
)
from .lens import decoder_lens_from_trace, encoder_lens, layer_labels, lens_names, sot_lens
from .model import Whisper
from .pages.explorer import token_texts
from .trace import Edits

SPEECH = Path(__file__).resolve().parent / "assets" / "speech"  # real speech shipped for official models
TRANSCRIBED = "hallucinated_in_transcribe"  # the hallucination rate a user of transcribe sees
CROP_POSITIONS = 25  # attention pictures show the audio and 0.5 s (25 encoder positions) after it
POSITION_SECONDS = 2 * HOP_LENGTH / SAMPLE_RATE  # 0.02 s: one encoder position

# ----------------------------------------------------------------------------- inputs and outputs


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


# ----------------------------------------------------------------------------- the clips studied


@dataclass
class Clips:
    """Audio windows to study: names, log-mels, lengths, and the reference transcripts when known."""

    names: list[str]
    mels: torch.Tensor  # (B, n_mels, frames): each clip padded to the model's window
    seconds: list[float]  # each clip's length before padding
    references: list[str] | None = None  # None: error rates are against the full model's own transcripts
    audio: list[np.ndarray] | None = None  # the 16 kHz samples, when read from files (for the explorer pages)


def window_seconds(model: Whisper) -> float:
    """The audio one window holds: 30 s for official models (n_audio_ctx 1500 positions of 20 ms)."""
    return 2 * model.dims.n_audio_ctx * HOP_LENGTH / SAMPLE_RATE


def default_samples(model: Whisper) -> Path:
    """The shipped real speech (``SPEECH``), or the toy's samples for a window too short for it (the toy's 4 s)."""
    import librosa

    from .loading import SHIPPED

    longest = max(librosa.get_duration(path=p) for p in SPEECH.glob("*.flac"))
    return SPEECH if longest <= window_seconds(model) else SHIPPED["toy"] / "samples"


def read_samples(folder: str | os.PathLike) -> tuple[list[Path], list[str] | None]:
    """The clips of a samples folder and their references.

    With ``transcripts.json`` (``{file name: text}`` or ``{file name: {"text": text, ...}}``): the
    files it names, in its order, and their texts. Without it: every audio file in the folder
    (``audio.AUDIO_SUFFIXES``), sorted, and no references.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"samples folder {folder} does not exist or is not a folder")
    index = folder / "transcripts.json"
    if not index.exists():
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
        if not paths:
            raise FileNotFoundError(
                f"{folder} has no audio files ({', '.join(AUDIO_SUFFIXES)}) and no transcripts.json"
            )
        return paths, None
    try:
        entries = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{index} must be a non-empty object {{file name: transcript}}")
    paths, refs = [], []
    for name, entry in entries.items():
        text = entry.get("text") if isinstance(entry, dict) else entry
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{index}: the transcript of {name!r} must be a non-empty string")
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{index} names {name!r}, which is not a file in {folder}")
        paths.append(folder / name)
        refs.append(text)
    return paths, refs


def load_clips(model: Whisper, folder: str | os.PathLike | None = None) -> Clips:
    """The clips of a samples folder (default: ``default_samples(model)``) as windows for ``model``.

    Every clip must fit one window: the study decodes one window per clip. Long recordings are
    ``whisper-lens transcribe``'s job.
    """
    require_tokenizer(model)
    paths, refs = read_samples(default_samples(model) if folder is None else folder)
    audio = [load_audio(p) for p in paths]
    window = window_seconds(model)
    for path, a in zip(paths, audio, strict=True):
        if len(a) > window * SAMPLE_RATE:
            raise ValueError(f"{path} is {len(a) / SAMPLE_RATE:.1f} s long, longer than the model's {window:g} s "
                             "window: the study decodes one window per clip; cut it into clips, or transcribe "
                             "long recordings with `whisper-lens transcribe`")  # fmt: skip
    mels, seconds = load_windows(audio, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    return Clips([p.name for p in paths], mels, seconds, refs, audio)


def non_speech_clips(model: Whisper, seconds: float | None = None, seed: int = 0) -> Clips:
    """``hallucination.non_speech`` as windows for ``model``: ``seconds`` long (default 10 s, or the window)."""
    window = window_seconds(model)
    seconds = min(10.0, window) if seconds is None else seconds
    if isinstance(seconds, int | float) and seconds > window:
        raise ValueError(f"non-speech clips of {seconds:g} s do not fit the model's {window:g} s window")
    signals = non_speech(seconds, seed)
    mels, lengths = load_windows(list(signals.values()), model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    return Clips(list(signals), mels, lengths)


# ----------------------------------------------------------------------------- the three studies


def lens_study(model: Whisper, mel: torch.Tensor, out: Path, name: str = "clip") -> dict:
    """Decoder and encoder logit lens of one clip's greedy transcript; writes ``{name}_lens*.png`` and a table."""
    tok = model.tokenizer
    res = model.generate(mel[None], trace=lens_names(model))[0]
    seq = prompt_tokens(model, res.language) + res.tokens  # the fed positions; the last one predicts EOT
    lens = decoder_lens_from_trace(model, res.trace)
    labels = token_texts(tok, seq)
    top = [[token_label(tok, int(t)) for t in row] for row in lens.top_ids[:, 0, :, 0]]
    fig = plot.lens_heatmap(
        lens.final_prob[:, 0].cpu().numpy(),
        top,
        layer_labels=lens.labels,
        position_labels=labels,
        title=f"Decoder logit lens: {res.text.strip()!r}",
    )
    plot.save(fig, out / f"{name}_lens.png")
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
    enc_labels = [str(k) for k in range(model.dims.n_audio_layer + 1)]
    enc_top = [token_texts(tok, seq[1:] + [tok.eot])] * enc.shape[0]
    fig = plot.lens_heatmap(
        enc.cpu().numpy(),
        enc_top,
        layer_labels=enc_labels,
        position_labels=labels,
        title="Encoder lens: p(next token) with only the first k encoder blocks (rows: k)",
        scale_label="p(token)",
    )
    plot.save(fig, out / f"{name}_encoder_lens.png")
    save_rows(per_layer, out / f"{name}_lens.csv")
    return {"text": res.text.strip(), "per_layer": per_layer, "encoder_lens": enc.cpu().numpy().tolist()}


def ablate_study(
    model: Whisper,
    mels: torch.Tensor,
    seconds: Sequence[float],
    out: Path,
    stacks: Sequence[str] = ("encoder", "decoder"),
    references: Sequence[str] | None = None,
    normalize: str | None = "english",
    on_decoded=None,
) -> list[dict]:
    """Remove the last k blocks (k = 0..L) of each stack, decode all clips (the settings together), measure; plot.

    WER and CER are against ``references`` (default: the full model's transcripts) after ``normalize``.
    ``on_decoded(n, total)``: progress, as ``experiments.removal_sweep``'s.
    """
    rows = removal_sweep(model, mels, list(stacks), references=references, seconds=seconds, normalize=normalize,
                         on_decoded=on_decoded)  # fmt: skip
    cols = ["wer", "cer", "compression_ratio", "max_repeats", "tokens_per_second", "empty"]
    summary = []
    for stack in stacks:
        summary += [{"setting": removal_name(stack, s["removed"]), "stack": stack, **s}
                    for s in summarize([r for r in rows if r["stack"] == stack], "removed", cols)]  # fmt: skip
    curves = {s: [(r["removed"], r["wer"]) for r in summary if r["stack"] == s] for s in stacks}
    plot.save(plot.removal_curves(curves, metric="WER", title="Removing the last k blocks"), out / "removal.png")
    save_rows(rows, out / "ablate.csv")
    save_rows(summary, out / "ablate_summary.csv")
    return summary


def removal_name(stack: str, k: int) -> str:
    """What a removal setting is, in words: 'full model', 'last block of the encoder removed', ..."""
    if k == 0:
        return "full model"
    return f"last {k} {stack} blocks removed" if k > 1 else f"last {stack} block removed"


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
    return attention_pictures(model, {name: AttentionRun(name, mel, seconds, edits)}, out, layer)[name]


@dataclass
class AttentionRun:
    """One decoding whose attention is drawn: what it is (in words), its clip, and the edits it runs under."""

    what: str
    mel: torch.Tensor  # (n_mels, frames)
    seconds: float
    edits: Edits | None = None


def attention_pictures(model: Whisper, runs: dict[str, AttentionRun], out: Path, layer: int | None = None
                       ) -> dict[str, list[dict]]:  # fmt: skip
    """Attention grids (encoder self, decoder self, decoder cross) and cross-attention over the spectrogram of
    each run (files ``{name}_...``), and their per-head statistics (``{name}_attention.csv``), by run name.

    Pictures of one kind share one colour scale across the runs, so a run that attends less looks darker.
    """
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
    done = {}
    for name, r in runs.items():
        res = model.generate(r.mel[None], trace=request, edits=r.edits)[0]
        audio_positions = int(np.ceil(r.seconds * SAMPLE_RATE / HOP_LENGTH / 2))
        shown = min(model.dims.n_audio_ctx, audio_positions + CROP_POSITIONS)  # the audio and 0.5 s after it
        labels = token_texts(tok, prompt_tokens(model, res.language) + res.tokens)
        done[name] = (res, audio_positions, shown, labels)
    keys = [("encoder", enc_layer, "attn"), ("decoder", dec_layer, "attn"), ("decoder", dec_layer, "cross_attn")]
    for stack, i, kind in keys:
        key = f"{stack}.blocks.{i}.{kind}.pattern"
        drawn = {n: d for n, d in done.items() if key in d[0].trace}  # a skipped block records nothing
        audio = stack == "encoder" or kind == "cross_attn"
        crop = {n: d[2] if audio else None for n, d in drawn.items()}
        top = max((float(d[0].trace[key][0][..., : crop[n]].max()) for n, d in drawn.items()), default=1.0)
        for n, (res, _, _, labels) in drawn.items():
            fig = plot.attention_grid(
                res.trace[key][0].cpu().numpy(),
                title=f"{key}, {runs[n].what}: {res.text.strip()[:60]!r}",
                query_labels=None if stack == "encoder" else labels,
                key_labels=labels if stack == "decoder" and kind == "attn" else None,
                key_seconds=POSITION_SECONDS if audio else None,
                crop=crop[n],
                vmax=top if len(drawn) > 1 else None,
            )
            plot.save(fig, out / f"{n}_{stack}_{i}_{kind}.png")
    cross = f"decoder.blocks.{dec_layer}.cross_attn.pattern"
    drawn = {n: d for n, d in done.items() if cross in d[0].trace}
    means = {n: d[0].trace[cross][0].mean(0).cpu().numpy() for n, d in drawn.items()}  # (T, S) each
    top = max((float(m[: plot.MAX_TOKENS, : done[n][2]].max()) for n, m in means.items()), default=1.0)
    for n, (res, _, _, labels) in drawn.items():
        fig = plot.cross_attention_over_mel(
            runs[n].mel.cpu().numpy(),
            means[n],
            labels,
            title=f"{cross}, mean over heads, {runs[n].what}: {res.text.strip()[:60]!r}",
            seconds=runs[n].seconds,
            vmax=top if len(drawn) > 1 else None,
        )
        plot.save(fig, out / f"{n}_cross_over_mel.png")
    stats = {}
    for n, (res, audio_positions, _, _) in done.items():
        stats[n] = attention_stats(res.trace, audio_positions=audio_positions)
        save_rows(stats[n], out / f"{n}_attention.csv")
    return stats


# ----------------------------------------------------------------------------- hallucination


def hallucination_report(
    model: Whisper,
    out: Path,
    speech: Clips,
    noise: Clips,
    *,
    title: str,
    heads: Sequence[tuple[str, int, int]] | None = None,
    max_new_tokens: int | None = None,
    normalize: str | None = "english",
) -> Path:
    """The hallucination study of ``hallucination_sections`` as ``out/report.md`` with a short header."""
    started = time.time()
    d = model.dims
    md = [
        "# whisper-lens hallucination report",
        "",
        f"Model: {title} ({d.n_audio_layer} encoder + {d.n_text_layer} decoder blocks, {d.n_text_head} heads "
        f"each, width {d.n_text_state}). Non-speech: {len(noise.names)} clips of {noise.seconds[0]:g} s. "
        f"Speech: {len(speech.names)} clips ({', '.join(speech.names)}).",
        "",
        *hallucination_sections(
            model, out, speech, noise, heads=heads, max_new_tokens=max_new_tokens, normalize=normalize
        ),  # fmt: skip
        f"Written in {time.time() - started:.1f} s.",
    ]
    return write_text(out / "report.md", "\n".join(md) + "\n")


def hallucination_sections(
    model: Whisper,
    out: Path,
    speech: Clips,
    noise: Clips,
    *,
    heads: Sequence[tuple[str, int, int]] | None = None,
    max_new_tokens: int | None = None,
    normalize: str | None = "english",
) -> list[str]:
    """Every hallucination experiment on ``speech`` and ``noise`` (non-speech) clips: markdown, files in ``out``.

    In order: what each non-speech clip decodes to; the no-speech probability per decoder layer; the
    head sweep (``heads``: default every decoder head, ``[]`` for none); attention during a
    hallucination against a normal run; the logit lens along the most repetitive output on non-speech.
    """
    rows = head_sweep(model, speech.mels, noise.mels, references=speech.references, names=noise.names,
                      seconds=noise.seconds, heads=heads, max_new_tokens=max_new_tokens,
                      normalize=normalize)  # fmt: skip
    save_rows(rows, out / "head_sweep.csv")
    base = [r for r in rows if r["kind"] == "none"]
    md = nonspeech_section(base, speech.references is None)
    md += no_speech_lens_section(model, speech, noise, out)
    if len(base) < len(rows):
        md += head_section(model, rows, out)
    md += hallucination_attention_section(model, speech, noise, base, out)
    md += repetition_lens_section(model, noise, rows, out)
    return md


def nonspeech_section(rows: Sequence[dict], self_references: bool) -> list[str]:
    """Markdown: what the unedited model writes for each non-speech clip, and the hallucination rates."""
    noise = [r for r in rows if not r["speech"]]
    speech = [r for r in rows if r["speech"]]
    words = sum(r["ref_words"] for r in speech)
    table = [{"input": r["name"], "text": r["text"][:60], "tokens": r["n_tokens"], "p(nospeech)": r["no_speech_prob"],
              "avg logprob": r["avg_logprob"], "compression": r["compression_ratio"],
              "hallucinated": r["hallucinated"], "transcribe drops it": r["skipped"]} for r in noise]  # fmt: skip
    against = "the full model's own transcripts" if self_references else "the references"
    return [
        "## Non-speech inputs",
        "",
        "Each input is decoded alone in its window (greedy, as `generate`). *Hallucinated*: text is left "
        "after Whisper's English normalisation. *Transcribe drops it*: openai-whisper's `transcribe` would skip "
        "the window as silence (p(nospeech) > 0.6 and average log-probability < -1).",
        "",
        format_table(table),
        "",
        f"Hallucination rate {hallucination_rate(noise):.2f} ({sum(r['hallucinated'] for r in noise)} of "
        f"{len(noise)}); past transcribe's no-speech rule {hallucination_rate(noise, TRANSCRIBED):.2f}. "
        f"Speech: corpus WER {sum(r['wer'] * r['ref_words'] for r in speech) / words:.3f} against {against}.",
        "",
    ]


def no_speech_lens_section(model: Whisper, speech: Clips, noise: Clips, out: Path) -> list[str]:
    """The probability of <|nospeech|> read at every decoder layer, speech against each non-speech input."""
    p = sot_lens(model, torch.cat([speech.mels, noise.mels]))["no_speech"].cpu()  # (L+1, S+N)
    S, labels = len(speech.names), layer_labels(model)
    series = {"speech (mean)": p[:, :S].mean(1).tolist()}
    series |= {name: p[:, S + i].tolist() for i, name in enumerate(noise.names)}
    fig = plot.layer_lines(series, labels=labels, ylabel="p(<|nospeech|>)", log=True,
                           title="p(<|nospeech|>) at each decoder layer (start-of-transcript position)")  # fmt: skip
    plot.save(fig, out / "no_speech_layers.png")
    rows = [{"layer": lab} | {n: v[j] for n, v in series.items()} for j, lab in enumerate(labels)]
    save_rows(rows, out / "no_speech_layers.csv")
    shown = [{k: f"{v:.2g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows]
    return [
        "## The no-speech probability, layer by layer",
        "",
        "p(<|nospeech|>) at the <|startoftranscript|> position, each decoder layer's stream read through the "
        "final LayerNorm and the unembedding (`lens.sot_lens`); the last row is the `no_speech_prob` decoding "
        "reports. Where the curves part is where the decoder tells speech from non-speech (log scale).",
        "",
        "![no-speech per layer](no_speech_layers.png)",
        "",
        format_table(shown),
        "",
    ]


def head_section(model: Whisper, rows: Sequence[dict], out: Path, top: int = 10) -> list[str]:
    """The head sweep's ranking (table, CSV) and two pictures: the change in hallucination and in WER per head."""
    summary = head_summary(rows)
    save_rows(summary, out / "heads.csv")
    L, H = model.dims.n_text_layer, model.dims.n_text_head
    kinds = {"attn": "self-attention", "cross_attn": "cross-attention"}
    pictures = [("d_in_transcribe", "the hallucination rate past transcribe's rule", "heads_hallucination.png"),
                ("d_wer", "the speech WER", "heads_wer.png")]  # fmt: skip
    for column, what, name in pictures:
        grids = {title: np.zeros((L, H)) for kind, title in kinds.items() if any(s["kind"] == kind for s in summary)}
        for s in summary[1:]:
            grids[kinds[s["kind"]]][s["layer"], s["head"]] = s[column]
        fig = plot.head_grid(grids, title=f"Zeroing one decoder head: the change in {what}", label="change")
        plot.save(fig, out / name)
    columns = ["kind", "layer", "head", "hallucination_rate", "in_transcribe", "no_speech_prob", "wer",
               "d_in_transcribe", "d_no_speech_prob", "d_wer"]  # fmt: skip
    return [
        "## Head sweep",
        "",
        f"Each of the {len(summary) - 1} decoder attention heads zeroed alone (`Edits().ablate_heads`, at the head's "
        "`z`), every clip decoded again. Ranked by the hallucination rate past transcribe's rule, then the "
        f"rate itself, then p(nospeech) (higher first), then the speech WER. The unedited model, then the top {top}:",
        "",
        format_table(summary[: top + 1], columns),
        "",
        "![hallucination per head](heads_hallucination.png)",
        "",
        "![WER per head](heads_wer.png)",
        "",
        "All settings: `heads.csv`; every clip of every setting: `head_sweep.csv`.",
        "",
    ]


def hallucination_attention_section(
    model: Whisper, speech: Clips, noise: Clips, rows: Sequence[dict], out: Path
) -> list[str]:
    """Attention while the unedited model hallucinates on non-speech, against a normal run on speech."""
    halluc = [r for r in rows if not r["speech"] and r["hallucinated"]]
    if not halluc:
        return ["## Attention during a hallucination", "", "The model hallucinated on no non-speech input.", ""]
    pick = min(halluc, key=lambda r: r["no_speech_prob"])  # the input the model most takes for speech
    i = pick["clip"]
    what = {"normal": f"speech ({speech.names[0]})", "hallucination": f"non-speech ({pick['name']})"}
    stats = attention_pictures(model, {
        "normal": AttentionRun(what["normal"], speech.mels[0], speech.seconds[0]),
        "hallucination": AttentionRun(what["hallucination"], noise.mels[i], noise.seconds[i]),
    }, out)  # fmt: skip
    normal, broken = stats["normal"], stats["hallucination"]
    per_head = []
    for metric in ("entropy", "padding_share"):
        per_head += [
            r | {"metric": metric} for r in compare_attention(normal, broken, metric) if "cross_attn" in r["name"]
        ]
    save_rows(per_head, out / "attention_compare.csv")
    table = []
    for name in dict.fromkeys(r["name"] for r in per_head):  # each cross-attention layer, mean over its heads
        row = {"layer": name}
        for metric, label in (("entropy", "entropy"), ("padding_share", "after the audio")):
            heads = [r for r in per_head if r["name"] == name and r["metric"] == metric]
            row[f"{label}, speech"] = float(np.mean([r[f"{metric}_normal"] for r in heads]))
            row[f"{label}, hallucination"] = float(np.mean([r[f"{metric}_other"] for r in heads]))
        table.append(row)
    return [
        "## Attention during a hallucination",
        "",
        f"The unedited model on `{pick['name']}` (it wrote {pick['text'][:60]!r} with p(nospeech) "
        f"{pick['no_speech_prob']:.2f}, the lowest of its hallucinations) against a normal run on "
        f"`{speech.names[0]}`. Cross-attention of the last decoder block, mean over heads, over the spectrogram "
        "(the bar at the right: each token's attention on the window after the audio; one colour scale for both):",
        "",
        "![normal](normal_cross_over_mel.png)",
        "",
        "![hallucination](hallucination_cross_over_mel.png)",
        "",
        "Attention grids of the last blocks (one colour scale per kind for both runs): "
        + ", ".join(f"[{p}]({p})" for p in attention_files(model, ("normal", "hallucination"), out))
        + ".",
        "",
        "Cross-attention per layer, mean over heads: entropy (nats; higher = more spread out) and the share "
        "of attention on the window after the audio, speech against the hallucination (per head: "
        "`attention_compare.csv`; every statistic: `normal_attention.csv`, `hallucination_attention.csv`):",
        "",
        format_table(table),
        "",
    ]


def repetition_lens_section(model: Whisper, noise: Clips, rows: Sequence[dict], out: Path) -> list[str]:
    """The logit lens along the most repetitive output on non-speech (unedited or under a head ablation)."""
    candidates = [r for r in rows if not r["speech"] and r["n_tokens"] > 0]
    if not candidates:
        return ["## The logit lens along a repetition loop", "", "No non-speech input produced any text.", ""]
    pick = max(candidates, key=lambda r: (r["max_repeats"], r["n_tokens"], r["kind"] == "none"))
    head = None if pick["kind"] == "none" else (pick["kind"], pick["layer"], pick["head"])
    edits = None if head is None else Edits().ablate_heads(f"decoder.blocks.{head[1]}.{head[0]}", [head[2]])
    mel = noise.mels[pick["clip"]]
    res = model.generate(mel[None], edits=edits, max_new_tokens=pick["n_tokens"] or None)[0]
    prompt = prompt_tokens(model, res.language)
    lens = repetition_lens(model, mel, prompt, res.tokens, edits=edits)
    save_rows(lens, out / "repetition_lens.csv")
    tok, labels = model.tokenizer, layer_labels(model)
    n = len(labels)
    prob = np.array([[r[f"p_{l}"] for r in lens] for l in range(n)])  # (L+1, T)
    top = [[token_label(tok, r[f"top_{l}"]) for r in lens] for l in range(n)]
    fed = token_texts(tok, (prompt + res.tokens)[len(prompt) - 1 : len(prompt) - 1 + len(lens)])
    fig = plot.lens_heatmap(prob, top, layer_labels=labels, position_labels=fed,
                            title=f"Logit lens along {res.text.strip()[:60]!r}")  # fmt: skip
    plot.save(fig, out / "repetition_lens.png")
    summary = decision_summary(lens)
    where = "the unedited model" if head is None else f"head {head[2]} of decoder.blocks.{head[1]}.{head[0]} zeroed"
    stats = [{"tokens": kind, "count": summary[kind], "mean decision layer": summary[f"decision_{kind}"]}
             for kind in ("repeats", "others")]  # fmt: skip
    return [
        "## The logit lens along a repetition loop",
        "",
        f"The most repetitive output on non-speech, of the unedited model and of every head ablation: "
        f"`{pick['name']}`, {where}, {len(res.tokens)} tokens ({pick['max_repeats']} repeats in a row): "
        f"{res.text.strip()[:80]!r}. Each column is one emitted "
        "token, read at the position that predicted it; colour is the probability each layer's readout gives it, "
        "text the readout's own top token. A token's *decision layer* is the first readout from which it stays "
        f"the top-1 ({labels[0]} = the embeddings, {labels[-1]} = the model's output). Repeats are tokens that "
        "copy an earlier pair of tokens.",
        "",
        "![lens along the loop](repetition_lens.png)",
        "",
        format_table(stats),
        "",
    ]


# ----------------------------------------------------------------------------- the demo


def demo(
    out: str | os.PathLike = "report",
    model_name: str | None = None,
    samples: str | os.PathLike | None = None,
    progress: bool = True,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """The whole study on a model and sample clips; writes ``out/report.md`` and its pictures, returns its path.

    ``model_name``: anything ``load_model`` takes (default: the shipped toy model). ``samples``: a
    folder of clips (see ``read_samples``; without ``transcripts.json`` the error rates are against
    the full model's own transcripts); default ``default_samples(model)``: the shipped real speech
    for official models, the toy's samples for the toy. One section per stage, one explorer page
    per clip, and at the end a list linking every file written. ``progress``: a bar on stderr that
    advances per clip and per removal setting decoded.
    """
    from tqdm import tqdm

    from .loading import load_model

    started = time.time()
    if samples is not None:
        read_samples(samples)  # a missing folder or a bad transcripts.json fails before any work
    with output_folder(out, "demo") as tmp:  # checks the destination before any work
        model = load_model(model_name, device=device, dtype=dtype)
        clips = load_clips(model, samples)
        n = len(clips.names)
        bar = tqdm(total=1 + 3 * n + 2, desc="demo", unit="step", disable=not progress, postfix="transcripts")
        step = Progress(bar)
        md = demo_header(model, model_name, clips) + transcripts_section(model, clips)
        step("lens")
        md += lens_section(model, clips, tmp, step)
        removal_md, summary = removal_section(model, clips, tmp, step)
        md += removal_md
        md += attention_section(model, clips, tmp, summary)
        step("explorer pages")
        md += explorer_section(model, clips, tmp, step)
        md += no_speech_section(model, clips, tmp)
        step("done")
        bar.close()
        md += files_section(tmp)
        md += [f"Written in {time.time() - started:.1f} s."]
        write_text(tmp / "report.md", "\n".join(md) + "\n")
    return Path(out) / "report.md"


class Progress:
    """The demo's progress bar: ``step(next)`` after a clip or a stage, ``settings(n, total)`` as removal
    settings are decoded (their count joins the bar's total when first known)."""

    def __init__(self, bar) -> None:
        self.bar = bar
        self.sized = False

    def __call__(self, next_stage: str, n: int = 1) -> None:
        self.bar.update(n)
        self.bar.set_postfix_str(next_stage)

    def settings(self, n: int, total: int) -> None:
        if not self.sized:
            self.bar.total += total
            self.sized = True
        self("removal: decoding settings", n)


def demo_header(model: Whisper, model_name: str | None, clips: Clips) -> list[str]:
    d = model.dims
    return [
        "# whisper-lens demo report",
        "",
        f"Model: {model_name or 'the shipped toy Whisper'} ({d.n_audio_layer} encoder + {d.n_text_layer} decoder "
        f"blocks, width {d.n_text_state}), {len(clips.names)} clips. Every file written is listed at the end.",
        "",
    ]


def transcripts_section(model: Whisper, clips: Clips) -> list[str]:
    """1. Every clip's greedy transcript, against its reference when there is one."""
    hyps = [r.text.strip() for r in model.generate(clips.mels)]
    if clips.references is None:
        rows = [{"clip": name, "transcript": hyp} for name, hyp in zip(clips.names, hyps, strict=True)]
        rates = ("No reference transcripts were given: the error rates below are against these transcripts "
                 "of the full model.")  # fmt: skip
    else:
        rows = [
            {"clip": name, "reference": ref, "transcript": hyp, "wer": wer(ref, hyp), "cer": cer(ref, hyp)}
            for name, ref, hyp in zip(clips.names, clips.references, hyps, strict=True)
        ]
        rates = f"Corpus WER {wer(clips.references, hyps):.3f}, CER {cer(clips.references, hyps):.3f}."
    return ["## 1. Transcripts (greedy)", "", format_table(rows), "", rates, ""]


def clip_stem(i: int, name: str) -> str:
    """A file-name stem for clip ``i``: its own name's stem (letters, digits, - and _ only)."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(name).stem)
    return f"{i}_{stem}"


def lens_section(model: Whisper, clips: Clips, out: Path, step=None) -> list[str]:
    """2. The decoder logit lens of every clip (pictures of each, the first shown), averaged per layer; the
    encoder lens."""
    per_clip, texts = [], []
    for i in range(len(clips.names)):
        result = lens_study(model, clips.mels[i], out, name=f"sample{i}")
        per_clip.append(result["per_layer"])
        texts.append(result["text"])
        if step is not None:
            step("lens" if i + 1 < len(clips.names) else "removal")
    metrics = ("top1_agreement", "p_final", "kl", "entropy")
    mean_rows = [
        {"layer": row["layer"], **{k: float(np.mean([clip[j][k] for clip in per_clip])) for k in metrics}}
        for j, row in enumerate(per_clip[0])
    ]
    fig = plot.layer_lines(
        {
            "top-1 agreement with the final output": [r["top1_agreement"] for r in mean_rows],
            "p(final token)": [r["p_final"] for r in mean_rows],
        },
        labels=[r["layer"] for r in mean_rows],
        ylabel="mean over positions",
        title="Decoder logit lens, all samples",
    )
    plot.save(fig, out / "lens_layers.png")
    table = [
        {"clip": name, "transcript": text[:60], "decoder lens": f"[picture](sample{i}_lens.png)",
         "encoder lens": f"[picture](sample{i}_encoder_lens.png)", "per layer": f"[table](sample{i}_lens.csv)",
         "explorer": f"[page](explore_{clip_stem(i, name)}.html)" if clips.audio is not None else ""}
        for i, (name, text) in enumerate(zip(clips.names, texts, strict=True))
    ]  # fmt: skip
    return [
        "## 2. Decoder logit lens",
        "",
        "Each block's input read through the final LayerNorm and the unembedding. Colour: the probability "
        f"of the token the full model predicts (0 to 1, the same scale in every lens picture); text: each "
        f"layer's top token. The first clip, `{clips.names[0]}`:",
        "",
        "![decoder lens](sample0_lens.png)",
        "",
        "Every clip:",
        "",
        format_table(table),
        "",
        "Mean over all clips' positions, per layer:",
        "",
        "![lens per layer](lens_layers.png)",
        "",
        format_table(mean_rows),
        "",
        "Encoder lens: probability of each transcript token when only the first k encoder blocks run "
        "(ln_post still applied; rows: k). The first clip:",
        "",
        "![encoder lens](sample0_encoder_lens.png)",
        "",
    ]


def removal_section(model: Whisper, clips: Clips, out: Path, step=None) -> tuple[list[str], list[dict]]:
    """3. Removing the last k blocks of the encoder, then of the decoder; returns the section and the summary."""
    summary = ablate_study(model, clips.mels, clips.seconds, out, stacks=("encoder", "decoder"),
                           references=clips.references, on_decoded=None if step is None else step.settings)  # fmt: skip
    lines = [
        "## 3. Layer removal",
        "",
        "The last k blocks of one stack are skipped (the residual passes through; the encoder's ln_post "
        "stays). All samples and settings are decoded together, the full model once for both stacks. "
        "Rows: `ablate.csv`; this table: `ablate_summary.csv`.",
        "",
        "![removal](removal.png)",
        "",
        format_table(summary),
        "",
    ]
    return lines, summary


def attention_files(model: Whisper, names: Sequence[str], out: Path, layer: int | None = None) -> list[str]:
    """The attention grid files ``attention_pictures`` wrote into ``out`` for runs ``names`` (a skipped block has
    none)."""
    e = model.dims.n_audio_layer - 1 if layer is None else layer
    d = model.dims.n_text_layer - 1 if layer is None else layer
    kinds = (f"encoder_{e}_attn", f"decoder_{d}_attn", f"decoder_{d}_cross_attn")
    return [f"{n}_{kind}.png" for n in names for kind in kinds if (out / f"{n}_{kind}.png").exists()]


def attention_section(model: Whisper, clips: Clips, out: Path, summary: list[dict]) -> list[str]:
    """4. Attention of the full model against the encoder removal (from ``summary``) that repeats most."""
    enc_rows = [r for r in summary if r["stack"] == "encoder" and r["removed"] > 0]
    changed = [r for r in enc_rows if r["wer"] > 0] or enc_rows[-1:]  # settings that change the transcripts
    k = int(max(changed, key=lambda r: (r["max_repeats"], r["compression_ratio"], r["wer"]))["removed"])
    L = model.dims.n_audio_layer
    mel, seconds = clips.mels[0], clips.seconds[0]
    broken = removal_name("encoder", k)
    names = {"full": "full model", "removed": broken}
    stats = attention_pictures(model, {
        "full": AttentionRun(names["full"], mel, seconds),
        "removed": AttentionRun(broken, mel, seconds, Edits().skip("encoder", range(L - k, L))),
    }, out)  # fmt: skip
    table = []
    padding = compare_attention(stats["full"], stats["removed"], "padding_share")
    entropy = {(r["name"], r["head"]): r for r in compare_attention(stats["full"], stats["removed"], "entropy")}
    for r in padding:
        if "cross_attn" not in r["name"]:
            continue
        e = entropy[r["name"], r["head"]]
        table.append({"layer": r["name"].removesuffix(".cross_attn"), "head": r["head"],
                      "after the audio, full model": r["padding_share_normal"],
                      f"after the audio, {broken}": r["padding_share_other"],
                      "entropy, full model": e["entropy_normal"],
                      f"entropy, {broken}": e["entropy_other"]})  # fmt: skip
    grids = ", ".join(f"[{p}]({p})" for p in attention_files(model, names, out))
    return [
        "## 4. Attention: the full model against removed encoder blocks",
        "",
        f"The second run removes the last {k} encoder blocks (of the settings that change the "
        f"transcripts, the one with the most repetition) on `{clips.names[0]}`. "
        "Cross-attention of the last decoder block, mean over heads, over the spectrogram; both pictures share "
        "one colour scale (stated on their colourbars):",
        "",
        "![full model](full_cross_over_mel.png)",
        "",
        f"![{broken}](removed_cross_over_mel.png)",
        "",
        f"Attention grids of the last blocks, one colour scale per kind for both runs: {grids}. "
        "Every head's statistics: `full_attention.csv`, `removed_attention.csv`.",
        "",
        "Cross-attention per head: the share of attention on the window after the audio (the padding), and "
        "the entropy of each row (nats; higher = more spread out), mean over the tokens:",
        "",
        format_table(table),
        "",
    ]


def explorer_section(model: Whisper, clips: Clips, out: Path, step=None) -> list[str]:
    """5. One clip explorer page per clip (``pages.explorer``): where each token listened, layer by layer."""
    from .pages.common import write_page
    from .pages.explorer import explorer_data, explorer_html

    if clips.audio is None:
        return []
    links = []
    for i, (name, audio) in enumerate(zip(clips.names, clips.audio, strict=True)):
        page = f"explore_{clip_stem(i, name)}.html"
        write_page(out / page, explorer_html(explorer_data(model, audio, name=name)))
        links.append(f"- [{name}]({page})")
        if step is not None:
            step("explorer pages" if i + 1 < len(clips.names) else "no-speech")
    return [
        "## 5. Clip explorer",
        "",
        "One self-contained page per clip (open it in a browser, no server needed): the spectrogram with the "
        "audio, the tokens with their word times; click a token to see each decoder layer's cross-attention "
        "for it, its logit lens and its encoder lens.",
        "",
        *links,
        "",
    ]


def no_speech_section(model: Whisper, clips: Clips, out: Path | None = None) -> list[str]:
    """6. p(<|nospeech|>) at sot per decoder layer, for the first clip and for one second of silence."""
    frames = 2 * model.dims.n_audio_ctx
    silence, _ = load_windows([np.zeros(SAMPLE_RATE, np.float32)], model.dims.n_mels, frames)
    sot = sot_lens(model, torch.cat([clips.mels[:1], silence.to(clips.mels)]))
    labels = layer_labels(model)
    values = sot["no_speech"].double().tolist()  # (L+1, 2)
    rows = [{"layer": label, "speech": f"{a:.3g}", "silence": f"{b:.3g}"}
            for label, (a, b) in zip(labels, values, strict=True)]  # fmt: skip
    picture = []
    if out is not None and all(v > 0 for pair in values for v in pair):
        fig = plot.layer_lines({f"speech ({clips.names[0]})": [a for a, _ in values], "1 s of silence":
                                [b for _, b in values]}, labels=labels, ylabel="p(<|nospeech|>)", log=True,
                               title="p(<|nospeech|>) read at each decoder layer")  # fmt: skip
        plot.save(fig, out / "no_speech_layers.png")
        picture = ["![no-speech per layer](no_speech_layers.png)", ""]
    return [
        "## 6. No-speech lens",
        "",
        "Probability of <|nospeech|> at the <|startoftranscript|> position, read at each decoder layer, "
        "for a speech sample and for silence (three significant digits; the picture's axis is logarithmic):",
        "",
        *picture,
        format_table(rows),
        "",
    ]


def files_section(out: Path) -> list[str]:
    """The last section: a link to every file in ``out`` (but the report itself), grouped by kind."""
    kinds = {".png": "Pictures", ".html": "Pages", ".csv": "Tables"}
    files = sorted(
        p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".") and p.name != "report.md"
    )
    md = ["## Files", ""]
    for suffix, title in kinds.items():
        names = [f for f in files if f.endswith(suffix)]
        if names:
            md += [f"{title}: " + ", ".join(f"[{f}]({f})" for f in names) + ".", ""]
    other = [f for f in files if Path(f).suffix not in kinds]
    if other:
        md += ["Other: " + ", ".join(f"[{f}]({f})" for f in other) + ".", ""]
    return md
