"""Results: each clip's best sequence brought to the host once (``finish``), and its ``DecodingResult``."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..audio import TIME_PRECISION
from ..trace import Trace
from .traces import stitch_trace, traced_names

if TYPE_CHECKING:
    from .loop import Decoding


@dataclass
class DecodingResult:
    """One clip's decoded transcript, as openai-whisper's ``DecodingResult``.

    ``tokens`` are the sampled tokens only: no prompt, no prefix, no final EOT. ``avg_logprob`` is
    the sum of their log-probabilities (EOT included) divided by ``len(tokens) + 1``.
    ``token_logprobs[j]`` is the log-probability of ``tokens[j]`` under the (filtered)
    distribution it was chosen from: the terms of ``sum_logprob``, but for EOT's.
    """

    tokens: list[int]
    text: str
    language: str | None
    language_probs: dict[str, float] | None
    avg_logprob: float
    sum_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    token_logprobs: list[float] = field(default_factory=list)
    trace: Trace | None = None


def compression_ratio(text: str) -> float:
    """UTF-8 size of ``text`` over its zlib-compressed size: high (> 2.4) for repetitive loops."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data))


def finish(d: Decoding, n_sel: int) -> list[DecodingResult]:
    """Bring the search to the host once and build each clip's result (openai-whisper's final ranking)."""
    s, tok = d.search, d.model.tokenizer
    host = History(s.hist_tok[:n_sel].tolist(), s.hist_src[:n_sel].tolist(), s.hist_lp[:n_sel].tolist())
    sums, done_at = s.sum_logprobs.cpu(), [min(t, n_sel) for t in s.done_at.tolist()]
    order = traced_names(d)
    results = []
    for g in range(len(d.plan.prompts)):
        cands = candidates(d, g, sums, done_at)
        scores = [rank_score(sum_lp, time, d.options.length_penalty) for _, time, sum_lp in cands]
        row, time, sum_lp = cands[int(np.argmax(scores))]  # the first of equals
        tokens, lps, rows = host.ancestry(row, time)
        text = tok.decode(tokens).strip()
        length = len(d.plan.prompts[g]) + len(tokens)
        trace = stitch_trace(order, d, g, rows, length) if d.tracing else None
        results.append(DecodingResult(
            tokens=tokens, text=text, language=d.clips.languages[g], language_probs=d.clips.language_probs[g],
            avg_logprob=sum_lp / (len(tokens) + 1), sum_logprob=sum_lp, no_speech_prob=d.clips.no_speech[g],
            compression_ratio=compression_ratio(text), temperature=d.options.temperature, token_logprobs=lps,
            trace=trace,
        ))  # fmt: skip
    return results


@dataclass
class History:
    """The selections on the host: per selection and row, the token, the row it came from, its log-probability."""

    tok: list[list[int]]
    src: list[list[int]]
    lp: list[list[float]]

    def ancestry(self, row: int, time: int) -> tuple[list[int], list[float], list[int]]:
        """The sampled tokens of the sequence in ``row`` after ``time`` selections, their log-probabilities,
        and the row the sequence was in at each step (1..time)."""
        tokens, lps, rows = [], [], [row]
        for t in range(time - 1, -1, -1):
            tokens.append(self.tok[t][row])
            lps.append(self.lp[t][row])
            row = self.src[t][row]
            rows.append(row)
        return tokens[::-1], lps[::-1], rows[::-1][1:]


def candidates(d: Decoding, g: int, sums: Tensor, done_at: list[int]) -> list[tuple[int, int, float]]:
    """Clip ``g``'s candidate sequences as (row, selections, sum of log-probabilities)."""
    s, beam = d.search, d.options.beam_size
    if beam is None:
        return [(g, done_at[g], float(sums[g]))]
    n = int(s.n_fin[g])
    rows, times, scores = s.fin_row[g, :n].tolist(), s.fin_time[g, :n].tolist(), s.fin_score[g, :n].tolist()
    cands = list(zip(rows, times, scores, strict=True))
    if len(cands) < beam:  # not enough finished: the live beams, best first, with an EOT added
        live = range(g * beam, (g + 1) * beam)
        for j in np.argsort(sums[live.start : live.stop].numpy())[::-1][: beam - len(cands)]:
            cands.append((live[j], done_at[live.start], float(sums[live[j]])))
    return cands


def rank_score(sum_logprob: float, length: int, length_penalty: float | None) -> float:
    """How candidates are ranked: log-probability per token, or over Google NMT's ((5 + length) / 6) ** alpha."""
    penalty = length if length_penalty is None else ((5 + length) / 6) ** length_penalty
    return sum_logprob / max(penalty, 1e-9)


def segments(
    tokens: Sequence[int], tokenizer, n_audio_ctx: int = 1500, duration: float | None = None
) -> list[tuple[float, float, str]]:
    """Split timestamped tokens into (start s, end s, text) segments: text between a pair of timestamps.

    A timestamp token counts 20 ms steps (``TIME_PRECISION``: one encoder position) from the start
    of the window, whatever the window's length; the window holds ``n_audio_ctx`` positions
    (30 s for the official models, 4 s for the shipped toy). A trailing lone timestamp (the
    model's "the rest continues later") closes no segment; text after the last timestamp becomes
    a segment ending where the audio ends: ``duration`` seconds, or the end of the window.
    """
    end_of_audio = n_audio_ctx * TIME_PRECISION if duration is None else min(duration, n_audio_ctx * TIME_PRECISION)
    ts = tokenizer.timestamp_begin
    out: list[tuple[float, float, str]] = []
    start, text_ids = None, []
    for t in tokens:
        if t >= ts:
            time = (t - ts) * TIME_PRECISION
            if start is None:
                start = time
            else:
                out.append((start, time, tokenizer.decode(text_ids).strip()))
                start, text_ids = None, []
        else:
            text_ids.append(t)
    if text_ids:
        out.append((start or 0.0, end_of_audio, tokenizer.decode(text_ids).strip()))
    return out
