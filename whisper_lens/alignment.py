"""Word timestamps from cross-attention: dynamic time warping over the alignment heads, and finding those heads.

How Whisper knows when a word was said
--------------------------------------
Whisper is never trained to time words. But while it writes a token, some cross-attention
heads look at the stretch of audio where that token is spoken: their pattern over the audio's
``n_audio_ctx`` positions (20 ms each) draws a staircase down the transcript. OpenAI published,
for each checkpoint, the (layer, head) pairs that do this best: the *alignment heads*.

openai-whisper's recipe, reproduced here from its documented behaviour:

1. Run the decoder teacher-forced over ``sot-sequence <|notimestamps|> text-tokens <|endoftext|>``
   and take each alignment head's attention scores (pre-softmax) over the window's audio.
2. Softmax them over the positions that hold audio (not the window's padding); standardise
   each position's column over the tokens (zero mean, unit variance), so a position that every
   token looks at (a "sink") stops standing out; smooth along time with a median filter of
   width 7; average over the heads. Row k is then "where was token k read", k = 0 being the
   row that predicts the first text token and the last row the one that predicts EOT.
3. Find the monotonic path through this token x time matrix that collects the most attention:
   dynamic time warping (DTW) on its negation. Each step of the path moves to the next token,
   to the next position, or both.
4. A token starts where the path first reaches its row; a word (tokens grouped at spaces and
   punctuation) runs from its first token's start to the next word's start. Punctuation is
   attached to the neighbouring word, and a few rules trim words that swallow a pause.

This module does steps 2-4 on scores from any source: a cheap decoder-only pass (the default,
equal to openai-whisper's numbers) or the patterns recorded while decoding (see
``transcribe``). ``find_alignment_heads`` ranks every head of a model by how well it alone
tracks time, for models that come without a published list.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .audio import TIME_PRECISION
from .trace import Edits, Trace

if TYPE_CHECKING:
    from .decoding import DecodingResult
    from .model import Whisper

POSITIONS_PER_SECOND = round(1 / TIME_PRECISION)  # 50 encoder positions of 20 ms
MEDIAN_FILTER_WIDTH = 7  # openai-whisper's smoothing of the heads' attention along time (positions)
PREPEND_PUNCTUATIONS = "\"'“¿([{-"  # joined to the word after them
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"  # joined to the word before them
SENTENCE_ENDS = ".。!！?？"


class ReadsLikeADict:
    """Fields read as keys too, as openai-whisper's dicts: ``result["segments"][0]["words"][0]["start"]``.

    ``KEYS``: the keys openai-whisper's dict has (in its order); ``to_dict()`` returns exactly that dict.
    """

    KEYS: tuple[str, ...] = ()

    def __getitem__(self, key: str):
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> tuple[str, ...]:
        return self.KEYS

    def get(self, key: str, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self[k]) for k in self.keys()]


@dataclass
class Word(ReadsLikeADict):
    """A timed word of a transcript (openai-whisper's fields): seconds from the recording's start."""

    KEYS = ("word", "start", "end", "probability")

    word: str  # with its leading space and attached punctuation
    start: float
    end: float
    probability: float  # mean probability of its tokens

    def to_dict(self) -> dict:
        return {"word": self.word, "start": float(self.start), "end": float(self.end),
                "probability": float(self.probability)}  # fmt: skip


@dataclass
class WordTiming:
    """One word of a window, timed from the window's start: text (with its leading space), tokens, seconds."""

    word: str
    tokens: list[int]
    start: float
    end: float
    probability: float  # mean probability of its tokens, over text tokens only


@dataclass
class Alignment:
    """What the word timing of one window was read from: enough to draw it (``plot.word_alignment``).

    ``matrix`` [n_text + 1, positions]: the heads' standardised, filtered, averaged attention, row k
    the step that predicts text token k (the last row predicts EOT); ``path`` [2, steps]: the DTW
    path as (row, position) pairs; ``words``: the words before punctuation is merged.
    """

    text_tokens: list[int]
    matrix: Tensor
    path: np.ndarray
    words: list[WordTiming]


# ----------------------------------------------------------------------------- the path


def dtw(cost: np.ndarray) -> np.ndarray:
    """The cheapest monotonic path through ``cost`` [N, M] from (0, 0) to (N-1, M-1): [2, steps] (rows, columns).

    Each step moves down, right or diagonally. Accumulated costs are kept in float32, and
    ties go as openai-whisper's: the diagonal only when strictly cheapest, then down only when
    strictly cheapest, else right. Cells are filled one anti-diagonal at a time (every cell of
    an anti-diagonal depends only on the two before it), so numpy does each diagonal at once.
    """
    N, M = cost.shape
    acc = np.full((N + 1, M + 1), np.inf, dtype=np.float32)  # acc[i, j]: cheapest path to cell (i-1, j-1)
    acc[0, 0] = 0
    move = np.zeros((N + 1, M + 1), dtype=np.int8)  # 0 diagonal, 1 down (from i-1), 2 right (from j-1)
    for d in range(2, N + M + 1):
        i = np.arange(max(1, d - M), min(N, d - 1) + 1)  # rows of anti-diagonal i + j = d
        j = d - i
        diag, up, left = acc[i - 1, j - 1], acc[i - 1, j], acc[i, j - 1]
        step = np.where((diag < up) & (diag < left), 0, np.where((up < diag) & (up < left), 1, 2))
        best = np.choose(step, [diag, up, left])
        acc[i, j] = (cost[i - 1, j - 1] + best.astype(np.float64)).astype(np.float32)
        move[i, j] = step
    move[0, :], move[:, 0] = 2, 1
    i, j, path = N, M, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        m = move[i, j]
        i, j = (i - 1, j - 1) if m == 0 else (i - 1, j) if m == 1 else (i, j - 1)
    return np.array(path[::-1]).T  # (2, steps)


def median_filter(x: Tensor, width: int = MEDIAN_FILTER_WIDTH) -> Tensor:
    """Median of each run of ``width`` values along the last axis, the edges reflected (an odd ``width``)."""
    if x.shape[-1] <= width // 2:  # too short to reflect: left as it is
        return x
    n = x.shape[-1]
    padded = F.pad(x.reshape(-1, 1, n), (width // 2, width // 2), mode="reflect")  # (rows, 1, n + width - 1)
    padded = padded.view(*x.shape[:-1], n + width - 1)  # (..., n + width - 1)
    return padded.unfold(-1, width, 1).median(dim=-1).values  # (..., n)


def attention_matrix(scores: Tensor, n_positions: int) -> Tensor:
    """openai-whisper's alignment matrix from the heads' attention scores [heads, T, S]: [T, n_positions].

    Softmax over the ``n_positions`` positions that hold audio, standardise each position over the
    T tokens, median-filter along time, average the heads.
    """
    weights = scores[:, :, :n_positions].float().softmax(dim=-1)  # (h, T, P)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)  # (h, 1, P)
    weights = median_filter((weights - mean) / std)  # (h, T, P)
    return weights.mean(dim=0)  # (T, P)


def word_timings(tokenizer, text_tokens: list[int], matrix: Tensor, token_probs: Sequence[float]) -> Alignment:
    """Words of ``text_tokens`` timed by the DTW path through ``matrix`` [len(text_tokens) + 1, positions]."""
    path = dtw(-matrix.detach().double().cpu().numpy())
    words, word_tokens = tokenizer.split_to_word_tokens([*text_tokens, tokenizer.eot])
    if len(word_tokens) <= 1:  # nothing but EOT
        return Alignment(text_tokens, matrix, path, [])
    rows, positions = path
    first_step = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)  # the path enters a new row
    row_start = positions[first_step] / POSITIONS_PER_SECOND  # (n_text + 1,) seconds (divided, as openai-whisper)
    bounds = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))  # first token of each word, and the end
    timings = [
        WordTiming(word, tokens, row_start[a], row_start[b], float(np.mean(token_probs[a:b])))
        for word, tokens, a, b in zip(words, word_tokens, bounds[:-1], bounds[1:], strict=False)
    ]
    return Alignment(text_tokens, matrix, path, timings)


