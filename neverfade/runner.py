"""Describing many items with one or more method settings: batching, image errors as records, resume, progress.

Used by `neverfade caption` and `neverfade eval scenes`."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neverfade.data.images import ImageError, load_image
from neverfade.data.items import Item
from neverfade.results import best_records


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
        key = json.dumps(
            {"model": captioner.name, **captioner.setup(), "methods": described, "prompt": prompt, **generate},
            sort_keys=True,
        )
        runs.append(Run(captioner.methods, described, hashlib.sha1(key.encode()).hexdigest()[:12]))
    return runs


def caption_items(
    captioner,
    items: list[Item],
    runs: list[Run],
    *,
    prompt: str,
    generate: dict,
    batch_size: int,
    results=None,
    on_batch: Callable[[list[Item], dict[str, list[dict]]], None] | None = None,
    seed: int = 0,
    shard: tuple[int, int] = (0, 1),
    retry_errors: bool = False,
    timings: dict[str, float] | None = None,
    fixed_shards: bool = False,
) -> set[str]:
    """Describe every item with every run, skipping what `results` (a ResultsFile) already holds for the item as it
    is now (`is_for`; with `retry_errors`, only records without error) and appending to it batch by batch; a record
    made again supersedes the old one (`item_score`). `on_batch(items, {item id: [record per run]})` sees each
    batch. Returns the ids that failed.

    The items are cut into batches of `batch_size` in input order; the batches with something left to do are dealt
    to the ranks in turn, `shard = (rank, world_size)`, so each batch is the one a single process would form; with
    `fixed_shards`, batch k is rank k % world_size's whatever is done (processes that start apart, `--shard`). Each
    (batch, run) draws its random numbers from its own seed, so sampling gives the same records whatever the number
    of ranks and however often the run was resumed. A batch that runs out of memory is split in halves and tried
    again; an item that runs out of memory alone is recorded with the error. `timings` (if given) gains the seconds
    spent per stage: waiting for images, describing, writing, and preparing (on the loader's thread, meanwhile)."""
    import torch
    from tqdm import tqdm

    rank, world_size = shard
    best = best_records(results.records, item_score(items)) if results is not None else {}
    done = {
        (it.id, run.id)
        for it in items
        for run in runs
        if (rec := best.get((it.id, run.id))) is not None
        and is_for(rec, it)
        and not (retry_errors and rec.get("error") is not None)
    }
    batches = [items[start : start + batch_size] for start in range(0, len(items), batch_size)]
    left = [(k, b) for k, b in enumerate(batches) if any((it.id, run.id) not in done for it in b for run in runs)]
    mine = [(k, b) for k, b in left if k % world_size == rank] if fixed_shards else left[rank::world_size]
    todo = sum((item.id, run.id) not in done for _, batch in mine for item in batch for run in runs)
    already = sum((item.id, run.id) in done for item in items for run in runs)
    if already and rank == 0:
        print(f"resuming: {already} records already done", file=sys.stderr)
    failed: set[str] = set()
    bar = tqdm(
        total=todo,
        unit="caption",
        desc="captioning" + (f" (rank {rank})" if world_size > 1 else ""),
        position=rank,
        disable=None,
    )
    wanted = [[it for it in b if any((it.id, run.id) not in done for run in runs)] for _, b in mine]
    clock = timings if timings is not None else {}
    with BatchLoader(captioner, wanted, prompt) as loader:  # the next batch loads and is prepared meanwhile
        for k, batch in mine:
            start = time.perf_counter()
            images, prepared = loader.next_batch()
            _add(clock, "waiting for images", start)
            seen: dict[str, list[dict]] = {}
            for run_index, run in enumerate(runs):
                pending = [it for it in batch if (it.id, run.id) not in done]
                if not pending:
                    continue
                records = {}
                for item in pending:
                    if isinstance(images[item.id], ImageError):
                        records[item.id] = record(item, captioner.name, run, error=str(images[item.id]))
                ok = [it for it in pending if it.id not in records]
                if captioner.methods != run.methods:
                    captioner.use(run.methods)
                torch.manual_seed(batch_seed(seed, k, run_index))
                start = time.perf_counter()
                ready = prepared[1] if prepared is not None and prepared[0] == [it.id for it in ok] else None
                captions = caption_fitting(
                    captioner, [images[it.id] for it in ok], [it.prompt or prompt for it in ok], generate, ready
                )
                _add(clock, "describing", start)
                for stage, seconds in captioner.decode_stages().items():  # the last generate's (a split batch: one)
                    clock[f"describing/{stage}"] = clock.get(f"describing/{stage}", 0.0) + seconds
                start = time.perf_counter()
                for item, caption in zip(ok, captions):
                    records[item.id] = (
                        record(item, captioner.name, run, error=caption)
                        if isinstance(caption, str)
                        else record(item, captioner.name, run, caption=caption)
                    )
                ordered = [records[it.id] for it in pending]
                failed.update(rec["id"] for rec in ordered if rec["error"] is not None)
                if results is not None:
                    results.append(ordered)
                for rec in ordered:
                    seen.setdefault(rec["id"], []).append(rec)
                bar.update(len(ordered))
                _add(clock, "writing", start)
            if on_batch is not None and seen:
                on_batch([it for it in batch if it.id in seen], seen)
        clock["preparing (meanwhile)"] = clock.get("preparing (meanwhile)", 0.0) + loader.prepare_s
    bar.close()
    return failed


def _add(clock: dict[str, float], stage: str, start: float) -> None:
    clock[stage] = clock.get(stage, 0.0) + time.perf_counter() - start


def is_for(record: dict[str, Any], item: Item) -> bool:
    """Whether `record` describes `item` as it is now: the same image path and the same prompt (the run's id covers
    everything else that decides the output)."""
    image = record.get("image")
    return (
        record.get("prompt") == item.prompt
        and isinstance(image, str)
        and os.path.abspath(image) == os.path.abspath(item.image)
    )


def item_score(items: list[Item]) -> Callable[[dict[str, Any]], tuple]:
    """Which of two records of one (id, run) stands (`best_records`): one for the item as it is now over a stale
    one, then one without error over one with, then the later one."""
    current = {it.id: it for it in items}

    def score(rec: dict[str, Any]) -> tuple:
        item = current.get(rec.get("id"))
        return item is not None and is_for(rec, item), rec.get("error") is None

    return score


def errors_left(records: list[dict[str, Any]], items: list[Item], runs: list[Run]) -> int:
    """How many (item, run) pairs the standing records answer with an error."""
    best = best_records(records, item_score(items))
    return sum(
        (rec := best.get((it.id, run.id))) is not None and is_for(rec, it) and rec.get("error") is not None
        for it in items
        for run in runs
    )


class BatchLoader:
    """One batch ahead of the batch being described, on worker threads: loads each item's image, then prepares the
    model's inputs from those that load (`Captioner.prepare`: the processor's work, off the thread that decodes).
    An image the processor refuses (e.g. Qwen-VL and an aspect ratio beyond 200) becomes an ImageError, found by
    checking the images one by one only when the batch fails. `next_batch()` returns ({item id: image or
    ImageError}, (the ids prepared, in order; their host batch) or None). `prepare_s`: the seconds spent preparing."""

    def __init__(self, captioner, batches: list[list[Item]], prompt: str, workers: int = 4):
        self.captioner, self.batches, self.prompt, self.workers = captioner, iter(batches), prompt, workers
        self.prepare_s = 0.0

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="neverfade-images")
        self.preparer = ThreadPoolExecutor(1, thread_name_prefix="neverfade-prepare")
        self.ahead = self._submit()
        return self

    def __exit__(self, *exc):
        self.preparer.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _submit(self):
        batch = next(self.batches, None)
        if batch is None:
            return None
        loads = {it.id: self.pool.submit(load_or_error, it.image) for it in batch}
        return self.preparer.submit(self._prepare, batch, loads)

    def _prepare(self, batch: list[Item], loads: dict):
        start = time.perf_counter()
        images = {item_id: future.result() for item_id, future in loads.items()}
        ok = [it for it in batch if not isinstance(images[it.id], ImageError)]
        prepared = None
        try:
            if ok:
                prepared = self._prepared(ok, images)
        except Exception:  # noqa: BLE001 - find the images the processor refuses; they become records
            for it in ok:
                images[it.id] = refused_image(self.captioner, it.image, images[it.id])
            ok = [it for it in ok if not isinstance(images[it.id], ImageError)]
            try:
                prepared = self._prepared(ok, images) if ok else None
            except Exception:  # noqa: BLE001 - not any one image: the thread that describes meets it again
                prepared = None
        self.prepare_s += time.perf_counter() - start
        return images, prepared

    def _prepared(self, ok: list[Item], images: dict):
        host = self.captioner.prepare([images[it.id] for it in ok], [it.prompt or self.prompt for it in ok])
        return [it.id for it in ok], host

    def next_batch(self):
        current, self.ahead = self.ahead, self._submit()
        if current is None:
            raise StopIteration("no batch left")
        return current.result()


