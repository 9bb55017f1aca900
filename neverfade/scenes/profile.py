"""How a model's captions hallucinate, in the figures ../shared/TESTBED.md gives for LLaVA-1.5-7B on COCO.

`hallucination_profile(captions, scenes, partners)`: CHAIRs, CHAIRi, recall, words and distinct objects per
caption; the hallucinated share of the k-th distinct object named (k = 1..4, 5 and later) and of object
mentions by caption quarter; and the share of hallucinated objects that the world's co-occurrence priors pair
with an object present (`partners(kind)`), beside the share expected if hallucinated kinds were drawn at random
from each scene's absent kinds. `check_profile(profile)` tells which of TESTBED.md's tolerances it meets.

Counting choices: a kind counts once per caption, at its first (not negated) mention (`vocab.find_mentions`);
its quarter is that mention's word position over the caption's words.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from .kinds import KINDS
from .metrics import scene_metrics
from .vocab import find_mentions

# LLaVA-1.5-7B, 500 COCO val2014 images, greedy (../shared/TESTBED.md)
TARGET = {
    "chair_s": 44.8,
    "chair_i": 12.65,
    "recall": 79.8,
    "words": 87,
    "distinct_objects": 3.2,
    "by_rank": [1.0, 13.0, 35.8, 48.6, 58.5],
    "by_quarter": [3.7, 25.3, 47.8, 71.4],
    "cooccurrence": 77.6,
}
TOLERANCE = {
    "chair_s": (35, 55),
    "chair_i": (9, 17),
    "recall": (65, 90),
    "words": (60, 200),
    "distinct_objects": (3, None),
    "first_object": (None, 5),
    "cooccurrence": (60, None),
}


def first_mentions(text: str) -> list[tuple[str, float]]:
    """(kind, position in [0, 1) as a share of the caption's words) of each kind at its first mention."""
    n_words = max(1, len(re.findall(r"[a-z]+", text.lower())))  # the words find_mentions indexes
    seen, out = set(), []
    for m in find_mentions(text):
        if not m.negated and m.kind not in seen:
            seen.add(m.kind)
            out.append((m.kind, m.word_index / n_words))
    return out


def hallucination_profile(captions: Sequence[str], scenes: Sequence, partners: Callable[[str], set[str]]) -> dict:
    """The profile of `captions[i]` describing `scenes[i]` (anything with `.kinds`); rates in percent."""
    metrics = scene_metrics(captions, scenes)
    by_rank = [[0, 0] for _ in range(5)]  # hallucinated, named
    by_quarter = [[0, 0] for _ in range(4)]
    co = chance = n_hall = 0.0
    distinct = 0
    for text, scene in zip(captions, scenes):
        present = set(scene.kinds)
        absent = set(KINDS) - present
        named = first_mentions(text)
        distinct += len(named)
        for rank, (kind, where) in enumerate(named):
            wrong = kind not in present
            by_rank[min(rank, 4)][0] += wrong
            by_rank[min(rank, 4)][1] += 1
            by_quarter[min(3, int(where * 4))][0] += wrong
            by_quarter[min(3, int(where * 4))][1] += 1
            if wrong:
                n_hall += 1
                paired = set().union(*(partners(k) for k in present)) if present else set()
                co += kind in paired
                chance += len(paired & absent) / max(1, len(absent))
    share = [round(100 * h / n, 2) if n else None for h, n in by_rank]
    quarter = [round(100 * h / n, 2) if n else None for h, n in by_quarter]
    return {
        "n": len(captions),
        "chair_s": round(100 * metrics["chair_s"], 2),
        "chair_i": round(100 * metrics["chair_i"], 2),
        "recall": round(100 * metrics["recall"], 2),
        "precision": round(100 * metrics["precision"], 2),
        "f1": round(100 * metrics["f1"], 2),
        "words": round(metrics["words"], 1),
        "distinct_objects": round(distinct / max(1, len(captions)), 2),
        "by_rank": share,
        "by_rank_counts": by_rank,
        "by_quarter": quarter,
        "by_quarter_counts": by_quarter,
        "cooccurrence": round(100 * co / n_hall, 2) if n_hall else None,
        "cooccurrence_chance": round(100 * chance / n_hall, 2) if n_hall else None,
    }


def check_profile(p: dict) -> dict[str, bool]:
    """Which of TESTBED.md's tolerances the profile meets."""

    def within(value, bounds):
        lo, hi = bounds
        return value is not None and (lo is None or value >= lo) and (hi is None or value <= hi)

    rank, quarter = p["by_rank"], p["by_quarter"]
    out = {k: within(rank[0] if k == "first_object" else p[k], b) for k, b in TOLERANCE.items()}
    out["rank_rising_1_to_4"] = None not in rank[:4] and all(a < b for a, b in zip(rank[:3], rank[1:4]))
    out["quarter_rising"] = None not in quarter and all(a < b for a, b in zip(quarter, quarter[1:]))
    out["last_quarter_4x_first"] = None not in quarter and quarter[3] >= 4 * quarter[0]
    return out
