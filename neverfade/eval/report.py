"""Confidence intervals over images, the papers' repeated draws, and printed tables with methods side by side.

Every metric here is a function of per-image counts summed over images (CHAIR's mentions and hallucinations, POPE's
TP/FP/TN/FN, CLAIR's score sums), so resampling images means reweighting rows of one count matrix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

Metrics = Callable[[np.ndarray], dict[str, np.ndarray]]  # column sums (..., k) -> metric name -> values (...)


def ratio(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """num / den elementwise, `empty` where den is 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, empty), where=den != 0)


def point(counts: np.ndarray, metrics: Metrics) -> dict[str, float]:
    return {name: float(v) for name, v in metrics(np.asarray(counts, float).sum(axis=0)).items()}


def bootstrap(counts: np.ndarray, metrics: Metrics, n: int = 1000, seed: int = 0, level: float = 0.95,
              baseline: np.ndarray | None = None) -> dict[str, list[float]]:
    """Percentile intervals: images (rows of `counts`) drawn with replacement, `n` times, by `seed`. With
    `baseline` (another method's counts of the same images, row for row), the intervals are of the paired
    difference metrics(counts) - metrics(baseline), both on the same draws."""
    counts = np.asarray(counts, float)
    rows = len(counts)
    picks = np.random.default_rng(seed).integers(0, rows, size=(n, rows))
    weights = np.bincount((picks + rows * np.arange(n)[:, None]).ravel(), minlength=n * rows).reshape(n, rows)
    values = metrics(weights @ counts)
    if baseline is not None:
        base = metrics(weights @ np.asarray(baseline, float))
        values = {name: v - base[name] for name, v in values.items()}
    tail = (1 - level) / 2 * 100
    return {name: [float(q) for q in np.percentile(v, [tail, 100 - tail])] for name, v in values.items()}


def draws(counts: np.ndarray, metrics: Metrics, n_draws: int = 5, size: int = 500,
          seed: int = 0) -> dict[str, dict[str, float]]:
    """The SPARC paper's protocol: `n_draws` subsets of `size` images without replacement; mean and std of each."""
    counts = np.asarray(counts, float)
    rng = np.random.default_rng(seed)
    size = min(size, len(counts))
    sums = np.stack([counts[rng.choice(len(counts), size, replace=False)].sum(axis=0) for _ in range(n_draws)])
    return {name: {"mean": float(v.mean()), "std": float(v.std())} for name, v in metrics(sums).items()}


def format_value(value: float | None, percent: bool) -> str:
    if value is None:
        return "-"
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
            lines.append([""] + [
                "[" + ", ".join(format_value(x, p) for x in ci[k]) + "]" if k in ci else "" for k, _, p in columns
            ])
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