# ----------------------------------------------------------------------------- from timings to words


def merge_punctuations(words: list[WordTiming], prepended: str, appended: str) -> None:
    """Join opening punctuation to the word after it and closing punctuation to the word before (in place).

    A joined piece is left behind as an empty word with no tokens (dropped when words are listed).
    """
    following = len(words) - 1
    for i in range(len(words) - 2, -1, -1):  # right to left: " (" + "word"
        prev, nxt = words[i], words[following]
        if prev.word.startswith(" ") and prev.word.strip() in prepended:
            nxt.word, nxt.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            prev.word, prev.tokens = "", []
        else:
            following = i
    before = 0
    for j in range(1, len(words)):  # left to right: "word" + ","
        prev, nxt = words[before], words[j]
        if not prev.word.endswith(" ") and nxt.word in appended:
            prev.word, prev.tokens = prev.word + nxt.word, prev.tokens + nxt.tokens
            nxt.word, nxt.tokens = "", []
        else:
            before = j


def clip_long_words(words: list[WordTiming]) -> float:
    """Cut words at sentence ends to twice the median word length; returns that median (at most 0.7 s).

    DTW gives a word all the time up to the next one, so the last word before a pause, or the
    first after it, can swallow the pause.
    """
    durations = np.array([w.end - w.start for w in words])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = median * 2
    if len(durations):
        for i in range(1, len(words)):
            if words[i].end - words[i].start > longest:
                if words[i].word in SENTENCE_ENDS:
                    words[i].end = words[i].start + longest
                elif words[i - 1].word in SENTENCE_ENDS:
                    words[i].start = words[i].end - longest
    return median


