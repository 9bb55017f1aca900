"""Describing many items with one or more method settings: batching, image errors as records, resume, progress.

Used by `neverfade caption` and `neverfade eval scenes`."""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

from neverfade.data.images import ImageError, load_image
from neverfade.data.items import Item


@dataclass
class Run:
    """One method setting: the attached method objects, their recorded description, and the resume key."""

    methods: list
    described: list[dict[str, Any]]
    id: str

    @property
    def label(self) -> str:
        return "+".join(m["name"] for m in self.described) or "baseline"


def prepare_runs(captioner, settings: list[tuple[list[str], dict | None]], prompt: str, generate: dict) -> list[Run]:
    """A Run per (method names, parameters) setting, bound to the captioner's model (defaults resolved)."""
    runs = []
    for names, params in settings:
        captioner.use(names, params)
        described = captioner.describe()
        key = json.dumps({"model": captioner.name, "methods": described, "prompt": prompt, **generate},
                         sort_keys=True)
        runs.append(Run(captioner.methods, described, hashlib.sha1(key.encode()).hexdigest()[:12]))
    return runs


def caption_items(captioner, items: list[Item], runs: list[Run], *, prompt: str, generate: dict, batch_size: int,
                  results=None, on_batch: Callable[[list[Item], dict[str, list[dict]]], None] | None = None,
                  seed: int = 0) -> set[str]:
    """Describe every item with every run, skipping what `results` (a ResultsFile) already holds and appending to it
    batch by batch. `on_batch(items, {item id: [record per run]})` sees each batch. Returns the ids that failed."""
    import torch
    from tqdm import tqdm

    done = results.done if results is not None else set()
    todo = sum((item.id, run.id) not in done for item in items for run in runs)
    if len(items) * len(runs) > todo and results is not None:
        print(f"resuming: {len(items) * len(runs) - todo} records already in {results.path}", file=sys.stderr)
    torch.manual_seed(seed)
    failed: set[str] = set()
    bar = tqdm(total=todo, unit="caption", desc="captioning", disable=None)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        images: dict[str, Any] = {}
        seen: dict[str, list[dict]] = {}
        for run in runs:
            pending = [it for it in batch if (it.id, run.id) not in done]
            if not pending:
                continue
            records = {}
            for item in pending:
                if item.id not in images:
                    try:
                        images[item.id] = load_image(item.image)
                    except ImageError as err:
                        images[item.id] = err
                if isinstance(images[item.id], ImageError):
                    records[item.id] = record(item, captioner.name, run, error=str(images[item.id]))
            ok = [it for it in pending if it.id not in records]
            if captioner.methods != run.methods:
                captioner.use(run.methods)
            captions = captioner.caption([images[it.id] for it in ok], [it.prompt or prompt for it in ok],
                                         **generate) if ok else []
            for item, caption in zip(ok, captions):
                records[item.id] = record(item, captioner.name, run, caption=caption)
            ordered = [records[it.id] for it in pending]
            failed.update(r["id"] for r in ordered if r["error"] is not None)
            if results is not None:
                results.append(ordered)
            for r in ordered:
                seen.setdefault(r["id"], []).append(r)
            bar.update(len(ordered))
        if on_batch is not None and seen:
            on_batch([it for it in batch if it.id in seen], seen)
    bar.close()
    return failed


def record(item: Item, model: str, run: Run, caption=None, error: str | None = None) -> dict[str, Any]:
    out = {
        "id": item.id, "image": item.image, "run": run.id, "model": model, "methods": run.described,
        "prompt": item.prompt, "caption": caption.text if caption else None,
        "new_tokens": caption.new_tokens if caption else 0,
        "seconds": round(caption.seconds, 4) if caption else 0.0, "error": error,
    }
    if caption is not None and caption.image_attention is not None:
        out["image_attention"] = [round(x, 5) for x in caption.image_attention]
    return out
