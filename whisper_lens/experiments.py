"""Experiments on a model's behaviour: error rates, layer removal, hallucination and attention statistics."""

from __future__ import annotations

import csv
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .inputs import check_mel
from .trace import Edits

NORMALIZERS = ("english", "basic", None)  # the ``normalize=`` choices: Whisper's English one, its basic one, raw


def text_normalizer(normalize: str | None) -> Callable[[str], str]:
    """Whisper's text normalisation by name, as used in OpenAI's evaluations (from ``whisper-normalizer``).

    - ``"english"``: ``EnglishTextNormalizer``: lower case, punctuation and filler words ("hmm", "uh")
      removed, titles spelt out ("Mr." -> "mister"), British spellings American, numbers as digits
      ("ten" -> "10"). Use it for English.
    - ``"basic"``: ``BasicTextNormalizer``: lower case, punctuation and bracketed text removed; for
      other languages, where the English rules do not apply.
    - ``None``: the raw strings (only runs of whitespace split words): case and punctuation count.
    """
    if not isinstance(normalize, str | None) or normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {NORMALIZERS}, got {normalize!r}")
    return _load_normalizer(normalize)


@functools.cache
def _load_normalizer(normalize: str | None) -> Callable[[str], str]:
    if normalize == "english":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    if normalize == "basic":
        from whisper_normalizer.basic import BasicTextNormalizer

        return BasicTextNormalizer()
    return str


def _normalized(ref, hyp, normalize: str | None) -> tuple[list[str], list[str]]:
    """References and hypotheses as equal-length lists of normalised strings; no reference may be empty."""
    single = isinstance(ref, str)
    refs = [ref] if single else list(ref)
    hyps = [hyp] if isinstance(hyp, str) else list(hyp)
    if isinstance(hyp, str) != single or len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} reference(s) but {len(hyps)} hypothesis(es): give two strings or two "
                         "lists of one length")  # fmt: skip
    norm = text_normalizer(normalize)
    refs, hyps = [" ".join(norm(r).split()) for r in refs], [" ".join(norm(h).split()) for h in hyps]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        how = "raw" if normalize is None else f"after {normalize} normalisation"
        raise ValueError(f"reference {empty[0]} is empty ({how}): an error rate needs words to compare against")
    return refs, hyps


