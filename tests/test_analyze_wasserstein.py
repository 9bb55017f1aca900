"""The Wasserstein distance between visual-attention maps on the token grid, against its definition."""

import numpy as np
import pytest
from scipy.optimize import linprog

from neverfade.analysis.wasserstein import consecutive_wasserstein, grid_costs, wasserstein


def plain_w1(p, q):
    """W1 as the transport linear program: min sum c_ij x_ij, rows of x sum to p, columns to q, x >= 0, with the
    Euclidean distance between grid cells as c."""
    rows, cols = p.shape
    p, q = (p / p.sum()).ravel(), (q / q.sum()).ravel()
    n = p.size
    y, x = np.divmod(np.arange(n), cols)
    cost = np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :])
    a_eq = np.vstack([np.kron(np.eye(n), np.ones(n)), np.kron(np.ones(n), np.eye(n))])
    result = linprog(cost.ravel(), A_eq=a_eq, b_eq=np.concatenate([p, q]), bounds=(0, None), method="highs")
    assert result.status == 0
    return result.fun


def test_identical_maps_are_zero_apart():
    m = np.random.default_rng(0).random((12, 12))
    assert wasserstein(m, m) == pytest.approx(0, abs=1e-12)
    assert wasserstein(m, 3 * m) == pytest.approx(0, abs=1e-12), "maps are normalised first"


@pytest.mark.parametrize("dy, dx", [(0, 1), (0, 5), (3, 0), (2, 2), (4, 3)])
def test_a_shifted_map_is_its_shift_apart(dy, dx):
    blob = np.zeros((12, 12))
    blob[1:4, 2:5] = np.random.default_rng(1).random((3, 3)) + 0.1
    shifted = np.roll(blob, (dy, dx), axis=(0, 1))  # the blob stays inside the grid
    assert wasserstein(blob, shifted) == pytest.approx(np.hypot(dy, dx), abs=1e-9)


def test_equals_the_transport_linear_program():
    rng = np.random.default_rng(2)
    for shape in [(3, 4), (5, 5), (2, 7)]:
        p, q = rng.random(shape) ** 3, rng.random(shape) ** 3
        assert wasserstein(p, q) == pytest.approx(plain_w1(p, q), abs=1e-9)


def test_consecutive_distances_and_costs():
    rng = np.random.default_rng(3)
    maps = rng.random((5, 4, 4))
    assert consecutive_wasserstein(maps) == pytest.approx([wasserstein(maps[i], maps[i + 1]) for i in range(4)])
    assert grid_costs(2, 3)[0, 5] == pytest.approx(np.hypot(1, 2))
    assert np.isnan(wasserstein(np.zeros((2, 2)), np.ones((2, 2))))
