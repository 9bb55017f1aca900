"""POPE (Li et al. 2023): yes/no object questions, built from COCO instance annotations, answered, scored.

Building follows POPE's `utils.py`: images with at least `per_image` object categories, `n_images` of them drawn by
seed; per image `per_image` positives (here a seeded draw from its categories), each followed by one negative absent
from the image and not yet asked about it:
  random       a category drawn uniformly from every category in the annotations;
  popular      the most frequent category among the drawn images (ties by name);
  adversarial  the category co-occurring most often with that positive among the drawn images (ties by name);
popular and adversarial fall back to a random draw when their list runs out. Files use the published format, one
JSON object a line: {"question_id", "image", "text": "Is there a/an <object> in the image?", "label": "yes"|"no"}.

Answering takes any captioner with `caption(images, prompt, max_new_tokens=..., do_sample=...) -> [r.text]`.
The prompt is ANSWER_PROMPT; with `caption_first`, the captioner first describes the image with CAPTION_PROMPT and
then answers CAPTION_THEN_ANSWER_PROMPT, which holds that description (the SPARC paper's caption-then-answer variant).
Answer parsing is POPE's: keep the first sentence; it means "no" when it holds the word "no", "No" or "not".
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from neverfade.data import coco
from neverfade.data.coco import AnnotationError
from neverfade.data.images import load_image
from neverfade.eval import report

STRATEGIES = ("random", "popular", "adversarial")
ANSWER_PROMPT = "{question}"
CAPTION_PROMPT = "Please describe this image in detail."
CAPTION_THEN_ANSWER_PROMPT = "Here is a description of the image:\n{caption}\n\n{question} Answer yes or no."
COLUMNS = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
TABLE_COLUMNS = [(k, k, True) for k in COLUMNS] + [("n", "n", False)]
_TP, _FP, _TN, _FN = range(4)


def question_text(category: str) -> str:
    article = "an" if category[0] in "aeiou" else "a"
    return f"Is there {article} {category} in the image?"


def build(
    files: dict[int, str],
    objects: dict[int, set[str]],
    strategy: str,
    n_images: int = 500,
    per_image: int = 3,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Questions for `n_images` images drawn by `seed` from those with at least `per_image` categories."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown POPE strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    rng = random.Random(seed)
    eligible = sorted(i for i, found in objects.items() if len(found) >= per_image)
    if len(eligible) < n_images:
        raise ValueError(
            f"only {len(eligible)} images have {per_image} or more object categories; {n_images} asked for"
        )
    images = rng.sample(eligible, n_images)
    categories = sorted(set().union(*objects.values()))
    frequency = Counter(c for i in images for c in objects[i])
    popular = sorted(frequency, key=lambda c: (-frequency[c], c))
    co_occurring: dict[str, Counter] = defaultdict(Counter)
    for i in images:
        for a in objects[i]:
            co_occurring[a].update(b for b in objects[i] if b != a)

    questions: list[dict[str, Any]] = []
    for i in images:
        present, asked = objects[i], set()
        for positive in rng.sample(sorted(present), per_image):
            asked.add(positive)
            if strategy == "popular":
                ranked = popular
            elif strategy == "adversarial":
                ranked = sorted(co_occurring[positive], key=lambda c: (-co_occurring[positive][c], c))
            else:
                ranked = []
            candidates = [c for c in ranked if c not in present and c not in asked]
            negative = (
                candidates[0]
                if candidates
                else rng.choice([c for c in categories if c not in present and c not in asked])
            )
            asked.add(negative)
            for category, label in ((positive, "yes"), (negative, "no")):
                questions.append(
                    {
                        "question_id": len(questions) + 1,
                        "image": files[i],
                        "text": question_text(category),
                        "label": label,
                    }
                )
    return questions


def build_from_coco(
    annotations_dir: str | Path,
    strategy: str,
    n_images: int = 500,
    per_image: int = 3,
    seed: int = 0,
    split: str = "val",
) -> list[dict[str, Any]]:
    path = Path(annotations_dir) / f"instances_{split}2014.json"
    files, objects = coco.load_instances(path)
    try:
        return build(files, objects, strategy, n_images, per_image, seed)
    except ValueError as err:
        raise AnnotationError(f"{path}: {err}") from None


def read_questions(path: str | Path) -> list[dict[str, Any]]:
    """A POPE question file in the published format (JSONL, whatever its extension)."""
    questions = []
    for number, record in coco.read_jsonl(path):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in record]
        if missing:
            raise AnnotationError(f"{path}: line {number} has no {', '.join(repr(k) for k in missing)} field")
        if record["label"] not in ("yes", "no"):
            raise AnnotationError(f"{path}: line {number} has label {record['label']!r}; expected 'yes' or 'no'")
        questions.append(record)
    if not questions:
        raise AnnotationError(f"{path}: no questions")
    return questions


def parse_answer(text: str) -> str:
    """POPE's rule: the first sentence, commas dropped; "no" if it holds the word No, no or not, else "yes"."""
    first = text.split(".")[0].replace(",", "")
    return "no" if {"No", "no", "not"} & set(first.split(" ")) else "yes"