def wer(ref: str | Sequence[str], hyp: str | Sequence[str], normalize: str | None = "english") -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words, after ``normalize``.

    With Whisper's English normalisation (the default) "And Mr. Dashwood," and "and mister dashwood"
    are the same three words; ``normalize=None`` compares raw strings. Lists are scored corpus-level:
    the errors of every pair over the words of every reference (``jiwer``). Above 1 when the hypothesis
    inserts more words than the reference has (a hallucinated loop).
    """
    import jiwer

    refs, hyps = _normalized(ref, hyp, normalize)
    return float(jiwer.wer(refs, hyps))


def cer(ref: str | Sequence[str], hyp: str | Sequence[str], normalize: str | None = "english") -> float:
    """Character error rate: character edits over reference characters (spaces count), after ``normalize``."""
    import jiwer

    refs, hyps = _normalized(ref, hyp, normalize)
    return float(jiwer.cer(refs, hyps))


def require_tokenizer(model) -> None:
    """The experiments read and write text: a model without a tokenizer is refused with a way out."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer, and the experiments read its transcripts: load it with "
                         "load_model(source, tokenizer=a .tiktoken file or an HF folder with vocab.json)")  # fmt: skip


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
    stack: str | Sequence[str],
    *,
    references: Sequence[str] | None = None,
    removals: Sequence[Sequence[int]] | dict[str, Sequence[Sequence[int]]] | None = None,
    seconds: Sequence[float] | None = None,
    max_new_tokens: int | None = None,
    normalize: str | None = "english",
    on_decoded: Callable[[int, int], None] | None = None,
) -> list[dict]:
    """Decode every clip with blocks of ``stack`` removed; one row per (stack, removal, clip).

    ``stack``: "encoder", "decoder", or several, e.g. ("encoder", "decoder"): their settings then
    decode together (below), and the rows come stack by stack. ``removals``: the block sets to
    remove; default the last k blocks for k = 0..L; with several stacks, a dict from a stack to its
    sets (a stack left out gets the default). Error rates are against ``references`` or, when none
    are given, against the full model's own transcripts, after ``normalize`` (see
    ``text_normalizer``). Rows: stack, removed (how many blocks), blocks_removed, clip, text, wer,
    cer, avg_logprob, no_speech_prob, n_tokens and ``hallucination_metrics``.

    The transcripts are those of ``generate(mel, edits=Edits().skip(stack, blocks))``, computed
    with as little work as that allows. The encoder runs once for every setting that removes the
    last k blocks of either stack: the stream entering encoder block L-k, recorded in one pass, is
    what the encoder gives with those blocks skipped, once ``ln_post`` is applied. Such settings
    then decode together, up to ``SWEEP_ROWS`` clips per ``generate`` call (``_decode_all``), and
    the full model's transcripts are decoded once for all stacks. Any other block set decodes in a
    call of its own with ``Edits().skip``. ``on_decoded(n, total)``: called as each ``generate`` call
    ends, with the number of settings it decoded and the number of settings in all (for a progress bar).
    """
    stacks = check_stacks(stack)
    if isinstance(removals, dict) and set(removals) - set(stacks):
        raise ValueError(f"removals names stacks not swept: {sorted(set(removals) - set(stacks))} (sweeping {stacks})")
    if len(stacks) > 1 and removals is not None and not isinstance(removals, dict):
        raise TypeError(f"with several stacks, removals must be a dict from stack to block sets, got "
                        f"{type(removals).__name__}")  # fmt: skip
    per_stack = removals if isinstance(removals, dict) else dict.fromkeys(stacks, removals)
    sets = {s: removal_sets(model, s, per_stack.get(s)) for s in stacks}
    mel = check_mel(mel, model.dims, model.device, model.dtype)  # (B, n_mels, frames)
    B = mel.shape[0]
    seconds = list(seconds) if seconds is not None else [30.0 * model.dims.n_audio_ctx / 1500] * B
    if references is not None and len(references) != B:
        raise ValueError(f"{len(references)} references for {B} clips")
    if references is not None and any(not r.strip() for r in references):
        raise ValueError("a reference transcript is empty: error rates need words to compare against")
    text_normalizer(normalize)  # a bad choice fails before any decoding
    require_tokenizer(model)
    wanted = [(s, r) for s in stacks for r in sets[s]]
    outputs = _decode_all(model, mel, wanted, max_new_tokens, on_decoded)  # (stack, removed) -> results
    if references is None:
        full = outputs.get(("decoder", ())) or outputs.get(("encoder", ()))
        full = full or model.generate(mel, max_new_tokens=max_new_tokens)
        references = [r.text.strip() for r in full]
        norm = text_normalizer(normalize)
        empty = [i for i, r in enumerate(references) if not norm(r).strip()]
        if empty:
            raise ValueError(f"the full model writes no words for clip {empty[0]}, so there is nothing to compare the "
                             "removals with: give references, or leave the clip out")  # fmt: skip
    rows = []
    for stack_, removed in wanted:
        for i, (res, ref) in enumerate(zip(outputs[stack_, removed], references, strict=True)):
            text = res.text.strip()
            row = {"stack": stack_, "removed": len(removed), "blocks_removed": " ".join(map(str, removed)),
                   "clip": i, "text": text, "wer": wer(ref, text, normalize), "cer": cer(ref, text, normalize),
                   "avg_logprob": res.avg_logprob, "no_speech_prob": res.no_speech_prob,
                   "n_tokens": len(res.tokens)}  # fmt: skip
            rows.append(row | hallucination_metrics(text, res.tokens, seconds[i]))
    return rows


