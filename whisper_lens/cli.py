"""The ``whisper-lens`` command. Each subcommand is one function ``cmd_<name>(args)``.

Errors a user can cause (bad arguments, paths, names, shapes) are printed as one line,
``whisper-lens: error: ...``, with exit code 2 and no traceback. A signal that ends a run (Ctrl-C,
SIGTERM as ``timeout`` and schedulers send it, SIGHUP when the terminal closes) first removes
whatever the command had half-written, then exits with 128 + its number (130, 143, 129) and one
line naming it. ``--model`` defaults to
the shipped toy model everywhere, so every command runs offline. Output folders (``--out``) are
replaced only when they are new, empty, or a previous output of the same command (see
``whisper_lens.files``); anything else is refused before any work.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from .loading import DEFAULT_MODEL, OFFICIAL, SHIPPED

NORMALIZE = {"english": "english", "basic": "basic", "none": None}  # --normalize -> experiments' normalize=
USER_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError)


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM or SIGHUP, so that the command unwinds (and cleans up) as on Ctrl-C."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(signum)
        self.signum = signum


ENDING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # handled as Ctrl-C is (SIGINT: KeyboardInterrupt)


class Parser(argparse.ArgumentParser):
    """argparse with the command's one-line error format (argparse prints the usage and its own prefix)."""

    argv: list[str] = []  # the command line being parsed (set by main), to explain what argparse cannot

    def error(self, message: str):
        command = self.prog.removeprefix("whisper-lens").strip()
        where = f"{command}: " if command else ""
        dashed = [a for a in Parser.argv if a.startswith("-") and len(a) > 1 and os.path.exists(a)]
        if dashed:  # a file named like a flag: argparse took it for one
            message = f"{dashed[0]} is a file whose name starts with '-', read as a flag: write it ./{dashed[0]}"
        self.exit(2, f"whisper-lens: error: {where}{message} (see whisper-lens {command} --help)\n".replace("  ", " "))


def placement(device: str) -> dict:
    """load_model's device and dtype for a --device flag: fp32 on the CPU, fp16 on CUDA."""
    import torch

    from .toy.train import check_device

    kind = check_device(device).type
    return {"device": device, "dtype": torch.float16 if kind == "cuda" else torch.float32}


def progress_arg(p: argparse.ArgumentParser) -> None:
    """``--no-progress``: the one definition of the flag, on every command that runs a model."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def cmd_explore(args: argparse.Namespace) -> None:
    """One clip as a self-contained HTML page: spectrogram and audio, tokens, attention, logit and encoder lens."""
    from pathlib import Path

    from .loading import load_model
    from .pages.common import check_page_path
    from .pages.explorer import write_explorer

    out = check_page_path(args.out or Path(args.audio).stem + "-explorer.html")  # refused before any work
    model = load_model(args.model, **placement(args.device))
    print(f"explorer page written to {write_explorer(model, args.audio, out, progress=not args.no_progress)}")


def cmd_download(args: argparse.Namespace) -> None:
    from .loading import download

    print(download(args.name))


def cmd_info(args: argparse.Namespace) -> None:
    """The machine and the fast paths chosen on it (``whisper_lens.fastpaths``); ``--calibrate``: time them now."""
    from . import fastpaths

    model, name = None, None
    if args.calibrate is not None:
        from .loading import load_model

        if fastpaths.mode() == "plain":  # checked before any output: the error is the command's one line
            raise ValueError(f"{fastpaths.ENV}=plain turns the fast paths off: there is nothing to calibrate")

        name = calibration_model(args.calibrate)
        model = load_model(name, **placement(args.device))
    for key, value in fastpaths.machine().items():
        print(f"{key + ':':<7} {value}")
    if model is not None:
        print(f"\ntimed now with {name} on {args.device}, batch 1 and 8 (seconds per step of each candidate):")
        show_choices(fastpaths.calibrate(model, (1, 8)))
    print("\nfast paths chosen on this machine (seconds per step of each candidate, best of a few):")
    show_choices(fastpaths.choices())


def calibration_model(name: str) -> str:
    """``info --calibrate``'s model: the one named, else the real tiny.en where it is on disk, else the toy."""
    from .loading import CheckpointError, find_official

    if name != "default":
        return name
    try:
        find_official("tiny.en", local=True)
        return "tiny.en"
    except CheckpointError:
        return DEFAULT_MODEL


def show_choices(choices: list) -> None:
    """The choices, under a line per device, torch version and thread count."""
    from .fastpaths import describe

    if not choices:
        print("  none yet: each is timed at its first use (--calibrate times them now)")
    where = None
    for c in sorted(choices, key=lambda c: (c.device, c.torch, c.threads, c.what, c.shape)):
        if (c.device, c.torch, c.threads) != where:
            where = (c.device, c.torch, c.threads)
            print(f"  {c.device}, torch {c.torch}, {c.threads} threads:")
        print(f"    {c.what} {c.shape}: {c.chosen}  ({describe(c)}; timed in {c.cost:.2f} s, {c.when})")


