"""The exact scene metric: objects a caption mentions against the objects the scene contains.

Per caption, the mentioned kinds are a set (`vocab.mentioned_objects`): a kind named twice counts once.
Pooled over captions (CHAIR's convention, Rohrbach et al. 2018; Precision and F1 as in the SPARC paper):
- CHAIRi = hallucinated mentions / all mentions; Precision = 1 - CHAIRi (0 mentions in all: CHAIRi = 0).
- CHAIRs = share of captions with at least one hallucinated kind.
- Recall = sum |mentioned & present| / sum |present|; F1 = harmonic mean of Precision and Recall.
Rates are fractions in [0, 1]; `words` is the mean caption length in whitespace-separated words.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from neverfade import stats

from .vocab import mentioned_objects

METRICS = ("precision", "recall", "f1", "chair_i", "chair_s", "words")


def caption_counts(caption: str, kinds_present: set[str]) -> dict:
    mentioned = mentioned_objects(caption)
    return {
        "mentioned": sorted(mentioned),
        "hallucinated": sorted(mentioned - kinds_present),
        "missed": sorted(kinds_present - mentioned),
        "words": len(caption.split()),
    }


def scene_metrics(captions: Sequence[str], scenes: Sequence) -> dict:
    """Precision, recall, F1, CHAIRi, CHAIRs and mean length of `captions[i]` describing `scenes[i]`.

    `scenes` are `Scene`s or anything with a `.kinds` set. Returns the pooled rates, `n`, and `per_caption`:
    for each caption its mentioned, hallucinated and missed kinds and its length in words.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"{len(captions)} captions for {len(scenes)} scenes")
    per_caption = [caption_counts(c, set(s.kinds)) for c, s in zip(captions, scenes)]
    rates = _rates(_count_table(per_caption, scenes).sum(axis=0))
    return {**{k: float(v) for k, v in rates.items()}, "n": len(captions), "per_caption": per_caption}


def _count_table(per_caption, scenes) -> np.ndarray:
    """One row per caption: mentioned, hallucinated, correct, present, has hallucination, words, 1 (the caption)."""
    return np.array(
        [
            [
                len(p["mentioned"]),
                len(p["hallucinated"]),
                len(p["mentioned"]) - len(p["hallucinated"]),
                len(s.kinds),
                bool(p["hallucinated"]),
                p["words"],
                1,
            ]
            for p, s in zip(per_caption, scenes)
        ],
        dtype=float,
    ).reshape(-1, 7)


def _rates(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Pooled rates from the count table's column sums (..., 7)."""
    mentioned, hallucinated, correct, present, any_hall, words, n = np.moveaxis(sums, -1, 0)
    chair_i = np.where(mentioned > 0, hallucinated / np.maximum(mentioned, 1), 0.0)
    precision = 1.0 - chair_i
    recall = correct / np.maximum(present, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "chair_i": chair_i,
        "chair_s": any_hall / n,
        "words": words / n,
    }


def _table(captions: Sequence[str], scenes: Sequence) -> np.ndarray:
    return _count_table([caption_counts(c, set(s.kinds)) for c, s in zip(captions, scenes)], scenes)


def bootstrap_ci(
    captions: Sequence[str],
    scenes: Sequence,
    *,
    baseline: Sequence[str] | None = None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over scenes for each metric (`neverfade.stats.bootstrap`).

    With `baseline` (captions of the same scenes by another method), the intervals are for the paired difference
    metric(captions) - metric(baseline), both computed on the same resampled scenes.
    """
    ci = stats.bootstrap(
        _table(captions, scenes),
        _rates,
        n=n_boot,
        seed=seed,
        level=level,
        baseline=None if baseline is None else _table(baseline, scenes),
    )
    return {name: (low, high) for name, (low, high) in ci.items()}
