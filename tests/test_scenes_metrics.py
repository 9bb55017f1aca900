"""The exact scene metric on hand-checked captions, and its bootstrap intervals."""

from types import SimpleNamespace

import pytest

from neverfade.scenes import bootstrap_ci, scene_metrics

SCENES = [SimpleNamespace(kinds={"cat", "ball", "tree"}), SimpleNamespace(kinds={"boat", "fish"})]
CAPTIONS = [
    "A cat plays with a ball next to a house.",  # 10 words: cat, ball correct; house hallucinated; tree missed
    "A boat. Another boat.",
]  # 4 words: boat once (a set); fish missed


def test_metric_on_hand_checked_captions():
    m = scene_metrics(CAPTIONS, SCENES)
    # mentions: 3 + 1 = 4, hallucinated 1 -> CHAIRi 1/4; correct 2 + 1 of 3 + 2 present -> recall 3/5
    assert m["chair_i"] == pytest.approx(0.25) and m["precision"] == pytest.approx(0.75)
    assert m["recall"] == pytest.approx(0.6)
    assert m["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert m["chair_s"] == pytest.approx(0.5) and m["words"] == pytest.approx(7.0) and m["n"] == 2
    first, second = m["per_caption"]
    assert first == {"mentioned": ["ball", "cat", "house"], "hallucinated": ["house"], "missed": ["tree"], "words": 10}
    assert second == {"mentioned": ["boat"], "hallucinated": [], "missed": ["fish"], "words": 4}


def test_negated_objects_are_neither_mentions_nor_hallucinations():
    m = scene_metrics(["A cat, a ball and a tree; there is no house."], SCENES[:1])
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["chair_s"] == 0.0


def test_captions_mentioning_nothing():
    m = scene_metrics(["", "Nothing to see."], SCENES)
    assert m["precision"] == 1.0 and m["chair_i"] == 0.0 and m["recall"] == 0.0 and m["f1"] == 0.0


def test_caption_and_scene_counts_must_match():
    with pytest.raises(ValueError):
        scene_metrics(CAPTIONS, SCENES[:1])


def test_bootstrap_intervals():
    scenes = SCENES * 20
    captions = CAPTIONS * 10 + ["A cat, a ball and a tree.", "A boat and a fish."] * 10
    point = scene_metrics(captions, scenes)
    ci = bootstrap_ci(captions, scenes, n_boot=300, seed=1)
    assert ci == bootstrap_ci(captions, scenes, n_boot=300, seed=1)
    for name in ("precision", "recall", "f1", "chair_i", "chair_s", "words"):
        low, high = ci[name]
        assert low <= point[name] <= high and low < high
    same = bootstrap_ci(captions, scenes, baseline=captions, n_boot=100)
    assert all(v == (0.0, 0.0) for v in same.values())
    better = ["A cat, a ball and a tree.", "A boat and a fish."] * 20
    diff = bootstrap_ci(better, scenes, baseline=captions, n_boot=300)
    assert diff["recall"][0] > 0 and diff["chair_s"][1] < 0