def cmd_names(args: argparse.Namespace) -> None:
    from .loading import load_model
    from .model import activation_shapes
    from .trace import select_names

    if args.batch < 1:
        raise ValueError(f"--batch must be at least 1, got {args.batch}")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {args.tokens}")
    model = load_model(args.model)
    if args.tokens > model.dims.n_text_ctx:
        raise ValueError(f"--tokens {args.tokens} is beyond the model's text context of {model.dims.n_text_ctx}")
    shapes = activation_shapes(model.dims, batch=args.batch, n_tokens=args.tokens)
    chosen = select_names(args.pattern or True, list(shapes))  # a pattern that matches nothing is an error
    width = max(map(len, chosen))
    for name, shape in shapes.items():
        if name in chosen:
            print(f"{name:<{width}}  {list(shape)}")


def cmd_transcribe(args: argparse.Namespace) -> None:
    """Transcribe recordings of any length (batched): openai-whisper's command, its flags, its files."""
    import torch

    from .audio import probe_audio
    from .loading import load_model
    from .longform import transcribe
    from .options import TRANSCRIBE, check_together, checked
    from .tokenizer import normalize_language
    from .writers import Layout, OutputFolder, formats, render

    layout = Layout(args.max_line_width, args.max_line_count, args.max_words_per_line, args.highlight_words)
    for name, value in asdict(layout).items():
        if value and not args.word_timestamps:  # openai-whisper's rule: these lay out words
            raise ValueError(f"--{name} requires --word_timestamps True")
    temperatures = fallback_temperatures(args.temperature, args.temperature_increment_on_fallback)
    options = {o.name: getattr(args, o.name) for o in TRANSCRIBE if o.cli}
    if min(temperatures) > 0 and not given("beam_size"):  # the default beam acts only at temperature 0: none here
        options["beam_size"] = None
    checked(options)  # every option refused here, before any work
    check_together({**options, "temperature": temperatures})  # --beam-size 5 --temperature 0.5: as the API refuses it
    heads = parse_heads(args.alignment_heads) if args.alignment_heads else None
    if options["language"] is not None:
        normalize_language(options["language"])
    for path in args.audio:  # every input read far enough to know it is audio
        probe_audio(path)
    device = placement(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = OutputFolder(args.output_dir, overwrite=args.overwrite)
    fmts = formats(args.output_format)
    outputs = folder.plan([os.path.splitext(os.path.basename(a))[0] for a in args.audio], fmts)
    name = real_model(args.model)
    model = load_model(name, download_root=args.model_dir, local_files_only=args.local_files_only, **device)
    if not model.tokenizer.multilingual and options["language"] not in (None, "en", "English"):
        print(f"whisper-lens: {name} is an English-only model; transcribing in English", file=sys.stderr)
        options["language"] = "en"
    if options["fp16"] and torch.device(args.device).type == "cpu":
        options["fp16"] = None  # openai-whisper's command warns and runs fp32: the CPU's only choice here
    transcripts = transcribe(model, list(args.audio), temperature=temperatures, alignment_heads=heads,
                             progress=not args.no_progress and args.verbose is False and not args.quiet,
                             **options)  # fmt: skip
    for path, transcript, targets in zip(args.audio, transcripts, outputs, strict=True):
        if args.verbose and not args.quiet:
            print_transcript(path, transcript, args.verbose == "words")
        for file in targets:
            folder.write(file, render(transcript, file.suffix[1:], layout))
    if not args.quiet:
        print(f"{', '.join(fmts)} files in {folder.folder}/", file=sys.stderr)


def given(name: str) -> bool:
    """Whether the command line being run gave the option ``name`` (under either spelling, or one argparse
    completes to it), rather than leaving it at its default."""
    flags = spellings(name)
    written = [a.split("=", 1)[0] for a in Parser.argv if a.startswith("--")]
    return any(w in flags or (len(w) > 3 and any(f.startswith(w) for f in flags)) for w in written)


def real_model(name: str | None) -> str:
    """The model a real-speech command runs: the one named, else one the user has on disk (see loading)."""
    from .loading import default_model

    return name if name is not None else default_model()


def fallback_temperatures(start: float, step: float | None) -> tuple[float, ...]:
    """openai-whisper's command-line rule: from ``start`` up to 1.0 by ``step`` (no fallback when ``step`` is None)."""
    if not 0 <= start <= 1 or (step is not None and not 0 < step <= 1):
        raise ValueError(f"--temperature must be from 0 to 1 and its increment above 0 up to 1 (or None), got {start} "
                         f"and {step}")  # fmt: skip
    import numpy as np

    if step is None:
        return (start,)
    return tuple(float(t) for t in np.arange(start, 1.0 + 1e-6, step))  # openai-whisper's values, to the last bit


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``--alignment-heads 1:0,2:5`` -> [(1, 0), (2, 5)]."""
    try:
        return [(int(layer), int(head)) for layer, head in (pair.split(":") for pair in text.split(","))]
    except ValueError:
        raise ValueError(f"--alignment-heads must be layer:head pairs like 1:0,2:5, got {text!r}") from None


def print_transcript(path: str, t, words: bool) -> None:
    """A recording's segments with their times, and the windows skipped as silence with their no-speech probability."""
    from .writers import timestamp

    silent = sum(w.no_speech for w in t.windows)
    seconds = t.windows[-1].end if t.windows else 0.0
    print(f"{path} [{t.language}, {seconds:.1f} s, {len(t.windows)} windows, {silent} without speech]"
          + ("" if t.text.strip() else ": no speech"))  # fmt: skip
    events = [(s.start, f"[{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}] {s.text.strip()}") for s in t.segments
              if s.text.strip()]  # fmt: skip
    for w in t.windows:
        if w.no_speech:
            why = "silence" if w.result is None else f"no_speech_prob {w.result.no_speech_prob:.2f}"
            events.append((w.start, f"[{timestamp(w.start, '.')} --> {timestamp(w.end, '.')}] (no speech: {why})"))
    for _, line in sorted(events, key=lambda e: e[0]):
        print(f"  {line}")
    if words:
        for s in t.segments:
            for w in s.words:
                print(f"    {w.start:8.2f} {w.end:8.2f}  {w.probability:.2f}  {w.word.strip()}")


def cmd_train_toy(args: argparse.Namespace) -> None:
    from .toy.train import train

    model = train(args.out, data_dir=args.data, run_dir=args.runs, n_train=args.clips, steps=args.steps,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device)  # fmt: skip
    print(f"saved {model.dims} to {args.out}")


def _study_inputs(args: argparse.Namespace, device: dict):
    from .audio import load_windows
    from .loading import load_model

    model = load_model(real_model(args.model), **device)
    if model.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer beside its weights")
    mels, seconds = load_windows(args.audio, model.dims.n_mels, 2 * model.dims.n_audio_ctx)
    return model, mels, seconds


def cmd_lens(args: argparse.Namespace) -> None:
    from .experiments import format_table
    from .files import output_folder
    from .study import lens_study

    device = placement(args.device)
    with output_folder(args.out, "lens") as tmp:  # refused here, before any work, if it is not ours to replace
        model, mels, _ = _study_inputs(args, device)
        for i, path in enumerate(args.audio):
            result = lens_study(model, mels[i], tmp, name=f"clip{i}")
            print(f"{path}: {result['text']}")
            print(format_table(result["per_layer"]))
    print(f"pictures and tables in {args.out}/")


def cmd_ablate(args: argparse.Namespace) -> None:
    from .experiments import format_table
    from .files import output_folder
    from .loading import load_model
    from .study import ablate_study, load_clips

    device = placement(args.device)
    refs = args.reference
    if args.audio and args.samples:
        raise ValueError("give audio files or --samples DIR, not both")
    if args.audio and refs is not None and len(refs) != len(args.audio):
        raise ValueError(f"give one --reference per audio file ({len(args.audio)}), got {len(refs)}")
    if not args.audio and refs is not None:
        raise ValueError("--reference goes with audio files; a --samples folder has its transcripts.json")
    stacks = ("encoder", "decoder") if args.stack == "both" else (args.stack,)
    with output_folder(args.out, "ablate") as tmp:  # refused here, before any work, if it is not ours to replace
        if args.audio:
            model, mels, seconds = _study_inputs(args, device)
        else:
            model = load_model(args.model, **device)
            clips = load_clips(model, args.samples)
            mels, seconds, refs = clips.mels, clips.seconds, clips.references
        summary = ablate_study(model, mels, seconds, tmp, stacks=stacks, references=refs,
                               normalize=NORMALIZE[args.normalize])  # fmt: skip
    print(format_table(summary))
    print(f"removal.png, ablate.csv, ablate_summary.csv in {args.out}/")


def cmd_attention(args: argparse.Namespace) -> None:
    from .experiments import format_table
    from .files import output_folder
    from .study import attention_study

    device = placement(args.device)
    with output_folder(args.out, "attention") as tmp:
        model, mels, seconds = _study_inputs(args, device)
        for i, path in enumerate(args.audio):
            stats = attention_study(model, mels[i], seconds[i], tmp, name=f"clip{i}", layer=args.layer)
            cross = [r for r in stats if r["kind"] == "cross_attn"]
            print(f"{path}: cross-attention per head")
            print(format_table(cross, ["name", "head", "entropy", "padding_share", "monotonicity", "diagonality"]))
    print(f"pictures and tables in {args.out}/")


def cmd_hallucinate(args: argparse.Namespace) -> None:
    """The hallucination experiments: non-speech inputs, the no-speech lens, the head sweep, attention, lens."""
    from .files import output_folder
    from .loading import load_model
    from .study import hallucination_report, load_clips, non_speech_clips

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    device = placement(args.device)
    with output_folder(args.out, "hallucinate") as tmp:  # refused here, before any work, if not ours to replace
        model = load_model(args.model, **device)
        speech = load_clips(model, args.samples)
        noise = non_speech_clips(model, args.seconds, args.seed)
        hallucination_report(model, tmp, speech, noise, title=str(args.model), heads=None if args.heads else [],
                             max_new_tokens=args.max_new_tokens, normalize=NORMALIZE[args.normalize])  # fmt: skip
    print(f"report written to {args.out}/report.md")


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    from .study import demo

    if args.model is None:  # the shipped model's products are too small to share between threads: one thread is
        torch.set_num_threads(1)  # as fast, and much faster when the other cores are busy
    report = demo(
        args.out, model_name=args.model, samples=args.samples, progress=not args.no_progress, **placement(args.device)
    )
    print(f"report written to {report}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """Layer removal over a dataset, one process or torchrun ranks, resumable; rows, summary and plot in --out."""
    from .distributed import RankFailed, Ranks, find_clips, rank_device, sweep
    from .experiments import format_table
    from .loading import load_model

    device = rank_device(args.device)
    try:
        with Ranks.join(device) as ranks:
            model = ranks.together(lambda: load_model(args.model, **placement(device)))
            clips = ranks.first(lambda: find_clips(args.audio, model, references=args.references))
            done = sweep(model, clips, args.out, stack=args.stack, removals=args.removals, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens, ranks=ranks, progress=not args.no_progress)  # fmt: skip
    except RankFailed:  # another rank failed and said why
        raise SystemExit(2) from None
    if ranks.rank == 0:
        print(format_table(done.summary))
        rate = f"{done.new_clips / done.seconds:.2f} clips/s" if done.new_clips else "nothing left to do"
        print(f"swept {done.new_clips} of {len(clips)} clips in {done.seconds:.2f} s ({rate}, {ranks.size} ranks)")
        drawn = ", removal.png" if done.plot else " (no removal.png: pip install matplotlib)"
        print(f"rows.csv, summary.csv{drawn} in {args.out}/")


def cmd_export(args: argparse.Namespace) -> None:
    """Activations of a dataset as safetensors shards with an index, one process or torchrun ranks, resumable."""
    import torch

    from .distributed import RankFailed, Ranks, export, find_clips, rank_device
    from .loading import load_model

    device = rank_device(args.device)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    try:
        with Ranks.join(device) as ranks:
            model = ranks.together(lambda: load_model(args.model, **placement(device)))
            clips = ranks.first(lambda: find_clips(args.audio, model))
            done = export(model, clips, args.out, args.trace, dtype=dtype, positions=args.positions,
                          batch_size=args.batch_size, shard_clips=args.shard_clips,
                          max_new_tokens=args.max_new_tokens, ranks=ranks, progress=not args.no_progress)  # fmt: skip
    except RankFailed:  # another rank failed and said why
        raise SystemExit(2) from None
    if ranks.rank == 0:
        rate = f"{done.bytes / 1e6 / done.seconds:.2f} MB/s" if done.new_clips else "nothing left to do"
        print(f"exported {done.new_clips} of {len(clips)} clips, {done.bytes / 1e6:.1f} MB in {done.seconds:.2f} s "
              f"({rate}, {ranks.size} ranks)")  # fmt: skip
        print(f"index: {done.index} (read it with whisper_lens.load_activations)")


def str2bool(text: str) -> bool:
    """openai-whisper's command-line booleans: True or False."""
    if text not in ("True", "False"):
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return text == "True"


def spellings(name: str) -> list[str]:
    """A flag under the usual spelling (--beam-size) and openai-whisper's (--beam_size)."""
    return list(dict.fromkeys([f"--{name.replace('_', '-')}", f"--{name}"]))


def add_option(p: argparse.ArgumentParser, o) -> None:
    """One ``options.Option`` on the command line: its flags, default and help, from its one definition."""
    default = o.command_line_default
    help = f"{o.doc} (default: {default})"
    if o.cli == "bool":
        p.add_argument(f"--{o.name}", dest=o.name, type=str2bool, default=default, metavar="True|False", help=help)
        flag = o.name.replace("_", "-")
        if flag != o.name:  # --word-timestamps alone means True (--fp16 always takes its value)
            p.add_argument(f"--{flag}", dest=o.name, action="store_true", help=argparse.SUPPRESS)
        p.add_argument(f"--no-{flag}", dest=o.name, action="store_false", help=argparse.SUPPRESS)
    else:
        p.add_argument(*spellings(o.name), dest=o.name, type=o.parse, default=default, choices=o.choices, help=help)


def transcribe_args(p: argparse.ArgumentParser) -> None:
    """The transcribe command's arguments: openai-whisper's (every option from ``options.TRANSCRIBE``) and ours."""
    from .options import TRANSCRIBE, optional

    p.add_argument("audio", nargs="+", help="audio files (wav, flac, mp3, ogg, opus, m4a, mp4, webm ...), any length")
    model_arg(p, real=True)
    p.add_argument(
        *spellings("model_dir"),
        "--download-root",
        dest="model_dir",
        default=None,
        help="where models are downloaded and looked for (default: the hub cache, ~/.cache/whisper)",
    )
    p.add_argument(*spellings("local_files_only"), dest="local_files_only", action="store_true",
                   help="never download: only models already on disk")  # fmt: skip
    p.add_argument(*spellings("output_dir"), "-o", dest="output_dir", default=".", help="folder for the files "
                   "(default: the current one); existing files of the same names need --overwrite")  # fmt: skip
    p.add_argument(
        *spellings("output_format"),
        "-f",
        dest="output_format",
        default="all",
        choices=["txt", "vtt", "srt", "tsv", "json", "all"],
        help="files to write (default: all)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace transcript files of the same names")
    p.add_argument("--verbose", type=lambda v: v if v == "words" else str2bool(v), default=True,
                   metavar="True|False|words", help="True: print each file's segments (default); words: and every "
                   "word with its probability; False: a progress bar only")  # fmt: skip
    p.add_argument(
        *spellings("temperature"), dest="temperature", type=float, default=0.0, help="first temperature (default 0)"
    )
    p.add_argument(*spellings("temperature_increment_on_fallback"), dest="temperature_increment_on_fallback",
                   type=optional(float), default=0.2, help="steps up to 1.0 for windows that fail the thresholds "
                   "(None: no fallback; default 0.2)")  # fmt: skip
    for o in TRANSCRIBE:
        if o.cli:
            add_option(p, o)
    p.add_argument("--alignment-heads", "--alignment_heads", default=None,
                   help="layer:head pairs to time words with (default: the model's), e.g. 1:0,2:5")  # fmt: skip
    p.add_argument(*spellings("highlight_words"), dest="highlight_words", type=str2bool, default=False,
                   metavar="True|False", help="(with --word_timestamps True) underline each word as it is spoken "
                   "in srt and vtt")  # fmt: skip
    p.add_argument(
        *spellings("max_line_width"),
        dest="max_line_width",
        type=optional(int),
        default=None,
        help="(with --word_timestamps True) the most characters in a subtitle line",
    )
    p.add_argument(
        *spellings("max_line_count"),
        dest="max_line_count",
        type=optional(int),
        default=None,
        help="(with --word_timestamps True) the most lines in a subtitle",
    )
    p.add_argument(
        *spellings("max_words_per_line"),
        dest="max_words_per_line",
        type=optional(int),
        default=None,
        help="(with --word_timestamps True, no effect with --max_line_width) the most words in a line",
    )
    p.add_argument("--threads", type=optional(int), default=0, help="torch's CPU threads (default 0: torch's choice)")


def common_args(p: argparse.ArgumentParser) -> None:
    """--quiet and --no-progress, on every command (those without a progress bar take --no-progress and ignore it)."""
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    if "--no-progress" not in p._option_string_actions:
        progress_arg(p)


def model_arg(p: argparse.ArgumentParser, device: bool = True, real: bool = False) -> None:
    """--model (and --device). ``real``: a command for real speech, whose default is a real model on disk."""
    models = ", ".join(list(SHIPPED) + list(OFFICIAL))
    if real:
        default, said = None, "a real model already on disk (turbo first, then the smallest), else an error"
    else:
        default, said = DEFAULT_MODEL, DEFAULT_MODEL
    help = f"model name ({models}), hub id, HF or faster-whisper folder, or OpenAI .pt (default: {said})"
    p.add_argument("--model", "-m", default=default, help=help)
    if device:
        p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp16); default cpu")


def cmd_sae_train(args: argparse.Namespace) -> None:
    """Train a sparse autoencoder on one activation of an export with SAELens; resumable; SAELens's format."""
    from .sae import train

    done = train(args.export, args.name, args.out, architecture=args.architecture, width=args.width, k=args.k,
                 sparsity=args.sparsity, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                 checkpoints=args.checkpoints, device=args.device)  # fmt: skip
    resumed = "" if done.resumed_from is None else f", resumed after {done.resumed_from} rows"
    print(f"{done.steps} steps{resumed}: {done.metrics}")
    print(f"SAE in {done.out}/ (sae_lens.SAE.load_from_disk reads it; splice it with wl.Edits().splice)")


def parse_features(text: str) -> list[int]:
    """'0-99,200' -> [0, ..., 99, 200]."""
    out = []
    for part in text.split(","):
        a, _, b = part.strip().partition("-")
        if not a.isdigit() or (b and not b.isdigit()):
            raise argparse.ArgumentTypeError(f"features are numbers and ranges like 0-99,200, got {text!r}")
        out += list(range(int(a), int(b or a) + 1))
    return out


def cmd_features(args: argparse.Namespace) -> None:
    """A self-contained page of the top moments of SAE latents, neurons or heads across clips, to listen to."""
    from .loading import load_model
    from .pages.common import check_page_path
    from .pages.features import write_features

    check_page_path(args.out)
    sae = None
    if args.sae is not None:
        try:
            from sae_lens import SAE
        except ImportError:
            raise ImportError("--sae needs SAELens: pip install 'whisper-lens[sae]'") from None
        if not (Path(args.sae) / "cfg.json").is_file():
            raise FileNotFoundError(f"--sae {args.sae}: no cfg.json there (a folder written by whisper-lens sae train)")
        sae = SAE.load_from_disk(args.sae, device=args.device)
    model = load_model(args.model, **placement(args.device))
    path = write_features(model, args.audio, args.out, name=args.name, sae=sae, features=args.features,
                          top_k=args.top_k, batch_size=args.batch_size, progress=True)  # fmt: skip
    print(f"wrote {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="whisper-lens",
        description="A hand-written Whisper for interpretability: traces, interventions, logit lens, decoding.",
    )
    parser.add_argument("--version", action="version", version=f"whisper-lens {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def samples_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--samples", default=None, help="a folder of speech clips with transcripts.json {file: text} "
                       "(without it, WER is against the full model's transcripts); default: the shipped speech "
                       "(the toy's samples for the toy)")  # fmt: skip

    def normalize_arg(p: argparse.ArgumentParser) -> None:
        help = "text normalisation before WER: Whisper's English one (default), basic (other languages), none (raw)"
        p.add_argument("--normalize", choices=list(NORMALIZE), default="english", help=help)

    p = sub.add_parser("download", help="fetch an official model into the hub cache")
    p.add_argument("name", help=f"one of: {', '.join(OFFICIAL)}, or a hub id")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("info", help="this machine and the fast paths timed on it (--calibrate: time them now)")
    p.add_argument("--calibrate", nargs="?", const="default", default=None, metavar="MODEL",
                   help="time greedy decoding's fast paths now for batch 1 and 8 with MODEL (default: the real "
                   f"tiny.en where it is on disk, else {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--device", default="cpu", help="the device --calibrate times on: cpu (fp32) or cuda (fp16)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("names", help="list every activation name with its shape")
    model_arg(p, device=False)  # shapes only: nothing runs
    p.add_argument("--batch", type=int, default=1, help="batch size for the shapes shown (default 1)")
    p.add_argument("--tokens", type=int, default=4, help="number of text tokens for the shapes shown (default 4)")
    p.add_argument("pattern", nargs="*", help="glob patterns to filter names (e.g. 'decoder.*.resid_post')")
    p.set_defaults(func=cmd_names)

    p = sub.add_parser("transcribe", help="transcribe recordings of any length (batched): openai-whisper's command",
                       description="openai-whisper's `whisper` command: its flags (--beam_size 5 or --beam-size 5, "
                       "--word_timestamps True or --word-timestamps), defaults and files, batched over the "
                       "recordings. See docs/openai-whisper.md.")  # fmt: skip
    transcribe_args(p)
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("explore", help="one clip as a self-contained HTML page: where each token listened")
    model_arg(p)
    p.add_argument("audio", help="one audio file, no longer than the model's window (30 s for official models)")
    p.add_argument("--out", default=None, help="the page to write (default: AUDIO's name + -explorer.html)")
    progress_arg(p)
    p.set_defaults(func=cmd_explore)

    p = sub.add_parser("demo", help="the whole study (default: the shipped toy model, offline), written to report/")
    p.add_argument("--out", default="report", help="output folder (default report)")
    p.add_argument("--model", default=None, help="another model: official name, hub id, folder or .pt (default: "
                   "the shipped toy); official models are studied on the shipped real speech")  # fmt: skip
    samples_arg(p)
    p.add_argument("--device", default="cpu", help="cpu (fp32) or cuda (fp16); default cpu")
    progress_arg(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("lens", help="decoder and encoder logit lens of audio files (pictures + tables)")
    model_arg(p, real=True)
    p.add_argument("audio", nargs="+")
    p.add_argument("--out", default="lens-out", help="output folder (default lens-out)")
    progress_arg(p)
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("ablate", help="remove the last k blocks of the encoder/decoder and measure WER")
    model_arg(p)
    p.add_argument("audio", nargs="*", help="audio files (default: the samples folder)")
    p.add_argument("--stack", choices=["encoder", "decoder", "both"], default="both")
    p.add_argument(
        "--reference",
        action="append",
        help="reference transcript (one per file, in order); default: the full model's own transcript",
    )
    samples_arg(p)
    normalize_arg(p)
    p.add_argument("--out", default="ablate-out", help="output folder (default ablate-out)")
    progress_arg(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("hallucinate", help="hallucination on non-speech: rates, no-speech lens, head sweep, lens")
    model_arg(p)
    samples_arg(p)
    p.add_argument("--seconds", type=float, default=None, help="length of each non-speech input (default 10 s, "
                   "or the model's window if shorter)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the noise inputs (default 0)")
    p.add_argument("--no-heads", dest="heads", action="store_false", help="skip the head sweep (the slow part)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens a clip may take in the head "
                   "sweep (default: twice the longest unedited output plus 16)")  # fmt: skip
    normalize_arg(p)
    p.add_argument("--out", default="hallucinate-out", help="output folder (default hallucinate-out)")
    progress_arg(p)
    p.set_defaults(func=cmd_hallucinate)

    p = sub.add_parser("attention", help="attention pictures and per-head statistics of audio files")
    model_arg(p, real=True)
    p.add_argument("audio", nargs="+")
    p.add_argument("--layer", type=int, default=None, help="block to draw (default: the last)")
    p.add_argument("--out", default="attention-out", help="output folder (default attention-out)")
    progress_arg(p)
    p.set_defaults(func=cmd_attention)

    p = sub.add_parser("sweep", help="layer removal over a dataset: resumable, one process or torchrun ranks",
                       description="Remove the last k blocks of a stack for each k and decode every clip; rows, "
                       "summary and plot in --out. N ranks: torchrun --nproc-per-node N -m whisper_lens sweep "
                       "...")  # fmt: skip
    model_arg(p)
    p.add_argument("audio", nargs="+", help="a folder of audio files (searched recursively), or the files")
    p.add_argument("--stack", choices=["encoder", "decoder", "both"], required=True)
    p.add_argument("--removals", type=int, action="append", metavar="K",
                   help="numbers of last blocks to remove (default: 0 to all of them)")  # fmt: skip
    p.add_argument("--references", help="JSON {clip: transcript}, clip = path in the folder or unique file name "
                   "(default: WER against the full model's own transcripts)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder; rerunning the command resumes in it")
    p.add_argument("--batch-size", type=int, default=8, help="clips decoded together (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per clip (default 224)")
    progress_arg(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="activations of a dataset as safetensors shards + index (for SAEs)",
                       description="model.run's activations of every clip as safetensors shards with index.json, "
                       "read with whisper_lens.load_activations. N ranks: torchrun --nproc-per-node N -m "
                       "whisper_lens export ...")  # fmt: skip
    model_arg(p)
    p.add_argument("audio", nargs="+", help="a folder of audio files (searched recursively), or the files")
    p.add_argument("--trace", action="append", required=True, metavar="PATTERN",
                   help="activation names or glob patterns, e.g. 'encoder.blocks.*.resid_post' (several after one "
                   "--trace, or --trace repeated)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder; rerunning the command resumes in it")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="stored dtype (default: the model's)")  # fmt: skip
    p.add_argument("--positions", choices=["speech", "all"], default="speech",
                   help="audio positions kept: those covering the clip (default) or the whole window")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8, help="clips run together (default 8)")
    p.add_argument("--shard-clips", type=int, default=32, help="clips per shard file (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens per transcript (decoder names)")
    progress_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sae", help="sparse autoencoders on an export's activations (SAELens: whisper-lens[sae])")
    sae = p.add_subparsers(dest="sae_command", required=True, metavar="SAE_COMMAND")
    p = sae.add_parser(
        "train",
        help="train an SAE on one activation of an export with SAELens's trainer",
        description="Train with SAELens's SAETrainer on shuffled rows of EXPORT's NAME; OUT ends "
        "up in SAELens's format (sae_lens.SAE.load_from_disk). Rerun to resume from its checkpoints.",
    )
    p.add_argument("export", help="a folder written by whisper-lens export")
    p.add_argument("--name", required=True, help="the activation, e.g. encoder.blocks.3.resid_post")
    p.add_argument("--out", required=True, help="output folder; rerunning the command resumes in it")
    p.add_argument("--architecture", choices=["standard", "topk", "jumprelu"], default="topk")
    p.add_argument("--width", type=int, default=None, help="latents (default 8 x the activation's width)")
    p.add_argument("--k", type=int, default=32, help="active latents per row, topk (default 32)")
    p.add_argument("--sparsity", type=float, default=None,
                   help="L1 (standard, default 5) or L0 (jumprelu, default 1) coefficient")  # fmt: skip
    p.add_argument("--steps", type=int, default=None, help="training steps (default: one pass over the export)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step (default 4096)")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoints", type=int, default=4, help="checkpoints written on the way (default 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_sae_train)

    p = sub.add_parser("features", help="a page of what SAE latents, neurons or heads fire on, to listen to",
                       description="Top moments of each feature across the clips, each with its snippet's audio, "
                       "spectrogram, activation and words, as one self-contained HTML page.")  # fmt: skip
    model_arg(p)
    p.add_argument("audio", nargs="+", help="a folder of audio files (searched recursively), or the files")
    p.add_argument(
        "--name",
        required=True,
        help="the activation: with --sae the SAE's point; else mlp.post (neurons), attn.z (heads)",
    )
    p.add_argument("--sae", default=None, help="an SAE folder (whisper-lens sae train, or any SAELens save)")
    p.add_argument("--features", type=parse_features, default=None, help="e.g. 0-99,200 (default: all)")
    p.add_argument("--top-k", type=int, default=8, help="moments per feature (default 8)")
    p.add_argument("--batch-size", type=int, default=8, help="clips run together (default 8)")
    p.add_argument("--out", required=True, help="the page to write (.html)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("train-toy", help="train the shipped toy model from scratch on espeak-ng speech (the recipe)")
    p.add_argument("--out", default="weights/toy", help="where to save the model (default weights/toy)")
    p.add_argument("--data", default="data/toy", help="feature cache folder (default data/toy)")
    p.add_argument("--runs", default="runs/toy", help="checkpoint folder; training resumes from it (default runs/toy)")
    p.add_argument("--clips", type=int, default=16000, help="training sentences (default 16000)")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_train_toy)

    for p in sub.choices.values():
        common_args(p)
    return parser


# Options that take several values: "--trace A B DIR" must leave DIR to the positionals, so the values an option
# takes are only those that look like its values (a pattern, not a path on disk; an integer), each given to argparse
# as a repeated flag.
LIST_OPTIONS = {
    "--trace": lambda v: "/" not in v and not os.path.exists(v),
    "--removals": lambda v: v.lstrip("-").isdigit(),
}


def split_list_options(argv: list[str]) -> list[str]:
    """``--trace A B DIR`` -> ``--trace A --trace B DIR``: a list option takes only values that look like its own."""
    out, i = [], 0
    while i < len(argv):
        flag = argv[i]
        out.append(flag)
        i += 1
        if flag == "--":
            return out + argv[i:]
        if flag in LIST_OPTIONS and i < len(argv):
            out.append(argv[i])  # the first value is the option's whatever it looks like
            i += 1
            while i < len(argv) and not argv[i].startswith("-") and LIST_OPTIONS[flag](argv[i]):
                out += [flag, argv[i]]
                i += 1
    return out


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("whisper-lens")
    except PackageNotFoundError:
        return "unknown (not installed)"


def in_flags(message: str, parser: argparse.ArgumentParser, argv: list[str]) -> str:
    """An error raised by the Python API, in the command's terms: ``beam_size=`` becomes ``--beam-size``."""
    sub = next((a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {})
    command = next((a for a in argv if a in sub), None)
    for action in sub[command]._actions if command else []:
        flags = [o for o in action.option_strings if o.startswith("--")]
        if not flags or action.dest in ("help", "model"):
            continue
        message = re.sub(rf"(?<![\w.-]){action.dest}=", f"{flags[0]} ", message)
        message = re.sub(rf"^{action.dest}\b(?!-)", flags[0], message)  # "seed must be ..." names --seed
        if "_" in action.dest:
            message = re.sub(rf"(?<![\w.-]){action.dest}\b", flags[0], message)
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    Parser.argv = split_list_options(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(Parser.argv)
    if args.no_progress or args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # every progress bar of the command (tqdm reads it)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can signals be handled
    previous = {sig: signal.signal(sig, _terminate) for sig in ENDING_SIGNALS} if main_thread else {}
    quiet = open(os.devnull, "w") if args.quiet else None  # noqa: SIM115
    try:
        if quiet:
            with contextlib.redirect_stdout(quiet):
                args.func(args)
        else:
            args.func(args)
    except KeyboardInterrupt:
        _say("whisper-lens: interrupted (SIGINT)")
        return 128 + signal.SIGINT
    except Terminated as e:
        how = "hung up" if e.signum == signal.SIGHUP else "terminated"
        _say(f"whisper-lens: {how} ({signal.Signals(e.signum).name})")
        return 128 + e.signum
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        message = in_flags(" ".join(str(message).split()), parser, Parser.argv)  # one line, in flag names
        print(f"whisper-lens: error: {message}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if quiet:
            quiet.close()
    return 0


def _say(line: str) -> None:
    """One line on stderr, if there still is one (after SIGHUP the terminal may be gone)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _terminate(signum: int, frame) -> None:
    raise Terminated(signum)


def run() -> None:
    """The process entry (the ``whisper-lens`` script, ``python -m whisper_lens``): ``main``'s exit status.

    After Ctrl-C the process ends by SIGINT itself, once it has cleaned up: the shell reports
    status 130 and, unlike after a plain ``exit(130)``, also stops a loop that runs the command.
    """
    code = main()
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    sys.exit(code)


if __name__ == "__main__":
    run()
