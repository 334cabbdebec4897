"""Hallucination: what Whisper writes when there is nothing to transcribe, and which of its parts write it.

Whisper was trained on transcripts of 680,000 hours of web audio; given silence or noise it often
writes something anyway ("you", "Thank you.", a loop of one phrase). The experiments here:

- ``non_speech``: inputs with no speech in them, made deterministically from a seed: digital
  silence, white and pink noise, tones, mains hum, clicks.
- ``hallucination_rows``: for each decoded non-speech clip, whether it hallucinated (any text
  left after Whisper's English normalisation), whether openai-whisper's ``transcribe`` would have
  dropped the window anyway (its no-speech rule), and the signs of a loop (compression ratio,
  repeats).
- ``head_sweep``: zero one decoder attention head at a time (self- or cross-attention, at its
  ``z``) and measure the hallucination rate on non-speech and the WER on speech; ``head_summary``
  ranks the heads. Every setting decodes all its clips in one batch, from one encoder pass.
- ``repetition_lens``: the logit lens along a hallucinated sequence: for every emitted token, the
  first layer from which it is the top-1 readout for good (``decision_layers``), for the tokens
  that repeat earlier text and for the others.

The no-speech probability per layer is ``lens.sot_lens``; attention during a hallucination against
a normal run is ``experiments.attention_stats`` / ``compare_attention`` (``study`` draws both).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .audio import SAMPLE_RATE
from .experiments import hallucination_metrics, require_tokenizer, text_normalizer, wer
from .inputs import check_mel
from .lens import lens_names, readout
from .trace import Edits

# openai-whisper's transcribe drops a window as silence when both hold (its default thresholds)
NO_SPEECH_THRESHOLD = 0.6  # p(<|nospeech|>) at the start-of-transcript position above this ...
LOGPROB_THRESHOLD = -1.0  # ... and the decoded text's average log-probability below this
RAMP_SECONDS = 0.01  # signals fade in and out over 10 ms, so their edges do not click
HEAD_KINDS = ("attn", "cross_attn")


# ----------------------------------------------------------------------------- non-speech inputs


def non_speech(seconds: float = 10.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Eleven inputs without speech, ``seconds`` long at 16 kHz (float32), the same for the same ``seed``.

    Levels are RMS in dB relative to full scale (a sample of 1.0), the usual range of recordings:

    - ``silence``: digital zeros.
    - ``white-50dB``, ``white-30dB``: white Gaussian noise (a quiet room's hiss, a loud fan).
    - ``pink-50dB``, ``pink-30dB``: pink noise, power falling as 1/f (rain, traffic, room tone).
    - ``tone-440Hz``, ``tone-1kHz``: pure sine tones at -20 dB (a test tone, a beep).
    - ``hum-50Hz``, ``hum-60Hz``: mains hum, the fundamental and harmonics 2-4 at amplitudes
      1, 1/2, 1/3, 1/4, at -20 dB (a bad cable in Europe / America).
    - ``clicks-1Hz``, ``clicks-4Hz``: 1 ms pulses of amplitude 0.5, one or four a second (a clock,
      a metronome).

    Each noise draws from its own generator, ``numpy.random.default_rng([seed, i])``, so one
    signal never depends on the others. Everything but silence and clicks fades in and out over 10 ms.
    """
    if not isinstance(seconds, int | float) or not 0 < seconds <= 3600:
        raise ValueError(f"seconds must be a number in (0, 3600], got {seconds!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE  # (n,) seconds
    rng = [np.random.default_rng([seed, i]) for i in range(4)]
    signals = {
        "silence": np.zeros(n),
        "white-50dB": _at_level(rng[0].standard_normal(n), -50),
        "white-30dB": _at_level(rng[1].standard_normal(n), -30),
        "pink-50dB": _at_level(_pink(rng[2].standard_normal(n)), -50),
        "pink-30dB": _at_level(_pink(rng[3].standard_normal(n)), -30),
        "tone-440Hz": _at_level(np.sin(2 * np.pi * 440 * t), -20),
        "tone-1kHz": _at_level(np.sin(2 * np.pi * 1000 * t), -20),
        "hum-50Hz": _at_level(sum(np.sin(2 * np.pi * 50 * h * t) / h for h in range(1, 5)), -20),
        "hum-60Hz": _at_level(sum(np.sin(2 * np.pi * 60 * h * t) / h for h in range(1, 5)), -20),
        "clicks-1Hz": _clicks(n, per_second=1),
        "clicks-4Hz": _clicks(n, per_second=4),
    }
    ramp = np.minimum(1.0, np.minimum(np.arange(n), np.arange(n)[::-1]) / (RAMP_SECONDS * SAMPLE_RATE))  # (n,)
    return {name: (x if name.startswith(("silence", "clicks")) else x * ramp).astype(np.float32)
            for name, x in signals.items()}  # fmt: skip


def _at_level(x: np.ndarray, db: float) -> np.ndarray:
    """``x`` scaled to an RMS of ``db`` dB relative to full scale."""
    return x * (10 ** (db / 20) / np.sqrt(np.mean(x**2)))


def _pink(white: np.ndarray) -> np.ndarray:
    """White noise shaped to a 1/f power spectrum (amplitude 1/sqrt(f)), no DC."""
    spectrum = np.fft.rfft(white)  # (n/2 + 1,)
    f = np.arange(len(spectrum), dtype=np.float64)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0
    return np.fft.irfft(spectrum, len(white))


def _clicks(n: int, per_second: int) -> np.ndarray:
    """1 ms pulses of amplitude 0.5, ``per_second`` a second, the first half a period in."""
    period, width = SAMPLE_RATE // per_second, SAMPLE_RATE // 1000
    x = np.zeros(n)
    for start in range(period // 2, n, period):
        x[start : start + width] = 0.5
    return x


# ----------------------------------------------------------------------------- what was written


def skipped_as_silence(no_speech_prob: float, avg_logprob: float) -> bool:
    """Whether openai-whisper's ``transcribe`` would drop this window as silence (its default thresholds)."""
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD


def hallucination_rows(
    results: Sequence, names: Sequence[str], seconds: Sequence[float], normalize: str | None = "english"
) -> list[dict]:
    """One row per decoded non-speech clip: what it wrote and whether that is a hallucination.

    ``results``: ``generate``'s results for the clips called ``names``, ``seconds`` long. Columns:
    name, text, n_tokens, ``hallucinated`` (a letter or digit left after ``normalize``: "you" is,
    "..." and "[BLANK_AUDIO]" are not), ``skipped`` (``transcribe`` would drop the window: ``skipped_as_silence``),
    ``hallucinated_in_transcribe`` (hallucinated and not skipped: what a user of ``transcribe`` sees),
    no_speech_prob, avg_logprob, and ``experiments.hallucination_metrics`` (compression ratio, repeats).
    """
    if not len(results) == len(names) == len(seconds):
        raise ValueError(f"{len(results)} results for {len(names)} names and {len(seconds)} durations")
    norm = text_normalizer(normalize)
    rows = []
    for res, name, sec in zip(results, names, seconds, strict=True):
        text = res.text.strip()
        hallucinated = any(c.isalnum() for c in norm(text))
        skipped = skipped_as_silence(res.no_speech_prob, res.avg_logprob)
        row = {"name": name, "text": text, "n_tokens": len(res.tokens), "hallucinated": hallucinated,
               "skipped": skipped, "hallucinated_in_transcribe": hallucinated and not skipped,
               "no_speech_prob": res.no_speech_prob, "avg_logprob": res.avg_logprob}  # fmt: skip
        rows.append(row | hallucination_metrics(text, res.tokens, sec))
    return rows


def hallucination_rate(rows: Sequence[dict], column: str = "hallucinated") -> float:
    """Share of non-speech rows with ``column`` true (``"hallucinated"`` or ``"hallucinated_in_transcribe"``)."""
    if not rows:
        raise ValueError("no rows: a hallucination rate needs at least one decoded non-speech clip")
    return sum(bool(r[column]) for r in rows) / len(rows)


# ----------------------------------------------------------------------------- the head sweep


def decoder_heads(model, kinds: Sequence[str] = HEAD_KINDS) -> list[tuple[str, int, int]]:
    """Every decoder attention head as (kind, layer, head), self-attention (``attn``) first."""
    bad = [k for k in kinds if k not in HEAD_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {HEAD_KINDS}, got {list(kinds)}")
    d = model.dims
    return [(k, layer, h) for k in kinds for layer in range(d.n_text_layer) for h in range(d.n_text_head)]


def head_sweep(
    model,
    speech: Tensor,
    non_speech_mel: Tensor,
    *,
    references: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    seconds: Sequence[float] | None = None,
    heads: Sequence[tuple[str, int, int]] | None = None,
    max_new_tokens: int | None = None,
    normalize: str | None = "english",
) -> list[dict]:
    """Zero one decoder head at a time; decode speech and non-speech; one row per (setting, clip).

    ``speech`` [S, n_mels, frames] and ``non_speech_mel`` [N, n_mels, frames] are decoded together,
    one ``generate`` call per setting (first the unedited model, then each of ``heads``: (kind,
    layer, head) with kind ``attn`` or ``cross_attn``, default every decoder head), from audio
    features computed once (decoder edits leave the encoder alone). Rows: kind, layer, head (-1 for
    the unedited model), speech, clip (the index among the speech or the non-speech clips), text.
    Speech rows carry the WER against ``references`` (default: the unedited model's transcripts) and
    ``ref_words``, its normalised word count; non-speech rows the columns of ``hallucination_rows``.
    ``names`` and ``seconds`` describe the non-speech clips. Summarise with ``head_summary``.

    ``max_new_tokens``: the most tokens a clip may take. By default the unedited model decodes with
    ``generate``'s own limit and every edited setting with twice the longest unedited output plus
    16 (a loop that long is a failure however it goes on, and a batch runs until its longest row
    stops). ``heads=[]`` decodes the unedited model only.
    """
    require_tokenizer(model)
    S, N = len(speech), len(non_speech_mel)
    if S == 0 or N == 0:
        raise ValueError(f"the head sweep needs speech and non-speech clips, got {S} and {N}")
    names = list(names) if names is not None else [f"non-speech {i}" for i in range(N)]
    window = 30.0 * model.dims.n_audio_ctx / 1500
    seconds = list(seconds) if seconds is not None else [window] * N
    if len(names) != N or len(seconds) != N:
        raise ValueError(f"{N} non-speech clips but {len(names)} names and {len(seconds)} durations")
    if references is not None and len(references) != S:
        raise ValueError(f"{len(references)} references for {S} speech clips")
    heads = decoder_heads(model) if heads is None else [_check_head(model, h) for h in heads]
    norm = text_normalizer(normalize)  # a bad choice fails before any decoding
    if references is not None and not all(norm(r).split() for r in references):
        raise ValueError(f"a speech reference has no words after {normalize} normalisation: {list(references)}")
    mel = torch.cat([torch.as_tensor(non_speech_mel), torch.as_tensor(speech)])  # (N+S, mels, T)
    mel = check_mel(mel, model.dims, model.device, model.dtype)  # (N+S, n_mels, frames), checked
    with torch.no_grad():
        features = model.encoder(mel)  # (N+S, n_audio_ctx, D): the same for every setting
    rows: list[dict] = []
    cap = max_new_tokens
    for kind, layer, head in [("none", -1, -1), *heads]:
        edits = None if kind == "none" else Edits().ablate_heads(f"decoder.blocks.{layer}.{kind}", [head])
        results = model.generate(audio_features=features, edits=edits, max_new_tokens=cap)
        if kind == "none":
            references = references or _own_transcripts(results[N:], norm)
            longest = max(len(r.tokens) for r in results)
            cap = max_new_tokens or min(2 * longest + 16, model.dims.n_text_ctx // 2)
        where = {"kind": kind, "layer": layer, "head": head}
        noise = hallucination_rows(results[:N], names, seconds, normalize)
        rows += [where | {"speech": False, "clip": i} | r for i, r in enumerate(noise)]
        rows += [where | {"speech": True, "clip": i} | _speech_row(i, res, ref, normalize)
                 for i, (res, ref) in enumerate(zip(results[N:], references, strict=True))]  # fmt: skip
    return rows


def _own_transcripts(results: Sequence, norm) -> list[str]:
    """The unedited model's speech transcripts, the references when none are given; each must have words."""
    texts = [r.text.strip() for r in results]
    empty = [i for i, t in enumerate(texts) if not norm(t).split()]
    if empty:
        raise ValueError(f"the unedited model writes no words for speech clip {empty[0]}, so there is nothing to "
                         "compare the ablations with: give references, or leave the clip out")  # fmt: skip
    return texts


def _check_head(model, head) -> tuple[str, int, int]:
    try:
        kind, layer, h = head
    except (TypeError, ValueError):
        raise ValueError(f"a head is (kind, layer, head), e.g. ('cross_attn', 2, 5); got {head!r}") from None
    d = model.dims
    if kind not in HEAD_KINDS or not 0 <= layer < d.n_text_layer or not 0 <= h < d.n_text_head:
        raise ValueError(f"head {head!r} is not a decoder head: kind in {HEAD_KINDS}, layer 0-{d.n_text_layer - 1}, "
                         f"head 0-{d.n_text_head - 1}")  # fmt: skip
    return kind, int(layer), int(h)


def _speech_row(i: int, res, ref: str, normalize: str | None) -> dict:
    text = res.text.strip()
    words = len(text_normalizer(normalize)(ref).split())
    return {"name": f"speech {i}", "text": text, "n_tokens": len(res.tokens), "wer": wer(ref, text, normalize),
            "ref_words": words, "no_speech_prob": res.no_speech_prob, "avg_logprob": res.avg_logprob}  # fmt: skip


def head_summary(rows: Sequence[dict]) -> list[dict]:
    """One row per setting of ``head_sweep``, ranked: the heads whose removal cuts hallucination most first.

    Columns: kind, layer, head; ``hallucination_rate`` and ``in_transcribe`` (the shares of non-speech
    clips hallucinated, and hallucinated past ``transcribe``'s no-speech rule); ``no_speech_prob``
    (mean over non-speech clips); ``wer`` (corpus WER on speech: errors over reference words); and
    each one's change from the unedited model (``d_*``). Ranked by ``in_transcribe``, then
    ``hallucination_rate`` (lower first), then ``no_speech_prob`` (higher first), then ``wer``.
    The unedited model is the row with kind ``none``, first.
    """
    settings: dict = {}
    for r in rows:
        settings.setdefault((r["kind"], r["layer"], r["head"]), []).append(r)
    if ("none", -1, -1) not in settings:
        raise ValueError("the rows have no unedited setting (kind 'none'): summarise what head_sweep returns")
    summary = []
    for (kind, layer, head), rs in settings.items():
        noise, speech = [r for r in rs if not r["speech"]], [r for r in rs if r["speech"]]
        words = sum(r["ref_words"] for r in speech)
        summary.append({"kind": kind, "layer": layer, "head": head,
                        "hallucination_rate": hallucination_rate(noise),
                        "in_transcribe": hallucination_rate(noise, "hallucinated_in_transcribe"),
                        "no_speech_prob": float(np.mean([r["no_speech_prob"] for r in noise])),
                        "wer": sum(r["wer"] * r["ref_words"] for r in speech) / words})  # fmt: skip
    base = next(s for s in summary if s["kind"] == "none")
    edited = [s for s in summary if s is not base]
    for s in summary:
        s |= {f"d_{c}": s[c] - base[c] for c in ("hallucination_rate", "in_transcribe", "no_speech_prob", "wer")}
    edited.sort(key=lambda s: (s["in_transcribe"], s["hallucination_rate"], -s["no_speech_prob"], s["wer"]))
    return [base, *edited]


# ----------------------------------------------------------------------------- the lens along a loop


def repeated_tokens(tokens: Sequence[int]) -> list[bool]:
    """For each token, whether it repeats earlier text: it and the token before it already occurred as a pair.

    In a loop ", you, you, you" every token from the second "you" on is a repeat; the first
    occurrence of each pair is not, and the first token never is. Pairs may overlap: in "S S S"
    the third S repeats the pair of the first two.
    """
    seen: set[tuple[int, int]] = set()  # the pairs ending before token i
    out = [False] * len(tokens)
    for i in range(1, len(tokens)):
        if i >= 2:
            seen.add((tokens[i - 2], tokens[i - 1]))
        out[i] = (tokens[i - 1], tokens[i]) in seen
    return out


def decision_layers(top1: Tensor, emitted: Tensor) -> Tensor:
    """The first readout from which ``emitted`` is the top-1 of every later readout: [L+1, T], [T] -> [T].

    ``top1[l, t]`` is readout l's most probable token at position t (l = 0 the embeddings, l = L the
    final layer), ``emitted[t]`` the token the model wrote there. The result is in 0..L, or L+1 where
    even the final readout prefers another token (a logit filter chose the emitted one).
    """
    match = (top1 == emitted[None]).long()  # (L+1, T)
    settled = match.flip(0).cumprod(0).flip(0)  # (L+1, T): 1 where this and every later readout agree
    return top1.shape[0] - settled.sum(0)  # (T,)


def repetition_lens(
    model, mel: Tensor, prompt: Sequence[int], tokens: Sequence[int], edits: Edits | None = None
) -> list[dict]:
    """The logit lens along a decoded sequence: one row per emitted token.

    ``mel`` [n_mels, frames] is the clip, ``prompt`` the tokens ``generate`` fed first, ``tokens``
    what it wrote (``result.tokens``) and ``edits`` the interventions it ran under. The sequence is
    re-run teacher-forced; the row of token i reads the position that predicted it. Columns: index,
    token (its id), repeat (``repeated_tokens``), decision_layer (``decision_layers``), then for
    each readout l (0 = the embeddings, L = the final layer, the model's own) p_l, the probability
    it gives the token, and top_l, its own most probable token.
    """
    require_tokenizer(model)
    if not tokens:
        raise ValueError("the sequence is empty: the lens along it needs at least one emitted token")
    emitted = torch.tensor(list(tokens))  # (n,)
    seq = torch.tensor([[*prompt, *tokens[:-1]]])  # (1, P+n-1): position P-1+i predicts token i
    with torch.no_grad():
        trace = model.run(mel.reshape(1, *mel.shape[-2:]), seq, trace=lens_names(model), edits=edits).trace
        top1, p = [], []
        for name in lens_names(model):
            logp = readout(model, trace[name][0, len(prompt) - 1 :]).log_softmax(-1).cpu()  # (n, V)
            top1.append(logp.argmax(-1))  # (n,)
            p.append(logp.gather(-1, emitted[:, None])[:, 0].exp())  # (n,)
    top1, p = torch.stack(top1), torch.stack(p)  # (L+1, n) each
    decision = decision_layers(top1, emitted)  # (n,)
    repeat = repeated_tokens(list(tokens))
    rows = []
    for i in range(len(emitted)):
        row = {"index": i, "token": int(emitted[i]), "repeat": repeat[i], "decision_layer": int(decision[i])}
        row |= {f"p_{l}": float(p[l, i]) for l in range(p.shape[0])}
        rows.append(row | {f"top_{l}": int(top1[l, i]) for l in range(p.shape[0])})
    return rows


def decision_summary(rows: Sequence[dict]) -> dict:
    """Mean decision layer of the repeated tokens and of the others in ``repetition_lens`` rows (NaN if none)."""

    def mean(rs: list[dict]) -> float:
        return float(np.mean([r["decision_layer"] for r in rs])) if rs else float("nan")

    repeats = [r for r in rows if r["repeat"]]
    others = [r for r in rows if not r["repeat"]]
    return {"repeats": len(repeats), "others": len(others), "decision_repeats": mean(repeats),
            "decision_others": mean(others)}  # fmt: skip
