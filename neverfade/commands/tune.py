"""`neverfade tune`: calibrate a method for a model (the library part is neverfade/tune.py)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SEARCHES = ("grid", "random")


def add_parser(subparsers) -> None:
    from neverfade.commands.options import add_model_options, add_world_option
    from neverfade.tune import DEFAULT_SPACES, METRICS

    p = subparsers.add_parser(
        "tune",
        help="search a method's parameters for a model on dev scenes, confirm on test scenes",
        description="Search a method's parameters on a dev split, choose the best setting by --metric there, then "
        "describe the test split with it and with the baseline and report the paired difference with a "
        "95% bootstrap interval over images. Scenes: dev = seeds 10000..10000+N-1 (never trained on, "
        "never held out), test = held-out seeds 0..N-1 (as neverfade eval scenes); --model testbed gets "
        "scenes of its hard world. COCO: --dev-manifest, --test-manifest and --annotations instead. "
        "Writes OUT/params.json, which caption, eval scenes and bench take with --params, and "
        "OUT/captions.jsonl (every trial's captions; a rerun resumes without describing anything "
        "twice). Under torchrun the (setting, batch) pairs are dealt to the ranks. Default spaces: "
        + "; ".join(f"{m}: {s}" for m, s in DEFAULT_SPACES.items())
        + ".",
    )
    p.add_argument(
        "--method",
        required=True,
        metavar="SPEC",
        help="the method to tune; values given here (sparc:beta=0.2) are held fixed",
    )
    p.add_argument("--budget", type=int, default=8, help="settings tried, the same for every method (default 8)")
    p.add_argument(
        "--search",
        choices=SEARCHES,
        default="grid",
        help="grid: the largest balanced grid within the budget, unsearched axes at their default; "
        "random: independent draws by --seed (default grid)",
    )
    p.add_argument(
        "--space",
        metavar="SPACE",
        help="parameters searched and their ranges, e.g. 'tau=1:16:log,alpha=1.05:1.3,layer' "
        "(name=LOW:HIGH linear, :log log-spaced; a bare name: layers over the model's depth, "
        "[minimum, maximum] where declared, else a quarter to 4x the default, log-spaced)",
    )
    p.add_argument(
        "--metric",
        choices=list(METRICS),
        default="f1",
        help="chosen on dev by this (higher is better; chairs and chairi lower); default f1",
    )
    p.add_argument("--dev-scenes", type=int, default=100, help="dev scenes, seeds 10000.. (default 100)")
    p.add_argument("--test-scenes", type=int, default=200, help="test scenes, held-out seeds 0.. (default 200)")
    p.add_argument("--dev-manifest", help="COCO: manifest of the dev images (neverfade eval manifest)")
    p.add_argument("--test-manifest", help="COCO: manifest of the test images, disjoint from the dev ones")
    p.add_argument("--annotations", help="COCO: folder of the 2014 annotation files (as neverfade eval chair)")
    add_world_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the random search (default 0)")
    p.add_argument("--out", help="output folder (default tune-<method>)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neverfade import distributed
    from neverfade.commands.options import check_device
    from neverfade.distributed import Ranks
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_spec

    for name in ("budget", "max_new_tokens", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    try:
        spec = parse_spec(args.method)
    except ParameterError as err:
        raise UserError(str(err)) from None
    if len(spec) != 1:
        raise UserError(f"--method {args.method}: tune one method at a time (got {len(spec)})")
    method, fixed = spec[0]
    try:
        dev, test = _splits(args)
    except ValueError as err:
        raise UserError(str(err)) from None
    args.out = args.out or f"tune-{method}"
    ranks = Ranks.from_env()
    args.device = ranks.device(args.device)
    check_device(args.device)
    results, owner = _open_results(Path(args.out), ranks)
    try:
        distributed.start(ranks, args.device)
        try:
            return _tune(args, ranks, method, fixed, dev, test, results)
        finally:
            distributed.stop(ranks)
    finally:
        for held in (results, owner):
            if held is not None:
                held.close()


def _splits(args):
    from neverfade import tune
    from neverfade.commands.options import scene_world
    from neverfade.scenes import HELD_OUT_SEEDS

    coco = [args.dev_manifest, args.test_manifest, args.annotations]
    if any(coco):
        if not all(coco):
            raise ValueError("COCO tuning needs --dev-manifest, --test-manifest and --annotations together")
        from neverfade.data.coco import AnnotationError
        from neverfade.data.images import InputError
        from neverfade.eval.chair import GroundTruth

        try:
            truth = GroundTruth.from_coco(args.annotations)
            dev, test = tune.CocoSplit(args.dev_manifest, truth), tune.CocoSplit(args.test_manifest, truth)
        except (AnnotationError, InputError) as err:
            raise ValueError(str(err)) from None
        shared = {Path(it.image).resolve() for it in dev.items} & {Path(it.image).resolve() for it in test.items}
        if shared:
            raise ValueError(f"--dev-manifest and --test-manifest share {len(shared)} image(s); they must be disjoint")
        return dev, test
    for name, count, seeds in (
        ("--dev-scenes", args.dev_scenes, tune.DEV_SEEDS),
        ("--test-scenes", args.test_scenes, HELD_OUT_SEEDS),
    ):
        if not 1 <= count <= len(seeds):
            raise ValueError(f"{name} must be between 1 and {len(seeds)}, got {count}")
    args.world = scene_world(args)
    return (
        tune.SceneSplit(tune.DEV_SEEDS[: args.dev_scenes], args.world),
        tune.SceneSplit(HELD_OUT_SEEDS[: args.test_scenes], args.world),
    )


def _open_results(out: Path, ranks):
    """OUT/captions.jsonl, locked (rank 0 of several holds its lock; each rank appends to its part file)."""
    from neverfade.errors import UserError
    from neverfade.results import ResultsFile, lock, part_files, part_path

    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    captions = out / "captions.jsonl"
    owner = None
    try:
        out.mkdir(parents=True, exist_ok=True)
        if ranks.parallel and ranks.rank == 0:
            owner = lock(captions)
        own = part_path(captions, ranks.rank, ranks.world_size) if ranks.parallel else captions
        return ResultsFile(own, also=[captions, *part_files(captions)]), owner
    except (ValueError, OSError) as err:
        if owner is not None:
            owner.close()
        raise UserError(f"--out {out}: {err}") from None


def _all_records(results, ranks) -> list[dict]:
    """Every rank's records so far (call after a barrier): OUT/captions.jsonl and every part file beside it."""
    from neverfade.results import part_files, read_records

    if not ranks.parallel:
        return results.records
    captions = results.path.parent.with_suffix("")  # OUT/captions.jsonl.parts/rank-... -> OUT/captions.jsonl
    return [r for path in [captions, *part_files(captions)] for r in read_records(path)]


