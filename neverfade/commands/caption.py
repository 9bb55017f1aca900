"""`neverfade caption`: describe an image, a folder of images or a manifest, with the chosen methods."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from neverfade import distributed
from neverfade.commands.options import (
    add_method_options,
    add_model_options,
    add_params_option,
    add_world_option,
    check_prompt_room,
    load_captioner,
    method_choice,
    params_setting,
    scene_world,
)
from neverfade.distributed import Ranks
from neverfade.results import Locked, ResultsFile, lock, merge_parts, part_files, part_path, read_records
from neverfade.runner import caption_items, errors_left, input_order, item_score, prepare_runs

EXIT_SOME_FAILED = 1


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "caption",
        help="describe images with the chosen methods",
        description="Describe images. Results go to --out as JSONL, one record per image and method setting; "
        "a rerun with the same --out skips what is already there. Under torchrun "
        "(torchrun --nproc-per-node N -m neverfade caption ...) each rank describes its share of the "
        "batches. Exit status: 0 all described, 1 some images could not be read or described "
        "(their records in --out hold the error, until --retry-errors describes them), 2 bad input.",
    )
    p.add_argument(
        "input",
        nargs="?",
        help="an image file, a folder of images, or a JSONL manifest "
        '(one {"image": path, "id"?: ..., "prompt"?: ...} per line)',
    )
    p.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="describe N held-out synthetic scenes instead of INPUT; mentioned objects are marked "
        "[word ✓] when the scene has them and [word ✗] when it does not",
    )
    add_world_option(p)
    p.add_argument(
        "--out",
        help="results JSONL: a new file or one written by neverfade (appended to; resumable; "
        "an item whose image or prompt changed is described again). Without it captions "
        "are only printed. "
        "Under torchrun each rank appends to OUT.parts/rank-R-of-W.jsonl, and rank 0 "
        "merges the parts into OUT when all are done.",
    )
    p.add_argument("--prompt", default=None, help='default "Please describe this image in detail."')
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument(
        "--min-new-tokens",
        type=int,
        default=0,
        help="write at least this many tokens before an end token may end a caption (benchmarks force a "
        "length with it; default 0)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--vs-baseline",
        action="store_true",
        help="also describe each image without methods, and print both side by side",
    )
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="try again images recorded with an error; the new record replaces the old one",
    )
    p.add_argument("--show", action="store_true", help="print captions even when writing --out")
    add_model_options(p)
    add_method_options(p)
    add_params_option(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neverfade.commands.options import check_device
    from neverfade.data.images import ImageError, InputError, load_image, read_items
    from neverfade.data.samples import sample_scene_items
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError, build_methods

    for name, value in (("--max-new-tokens", args.max_new_tokens), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not 0 <= args.min_new_tokens <= args.max_new_tokens:
        raise UserError("--min-new-tokens must be between 0 and --max-new-tokens")
    if (args.input is None) == (args.samples is None):
        raise UserError("give either INPUT or --samples N")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    spec = params_setting(args, ["+".join(args.method)] if args.method else [])
    if spec is not None:
        args.method = [spec]
    try:
        items = (
            sample_scene_items(args.samples, scene_world(args)) if args.samples is not None else read_items(args.input)
        )
        if args.input and len(items) == 1 and not args.input.endswith((".jsonl", ".json")):
            load_image(items[0].image)  # a single bad image is bad input, not a record
        names, params = method_choice(args)
        build_methods(names, params)  # fail on bad methods before loading a model
    except (InputError, ImageError, ParameterError, ValueError) as err:
        raise UserError(str(err)) from None

    ranks = Ranks.from_env()
    if ranks.parallel and not args.out:
        raise UserError("--out is needed when several processes describe the images (torchrun)")
    args.device = ranks.device(args.device)
    check_device(args.device)
    results, owner = _open_results(args, ranks) if args.out else (None, None)  # before the model loads
    try:
        distributed.start(ranks, args.device)
        try:
            return _describe(args, ranks, items, names, params, results)
        finally:
            distributed.stop(ranks)
    finally:
        for held in (results, owner):
            if held is not None:
                held.close()


def _describe(args: argparse.Namespace, ranks: Ranks, items, names, params, results) -> int:
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError

    start = time.perf_counter()
    captioner = load_captioner(args, names, params)
    timings = {"loading the model": time.perf_counter() - start}
    prompt = args.prompt or DEFAULT_PROMPT
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample)
    if args.min_new_tokens:
        generate["min_new_tokens"] = args.min_new_tokens
    if args.sample:
        generate.update(temperature=args.temperature, top_p=args.top_p)
    settings = [(names, params)] + ([(["baseline"], None)] if args.vs_baseline and names != ["baseline"] else [])
    try:
        runs = prepare_runs(captioner, settings, prompt, generate)
    except ParameterError as err:
        raise UserError(str(err)) from None
    check_prompt_room(captioner, args.prompt, args.max_new_tokens)  # an item's own prompt: its error record

    distributed.barrier(ranks)  # every rank knows what is done before any rank appends
    show = _print_batch if args.show or not args.out else None
    before = len(results.records) if results else 0
    failed = caption_items(
        captioner,
        items,
        runs,
        prompt=prompt,
        generate=generate,
        batch_size=args.batch_size,
        results=results,
        on_batch=show,
        seed=args.seed,
        shard=(ranks.rank, ranks.world_size),
        retry_errors=args.retry_errors,
        timings=timings,
    )
    new = len(results.records) - before if results else 0
    distributed.barrier(ranks)  # every part is complete
    total = left = 0
    if args.out and ranks.rank == 0:  # one record per (id, run): the parts folded in, records made again settled
        total = merge_parts(args.out, input_order(items, runs, args.batch_size), item_score(items))
        left = errors_left(read_records(args.out), items, runs)
    new, failed_count, total, left = distributed.sum_over_ranks(ranks, new, len(failed), total, left)
    print(time_spent(timings, f"rank {ranks.rank}: " if ranks.parallel else ""), file=sys.stderr)
    if ranks.rank == 0:
        if ranks.parallel:
            print(f"{ranks.world_size} ranks described {new} new; {total} records in {args.out}", file=sys.stderr)
        if failed_count:
            print(
                f"{failed_count} images could not be read or described; their records hold the error", file=sys.stderr
            )
        if left:
            print(f"records in {args.out} holding an error: {left}; --retry-errors tries them again", file=sys.stderr)
    return EXIT_SOME_FAILED if failed_count or left else 0


def _open_results(args: argparse.Namespace, ranks: Ranks) -> tuple[ResultsFile, object]:
    """This rank's results, locked while the run lasts: appended to --out by a single process, to its part file by a
    rank of several, whose rank 0 also holds --out's lock (the other handle returned); what is done is read from
    --out and every part file present, of any earlier world size. --out must be a new file or a results file."""
    from neverfade.errors import UserError

    out = Path(args.out)
    if args.input is not None and Path(args.input).exists() and out.exists() and out.samefile(args.input):
        raise UserError(f"--out {out} is the input; write the results to another file")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name")
    folder = next(p for p in out.absolute().parents if p.exists())
    if not folder.is_dir():
        raise UserError(f"cannot write --out {out}: {folder} is not a folder")
    owner = None
    try:
        if ranks.parallel and ranks.rank == 0:  # no other run may write --out while the parts are made and merged
            owner = lock(out)
        own = part_path(out, ranks.rank, ranks.world_size) if ranks.parallel else out
        return ResultsFile(own, also=[out, *part_files(out)]), owner
    except (ValueError, OSError) as err:
        if owner is not None:
            owner.close()
        raise UserError(
            str(err) if isinstance(err, (ValueError, Locked)) else f"cannot write --out {out}: {err.strerror or err}"
        ) from None


def time_spent(timings: dict[str, float], prefix: str = "") -> str:
    """Where the time went, in one line: each stage's seconds, and the process's whole life so far (Linux), so the
    part outside the stages (start, imports, merging) shows. Preparing runs on another thread, meanwhile. A stage
    "outer/inner" is shown in brackets after its outer stage (describing's prefill, first step, capture, later
    steps: `Captioner.decode_stages`)."""
    parts = {stage: [] for stage in timings if "/" not in stage}  # "describing/prefill": within describing
    for stage, seconds in timings.items():
        if "/" in stage:
            outer, inner = stage.split("/", 1)
            parts.setdefault(outer, []).append(f"{inner} {seconds:.1f} s")
    stages = "; ".join(
        f"{stage} {timings.get(stage, 0.0):.1f} s" + (f" ({', '.join(parts[stage])})" if parts[stage] else "")
        for stage in parts
    )
    alive = process_seconds()
    return f"{prefix}time: {stages}" + (f"; {alive:.0f} s since the process started" if alive is not None else "")


def process_seconds() -> float | None:
    """Seconds since this process started (to about a second: the boot time's resolution), or None off Linux."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after the command name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return time.time() - boot - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


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
