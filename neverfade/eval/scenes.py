"""Exact object precision, recall and F1 on held-out synthetic scenes, for method settings side by side, with
bootstrap intervals over scenes, each method's paired difference from the baseline, where its hallucinations fall
in the caption (`scenes/profile.py`), and the share of attention on the image by caption position. The command line
is `neverfade eval scenes` (commands/eval_scenes.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

DEFAULT_RUNS = ("baseline", "sparc", "naive", "locore")
POSITION_BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512))
LATE_AFTER = (2, 4)  # the SPARC paper's claim: objects named after the k-th distinct one are more often real
CO = ("cooccurrence", "cooccurrence_chance")
UNITS = "overall, ci, vs_baseline, vs_baseline_ci: fractions; profile, late_objects: percent"


def evaluate(records: list[dict], items, runs, labels: list[str], n_boot: int = 1000, world: str = "default") -> dict:
    """Per run label: overall scores, their intervals, the paired difference from the baseline (`vs_baseline`,
    `vs_baseline_ci`), the hallucination profile, the late objects' precision and the attention by position; over
    the scenes every run described."""
    from neverfade.data.samples import world_partners
    from neverfade.scenes import bootstrap_ci, scene_metrics
    from neverfade.scenes.profile import hallucination_profile

    partners = world_partners(world)
    by_run = {
        run.id: {r["id"]: r for r in records if r.get("run") == run.id and r.get("caption") is not None} for run in runs
    }
    common = [it for it in items if all(it.id in by_run[run.id] for run in runs)]
    scenes = [SimpleNamespace(kinds=set(it.meta["objects"])) for it in common]
    baseline = next((run for run in runs if not run.described), None)
    base_captions = [by_run[baseline.id][it.id]["caption"] for it in common] if baseline else None
    out = {"n_scenes": len(common), "world": world, "units": UNITS, "runs": {}}
    for run, label in zip(runs, labels):
        captions = [by_run[run.id][it.id]["caption"] for it in common]
        metrics = scene_metrics(captions, scenes)
        profile = hallucination_profile(captions, scenes, partners)
        entry = {
            "methods": run.described,
            "overall": {k: v for k, v in metrics.items() if k not in ("per_caption", "n")},
            "ci": bootstrap_ci(captions, scenes, n_boot=n_boot),
            "profile": profile,
            "late_objects": late_objects(profile),
            "attention_by_position": attention_by_position([by_run[run.id][it.id] for it in common]),
        }
        if base_captions is not None and run is not baseline:
            entry["vs_baseline_ci"] = bootstrap_ci(captions, scenes, baseline=base_captions, n_boot=n_boot)
        out["runs"][label] = entry
    if baseline is not None:
        base = out["runs"][labels[runs.index(baseline)]]["overall"]
        for entry in out["runs"].values():
            if "vs_baseline_ci" in entry:
                entry["vs_baseline"] = {k: v - base[k] for k, v in entry["overall"].items()}
    return out


def late_objects(profile: dict) -> dict[str, float | int | None]:
    """From the profile's counts of first mentions: the percent real among the objects named after the k-th
    distinct one (k in LATE_AFTER) and among those first named in the second half of the caption's words, and how
    many there were."""

    def real(counts):
        wrong, named = (sum(c) for c in zip(*counts))
        return (round(100 * (1 - wrong / named), 2) if named else None), named

    out = {}
    for k in LATE_AFTER:  # by_rank_counts[i] is the (i+1)-th object named; the last one, the 5th and later
        out[f"precision_after_object_{k}"], out[f"named_after_object_{k}"] = real(profile["by_rank_counts"][k:])
    out["precision_second_half"], out["named_second_half"] = real(profile["by_quarter_counts"][2:])
    return out


def attention_by_position(records: list[dict]) -> dict[str, float | None]:
    """Mean share of attention on the image over the tokens at caption positions in each bucket (1-based)."""
    out = {}
    for lo, hi in POSITION_BUCKETS:
        values = [x for r in records for x in (r.get("image_attention") or [])[lo - 1 : hi]]
        out[f"{lo}-{hi}"] = float(np.mean(values)) if values else None
    return out


def format_report(report: dict) -> str:
    from neverfade.eval.report import table

    runs = report["runs"]
    columns = [
        ("precision", "precision", True),
        ("recall", "recall", True),
        ("f1", "F1", True),
        ("chair_i", "CHAIRi", True),
        ("chair_s", "CHAIRs", True),
        ("words", "words", False),
    ]
    lines = [
        f"{report['n_scenes']} held-out scenes, model {report.get('model', '?')} (95% bootstrap intervals)",
        table(runs, columns),
    ]
    diffs = {k: {"overall": r["vs_baseline"], "ci": r["vs_baseline_ci"]} for k, r in runs.items() if "vs_baseline" in r}
    if diffs:
        lines += ["", "difference from the baseline (paired, 95% interval), in points:", table(diffs, columns[2:5])]
    heads = ["Q1", "Q2", "Q3", "Q4", "1st", "2nd", "3rd", "4th", "5th+"]
    hallucinated = {k: dict(zip(heads, r["profile"]["by_quarter"] + r["profile"]["by_rank"])) for k, r in runs.items()}
    late = {
        k: {**r["late_objects"], **{c: "n/a" if r["profile"][c] is None else r["profile"][c] for c in CO}}
        for k, r in runs.items()
    }
    late_columns = [(f"precision_after_object_{k}", f"after object {k}", False) for k in LATE_AFTER]
    late_columns += [("precision_second_half", "second half", False), (CO[0], "paired by priors", False)]
    lines += [
        "",
        "hallucinated share of objects named (%), by quarter of the caption's words and by rank of the object:",
        table({k: {"overall": v} for k, v in hallucinated.items()}, [(h, h, False) for h in heads]),
        "",
        "real share of the objects named late (%); hallucinations the world's priors pair with an object present (%):",
        table({k: {"overall": v} for k, v in late.items()}, late_columns + [(CO[1], "chance", False)]),
        "",
        "attention on the image by caption position (token index):",
    ]
    buckets = [f"{lo}-{hi}" for lo, hi in POSITION_BUCKETS]
    shares = {label: {"overall": r["attention_by_position"]} for label, r in runs.items()}
    lines.append(table(shares, [(b, b, True) for b in buckets]))
    return "\n".join(lines)
