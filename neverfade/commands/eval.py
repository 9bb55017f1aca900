"""`neverfade eval chair | pope | clair | manifest | scenes`: metrics on caption files, printed as tables and
written as JSON. The metrics themselves are library code in neverfade.eval; this is their command line.

Each eval subcommand is registered in EVAL_COMMANDS, name -> ("module" exposing add_parser(eval_subparsers), or
"module:function"; one line of help), and only the one named is built, as in neverfade.cli; a module not built yet is
skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

EVAL_COMMANDS = {
    "chair": (
        "neverfade.commands.eval:add_chair",
        "CHAIRs, CHAIRi, recall, precision, F1 against COCO 2014 annotations",
    ),
    "pope": ("neverfade.commands.eval:add_pope", "POPE: build question sets, answer them, score answers"),
    "clair": ("neverfade.commands.eval:add_clair", "CLAIR: an LLM judge compares captions with reference descriptions"),
    "manifest": (
        "neverfade.commands.eval:add_manifest",
        "write a manifest of COCO, IIW-400 or DOCCI images for `neverfade caption`",
    ),
    "scenes": ("neverfade.commands.eval_scenes", "exact object precision/recall on held-out synthetic scenes"),
}


def add_parser(subparsers, argv: list[str] | None = None) -> None:
    """The eval parser, with the full options of the metric `argv` (the arguments after `eval`) names, of every
    metric when `argv` is None."""
    parser = subparsers.add_parser(
        "eval", help="score captions: CHAIR, POPE, CLAIR", description="Score captions with CHAIR, POPE or CLAIR."
    )
    eval_subparsers = parser.add_subparsers(dest="metric", required=True, metavar="METRIC")
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (target, help_line) in EVAL_COMMANDS.items():
        module_name, _, function = target.partition(":")
        if importlib.util.find_spec(module_name) is None:
            continue
        if argv is None or name == named:
            getattr(importlib.import_module(module_name), function or "add_parser")(eval_subparsers)
        else:
            eval_subparsers.add_parser(name, help=help_line)


def _user_error(message: str):
    from neverfade.errors import UserError

    return UserError(message)


def _inputs(args) -> list[str]:
    paths = list(args.files) + list(args.compare or [])
    if not paths:
        raise _user_error("give a file to score (or several with --compare)")
    for path in paths:
        if not Path(path).is_file():
            raise _user_error(f"{path}: no such file")
    return paths


def _saved_results(path: str, metric: str) -> list[dict[str, Any]] | None:
    """Results JSON written by --out earlier (so --compare can mix fresh and saved results), else None."""
    if not path.endswith(".json"):
        return None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if isinstance(data, dict) and data.get("metric") == metric:
        return data.get("results", [data])
    return None


def _run(args, metric: str, compute: Callable[[str], list[dict[str, Any]]], columns) -> int:
    """Score each input (a file may hold several runs), print one table row per run, write --out."""
    from neverfade.eval import report
    from neverfade.eval.captions import method_label

    paths = _inputs(args)
    labelled: dict[str, dict[str, Any]] = {}
    for path, label in zip(paths, report.unique_labels(paths)):
        results = _saved_results(path, metric) or compute(path)
        for result in results:
            name = f"{label}:{method_label(result.get('methods'))}" if len(results) > 1 else label
            copies = sum(1 for other in labelled if other == name or other.startswith(name + " #"))
            labelled[f"{name} #{copies + 1}" if copies else name] = result
    print(report.table(labelled, columns))
    drawn = {label: r for label, r in labelled.items() if r.get("draws")}
    if drawn:
        protocol = next(iter(drawn.values()))["draw_protocol"]
        print(f"\nmean over {protocol['n_draws']} draws of {protocol['size']} images:")
        print(
            report.table(
                {label: {"overall": {k: v["mean"] for k, v in r["draws"].items()}} for label, r in drawn.items()},
                [c for c in columns if c[0] != "n"],
            )
        )
    for label, r in labelled.items():
        if r.get("n_skipped"):
            print(f"{label}: {r['n_skipped']} record(s) skipped (error or no caption)")
    if args.out:
        results = list(labelled.values())
        report.write_json(args.out, results[0] if len(results) == 1 else {"metric": metric, "results": results})
        print(f"results written to {args.out}")
    return 0


def _score_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("files", nargs="*", metavar="FILE", help=f"{what} (JSONL), or a results JSON from --out")
    parser.add_argument("--compare", nargs="+", metavar="FILE", help="more files, scored side by side")
    parser.add_argument("--out", help="write the results JSON here")
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="bootstrap resamples over images for 95%% intervals (0: none; default 1000)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")


# --- CHAIR -------------------------------------------------------------------------------------------------------


def add_chair(eval_subparsers) -> None:
    parser = eval_subparsers.add_parser(
        "chair",
        help=EVAL_COMMANDS["chair"][1],
        description="CHAIR of COCO captions (ids = COCO image ids). --coco is the folder holding "
        "instances_val2014.json and captions_val2014.json (and the train2014 pair, used when present).",
    )
    _score_arguments(parser, "caption files from `neverfade caption`")
    parser.add_argument("--coco", metavar="DIR", help="COCO 2014 annotations folder")
    parser.add_argument(
        "--cache-dir", help="where parsed ground truth is cached (default $NEVERFADE_CACHE or ~/.cache/neverfade)"
    )
    parser.add_argument("--draws", type=int, default=5, help="the SPARC paper's protocol: draws (default 5)")
    parser.add_argument("--draw-size", type=int, default=500, help="images per draw (default 500)")
    parser.set_defaults(func=run_chair)


def run_chair(args) -> int:
    from neverfade.eval import captions, chair

    truth = []

    def compute(path: str) -> list[dict[str, Any]]:
        if not args.coco:
            raise _user_error("--coco DIR is needed to score caption files")
        if not truth:
            truth.append(chair.GroundTruth.from_coco(args.coco, args.cache_dir))
        return [
            chair.evaluate(
                run, truth[0], n_boot=args.bootstrap, seed=args.seed, n_draws=args.draws, draw_size=args.draw_size
            )
            for run in captions.load_runs(path)
        ]

    return _run(args, "chair", compute, chair.TABLE_COLUMNS)


# --- POPE --------------------------------------------------------------------------------------------------------


def add_pope(eval_subparsers) -> None:
    parser = eval_subparsers.add_parser(
        "pope", help=EVAL_COMMANDS["pope"][1], description="POPE object-probing questions."
    )
    actions = parser.add_subparsers(dest="pope_action", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build",
        help="write the random, popular and adversarial question files",
        description="Build POPE question files from instances_<split>2014.json.",
    )
    build.add_argument("--coco", required=True, metavar="DIR", help="COCO 2014 annotations folder")
    build.add_argument("--out-dir", required=True, help="writes coco_pope_<strategy>.json (JSONL) here")
    build.add_argument(
        "--strategy",
        nargs="+",
        default=["random", "popular", "adversarial"],
        choices=["random", "popular", "adversarial"],
    )
    build.add_argument("--images", type=int, default=500, help="images (default 500)")
    build.add_argument("--per-image", type=int, default=3, help="positives per image, each with a negative (3)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--split", default="val", choices=["val", "train"])
    build.set_defaults(func=run_pope_build)

    answer = actions.add_parser(
        "answer",
        help="answer a question file with a model and methods",
        description="Answer POPE questions; appends to --out and resumes from it.",
    )
    answer.add_argument("questions", help="question file (POPE JSONL)")
    answer.add_argument("--images", required=True, metavar="DIR", help="folder of the questions' images")
    answer.add_argument(
        "--caption-first",
        action="store_true",
        help="describe the image first and answer with that description in the prompt",
    )
    answer.add_argument("--batch-size", type=int, default=8)
    answer.add_argument("--max-new-tokens", type=int, default=32, help="for answers (default 32)")
    answer.add_argument("--caption-tokens", type=int, default=512, help="for --caption-first captions (512)")
    answer.add_argument("--out", required=True, help="answers JSONL")
    from neverfade.commands.options import add_method_options, add_model_options

    add_model_options(answer)
    add_method_options(answer)
    answer.set_defaults(func=run_pope_answer)

    score = actions.add_parser(
        "score", help="accuracy, precision, recall, F1, yes-ratio", description="Score POPE answer files side by side."
    )
    _score_arguments(score, "answer files")
    score.add_argument("--questions", help="question file giving the labels, for answer files without them")
    score.set_defaults(func=run_pope_score)


def run_pope_build(args) -> int:
    from neverfade.eval import pope

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for strategy in args.strategy:
        questions = pope.build_from_coco(args.coco, strategy, args.images, args.per_image, args.seed, args.split)
        path = out_dir / f"coco_pope_{strategy}.json"
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(q) + "\n" for q in questions)
        print(f"{path}: {len(questions)} questions over {len({q['image'] for q in questions})} images")
    return 0


def run_pope_answer(args) -> int:
    from neverfade.api import PromptTooLong
    from neverfade.commands.options import load_captioner, method_choice
    from neverfade.eval import pope
    from neverfade.results import ResultsFile

    for name in ("batch_size", "max_new_tokens", "caption_tokens"):
        if getattr(args, name) < 1:
            raise _user_error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    questions = pope.read_questions(args.questions)
    try:  # appended to, fsynced per record; a torn last line is cut; locked while this runs
        answers = ResultsFile(args.out, keys=("question_id",))
    except (ValueError, OSError) as err:
        raise _user_error(str(err)) from None
    with answers:
        done = {r.get("question_id") for r in answers.records}
        todo = [q for q in questions if q["question_id"] not in done]
        print(f"{len(questions) - len(todo)} of {len(questions)} questions already answered in {args.out}")
        if not todo:
            return 0
        captioner = load_captioner(args, *method_choice(args))
        described = {"model": captioner.name, "methods": captioner.describe()}
        try:
            for record in pope.answer(
                captioner,
                todo,
                args.images,
                caption_first=args.caption_first,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                caption_tokens=args.caption_tokens,
            ):
                answers.append([{**record, **described}])
        except PromptTooLong as err:  # the answers so far are kept
            raise _user_error(str(err)) from None
    return 0


def run_pope_score(args) -> int:
    from neverfade.data.coco import read_jsonl
    from neverfade.eval import pope

    labels = None
    if args.questions:
        labels = {q["question_id"]: q["label"] for q in pope.read_questions(args.questions)}

    def compute(path: str) -> list[dict[str, Any]]:
        try:
            result = pope.score((r for _, r in read_jsonl(path)), labels, n_boot=args.bootstrap, seed=args.seed)
        except ValueError as err:
            raise _user_error(f"{path}: {err}") from None
        first = next((r for _, r in read_jsonl(path)), {})
        return [{**result, "answers": path, "model": first.get("model"), "methods": first.get("methods")}]

    return _run(args, "pope", compute, pope.TABLE_COLUMNS)


# --- CLAIR -------------------------------------------------------------------------------------------------------


def add_clair(eval_subparsers) -> None:
    parser = eval_subparsers.add_parser(
        "clair",
        help=EVAL_COMMANDS["clair"][1],
        description="CLAIR through an OpenAI-compatible chat-completions endpoint. Judge answers are cached, so an "
        "interrupted run resumes without asking again.",
    )
    _score_arguments(parser, "caption files from `neverfade caption`")
    parser.add_argument(
        "--references", metavar="FILE", help='IIW-400 or DOCCI JSONL, or JSONL of {"id", "references": [...]}'
    )
    parser.add_argument("--judge-url", default="https://api.openai.com/v1", help="endpoint base URL")
    parser.add_argument("--judge-model", default="gpt-4o", help="judge model (default gpt-4o, as the SPARC paper)")
    parser.add_argument(
        "--key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the key (unset: no Authorization header)",
    )
    parser.add_argument("--concurrency", type=int, default=8, help="judge calls at once (default 8)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per judge call (default 120)")
    parser.add_argument("--retries", type=int, default=6, help="retries on 429/5xx/time-outs (default 6)")
    parser.add_argument("--cache", help="judge answer cache (default <cache dir>/clair/judge-answers.jsonl)")
    parser.set_defaults(func=run_clair)


def run_clair(args) -> int:
    from neverfade import paths
    from neverfade.eval import captions, clair

    if not args.judge_url.startswith(("http://", "https://")):
        raise _user_error(f"--judge-url {args.judge_url!r}: expected an http:// or https:// URL")
    judge = clair.Judge(
        args.judge_url,
        args.judge_model,
        api_key=os.environ.get(args.key_env),
        timeout=args.timeout,
        retries=args.retries,
    )
    cache = clair.AnswerCache(args.cache or paths.cache_dir() / "clair" / "judge-answers.jsonl")
    references = []

    def compute(path: str) -> list[dict[str, Any]]:
        if not args.references:
            raise _user_error("--references FILE is needed to score caption files")
        if not references:
            references.append(clair.load_references(args.references))
        return [
            clair.evaluate(
                run, references[0], judge, cache, concurrency=args.concurrency, n_boot=args.bootstrap, seed=args.seed
            )
            for run in captions.load_runs(path)
        ]

    return _run(args, "clair", compute, clair.TABLE_COLUMNS)


# --- manifests of the papers' image sets --------------------------------------------------------------------------


def add_manifest(eval_subparsers) -> None:
    parser = eval_subparsers.add_parser(
        "manifest",
        help=EVAL_COMMANDS["manifest"][1],
        description='Write a JSONL manifest ({"id", "image"} a line, absolute paths) of a dataset\'s images, '
        "so that `neverfade caption MANIFEST` describes them under the ids the metrics expect.",
    )
    parser.add_argument("dataset", choices=["coco", "iiw", "docci"])
    parser.add_argument(
        "--annotations",
        required=True,
        help="coco: the annotations folder; iiw: IIW-400 data.jsonl; docci: docci_descriptions.jsonlines",
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of the dataset's images")
    parser.add_argument(
        "--n", type=int, help="images drawn by --seed (coco default 500, the papers' sample; others default all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", help="coco: val (default) or train; docci: test (default), train, ... or all")
    parser.add_argument("--out", required=True, help="manifest JSONL to write")
    parser.set_defaults(func=run_manifest)


def run_manifest(args) -> int:
    images = os.path.abspath(args.images)
    if args.dataset == "coco":
        from neverfade.data.coco import coco2014

        items = coco2014(args.annotations, images, 500 if args.n is None else args.n, args.seed, args.split or "val")
    elif args.dataset == "iiw":
        from neverfade.data.iiw import iiw400

        items = iiw400(args.annotations, images, args.n, args.seed)
    else:
        from neverfade.data.docci import docci

        items = docci(
            args.annotations, images, None if args.split == "all" else (args.split or "test"), args.n, args.seed
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": item.id, "image": item.image}) + "\n" for item in items)
    print(f"{args.out}: {len(items)} images")
    return 0