def answer(
    captioner,
    questions: list[dict[str, Any]],
    images_dir: str | Path,
    caption_first: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    caption_tokens: int = 512,
) -> Iterator[dict[str, Any]]:
    """Each question with the model's "answer" (raw text) and "prediction" (yes/no), in batches, as they finish.

    With `caption_first`, each image is described once (CAPTION_PROMPT, `caption_tokens` new tokens) and that
    description ("caption" in the record) goes into the question's prompt.
    """
    images_dir = Path(images_dir)
    captions: dict[str, str] = {}
    for start in tqdm(range(0, len(questions), batch_size), desc="POPE", unit="batch"):
        batch = questions[start : start + batch_size]
        images = [load_image(images_dir / q["image"]) for q in batch]
        if caption_first:
            todo = {q["image"]: image for q, image in zip(batch, images) if q["image"] not in captions}
            if todo:
                described = captioner.caption(
                    list(todo.values()), CAPTION_PROMPT, max_new_tokens=caption_tokens, do_sample=False
                )
                captions.update(zip(todo, (r.text for r in described)))
            prompts = [
                CAPTION_THEN_ANSWER_PROMPT.format(caption=captions[q["image"]], question=q["text"]) for q in batch
            ]
        else:
            prompts = [ANSWER_PROMPT.format(question=q["text"]) for q in batch]
        replies = captioner.caption(images, prompts, max_new_tokens=max_new_tokens, do_sample=False)
        for q, prompt, reply in zip(batch, prompts, replies):
            record = {**q, "prompt": prompt, "answer": reply.text, "prediction": parse_answer(reply.text)}
            if caption_first:
                record["caption"] = captions[q["image"]]
            yield record


def metrics(sums: np.ndarray) -> dict[str, np.ndarray]:
    tp, fp, tn, fn = (sums[..., i] for i in range(4))
    precision, recall = report.ratio(tp, tp + fp), report.ratio(tp, tp + fn)
    return {
        "accuracy": report.ratio(tp + tn, tp + fp + tn + fn),
        "precision": precision,
        "recall": recall,
        "f1": report.ratio(2 * precision * recall, precision + recall),
        "yes_ratio": report.ratio(tp + fp, tp + fp + tn + fn),
    }


def score(
    answers: Iterable[dict[str, Any]], labels: dict[Any, str] | None = None, n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and yes-ratio; CIs by resampling images. Each answer record needs "answer"
    and a label: its own "label" or `labels[question_id]` (for published answer files that carry none)."""
    per_image: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for n, record in enumerate(answers, 1):
        label = record.get("label") if labels is None else labels.get(record.get("question_id"))
        if label not in ("yes", "no") or "answer" not in record:
            raise ValueError(
                f"answer {n} (question_id {record.get('question_id')!r}) has no yes/no label or no 'answer'"
            )
        yes = parse_answer(str(record["answer"])) == "yes"
        cell = (_TP if yes else _FN) if label == "yes" else (_FP if yes else _TN)
        per_image[str(record.get("image"))][cell] += 1
    counts = np.array(list(per_image.values()), float)
    if not len(counts):
        raise ValueError("no answers to score")
    total = counts.sum(axis=0).astype(int)
    return {
        "metric": "pope",
        "overall": {**report.point(counts, metrics), "n": int(total.sum())},
        "counts": dict(zip(["tp", "fp", "tn", "fn"], map(int, total))),
        "ci": report.bootstrap(counts, metrics, n=n_boot, seed=seed) if n_boot else {},
        "bootstrap": {"n": n_boot, "seed": seed, "level": 0.95, "over": "images"},
    }
