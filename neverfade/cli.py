"""The `neverfade` command line: each subcommand lives in its own module in neverfade/commands, exposing
`add_parser(subparsers)`. The library (everything outside commands/ and this file) never imports them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import neverfade
from neverfade.errors import CannotAct, UserError

# subcommand -> (module exposing add_parser(subparsers), one line of help). Only the command named is imported, so
# `neverfade --help` starts no torch; the parser's `func(args) -> int` runs it.
SUBCOMMANDS = {
    "caption": ("neverfade.commands.caption", "describe images with the chosen methods"),
    "methods": ("neverfade.commands.methods", "list the methods with their parameters and defaults"),
    "eval": ("neverfade.commands.eval", "score captions: CHAIR, POPE, CLAIR"),
    "bench": ("neverfade.commands.bench", "time decoding with each method against the baseline"),
    "tune": ("neverfade.commands.tune", "search a method's parameters for a model; writes a params file"),
    "analyze": ("neverfade.commands.analyze", "attention over the caption, SPARC's selections, saliency maps"),
    "demo": ("neverfade.commands.demo", "a local page comparing methods on your images"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the full options of the subcommand `argv` names (of every one when `argv` is None)."""
    parser = argparse.ArgumentParser(
        prog="neverfade",
        description="Make vision-language models describe images more precisely and more completely.",
    )
    parser.add_argument("--version", action="version", version=f"neverfade {neverfade.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (module_name, help_line) in SUBCOMMANDS.items():
        if argv is None or name == named:
            add = importlib.import_module(module_name).add_parser
            if add.__code__.co_argcount > 1:  # subcommands of its own (eval): it builds the one the rest names
                add(sub, None if argv is None else argv[argv.index(name) + 1 :])
            else:
                add(sub)
        else:
            sub.add_parser(name, help=help_line)
    return parser


DATA_PARALLEL = ("caption", "tune")  # the subcommands that shard their work under torchrun


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DATA_PARALLEL:
        print(
            f"neverfade {args.command}: error: does not run data-parallel (every rank would do all the work); "
            "run it as one process. Under torchrun, use neverfade caption",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args.func(args) or 0)
    except (UserError, CannotAct) as err:
        print(f"neverfade {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neverfade {args.command}: interrupted; finished records are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
