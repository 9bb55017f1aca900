"""Visual-attention diversity (the SPARC paper's Fig. 3): the Wasserstein distance between the visual-attention maps
of consecutive output tokens.

The paper normalises each map to sum to 1 and cites Vallender (1974), but does not state the ground distance. Here
it is the Euclidean distance between token centres on the image's token grid, in tokens: moving all attention one
token to the right costs 1, one token diagonally sqrt(2). (A one-dimensional distance over the raster index would
charge a move of one row down as `cols` tokens.) The distance is exact: POT's network simplex (`ot.emd2`).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=8)
def grid_costs(rows: int, cols: int) -> np.ndarray:
    """(rows * cols, rows * cols) Euclidean distances between the cells of a rows x cols grid, row-major."""
    y, x = np.divmod(np.arange(rows * cols), cols)
    points = np.stack([y, x], axis=1).astype(np.float64)
    return np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))


def wasserstein(p: np.ndarray, q: np.ndarray) -> float:
    """W1 between two (rows, cols) maps of non-negative attention, each normalised to sum 1; NaN if one is all 0."""
    import ot

    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.ndim != 2:
        raise ValueError(f"two maps of one (rows, cols) shape expected, got {p.shape} and {q.shape}")
    if p.sum() <= 0 or q.sum() <= 0:
        return float("nan")
    return float(ot.emd2((p / p.sum()).ravel(), (q / q.sum()).ravel(), grid_costs(*p.shape)))


def consecutive_wasserstein(maps: np.ndarray) -> list[float]:
    """(steps, rows, cols) maps -> the steps - 1 distances between each map and the next."""
    return [wasserstein(a, b) for a, b in zip(maps[:-1], maps[1:])]