def load_or_error(path: str):
    """The image as RGB, or the ImageError saying why it cannot be read."""
    try:
        return load_image(path)
    except ImageError as err:
        return err


def refused_image(captioner, path: str, image):
    """`image`, or an ImageError when the model's image processor refuses it alone."""
    processor = getattr(getattr(captioner, "processor", None), "image_processor", None)
    if processor is None:
        return image
    try:
        with captioner.processor_lock:
            processor(images=[image], return_tensors="pt")
    except Exception as err:  # noqa: BLE001 - whatever the processor raises, this image is the cause
        return ImageError(f"the model's image processor refuses {path}: {err}")
    return image


def caption_fitting(captioner, images: list, prompts: list[str], generate: dict, prepared=None) -> list:
    """Each image's Caption, or an error text for one that runs out of memory even alone or whose prompt leaves no
    room for the new tokens: a batch that runs out of memory is split in halves, and each half is tried again.
    `prepared`: `captioner.prepare(images, prompts)`, made before (its halves are prepared again)."""
    import torch
    from tqdm import tqdm

    from neverfade.api import PromptTooLong

    if not images:
        return []
    try:
        return captioner.caption(images, prompts, prepared=prepared, **generate)
    except PromptTooLong as err:
        if len(images) == 1:
            return [str(err)]
        over = set(err.items)  # each alone, for its own message; the others as one batch
        alone = {i: caption_fitting(captioner, [images[i]], [prompts[i]], generate)[0] for i in over}
        fit = [i for i in range(len(images)) if i not in over]
        rest = caption_fitting(captioner, [images[i] for i in fit], [prompts[i] for i in fit], generate)
        return [{**dict(zip(fit, rest)), **alone}[i] for i in range(len(images))]
    except torch.OutOfMemoryError as err:
        message = (str(err).strip().splitlines() or ["out of memory"])[0]
    # out of the handler, so the failed batch's tensors are free to go
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(images) == 1:
        return [f"out of memory even as a batch of one: {message}"]
    half = (len(images) + 1) // 2
    tqdm.write(f"out of memory on a batch of {len(images)}; trying {half} and {len(images) - half}", file=sys.stderr)
    return caption_fitting(captioner, images[:half], prompts[:half], generate) + caption_fitting(
        captioner, images[half:], prompts[half:], generate
    )


