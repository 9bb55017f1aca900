"""Statistics over images: every metric is a function of per-image counts summed over images (CHAIR's mentions and
hallucinations, POPE's TP/FP/TN/FN, CLAIR's score sums, the scenes' counts), so resampling images means reweighting
rows of one count matrix. Used by eval/ and scenes/ alike."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Metrics = Callable[[np.ndarray], dict[str, np.ndarray]]  # column sums (..., k) -> metric name -> values (...)


def ratio(num: np.ndarray, den: np.ndarray, empty: float = 0.0) -> np.ndarray:
    """num / den elementwise, `empty` where den is 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, empty), where=den != 0)


def point(counts: np.ndarray, metrics: Metrics) -> dict[str, float]:
    return {name: float(v) for name, v in metrics(np.asarray(counts, float).sum(axis=0)).items()}


def bootstrap(
    counts: np.ndarray,
    metrics: Metrics,
    n: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    baseline: np.ndarray | None = None,
) -> dict[str, list[float]]:
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


def draws(
    counts: np.ndarray, metrics: Metrics, n_draws: int = 5, size: int = 500, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The SPARC paper's protocol: `n_draws` subsets of `size` images without replacement; mean and std of each."""
    counts = np.asarray(counts, float)
    rng = np.random.default_rng(seed)
    size = min(size, len(counts))
    sums = np.stack([counts[rng.choice(len(counts), size, replace=False)].sum(axis=0) for _ in range(n_draws)])
    return {name: {"mean": float(v.mean()), "std": float(v.std())} for name, v in metrics(sums).items()}