def split_into_segments(
    segments: list, timings: list[WordTiming], eot: int, time_offset: float, last_speech: float, median: float
) -> None:
    """Give each of a window's segments its words (``segment.words``), and let the words refine its bounds.

    ``timings`` cover the text tokens of all ``segments`` in order; times become absolute by
    ``time_offset`` (the window's start) and are rounded to 10 ms. At each segment's edges the
    first and last word are trimmed if they are implausibly long after a pause
    (``last_speech``: where speech last ended), and the segment's start and end move to its
    words' unless a word runs far past the model's own segment timestamp. Words that all sit at
    one instant (heads that do not track time) say nothing of where the segment is: its bounds
    stay the decoding's, so the words never shrink it to nothing (an instantaneous segment
    loses its text; openai-whisper's would).
    """
    longest = median * 2
    index = 0
    for segment in segments:
        n_text = sum(1 for t in segment.tokens if t < eot)
        taken, words = 0, []
        while index < len(timings) and taken < n_text:
            t = timings[index]
            if t.word:
                start, end = np.round(time_offset + t.start, 2), np.round(time_offset + t.end, 2)
                words.append(Word(t.word, float(start), float(end), t.probability))
            taken += len(t.tokens)
            index += 1
        if words and words[-1].end > words[0].start:  # words that span time: they bound the segment
            first, last = words[0], words[-1]
            after_pause = first.end - last_speech > median * 4
            if after_pause and (first.end - first.start > longest or
                                (len(words) > 1 and words[1].end - first.start > longest * 2)):  # fmt: skip
                if len(words) > 1 and words[1].end - words[1].start > longest:
                    boundary = max(words[1].end / 2, words[1].end - longest)
                    first.end = words[1].start = boundary
                first.start = max(0, first.end - longest)
            if segment.start < first.end and segment.start - 0.5 > first.start:  # the first word runs too early
                first.start = max(0, min(first.end - median, segment.start))
            else:
                segment.start = first.start
            if segment.end > last.start and segment.end + 0.5 < last.end:  # the last word runs too late
                last.end = max(last.start + median, segment.end)
            else:
                segment.end = last.end
            last_speech = segment.end
        segment.words = words


# ----------------------------------------------------------------------------- where the attention comes from


def score_names(heads: Sequence[tuple[int, int]]) -> list[str]:
    """The trace names holding the attention scores of ``heads``' layers."""
    return [f"decoder.blocks.{layer}.cross_attn.scores" for layer in sorted({layer for layer, _ in heads})]


def heads_scores(trace: Trace, heads: Sequence[tuple[int, int]], row: int) -> Tensor:
    """Batch row ``row``'s attention scores of each head: [len(heads), T, S]."""
    return torch.stack([trace[f"decoder.blocks.{layer}.cross_attn.scores"][row, h] for layer, h in heads])