def batch_seed(seed: int, batch: int, run: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{batch}/{run}".encode()).digest()[:8], "little") >> 1


def input_order(items: list[Item], runs: list[Run], batch_size: int) -> Callable[[dict[str, Any]], tuple]:
    """Sort key that puts records in the order one process writes them: by batch, then run, then item; records of
    other items or runs first, in the order they came."""
    index = {item.id: i for i, item in enumerate(items)}
    run_index = {run.id: r for r, run in enumerate(runs)}

    def key(rec: dict[str, Any]) -> tuple:
        i, r = index.get(rec.get("id")), run_index.get(rec.get("run"))
        return (0,) if i is None or r is None else (1, i // batch_size, r, i)

    return key


def record(item: Item, model: str, run: Run, caption=None, error: str | None = None) -> dict[str, Any]:
    out = {
        "id": item.id,
        "image": item.image,
        "run": run.id,
        "model": model,
        "methods": run.described,
        "prompt": item.prompt,
        "caption": caption.text if caption else None,
        "new_tokens": caption.new_tokens if caption else 0,
        "seconds": round(caption.seconds, 4) if caption else 0.0,
        "error": error,
    }
    if caption is not None and caption.image_attention is not None:
        out["image_attention"] = [round(x, 5) for x in caption.image_attention]
    return out
