"""Experiments on a model's behaviour: error rates, layer removal, hallucination and attention statistics."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .trace import Edits


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning ``ref`` into ``hyp``."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def _rate(refs: Sequence[Sequence], hyps: Sequence[Sequence], what: str) -> float:
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError(f"the reference is empty: a {what} error rate needs at least one reference {what}")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / total


def wer(ref: str | Sequence[str], hyp: str | Sequence[str]) -> float:
    """Word error rate: word edit distance over the number of reference words (corpus-level for lists)."""
    refs, hyps = ([ref], [hyp]) if isinstance(ref, str) else (ref, hyp)
    return _rate([r.split() for r in refs], [h.split() for h in hyps], "word")


def cer(ref: str | Sequence[str], hyp: str | Sequence[str]) -> float:
    """Character error rate: character edit distance over the number of reference characters."""
    refs, hyps = ([ref], [hyp]) if isinstance(ref, str) else (ref, hyp)
    return _rate(list(refs), list(hyps), "character")


# ----------------------------------------------------------------------------- hallucination metrics


def longest_repeat(tokens: Sequence) -> int:
    """Length of the longest n-gram that occurs at least twice (overlaps allowed): 0 when nothing repeats."""
    best, n = 0, 1
    while n < len(tokens):
        seen, found = set(), False
        for i in range(len(tokens) - n + 1):
            gram = tuple(tokens[i : i + n])
            if gram in seen:
                found = True
                break
            seen.add(gram)
        if not found:
            break
        best, n = n, n + 1
    return best


def max_consecutive_repeats(tokens: Sequence, max_n: int = 8) -> int:
    """The most times any n-gram (n <= max_n) repeats back to back: 'a b a b a b' -> 3; no loop -> 1."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(n):
            run, prev = 1, None
            for i in range(start, len(tokens) - n + 1, n):
                gram = tuple(tokens[i : i + n])
                run = run + 1 if gram == prev else 1
                prev = gram
                best = max(best, run)
    return best


def hallucination_metrics(text: str, tokens: Sequence[int], seconds: float) -> dict:
    """Signs of a degenerate transcript: repetition (compression ratio, repeated n-grams), rate, emptiness."""
    from .decoding import compression_ratio

    if seconds <= 0:
        raise ValueError(f"audio duration must be > 0 seconds, got {seconds}")
    return {
        "compression_ratio": compression_ratio(text) if text else 0.0,
        "longest_repeat": longest_repeat(list(tokens)),
        "max_repeats": max_consecutive_repeats(list(tokens)),
        "tokens_per_second": len(tokens) / seconds,
        "empty": not text.strip(),
    }


# ----------------------------------------------------------------------------- layer removal


def removal_sweep(
    model,
    mel,
    stack: str,
    *,
    references: Sequence[str] | None = None,
    removals: Sequence[Sequence[int]] | None = None,
    seconds: Sequence[float] | None = None,
    max_new_tokens: int | None = None,
) -> list[dict]:
    """Decode every clip with blocks of ``stack`` removed; one row per (removal, clip).

    ``removals``: the block sets to remove; default the last k blocks for k = 0..L. All clips of a
    removal are decoded in one batch (the same edit for the whole batch). Error rates are against
    ``references`` or, when none are given, against the full model's own transcripts.
    """
    if stack not in ("encoder", "decoder"):
        raise ValueError(f"stack must be 'encoder' or 'decoder', got {stack!r}")
    L = model.dims.n_audio_layer if stack == "encoder" else model.dims.n_text_layer
    if removals is None:
        removals = [list(range(L - k, L)) for k in range(L + 1)]
    for r in removals:
        bad = [i for i in r if not 0 <= i < L]
        if bad:
            raise IndexError(f"{stack} blocks {bad} out of range: the {stack} has {L} blocks (0-{L - 1})")
    B = mel.shape[0]
    seconds = list(seconds) if seconds is not None else [30.0 * model.dims.n_audio_ctx / 1500] * B
    if references is not None and len(references) != B:
        raise ValueError(f"{len(references)} references for {B} clips")
    if references is None:
        references = [r.text.strip() for r in model.generate(mel, max_new_tokens=max_new_tokens)]
    if any(not r.strip() for r in references):
        raise ValueError("a reference transcript is empty: error rates need words to compare against")
    rows = []
    for removed in removals:
        edits = Edits().skip(stack, list(removed)) if removed else None
        results = model.generate(mel, edits=edits, max_new_tokens=max_new_tokens)
        for i, (res, ref) in enumerate(zip(results, references, strict=True)):
            text = res.text.strip()
            row = {"stack": stack, "removed": len(removed), "blocks_removed": " ".join(map(str, removed)),
                   "clip": i, "text": text, "wer": wer(ref, text), "cer": cer(ref, text),
                   "avg_logprob": res.avg_logprob}  # fmt: skip
            rows.append(row | hallucination_metrics(text, res.tokens, seconds[i]))
    return rows


