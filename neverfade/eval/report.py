"""Printed tables with methods side by side, and result files; the intervals and draws are neverfade.stats'."""

from __future__ import annotations

import json
import os
from pathlib import Path

from neverfade.stats import Metrics, bootstrap, draws, point, ratio  # noqa: F401  (the eval modules' names)


def format_value(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # a word in place of a figure ("n/a")
        return value
    if isinstance(value, int):
        return str(value)
    return f"{value * 100:.2f}" if percent else f"{value:.2f}"


def table(results: dict[str, dict], columns: list[tuple[str, str, bool]]) -> str:
    """One row per method (label -> result with "overall" and optional "ci"); columns are (key, header, percent).

    A confidence interval, where present, is printed under its value as [low, high].
    """
    header = ["method"] + [h for _, h, _ in columns]
    lines = []
    for label, result in results.items():
        overall, ci = result["overall"], result.get("ci") or {}
        lines.append([label] + [format_value(overall.get(k), p) for k, _, p in columns])
        if any(k in ci for k, _, _ in columns):
            lines.append(
                [""]
                + ["[" + ", ".join(format_value(x, p) for x in ci[k]) + "]" if k in ci else "" for k, _, p in columns]
            )
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(row) for row in lines])


def write_json(path: str | Path, data: object) -> None:
    """Write atomically, so an interrupted run never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def unique_labels(paths: list[str]) -> list[str]:
    """Short names for result columns: file stems, with parent folders added while they collide."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]
