"""`neverfade eval scenes`: exact object precision, recall and F1 on held-out synthetic scenes, for method settings
side by side, with bootstrap intervals over scenes and the share of attention on the image by caption position."""

from __future__ import annotations

import argparse
import sys
from types import SimpleNamespace

import numpy as np

DEFAULT_RUNS = ("baseline", "sparc", "naive", "locore")
POSITION_BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512))


def add_parser(eval_subparsers) -> None:
    from neverfade.commands.options import add_method_options, add_model_options

    p = eval_subparsers.add_parser(
        "scenes", help="exact object precision/recall on held-out synthetic scenes",
        description="Describe held-out synthetic scenes (seeds 0..N-1, never trained on) with each method setting, "
                    "and score the objects mentioned against the objects present, exactly. Captions go to a "
                    "resumable JSONL; the scores to --out as JSON and a table.")
    p.add_argument("--n", type=int, default=500, help="how many held-out scenes (default 500)")
    p.add_argument("--run", action="append", metavar="SPEC",
                   help=f"a method setting: methods joined by '+', each with optional values after ':' "
                        f"(e.g. sparc:tau=8+locore); repeatable; default: {', '.join(DEFAULT_RUNS)}")
    p.add_argument("--out", default="scenes.json", help="results JSON (default scenes.json)")
    p.add_argument("--captions", help="captions JSONL, resumable (default: beside --out, .captions.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention-layer", type=int, help="layer for the attention share (default: SPARC's)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    add_model_options(p)
    add_method_options(p, with_method=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from neverfade.api import DEFAULT_PROMPT
    from neverfade.errors import UserError
    from neverfade.commands.options import load_captioner, method_choice
    from neverfade.data.samples import sample_scene_items
    from neverfade.eval.report import write_json
    from neverfade.methods import ParameterError, build_methods
    from neverfade.results import ResultsFile
    from neverfade.runner import caption_items, prepare_runs

    for name in ("n", "max_new_tokens", "batch_size", "bootstrap"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    specs = args.run or list(DEFAULT_RUNS)
    _, params = method_choice(args)
    try:
        settings = [parse_run(spec, params) for spec in specs]
        unused = set(params) - {m for names, _ in settings for m in names}
        if unused:
            raise ParameterError(f"parameters given for {', '.join(sorted(unused))}, which no --run uses")
        for names, p in settings:
            build_methods(names, p)
        items = sample_scene_items(args.n)
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
    try:
        results = ResultsFile(captions_path)
    except (ValueError, OSError) as err:
        raise UserError(f"--captions {captions_path}: {err}") from None
    with results:
        caption_items(captioner, items, runs, prompt=DEFAULT_PROMPT, generate=generate, batch_size=args.batch_size,
                      results=results)
    report = evaluate(results.records, items, runs, specs, n_boot=args.bootstrap)
    report["model"], report["captions"] = captioner.name, captions_path
    write_json(args.out, report)
    print(format_report(report))
    print(f"\nscores: {args.out}; captions: {captions_path}", file=sys.stderr)
    return 0


def parse_run(spec: str, params: dict[str, dict]) -> tuple[list[str], dict[str, dict]]:
    """"sparc:tau=8,alpha=1.2+locore" -> (["sparc", "locore"], {"sparc": {"tau": "8", "alpha": "1.2"}}), on top of
    the values given as flags (--sparc-tau ...)."""
    from neverfade.methods import ParameterError

    names, values = [], {}
    for part in spec.split("+"):
        name, _, assignments = part.partition(":")
        names.append(name)
        own = dict(params.get(name, {}))
        for assignment in filter(None, assignments.split(",")):
            key, eq, value = assignment.partition("=")
            if not eq:
                raise ParameterError(f"--run {spec}: expected name=value, got {assignment!r}")
            own[key] = value
        if own:
            values[name] = own
    return names, values


def evaluate(records: list[dict], items, runs, labels: list[str], n_boot: int = 1000) -> dict:
    """Scores per run (label -> overall, ci, paired difference to the baseline), over the scenes every run described."""
    from neverfade.scenes import bootstrap_ci, scene_metrics

    by_run = {run.id: {r["id"]: r for r in records if r.get("run") == run.id and r.get("caption") is not None}
              for run in runs}
    common = [it for it in items if all(it.id in by_run[run.id] for run in runs)]
    scenes = [SimpleNamespace(kinds=set(it.meta["objects"])) for it in common]
    baseline = next((run for run in runs if not run.described), None)
    base_captions = [by_run[baseline.id][it.id]["caption"] for it in common] if baseline else None
    out = {"n_scenes": len(common), "runs": {}}
    for run, label in zip(runs, labels):
        captions = [by_run[run.id][it.id]["caption"] for it in common]
        metrics = scene_metrics(captions, scenes)
        entry = {
            "methods": run.described,
            "overall": {k: v for k, v in metrics.items() if k not in ("per_caption", "n")},
            "ci": bootstrap_ci(captions, scenes, n_boot=n_boot),
            "attention_by_position": attention_by_position([by_run[run.id][it.id] for it in common]),
        }
        if base_captions is not None and run is not baseline:
            entry["vs_baseline_ci"] = bootstrap_ci(captions, scenes, baseline=base_captions, n_boot=n_boot)
        out["runs"][label] = entry
    return out


def attention_by_position(records: list[dict]) -> dict[str, float | None]:
    """Mean share of attention on the image over the tokens at caption positions in each bucket (1-based)."""
    out = {}
    for lo, hi in POSITION_BUCKETS:
        values = [x for r in records for x in (r.get("image_attention") or [])[lo - 1:hi]]
        out[f"{lo}-{hi}"] = float(np.mean(values)) if values else None
    return out


def format_report(report: dict) -> str:
    from neverfade.eval.report import table

    columns = [("precision", "precision", True), ("recall", "recall", True), ("f1", "F1", True),
               ("chair_i", "CHAIRi", True), ("chair_s", "CHAIRs", True), ("words", "words", False)]
    lines = [f"{report['n_scenes']} held-out scenes, model {report.get('model', '?')} (95% bootstrap intervals)",
             table(report["runs"], columns), "", "attention on the image by caption position (token index):"]
    buckets = [f"{lo}-{hi}" for lo, hi in POSITION_BUCKETS]
    shares = {label: {"overall": r["attention_by_position"]} for label, r in report["runs"].items()}
    lines.append(table(shares, [(b, b, True) for b in buckets]))
    return "\n".join(lines)