def _describe(captioner, items, runs, results, args, ranks) -> None:
    """Describe every item with every run, skipping what is done; under torchrun the (run, batch) pairs left are
    dealt to the ranks in turn, so trials as well as scenes are spread."""
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.results import best_records
    from neverfade.runner import caption_items, is_for, item_score

    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    common = dict(prompt=DEFAULT_PROMPT, generate=generate, batch_size=args.batch_size, results=results)
    if not ranks.parallel:
        caption_items(captioner, items, runs, **common)
        return
    best = best_records(_all_records(results, ranks), item_score(items))
    size = args.batch_size
    batches = [items[i : i + size] for i in range(0, len(items), size)]
    left = [
        (run, batch)
        for run in runs
        for batch in batches
        if any((rec := best.get((it.id, run.id))) is None or not is_for(rec, it) for it in batch)
    ]
    print(
        f"rank {ranks.rank} of {ranks.world_size}: {len(left[ranks.rank :: ranks.world_size])} of {len(left)} "
        f"(setting, batch) pairs left",
        file=sys.stderr,
    )
    for run in runs:
        mine = [
            it for k, (r, batch) in enumerate(left) if r is run and k % ranks.world_size == ranks.rank for it in batch
        ]
        if mine:
            caption_items(captioner, mine, [run], **common)