def summarize(rows: Sequence[dict], by: str, columns: Sequence[str]) -> list[dict]:
    """Mean of ``columns`` over rows grouped by ``by`` (e.g. mean WER per number of removed blocks)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(r[by], []).append(r)
    return [{by: key, **{c: sum(float(r[c]) for r in rs) / len(rs) for c in columns}} for key, rs in groups.items()]


# ----------------------------------------------------------------------------- attention statistics


def attention_stats(trace, *, audio_positions: int | None = None) -> list[dict]:
    """Per head statistics of every recorded attention pattern in ``trace`` (batch averaged).

    - entropy: mean over queries of the pattern's entropy (nats); low = focused heads.
    - padding_share (cross-attention and encoder self-attention, when ``audio_positions`` gives
      where the audio ends): attention mass on positions after the audio, i.e. on padding.
    - monotonicity (cross-attention): share of consecutive text positions whose attention peak
      does not move back in the audio; diagonality: correlation between text position and the
      attention centroid. Both near 1 for heads that follow the speech as it is read out.
    """
    rows = []
    for name in trace.names():
        if not name.endswith("attn.pattern"):
            continue
        p = trace[name].float()  # (B, H, T, S)
        stack, _, layer, kind = name.split(".")[:4]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(dim=(0, 2))  # (H,)
        for h in range(p.shape[1]):
            row = {"name": name.removesuffix(".pattern"), "stack": stack, "layer": int(layer), "kind": kind,
                   "head": h, "entropy": float(entropy[h])}  # fmt: skip
            if audio_positions is not None and (kind == "cross_attn" or stack == "encoder"):
                row["padding_share"] = float(p[:, h, :, audio_positions:].sum(-1).mean())
            if kind == "cross_attn" and p.shape[2] > 1:
                peak = p[:, h].argmax(-1).float()  # (B, T)
                row["monotonicity"] = float((peak[:, 1:] >= peak[:, :-1]).float().mean())
                centroid = (p[:, h] * torch.arange(p.shape[-1], dtype=p.dtype)).sum(-1)  # (B, T)
                pos = torch.arange(p.shape[2], dtype=p.dtype).expand_as(centroid)
                row["diagonality"] = float(_corr(pos.flatten(), centroid.flatten()))
            rows.append(row)
    return rows


def _corr(a, b) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def compare_attention(normal: Sequence[dict], other: Sequence[dict], metric: str = "entropy") -> list[dict]:
    """Side by side per head: ``metric`` in a normal and in another (e.g. hallucinating) run, and the change."""
    index = {(r["name"], r["head"]): r for r in other}
    rows = []
    for r in normal:
        o = index.get((r["name"], r["head"]))
        if o is not None and metric in r and metric in o:
            rows.append({"name": r["name"], "head": r["head"], f"{metric}_normal": r[metric],
                         f"{metric}_other": o[metric], "change": o[metric] - r[metric]})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- rows in and out


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """Rows as a GitHub markdown table (numbers rounded)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_rows(rows: Sequence[dict], path) -> Path:
    """Write rows to ``.csv`` or ``.json`` (by suffix), atomically."""
    from .files import atomic_write

    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"rows are saved as .csv or .json, not {path.suffix or 'no suffix'}: {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    if path.suffix == ".json":
        atomic_write(path, lambda p: Path(p).write_text(json.dumps(list(rows), indent=1) + "\n"))
    else:
        columns = list(dict.fromkeys(c for r in rows for c in r))

        def write(p) -> None:
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
    return path