def check_stacks(stack: str | Sequence[str]) -> tuple[str, ...]:
    """``removal_sweep``'s ``stack`` as a tuple of distinct stack names."""
    stacks = (stack,) if isinstance(stack, str) else tuple(stack) if isinstance(stack, list | tuple) else None
    if not stacks or any(s not in ("encoder", "decoder") for s in stacks) or len(set(stacks)) < len(stacks):
        raise ValueError(f"stack must be 'encoder', 'decoder' or a list of them (each once), got {stack!r}")
    return stacks


def n_blocks(model, stack: str) -> int:
    """How many blocks the ``stack`` ("encoder" or "decoder") of ``model`` has."""
    return model.dims.n_audio_layer if stack == "encoder" else model.dims.n_text_layer


def removal_sets(model, stack: str, removals: Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """One stack's block sets to remove, sorted and checked (default: the last k blocks, k = 0..L)."""
    L = n_blocks(model, stack)
    if removals is None:
        removals = [range(L - k, L) for k in range(L + 1)]
    sets = [tuple(sorted({int(i) for i in r})) for r in removals]
    for r in sets:
        bad = [i for i in r if not 0 <= i < L]
        if bad:
            raise IndexError(f"{stack} blocks {bad} out of range: the {stack} has {L} blocks (0-{L - 1})")
    return sets


SWEEP_ROWS = 64  # a sweep decodes several settings in one generate call of at most this many rows (clips x settings)
SWEEP_AUDIO_BYTES = 2**31  # ... holding at most this many bytes of audio keys and values (or one setting's)


def _decode_all(model, mel, wanted: list[tuple[str, tuple[int, ...]]], max_new_tokens: int | None,
                on_decoded: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
    """Each setting's results (a list of ``DecodingResult``, one per clip), by (stack, blocks removed).

    A setting that removes the last k blocks is a pair (encoder blocks kept, decoder blocks kept):
    the encoder's ones pick the audio features (``_encodings``), the decoder's the decoding depth.
    Settings that are the same pair (nothing removed, in either stack) decode once. The pairs
    decode together, deepest first, up to ``SWEEP_ROWS`` rows per call: every distinct audio once
    (``generate(clips=...)``: a clip's settings share its audio keys and values) and each row at its
    depth (``decoder_blocks``). Rows of a batch are independent, so each clip gets the tokens it gets
    alone, and a step reads the decoder's weights once for all settings instead of once per setting.
    """
    dims, B = model.dims, mel.shape[0]
    pairs = {}  # (stack, removed) -> (encoder blocks kept, decoder blocks kept)
    for stack, removed in wanted:
        L = n_blocks(model, stack)
        if removes_last(removed, L):
            kept = L - len(removed)
            pairs[stack, removed] = (kept, dims.n_text_layer) if stack == "encoder" else (dims.n_audio_layer, kept)
    order = sorted(set(pairs.values()), key=lambda p: (-p[1], -p[0]))  # deepest decoder first
    needed = {a for a, _ in order} | ({dims.n_audio_layer} if any(s == "decoder" for s, _ in wanted) else set())
    encodings = _encodings(model, mel, sorted(needed)) if needed else {}
    found = {}
    held = 2 * dims.n_text_layer * dims.n_audio_ctx * dims.n_text_state * model.dtype.itemsize  # one clip's audio k/v
    for group in _batches(order, B, per_clip=held):
        audios = sorted({a for a, _ in group})
        xa = torch.cat([encodings[a] for a in audios])  # (len(audios) * B, S, D): each distinct audio once
        clips = [audios.index(a) * B + c for a, _ in group for c in range(B)]
        depths = [d for _, d in group for _ in range(B)]
        results = model.generate(audio_features=xa, clips=clips, decoder_blocks=depths, max_new_tokens=max_new_tokens)
        found |= {pair: results[n * B : (n + 1) * B] for n, pair in enumerate(group)}
        if on_decoded is not None:
            on_decoded(len(group), len(order) + len(wanted) - len(pairs))
    out = {}
    for stack, removed in wanted:
        if (stack, removed) in pairs:
            out[stack, removed] = found[pairs[stack, removed]]
        else:
            out[stack, removed] = _decode_removed(model, mel, stack, list(removed), encodings, max_new_tokens)
            if on_decoded is not None:
                on_decoded(1, len(order) + len(wanted) - len(pairs))
    return out


def _batches(order: list[tuple[int, int]], B: int, per_clip: int) -> list[list[tuple[int, int]]]:
    """``order``'s settings cut into generate calls of at most ``SWEEP_ROWS`` rows holding at most
    ``SWEEP_AUDIO_BYTES`` of audio keys and values (``per_clip`` bytes for each clip of each distinct audio)."""
    batches: list[list[tuple[int, int]]] = []
    rows, audios = 0, set()
    for pair in order:
        more = audios | {pair[0]}
        if batches and rows + B <= SWEEP_ROWS and len(more) * B * per_clip <= SWEEP_AUDIO_BYTES:
            batches[-1].append(pair)
            rows, audios = rows + B, more
        else:
            batches.append([pair])
            rows, audios = B, {pair[0]}
    return batches


def _encodings(model, mel, kept: list[int]) -> dict:
    """Audio features by the number of encoder blocks kept: for k kept, ``ln_post`` of the stream entering
    block k (``encoder.embed`` for 0), all recorded in one pass of the encoder."""
    names = {k: "encoder.embed" if k == 0 else f"encoder.blocks.{k - 1}.resid_post" for k in kept}
    sot = torch.full((mel.shape[0], 1), model.tokenizer.sot)  # (B, 1): the decoder's pass is not used
    with torch.no_grad():
        trace = model.run(mel, sot, trace=sorted(set(names.values()))).trace
        return {k: model.encoder.ln_post(trace[name]) for k, name in names.items()}  # each (B, S, D)


def removes_last(removed: Sequence[int], L: int) -> bool:
    """Is the sorted block set ``removed`` the last k of ``L`` blocks? (Such settings share encodings and batches.)"""
    return list(removed) == list(range(L - len(removed), L))


def _decode_removed(model, mel, stack: str, removed: list[int], encodings: dict, max_new_tokens: int | None):
    """``generate`` with ``removed`` blocks of ``stack`` skipped, for a set that is not the last k blocks:
    a decoder setting from the full audio features (when a sweep has them), an encoder setting from the mel."""
    edits = Edits().skip(stack, removed)
    full = encodings.get(model.dims.n_audio_layer)
    if stack == "decoder" and full is not None:
        return model.generate(audio_features=full, edits=edits, max_new_tokens=max_new_tokens)
    return model.generate(mel, edits=edits, max_new_tokens=max_new_tokens)


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
    """Rows as a GitHub markdown table: numbers rounded to ``digits`` decimals, or written in scientific
    notation where that would round a non-zero value to 0."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        if isinstance(v, float) and v != 0 and abs(v) < 0.5 * 10**-digits:  # not a column of 0.000
            return f"{v:.{digits - 1}e}"
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save_rows(rows: Sequence[dict], path) -> Path:
    """Write rows to ``.csv`` or ``.json`` (by suffix), atomically."""
    from .files import atomic_write, write_text

    path = Path(path)
    if path.suffix not in (".csv", ".json"):
        raise ValueError(f"rows are saved as .csv or .json, not {path.suffix or 'no suffix'}: {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    if path.suffix == ".json":
        write_text(path, json.dumps(list(rows), indent=1) + "\n")
    else:
        columns = list(dict.fromkeys(c for r in rows for c in r))

        def write(p) -> None:
            with open(p, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)
    return path
