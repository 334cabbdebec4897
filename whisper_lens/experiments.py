"""Experiments on a model's behaviour: error rates, layer removal, hallucination and attention statistics."""

from __future__ import annotations

from collections.abc import Sequence


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
