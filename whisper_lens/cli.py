"""The ``whisper-lens`` command. Each subcommand is one function ``cmd_<name>(args)``.

Errors a user can cause (bad paths, names, shapes) are printed as one line, with exit code 2;
no traceback. ``--model`` defaults to the shipped toy model everywhere, so every command runs
offline.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys

from .loading import DEFAULT_MODEL, OFFICIAL, SHIPPED

USER_ERRORS = (ValueError, KeyError, IndexError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError,
               OSError)  # fmt: skip


def cmd_download(args: argparse.Namespace) -> None:
    from .loading import download

    print(download(args.name))


def cmd_names(args: argparse.Namespace) -> None:
    from .loading import load_model
    from .model import activation_shapes

    model = load_model(args.model)
    shapes = activation_shapes(model.dims, batch=args.batch, n_tokens=args.tokens)
    width = max(map(len, shapes))
    for name, shape in shapes.items():
        if not args.pattern or any(fnmatch.fnmatchcase(name, p) for p in args.pattern):
            print(f"{name:<{width}}  {list(shape)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="whisper-lens",
        description="A hand-written Whisper for interpretability: traces, interventions, logit lens, decoding.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models = ", ".join(list(SHIPPED) + list(OFFICIAL))

    def model_arg(p: argparse.ArgumentParser) -> None:
        help = f"model name ({models}), hub id, HF directory or OpenAI .pt (default: {DEFAULT_MODEL})"
        p.add_argument("--model", "-m", default=DEFAULT_MODEL, help=help)

    p = sub.add_parser("download", help="fetch an official model into the hub cache")
    p.add_argument("name", help=f"one of: {', '.join(OFFICIAL)}, or a hub id")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("names", help="list every activation name with its shape")
    model_arg(p)
    p.add_argument("--batch", type=int, default=1, help="batch size for the shapes shown (default 1)")
    p.add_argument("--tokens", type=int, default=4, help="number of text tokens for the shapes shown (default 4)")
    p.add_argument("pattern", nargs="*", help="glob patterns to filter names (e.g. 'decoder.*.resid_post')")
    p.set_defaults(func=cmd_names)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("whisper-lens: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"whisper-lens: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
