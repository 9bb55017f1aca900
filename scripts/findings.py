"""One findings table per testbed: every method at its paper defaults (a `neverfade eval scenes` JSON) and tuned
(`neverfade tune` output folders), with the paired difference from the baseline, hallucination by caption quarter,
the late objects' precision and the attention on the image by caption position.

    python scripts/findings.py --scenes testbed_scenes.json --tuned tune_sparc tune_pai ... --world hard \
        --title "testbed" --out docs/findings/testbed_methods

A tuned row is scored from the tune folder's test captions against that run's own baseline (paired), by the same
code as `neverfade eval scenes`; a folder whose captions are missing gives its params.json figures only. Writes
OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

from neverfade.data.samples import sample_scene_items
from neverfade.eval.scenes import POSITION_BUCKETS, evaluate
from neverfade.jsonl import read_jsonl
from neverfade.methods.spec import format_spec


def tuned_row(folder: Path, world: str, n_boot: int) -> dict:
    params = json.loads((folder / "params.json").read_text())
    test = params["test"]
    row = {
        "setting": params["method"],
        "overall": test["tuned"]["overall"],
        "vs_baseline": test["difference"],
        "vs_baseline_ci": test["difference_ci"],
        "baseline": test["baseline"]["overall"],
    }
    captions = folder / "captions.jsonl"
    if not captions.exists():
        return row
    items = sample_scene_items(test["n"], world)
    ids = {it.id for it in items}
    records = [r for _, r in read_jsonl(captions) if r["id"] in ids]
    base = next(r["run"] for r in records if not r["methods"])
    tuned = next(r["run"] for r in records if r["methods"])
    runs = [SimpleNamespace(id=base, described=[]), SimpleNamespace(id=tuned, described=params["methods"])]
    report = evaluate(records, items, runs, ["baseline", "tuned"], n_boot=n_boot, world=world)
    row.update({k: report["runs"]["tuned"][k] for k in ("overall", "vs_baseline", "vs_baseline_ci", "profile")})
    row["late_objects"] = report["runs"]["tuned"]["late_objects"]
    row["baseline_profile"] = report["runs"]["baseline"]["profile"]
    return row


def pct(x, ci=None) -> str:
    if x is None:
        return "n/a"
    text = f"{100 * x:+.2f}" if ci is not None else f"{100 * x:.2f}"
    return text + (f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]" if ci is not None else "")


def markdown(title: str, defaults: dict, tuned: list[dict], partial: list[dict] = ()) -> str:
    head = (
        "| method | setting | precision | recall | F1 | CHAIRs | CHAIRi | words | F1 vs baseline [95%] "
        "| CHAIRi vs baseline [95%] | hallucinated by quarter (%) | real after 4th object (%) |"
    )
    lines = [f"### {title}", "", head, "|" + "---|" * 12]

    def line(label, what, r):
        o, q = r["overall"], r.get("profile", {}).get("by_quarter")
        late = r.get("late_objects", {}).get("precision_after_object_4")
        diff = r.get("vs_baseline")
        lines.append(
            f"| {label} | {what} | {pct(o['precision'])} | {pct(o['recall'])} | {pct(o['f1'])} | {pct(o['chair_s'])} "
            f"| {pct(o['chair_i'])} | {o['words']:.0f} "
            f"| {pct(diff['f1'], r['vs_baseline_ci']['f1']) if diff else ''} "
            f"| {pct(diff['chair_i'], r['vs_baseline_ci']['chair_i']) if diff else ''} "
            f"| {' / '.join('-' if v is None else f'{v:.1f}' for v in q) if q else 'n/a'} "
            f"| {'n/a' if late is None else f'{late:.1f}'} |"
        )

    for label, r in defaults["runs"].items():
        line(label, "defaults" if r["methods"] else "", r)
    for r in tuned:
        line(r["setting"].split(":")[0], f"tuned: `{r['setting']}`", r)
    for part in partial:
        for label, r in part["runs"].items():
            if r["methods"]:
                line(label, f"defaults, {part['n_scenes']} scenes (a run of its own, paired with its baseline)", r)
    buckets = [f"{lo}-{hi}" for lo, hi in POSITION_BUCKETS]
    lines += ["", "Attention on the image (%) by caption position (tokens):", ""]
    lines += ["| method | " + " | ".join(buckets) + " |", "|" + "---|" * (len(buckets) + 1)]
    rows = list(defaults["runs"].items())
    rows += [
        (f"{label} ({p['n_scenes']} scenes)", r) for p in partial for label, r in p["runs"].items() if r["methods"]
    ]
    for label, r in rows:
        a = r["attention_by_position"]
        if any(a[b] is not None for b in buckets):  # OPERA's beam search records none
            lines.append(
                f"| {label} | " + " | ".join("-" if a[b] is None else f"{100 * a[b]:.2f}" for b in buckets) + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenes", type=Path, required=True, help="neverfade eval scenes JSON (paper defaults)")
    p.add_argument("--tuned", type=Path, nargs="*", default=[], help="neverfade tune --out folders")
    p.add_argument(
        "--partial",
        type=Path,
        nargs="*",
        default=[],
        help="eval scenes JSONs of separate runs (over all the scenes, or fewer: a run cut short), each with its "
        "own baseline: rows marked so",
    )
    p.add_argument("--world", default="default")
    p.add_argument("--title", required=True)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--commands", type=Path, help="a text file with the commands that made the inputs")
    p.add_argument("--out", type=Path, required=True, help="output stem: OUT.json and OUT.md")
    args = p.parse_args(argv)
    defaults, *partial = (json.loads(f.read_text()) for f in (args.scenes, *args.partial))
    for report in (defaults, *partial):
        report.pop("captions", None)
        for r in report["runs"].values():
            r["setting"] = format_spec([(m["name"], m["params"]) for m in r["methods"]])
    tuned = [tuned_row(folder, args.world, args.bootstrap) for folder in args.tuned]
    report = {
        "title": args.title,
        "defaults": defaults,
        "tuned": tuned,
        "partial": partial,
        "commands": args.commands.read_text() if args.commands else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(args.title, defaults, tuned, partial)
    Path(f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
