import numpy as np
import pytest

from neverfade.eval import report


def mean_of_first(sums):
    return {"mean": report.ratio(sums[..., 0], sums[..., 1])}


def test_ratio_is_empty_value_where_nothing_to_divide():
    assert report.ratio(np.array([1.0, 2.0]), np.array([4.0, 0.0])).tolist() == [0.25, 0.0]
    assert report.ratio(1, 0, empty=1.0) == 1.0


def test_bootstrap_interval_by_hand():
    # two images scoring 1 and 0: a resample of two averages 0, 0.5 or 1 with chances 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles of 1000 resamples are 0 and 1
    counts = np.array([[1.0, 1.0], [0.0, 1.0]])
    assert report.bootstrap(counts, mean_of_first, n=1000, seed=0) == {"mean": [0.0, 1.0]}
    same = np.array([[3.0, 4.0]] * 5)
    assert report.bootstrap(same, mean_of_first, n=200, seed=1) == {"mean": [0.75, 0.75]}


def test_bootstrap_follows_its_seed():
    counts = np.random.default_rng(0).integers(0, 5, size=(50, 2)).astype(float) + [0, 5]
    assert report.bootstrap(counts, mean_of_first, seed=3) == report.bootstrap(counts, mean_of_first, seed=3)
    assert report.bootstrap(counts, mean_of_first, seed=3) != report.bootstrap(counts, mean_of_first, seed=4)


def test_bootstrap_with_a_baseline_is_paired_over_images():
    counts = np.random.default_rng(0).integers(0, 5, size=(50, 2)).astype(float) + [0, 5]
    better = counts + [1, 0]  # one more hit on every image: the difference is 50 / (sum of 50 drawn rows' totals)
    low, high = report.bootstrap(better, mean_of_first, seed=2, baseline=counts)["mean"]
    assert low < 1 / counts[:, 1].mean() < high and high - low < 0.02  # 0.14 [0.132, 0.148]
    alone = report.bootstrap(better, mean_of_first, seed=2)["mean"]
    assert alone[1] - alone[0] > 0.1  # unpaired, the images' spread would swamp it
    assert report.bootstrap(counts, mean_of_first, baseline=counts) == {"mean": [0.0, 0.0]}


def test_draws_are_without_replacement():
    counts = np.array([[1.0, 1.0], [0.0, 1.0]])
    # drawing both of two images without replacement always gives 0.5; with replacement it would not
    assert report.draws(counts, mean_of_first, n_draws=5, size=2) == {"mean": {"mean": 0.5, "std": 0.0}}
    # asking for more images than there are uses them all
    assert report.draws(counts, mean_of_first, n_draws=3, size=500) == {"mean": {"mean": 0.5, "std": 0.0}}
    one = report.draws(counts, mean_of_first, n_draws=4, size=1, seed=0)["mean"]
    assert one["mean"] * 4 == pytest.approx(round(one["mean"] * 4))  # each draw scores 0 or 1


def test_table_puts_methods_side_by_side():
    text = report.table(
        {
            "baseline": {"overall": {"F1": 0.8199, "n": 500}, "ci": {"F1": [0.80, 0.84]}},
            "sparc": {"overall": {"F1": 0.8367, "n": 500}},
        },
        [("F1", "F1", True), ("n", "n", False)],
    )
    lines = text.splitlines()
    assert lines[0].split() == ["method", "F1", "n"]
    assert lines[2].split() == ["baseline", "81.99", "500"]
    assert lines[3].split() == ["[80.00,", "84.00]"]
    assert lines[4].split() == ["sparc", "83.67", "500"]


def test_labels_are_short_and_distinct():
    assert report.unique_labels(["runs/a.jsonl", "runs/b.jsonl"]) == ["a", "b"]
    assert report.unique_labels(["x/out.jsonl", "y/out.jsonl"]) == ["x/out", "y/out"]
