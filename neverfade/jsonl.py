"""The one JSONL reader, with one policy for lines that do not parse:

- a blank line is skipped;
- a torn last line (no newline at its end, and not UTF-8 JSON: what an interrupted writer leaves) is ignored with a
  warning on the "neverfade" logger;
- any other line that is not UTF-8 JSON is an error naming the file and the line (BadLine, a UserError).

What a line must hold (a JSON object, certain keys) is the caller's to check.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from neverfade.errors import UserError


class BadLine(UserError):
    """A line of a JSONL file that is not UTF-8 JSON: the message is "FILE:LINE: why"."""

    def __init__(self, path: str | Path, number: int, why: str):
        super().__init__(f"{path}:{number}: {why}")
        self.path, self.number, self.why = str(path), number, why


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, value) for each JSON line of the file, by the policy above; a missing file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    with open(path, "rb") as f:
        yield from parse_lines(f, path)


def parse_lines(lines: Iterable[bytes], path: str | Path) -> Iterator[tuple[int, Any]]:
    """`read_jsonl` over lines already read (each with its b"\\n", as iterating a binary file gives them)."""
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            if not raw.endswith(b"\n"):
                logging.getLogger("neverfade").warning(
                    "%s:%d: ignoring a torn last line (no newline, not JSON), as an interrupted writer leaves it",
                    path,
                    number,
                )
                return
            why = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else f"not valid JSON ({err.msg})"
            raise BadLine(path, number, why) from None
        yield number, value