def _tune(args, ranks, method, fixed, dev, test, results) -> int:
    from neverfade import distributed, tune
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.commands.options import load_captioner
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.models.families import model_info
    from neverfade.results import merge_parts, read_records
    from neverfade.runner import input_order, item_score, prepare_runs

    captioner = load_captioner(args, ["baseline"], {})
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    try:
        axes = tune.parse_space(args.space or tune.default_space(method), method, model_info(captioner.model), fixed)
        specs = tune.trials(method, axes, args.budget, args.search, args.seed, fixed)
        settings = [(["baseline"], None)] + [_setting(s) for s in specs]
        runs = prepare_runs(captioner, settings, DEFAULT_PROMPT, generate)
    except ParameterError as err:
        raise UserError(str(err)) from None
    say = (lambda text: print(text, file=sys.stderr)) if ranks.rank == 0 else (lambda text: None)
    say(
        f"tuning {method} on {captioner.name}: {len(specs)} settings ({args.search}) and the baseline on "
        f"{_where(dev)}; then the best and the baseline on {_where(test)}"
    )

    distributed.barrier(ranks)
    _describe(captioner, dev.items, runs, results, args, ranks)
    distributed.barrier(ranks)
    try:
        n_dev, scores = tune.dev_scores(dev, _all_records(results, ranks), runs)
    except ValueError as err:
        raise UserError(str(err)) from None
    best = tune.select(scores[1:], args.metric)
    chosen = runs[1 + best]
    key = tune.METRICS[args.metric][0]
    say(f"dev {args.metric}: baseline {scores[0][key]:.4f}; best {specs[best]} {scores[1 + best][key]:.4f}")

    _describe(captioner, test.items, [runs[0], chosen], results, args, ranks)
    distributed.barrier(ranks)
    if ranks.rank == 0:
        captions = Path(args.out) / "captions.jsonl"
        if ranks.parallel:
            items = dev.items + test.items
            merge_parts(captions, input_order(items, runs, args.batch_size), item_score(items))
        records = read_records(captions) if ranks.parallel else results.records
        try:
            report = tune.test_report(test, records, runs[0], chosen, args.bootstrap, args.metric)
        except ValueError as err:
            raise UserError(str(err)) from None
        data = {
            "method": specs[best],
            "methods": chosen.described,
            "values": {a.name: next(m["params"][a.name] for m in chosen.described) for a in axes},
            "model": args.model,
            "model_name": captioner.name,
            "metric": args.metric,
            "search": {
                "kind": args.search,
                "budget": args.budget,
                "seed": args.seed,
                "space": tune.axes_json(axes),
                "trials": len(specs),
            },
            "generate": generate,
            "prompt": DEFAULT_PROMPT,
            "dtype": captioner.setup()["dtype"],
            "dev": {
                **dev.describe(),
                "scored": n_dev,
                "baseline": scores[0],
                "chosen": best,
                "trials": [{"method": s, "scores": sc} for s, sc in zip(specs, scores[1:])],
            },
            "test": {**test.describe(), **report},
            "command": _command(args),
        }
        params = Path(args.out) / "params.json"
        tune.write_params(params, data)
        print(_summary(data))
        print(f"\nparams: {params}; captions: {captions}", file=sys.stderr)
    distributed.barrier(ranks)
    return 0


def _setting(spec: str):
    from neverfade.methods.spec import parse_spec, setting

    return setting(parse_spec(spec))


def _where(split) -> str:
    d = split.describe()
    if d["kind"] == "scenes":
        return f"{d['n']} {d['world']} scenes (seeds {d['seeds']})"
    return f"{d['n']} images of {d['manifest']}"


def _command(args) -> str:
    words = [
        "neverfade",
        "tune",
        "--method",
        args.method,
        "--budget",
        args.budget,
        "--search",
        args.search,
        "--metric",
        args.metric,
        "--seed",
        args.seed,
        "--max-new-tokens",
        args.max_new_tokens,
        "--batch-size",
        args.batch_size,
        "--bootstrap",
        args.bootstrap,
        "--out",
        args.out,
    ]
    for flag, value in (
        ("--model", args.model),
        ("--space", args.space),
        ("--dtype", args.dtype),
        ("--dev-manifest", args.dev_manifest),
        ("--test-manifest", args.test_manifest),
        ("--annotations", args.annotations),
    ):
        if value is not None:
            words += [flag, value]
    if not args.dev_manifest:
        words += ["--dev-scenes", args.dev_scenes, "--test-scenes", args.test_scenes, "--world", args.world]
    if args.paper:
        words.append("--paper")
    return shlex.join(str(w) for w in words)


def _summary(data: dict) -> str:
    from neverfade.eval.report import table

    test, metric = data["test"], data["metric"]
    key = dict(f1="f1", precision="precision", recall="recall", chairs="chair_s", chairi="chair_i")[metric]
    columns = [
        ("precision", "precision", True),
        ("recall", "recall", True),
        ("f1", "F1", True),
        ("chair_i", "CHAIRi", True),
        ("chair_s", "CHAIRs", True),
        ("words", "words", False),
    ]
    rows = {
        "baseline": test["baseline"],
        data["method"]: test["tuned"],
        "difference": {"overall": test["difference"], "ci": test["difference_ci"]},
    }
    low, high = test["difference_ci"][key]
    return "\n".join(
        [
            f"chosen on {data['dev']['scored']} dev items by {metric}: {data['method']} "
            f"(of {data['search']['trials']} settings)",
            f"test, {test['n']} items (95% bootstrap intervals; the difference is paired over items):",
            table(rows, columns),
            "",
            f"{metric} difference {test['difference'][key] * 100:+.2f} [{low * 100:+.2f}, {high * 100:+.2f}]: "
            f"{test['verdict']}",
        ]
    )
