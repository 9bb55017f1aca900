"""CHAIR (Rohrbach et al. 2018) with Recall, Precision = 1 - CHAIRi and F1, from the COCO 2014 annotation files.

Ground truth per image = its instance categories + the objects found in its reference captions, read from
instances_{val,train}2014.json and captions_{val,train}2014.json (val required; train used when present, as the
original does). Over the captions evaluated (pooled):
  CHAIRs = captions with a hallucinated mention / captions      CHAIRi = hallucinated mentions / mentions
  Recall = sum |distinct mentioned AND gt| / sum |gt|           Precision = 1 - CHAIRi,  F1 = 2PR / (P + R)
`objects` and `words` are the mean mentions and mean length in words (whitespace-separated) per caption.
Parsed ground truth is cached (JSON, keyed by the annotation files' size and mtime and by the vocabulary's source).

    truth = chair.GroundTruth.from_coco("coco/annotations")
    result = chair.evaluate(captions.load("out/sparc.jsonl"), truth)
    result["overall"]["F1"], result["ci"]["F1"], result["per_caption"][0]["hallucinated"]
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neverfade import paths
from neverfade.data import coco
from neverfade.data.coco import AnnotationError
from neverfade.eval import chair_words, report
from neverfade.eval.captions import Captions

COLUMNS = ["CHAIRs", "CHAIRi", "Recall", "Precision", "F1", "objects", "words"]
TABLE_COLUMNS = [(k, k, k not in ("objects", "words")) for k in COLUMNS] + [("n", "n", False)]
# per-caption counts, summed over captions by every metric below
_CAPTIONS, _HALLUCINATED_CAPTIONS, _MENTIONS, _HALLUCINATIONS, _GT, _RECALLED, _WORDS = range(7)


def metrics(sums: np.ndarray) -> dict[str, np.ndarray]:
    s = [sums[..., i] for i in range(7)]
    chair_i = report.ratio(s[_HALLUCINATIONS], s[_MENTIONS])
    precision, recall = 1 - chair_i, report.ratio(s[_RECALLED], s[_GT])
    return {
        "CHAIRs": report.ratio(s[_HALLUCINATED_CAPTIONS], s[_CAPTIONS]),
        "CHAIRi": chair_i,
        "Recall": recall,
        "Precision": precision,
        "F1": report.ratio(2 * precision * recall, precision + recall),
        "objects": report.ratio(s[_MENTIONS], s[_CAPTIONS]),
        "words": report.ratio(s[_WORDS], s[_CAPTIONS]),
    }


default_cache_dir = paths.cache_dir  # the name the eval command uses


def annotation_files(annotations_dir: str | Path) -> list[Path]:
    """The instances and captions files of val2014 (required) and train2014 (both or neither)."""
    root = Path(annotations_dir)
    if not root.is_dir():
        raise AnnotationError(f"{root}: no such annotations directory")
    files = []
    for split in ("val", "train"):
        pair = [root / f"instances_{split}2014.json", root / f"captions_{split}2014.json"]
        missing = [p for p in pair if not p.is_file()]
        if split == "train" and len(missing) == 2:
            continue
        if missing:
            raise AnnotationError(f"{missing[0]}: no such file (CHAIR needs the instances and captions of {split}2014)")
        files += pair
    return files


@dataclass
class GroundTruth:
    objects: dict[int, frozenset[str]]  # image id -> categories
    files: list[str]

    @classmethod
    def from_coco(cls, annotations_dir: str | Path, cache_dir: str | Path | None = None) -> GroundTruth:
        files = annotation_files(annotations_dir)
        key = hashlib.sha256(
            json.dumps(
                [Path(chair_words.__file__).read_text()]
                + [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
            ).encode()
        ).hexdigest()[:16]
        cache = Path(cache_dir or default_cache_dir()) / "chair" / f"ground-truth-{key}.json"
        if cache.is_file():
            with open(cache, encoding="utf-8") as f:
                return cls({int(k): frozenset(v) for k, v in json.load(f).items()}, [str(p) for p in files])
        vocabulary = chair_words.Vocabulary()
        objects: dict[int, set[str]] = {}
        for path in files:
            if path.name.startswith("instances"):
                for image_id, names in coco.load_instances(path)[1].items():
                    for name in names:
                        if name not in vocabulary.category_of:
                            raise AnnotationError(f"{path}: category {name!r} is not one of the 80 COCO categories")
                    objects.setdefault(image_id, set()).update(vocabulary.category_of[n] for n in names)
            else:
                for image_id, texts in tqdm(
                    coco.load_captions(path)[1].items(), desc=f"parsing {path.name}", unit="image", leave=False
                ):
                    found = objects.setdefault(image_id, set())
                    for text in texts:
                        found.update(category for _, category in vocabulary.objects(text))
        report.write_json(cache, {str(k): sorted(v) for k, v in objects.items()})
        return cls({k: frozenset(v) for k, v in objects.items()}, [str(p) for p in files])


def image_id(key: str, record: dict[str, Any]) -> int | None:
    """The COCO image id of a caption record: the number ending its id (42, "COCO_val2014_000000000042.jpg"),
    else the number ending its image file name."""
    for text in (key, Path(str(record.get("image") or "")).name):
        match = re.search(r"(\d+)\D*$", text)
        if match:
            return int(match.group(1))
    return None


def score_caption(vocabulary: chair_words.Vocabulary, caption: str, gt: frozenset[str]) -> dict[str, Any]:
    found = vocabulary.objects(caption)
    mentioned = [category for _, category in found]
    hallucinated = [category for category in mentioned if category not in gt]
    recalled = sorted(set(mentioned) & gt)
    return {
        "words": chair_words.count_words(caption),
        "mentioned_words": [word for word, _ in found],
        "mentioned": mentioned,
        "hallucinated": hallucinated,
        "gt": sorted(gt),
        "recalled": recalled,
        "CHAIRs": int(bool(hallucinated)),
        "CHAIRi": len(hallucinated) / len(mentioned) if mentioned else 0.0,
        "Recall": len(recalled) / len(gt) if gt else 0.0,
    }


def evaluate(
    captions: Captions, truth: GroundTruth, n_boot: int = 1000, seed: int = 0, n_draws: int = 5, draw_size: int = 500
) -> dict[str, Any]:
    """CHAIR of one caption file: overall metrics, bootstrap CIs over images, the paper's draws, per caption."""
    vocabulary = chair_words.Vocabulary()
    per_caption, counts, unknown = [], [], []
    for key, record in tqdm(captions.records.items(), desc="CHAIR", unit="caption", leave=False):
        coco_id = image_id(key, record)
        if coco_id not in truth.objects:
            unknown.append(key)
            continue
        scored = score_caption(vocabulary, record["caption"], truth.objects[coco_id])
        per_caption.append({"id": key, "image_id": coco_id, "caption": record["caption"], **scored})
        counts.append(
            [
                1,
                scored["CHAIRs"],
                len(scored["mentioned"]),
                len(scored["hallucinated"]),
                len(scored["gt"]),
                len(scored["recalled"]),
                scored["words"],
            ]
        )
    if unknown:
        raise AnnotationError(
            f"{captions.path}: {len(unknown)} caption(s) name images absent from the annotation "
            f"files (first: id {unknown[0]!r}); CHAIR needs COCO 2014 image ids"
        )
    counts = np.array(counts, float)
    return {
        "metric": "chair",
        **captions.describe(),
        "annotations": truth.files,
        "overall": {**report.point(counts, metrics), "n": len(counts)},
        "ci": report.bootstrap(counts, metrics, n=n_boot, seed=seed) if n_boot else {},
        "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "over": "images"},
        "draws": report.draws(counts, metrics, n_draws, draw_size, seed) if n_draws else {},
        "draw_protocol": {"n_draws": n_draws, "size": min(draw_size, len(counts)), "seed": seed},
        "per_caption": per_caption,
    }
