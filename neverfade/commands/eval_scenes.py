"""`neverfade eval scenes`: the command line of neverfade.eval.scenes (exact object precision, recall and F1 on
held-out synthetic scenes, for method settings side by side)."""

from __future__ import annotations

import argparse
import sys

from neverfade.eval.scenes import DEFAULT_RUNS


def add_parser(eval_subparsers) -> None:
    from neverfade.commands.eval import EVAL_COMMANDS
    from neverfade.commands.options import add_method_options, add_model_options, add_params_option, add_world_option

    p = eval_subparsers.add_parser(
        "scenes",
        help=EVAL_COMMANDS["scenes"][1],
        description="Describe held-out synthetic scenes (seeds 0..N-1, never trained on) with each method setting, "
        "and score the objects mentioned against the objects present, exactly. Captions go to a "
        "resumable JSONL; the scores to --out as JSON and a table.",
    )
    p.add_argument("--n", type=int, default=500, help="how many held-out scenes (default 500)")
    p.add_argument(
        "--run",
        action="append",
        metavar="SPEC",
        help=f"a method setting: methods joined by '+', each with optional values after ':' "
        f"(e.g. sparc:tau=8+locore); repeatable; default: {', '.join(DEFAULT_RUNS)}",
    )
    p.add_argument("--out", default="scenes.json", help="results JSON (default scenes.json)")
    p.add_argument("--captions", help="captions JSONL, resumable (default: beside --out, .captions.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention-layer", type=int, help="layer for the attention share (default: SPARC's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument(
        "--score-only",
        action="store_true",
        help="describe nothing: score the captions as they are, over the scenes every run has described (a run "
        "cut short, scored on a machine without its GPU); the report's n_scenes says how many",
    )
    p.add_argument(
        "--shard",
        metavar="K/N",
        help="describe only this process's share of the batches (K, K+N, K+2N, ...; K from 0) into the captions' "
        "parts folder (CAPTIONS.parts/), and stop without scoring: N processes split one run without torchrun, "
        "several on one GPU for a small model or one per machine. Once every shard is done, the same command "
        "without --shard folds the parts into the captions, describes what is still missing and scores",
    )
    add_world_option(p)
    add_model_options(p)
    add_method_options(p, with_method=False)
    add_params_option(p, "its method setting is evaluated too (beside the --run settings, or the baseline)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neverfade.api import DEFAULT_PROMPT
    from neverfade.commands.options import load_captioner, method_settings, params_setting, scene_world
    from neverfade.data.samples import sample_scene_items
    from neverfade.errors import UserError
    from neverfade.eval.report import write_json
    from neverfade.eval.scenes import evaluate, format_report
    from neverfade.methods import ParameterError, build_methods
    from neverfade.results import ResultsFile, lock, merge_parts, part_files, part_path
    from neverfade.runner import caption_items, input_order, item_score, prepare_runs

    for name in ("n", "max_new_tokens", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    shard = parse_shard(args.shard) if args.shard else None
    if shard is not None and args.score_only:
        raise UserError("--shard describes and --score-only does not: give one of them")
    tuned = params_setting(args, [], "--run")
    specs = args.run or (["baseline"] if tuned else list(DEFAULT_RUNS))
    if tuned is not None and tuned not in specs:
        specs.append(tuned)
    settings = method_settings(args, specs, "--run")
    try:
        for names, p in settings:
            build_methods(names, p)
        world = scene_world(args)
        items = sample_scene_items(args.n, world)
    except (ParameterError, ValueError) as err:
        raise UserError(str(err)) from None

    captioner = load_captioner(args, ["baseline"], {})
    captioner.record_attention(args.attention_layer)
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False)
    try:
        runs = prepare_runs(captioner, settings, DEFAULT_PROMPT, generate)
    except ParameterError as err:
        raise UserError(str(err)) from None
    captions_path = args.captions or str(Path(args.out).with_suffix("")) + ".captions.jsonl"
    shared = None
    try:
        if shard is not None:  # the shards share the captions' lock, so no run folds their parts in meanwhile
            shared = lock(captions_path, shared=True)
        own = part_path(captions_path, *shard) if shard is not None else captions_path
        results = ResultsFile(own, also=[captions_path, *part_files(captions_path)])
    except (ValueError, OSError) as err:
        if shared is not None:
            shared.close()
        raise UserError(f"--captions {captions_path}: {err}") from None
    with results:
        try:
            before = len(results.records)
            if not args.score_only:
                caption_items(
                    captioner,
                    items,
                    runs,
                    prompt=DEFAULT_PROMPT,
                    generate=generate,
                    batch_size=args.batch_size,
                    results=results,
                    shard=shard or (0, 1),
                    fixed_shards=True,
                )
        finally:
            if shared is not None:
                shared.close()
        if shard is not None:
            print(
                f"shard {args.shard}: {len(results.records) - before} records described into {results.path}; once "
                f"every shard is done, run the same command without --shard to score",
                file=sys.stderr,
            )
            return 0
        records = results.records
        merge_parts(captions_path, input_order(items, runs, args.batch_size), item_score(items))
    described = [{r["id"] for r in records if r.get("run") == run.id and r.get("caption") is not None} for run in runs]
    if not set.intersection(*described):
        raise UserError(f"no scene in {captions_path} is described by every run: nothing to score")
    report = evaluate(records, items, runs, specs, n_boot=args.bootstrap, world=world)
    report["model"], report["captions"] = captioner.name, captions_path
    write_json(args.out, report)
    print(format_report(report))
    print(f"\nscores: {args.out}; captions: {captions_path}", file=sys.stderr)
    return 0


def parse_shard(text: str) -> tuple[int, int]:
    """'K/N' as (K, N), with 0 <= K < N."""
    from neverfade.errors import UserError

    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise UserError(f"--shard takes K/N, e.g. 0/4, got {text!r}") from None
    if not 0 <= k < n:
        raise UserError(f"--shard {text}: K must be at least 0 and below N")
    return k, n
