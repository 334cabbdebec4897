"""Finding alignment heads for a model that comes without a published list (fine-tuned, distilled, new).

OpenAI chose each checkpoint's alignment heads by hand against forced alignments; a fine-tuned or
distilled model has none, and its heads need not be where the original's were. The method here
needs no labels, only a few recordings of speech:

1. Transcribe them (long-form, the model's own text) and, for every window, run the decoder
   once over its text (``alignment.forced_pass``) recording every head's cross-attention.
2. Time the tokens with each head *alone*: openai-whisper's matrix (softmax over the audio,
   standardised, median-filtered) and its DTW path give each text token a start.
3. Heads that track time agree with one another, because they all follow the same speech;
   heads that look elsewhere (a fixed position, the padding, the whole window) scatter. So the
   consensus of all heads (the median start of every token) is a fair first guess of when each
   token was said, and a head's mean distance from it, in seconds, is its *deviation*.
4. The consensus is taken again over the heads within ``threshold`` of the first one, and the
   heads within ``threshold`` of that consensus are the alignment heads.

On OpenAI's tiny.en and the test clips this finds 8 heads, 4 of them OpenAI's, whose word times
are closer to pocketsphinx's forced alignment than those of OpenAI's heads (README: "Finding
alignment heads"). The assumption is the one named in step 3: that the time-tracking heads
agree, and the others do not agree with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from .alignment import POSITIONS_PER_SECOND, attention_matrix, dtw, forced_pass

if TYPE_CHECKING:
    from .longform import AudioLike
    from .model import Whisper

WINDOWS_PER_PASS = 8  # windows aligned together in one decoder pass


@dataclass
class HeadRanking:
    """Every cross-attention head of a model, ranked by how well its attention alone times the words."""

    heads: list[tuple[int, int]]  # the alignment heads found: (layer, head), best first
    deviation: Tensor  # [n_text_layer, n_text_head] seconds: mean distance of a head's token starts from the consensus
    ranking: list[tuple[int, int]]  # every head, best first
    n_tokens: int  # text tokens the deviations were measured on


@torch.no_grad()
def find_alignment_heads(
    model: Whisper, audio: Sequence[AudioLike], *, language: str | None = None, threshold: float = 0.15
) -> HeadRanking:
    """Rank every cross-attention head by how well it tracks time in ``audio`` (recordings of speech).

    ``threshold`` (seconds): a head whose token starts stay within it of the consensus on average
    is an alignment head. Use ``.heads`` as ``transcribe(..., alignment_heads=...)``.
    """
    if not isinstance(threshold, int | float) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number of seconds, got {threshold!r}")
    starts = token_starts(model, audio, language)  # (L * H, n_tokens) seconds
    if starts.shape[1] == 0:
        raise ValueError("no speech was transcribed in the audio given: find_alignment_heads needs speech")
    consensus = np.median(starts, axis=0)  # (n_tokens,)
    deviation = np.abs(starts - consensus).mean(axis=1)  # (L * H,)
    close = deviation <= threshold
    if close.any():  # the consensus of the heads that agree
        deviation = np.abs(starts - np.median(starts[close], axis=0)).mean(axis=1)
    L, H = model.dims.n_text_layer, model.dims.n_text_head
    order = np.argsort(deviation, kind="stable")
    ranking = [(int(i) // H, int(i) % H) for i in order]
    chosen = [ranking[k] for k, i in enumerate(order) if deviation[i] <= threshold] or ranking[:1]
    return HeadRanking(chosen, torch.tensor(deviation, dtype=torch.float32).view(L, H), ranking, starts.shape[1])


def token_starts(model: Whisper, audio: Sequence[AudioLike], language: str | None) -> np.ndarray:
    """When every head alone says each text token starts, over all windows of ``audio``: (L * H, tokens) seconds."""
    if isinstance(audio, str) or not isinstance(audio, Sequence) or len(audio) == 0:
        raise ValueError("find_alignment_heads needs a non-empty list of recordings (paths or 16 kHz arrays)")
    tok, d = model.tokenizer, model.dims
    transcripts = model.transcribe(list(audio), language=language, temperature=0.0, trace=["encoder.ln_post"])
    windows = []  # (encoder output, text tokens, frames of audio, start of transcript)
    for t in transcripts:
        sot = tok.sot_sequence_for(t.language, "transcribe") if tok.multilingual else tok.sot_sequence
        for w in t.windows:
            text = [x for s in t.segments if s.seek == w.seek for x in s.tokens if x < tok.eot]
            if text and w.trace is not None:
                windows.append((w.trace["encoder.ln_post"][0], text, w.frames, tuple(sot)))
    heads = [(layer, h) for layer in range(d.n_text_layer) for h in range(d.n_text_head)]
    names = [f"decoder.blocks.{layer}.cross_attn.scores" for layer in range(d.n_text_layer)]
    columns = []
    for first in range(0, len(windows), WINDOWS_PER_PASS):
        part = windows[first : first + WINDOWS_PER_PASS]
        rows = [[*sot, tok.no_timestamps, *text, tok.eot] for _, text, _, sot in part]
        _, trace = forced_pass(model, torch.stack([xa for xa, *_ in part]), rows, names, None)
        for b, ((_, _, frames, sot), row) in enumerate(zip(part, rows, strict=True)):
            scores = torch.stack(
                [
                    trace[f"decoder.blocks.{layer}.cross_attn.scores"][b, :, : len(row)]
                    for layer in range(d.n_text_layer)
                ]
            ).flatten(0, 1)  # fmt: skip  (L * H, T, S)
            columns.append(np.stack([head_starts(scores[i : i + 1], frames, len(sot)) for i in range(len(heads))]))
    return np.concatenate(columns, axis=1) if columns else np.zeros((len(heads), 0))


def head_starts(scores: Tensor, frames: int, sot_length: int) -> np.ndarray:
    """The start (s) of every text token, and of EOT, on the DTW path of one head's attention [1, T, S]."""
    matrix = attention_matrix(scores, frames // 2)[sot_length:-1]  # (n_text + 1, P)
    rows, positions = dtw(-matrix.double().numpy())
    first = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    return positions[first] / POSITIONS_PER_SECOND  # (n_text + 1,)