@torch.no_grad()
def forced_pass(model: Whisper, audio_features: Tensor, rows: list[list[int]], names: list[str],
                edits: Edits | None) -> tuple[Tensor, Trace]:  # fmt: skip
    """One teacher-forced decoder pass over token rows (padded at the end with EOT): logits [B, T, V] and ``names``.

    Padding is never seen by the real positions (attention is causal); cross-attention reads
    ``audio_features`` [B, n_audio_ctx, D], so the encoder does not run again.
    """
    eot, length = model.tokenizer.eot, max(map(len, rows))
    tokens = torch.tensor([r + [eot] * (length - len(r)) for r in rows], device=model.device)  # (B, T)
    rec = model.recorder(names, edits)
    logits = model.decoder(tokens, rec.child("decoder"), xa=audio_features)  # (B, T, V)
    return logits, rec.trace


def align(
    model: Whisper,
    audio_features: Tensor,
    text_tokens: Sequence[list[int]],
    n_frames: Sequence[int],
    heads: Sequence[tuple[int, int]],
    sot_sequence: Sequence[int],
    edits: Edits | None = None,
) -> list[Alignment]:
    """Time the words of each window's ``text_tokens`` by a decoder-only pass over its audio (openai-whisper's numbers).

    ``audio_features`` [B, n_audio_ctx, D]: the encoder's output for the B windows; ``n_frames``:
    each window's mel frames that hold audio (the rest is padding); ``heads``: (layer, head)
    pairs; ``sot_sequence``: the start of transcript the decoding used (without its prompt).
    The decoder runs once, for all windows together, over ``sot_sequence <|notimestamps|> text
    <|endoftext|>``; the probability of a token is over text tokens only.
    """
    tok = model.tokenizer
    rows = [[*sot_sequence, tok.no_timestamps, *text, tok.eot] for text in text_tokens]
    logits, trace = forced_pass(model, audio_features, rows, score_names(heads), edits)
    start, out = len(sot_sequence), []
    for b, (row, text) in enumerate(zip(rows, text_tokens, strict=True)):
        probs = logits[b, start : len(row) - 1, : tok.eot].float().softmax(dim=-1)  # (n_text + 1, eot)
        token_probs = probs[torch.arange(len(text)), text].tolist()
        scores = heads_scores(trace, heads, b)[:, : len(row)]  # (h, T, S)
        matrix = attention_matrix(scores, n_frames[b] // 2)[start:-1]  # (n_text + 1, P)
        out.append(word_timings(tok, list(text), matrix, token_probs))
    return out


def recorded_names(heads: Sequence[tuple[int, int]]) -> tuple[str, ...]:
    """What ``align_recorded`` needs recorded while decoding: the heads' attention scores."""
    return tuple(score_names(heads))


def align_recorded(
    model: Whisper, result: DecodingResult, text: list[int], n_frames: int, heads: Sequence[tuple[int, int]]
) -> Alignment:
    """Time the words of ``text`` from the attention recorded while the window was decoded: no extra pass.

    ``result`` is the window's decoding, traced with ``recorded_names``: its trace covers the
    prompt and the sampled ``result.tokens``; ``text``: the first text tokens among them (those of
    the segments kept). Row k of the matrix is the step that chose text token k (after the
    previous text or a timestamp, with the previous window's text in the prompt), the last row the
    step after the last text token, so the words differ from the decoder-only pass (README: word
    timing). A token's probability is the decoding's own (``result.token_logprobs``: over the
    filtered vocabulary, timestamps included, where the pass's is over text tokens only).
    """
    tok, sampled = model.tokenizer, result.tokens
    scores = heads_scores(result.trace, heads, 0)  # (h, T, S): T = prompt + sampled tokens
    T0 = scores.shape[1] - len(sampled)  # the prompt's length
    js = [j for j, t in enumerate(sampled) if t < tok.eot][: len(text)]  # the text tokens among those sampled
    rows = [T0 + j - 1 for j in js] + [T0 + js[-1]]  # (n_text + 1,): the positions that chose them, then the last
    token_probs = [math.exp(result.token_logprobs[j]) for j in js]
    matrix = attention_matrix(scores[:, rows], n_frames // 2)  # (n_text + 1, P)
    return word_timings(tok, list(text), matrix, token_probs)
