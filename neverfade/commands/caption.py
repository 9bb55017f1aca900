"""`neverfade caption`: describe an image, a folder of images or a manifest, with the chosen methods."""

from __future__ import annotations

import argparse
import sys

from neverfade.commands.options import add_method_options, add_model_options, load_captioner, method_choice
from neverfade.runner import caption_items, prepare_runs

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
    prompt = args.prompt or DEFAULT_PROMPT
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.sample:
        generate.update(temperature=args.temperature, top_p=args.top_p)
    settings = [(names, params)] + ([(["baseline"], None)] if args.vs_baseline and names != ["baseline"] else [])
    try:
        runs = prepare_runs(captioner, settings, prompt, generate)
    except ParameterError as err:
        raise UserError(str(err)) from None

    results = None
    if args.out:
        from neverfade.results import ResultsFile

        try:
            results = ResultsFile(args.out)
        except ValueError as err:
            raise UserError(str(err)) from None
        if args.retry_errors:
            results.done = {(r["id"], r["run"]) for r in results.records if r.get("error") is None}
    show = _print_batch if args.show or not args.out else None
    failed = caption_items(captioner, items, runs, prompt=prompt, generate=generate, batch_size=args.batch_size,
                           results=results, on_batch=show, seed=args.seed)
    if failed:
        print(f"{len(failed)} images could not be read; their records hold the error", file=sys.stderr)
    return EXIT_SOME_FAILED if failed else 0


def _print_batch(items, records) -> None:
    from tqdm import tqdm

    for item in items:
        tqdm.write("\n".join([_header(item)] + [_shown(item, r) for r in records[item.id]]) + "\n")


def _header(item) -> str:
    objects = item.meta.get("objects")
    return f"== {item.id}" + (f" (objects present: {', '.join(objects)})" if objects is not None else "")


def _shown(item, record) -> str:
    label = "+".join(m["name"] for m in record["methods"]) or "baseline"
    if record["error"] is not None:
        return f"  {label}: ERROR {record['error']}"
    text = record["caption"]
    if "objects" in item.meta:
        from neverfade.data.samples import mark_objects

        text = mark_objects(text, item.meta["objects"])
    return f"  {label}: {text}"
