"""The `neverfade` command line: each subcommand lives in its own module exposing `add_parser(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from neverfade.errors import CannotAct

# subcommand name -> module exposing add_parser(subparsers); the parser's `func(args) -> int` runs it.
SUBCOMMANDS = {
    "caption": "neverfade.commands.caption",
    "methods": "neverfade.commands.methods",
    "eval": "neverfade.eval.cli",
    "bench": "neverfade.commands.bench",
    "analyze": "neverfade.commands.analyze",
    "demo": "neverfade.commands.demo",
}


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neverfade",
        description="Make vision-language models describe images more precisely and more completely.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in SUBCOMMANDS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # a subcommand not built yet
        module.add_parser(sub)
    return parser


DATA_PARALLEL = ("caption",)  # the subcommands that shard their work under torchrun


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DATA_PARALLEL:
        print(f"neverfade {args.command}: error: does not run data-parallel (every rank would do all the work); "
              "run it as one process. Under torchrun, use neverfade caption", file=sys.stderr)
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
