"""`neverfade caption`: describe an image, a folder of images or a manifest, with the chosen methods."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from typing import Any

from neverfade.commands.options import add_method_options, add_model_options, load_captioner, method_choice

EXIT_SOME_FAILED = 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "caption", help="describe images with the chosen methods",
        description="Describe images. Results go to --out as JSONL, one record per image and method setting; "
                    "a rerun with the same --out skips what is already there. Exit status: 0 all described, "
                    "1 some images could not be read (recorded as errors), 2 bad input.")
    p.add_argument("input", nargs="?", help="an image file, a folder of images, or a JSONL manifest "
                                            "(one {\"image\": path, \"id\"?: ..., \"prompt\"?: ...} per line)")
    p.add_argument("--samples", type=int, metavar="N",
                   help="describe N held-out synthetic scenes instead of INPUT; mentioned objects are marked "
                        "[word ✓] when the scene has them and [word ✗] when it does not")
    p.add_argument("--out", help="results JSONL (appended to; resumable). Without it captions are only printed.")
    p.add_argument("--prompt", default=None, help='default "Please describe this image in detail."')
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vs-baseline", action="store_true",
                   help="also describe each image without methods, and print both side by side")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--retry-errors", action="store_true", help="try again images recorded with an error")
    p.add_argument("--show", action="store_true", help="print captions even when writing --out")
    add_model_options(p)
    add_method_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.cli import UserError
    from neverfade.data.images import ImageError, InputError, load_image, read_items
    from neverfade.data.samples import sample_scene_items
    from neverfade.methods import ParameterError, build_methods

    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if (args.input is None) == (args.samples is None):
        raise UserError("give either INPUT or --samples N")
    try:
        items = sample_scene_items(args.samples) if args.samples else read_items(args.input)
        if args.input and len(items) == 1 and not args.input.endswith((".jsonl", ".json")):
            load_image(items[0].image)  # a single bad image is bad input, not a record
        names, params = method_choice(args)
        build_methods(names, params)  # fail on bad methods before loading a model
    except (InputError, ImageError, ParameterError, ValueError) as err:
        raise UserError(str(err)) from None

    captioner = load_captioner(args, names, params)
    settings = [names] + ([["baseline"]] if args.vs_baseline and names != ["baseline"] else [])
    prompt = args.prompt or DEFAULT_PROMPT
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        generate.update(temperature=args.temperature, top_p=args.top_p)
    runs = []
    for setting in settings:
        try:
            captioner.use(setting, params if setting is names else None)
        except ParameterError as err:
            raise UserError(str(err)) from None
        described = captioner.describe()
        runs.append((captioner.methods, described, _run_id(captioner.name, described, prompt, generate)))

    results = None
    if args.out:
        from neverfade.results import ResultsFile

        try:
            results = ResultsFile(args.out)
        except ValueError as err:
            raise UserError(str(err)) from None
        if args.retry_errors:
            results.done = {(r["id"], r["run"]) for r in results.records if r.get("error") is None}
    show = args.show or not args.out
    return _caption_all(captioner, items, runs, prompt, generate, args, results, show, load_image, ImageError)


def _caption_all(captioner, items, runs, prompt, generate, args, results, show, load_image, ImageError) -> int:
    import torch
    from tqdm import tqdm

    todo = [(item, r) for item in items for r in runs if results is None or (item.id, r[2]) not in results.done]
    skipped = len(items) * len(runs) - len(todo)
    if skipped:
        print(f"resuming: {skipped} records already in {args.out}", file=sys.stderr)
    torch.manual_seed(args.seed)
    failed: set[str] = set()
    bar = tqdm(total=len(todo), unit="caption", desc="captioning", disable=None)
    for start in range(0, len(items), args.batch_size):
        batch = items[start:start + args.batch_size]
        images: dict[str, Any] = {}
        shown: dict[str, list[str]] = {}
        for methods, described, run_id in runs:
            pending = [it for it in batch if results is None or (it.id, run_id) not in results.done]
            if not pending:
                continue
            records, ok = [], []
            for item in pending:
                if item.id not in images:
                    try:
                        images[item.id] = load_image(item.image)
                    except ImageError as err:
                        images[item.id] = err
                if isinstance(images[item.id], ImageError):
                    records.append(_record(item, captioner.name, described, run_id, error=str(images[item.id])))
                else:
                    ok.append(item)
            if captioner.methods != methods:
                captioner.use(methods)
            captions = captioner.caption([images[it.id] for it in ok], [it.prompt or prompt for it in ok],
                                         **generate) if ok else []
            for item, c in zip(ok, captions):
                records.append(_record(item, captioner.name, described, run_id, caption=c))
            failed.update(r["id"] for r in records if r["error"] is not None)
            if results is not None:
                results.append(records)
            by_id = {r["id"]: r for r in records}
            for item in pending:
                shown.setdefault(item.id, [_header(item)]).append(_shown(item, by_id[item.id], described))
            bar.update(len(records))
        if show:
            for lines in shown.values():
                tqdm.write("\n".join(lines) + "\n")
    bar.close()
    if failed:
        print(f"{len(failed)} images could not be read; their records hold the error", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def _header(item) -> str:
    objects = item.meta.get("objects")
    return f"== {item.id}" + (f" (objects present: {', '.join(objects)})" if objects is not None else "")


def _shown(item, record, described) -> str:
    label = "+".join(m["name"] for m in described) or "baseline"
    if record["error"] is not None:
        return f"  {label}: ERROR {record['error']}"
    text = record["caption"]
    if "objects" in item.meta:
        from neverfade.data.samples import mark_objects

        text = mark_objects(text, item.meta["objects"])
    return f"  {label}: {text}"


def _record(item, model: str, methods, run_id: str, caption=None, error: str | None = None) -> dict[str, Any]:
    return {
        "id": item.id, "image": item.image, "run": run_id, "model": model, "methods": methods,
        "prompt": item.prompt, "caption": caption.text if caption else None,
        "new_tokens": caption.new_tokens if caption else 0,
        "seconds": round(caption.seconds, 4) if caption else 0.0, "error": error,
    }


def _run_id(model: str, methods, prompt: str, generate: dict) -> str:
    key = json.dumps({"model": model, "methods": methods, "prompt": prompt, **generate}, sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:12]
