"""Exact object precision, recall and F1 on held-out synthetic scenes, for method settings side by side, with
bootstrap intervals over scenes and the share of attention on the image by caption position. The command line is
`neverfade eval scenes` (commands/eval_scenes.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

DEFAULT_RUNS = ("baseline", "sparc", "naive", "locore")
POSITION_BUCKETS = ((1, 16), (17, 32), (33, 64), (65, 128), (129, 256), (257, 512))


def evaluate(records: list[dict], items, runs, labels: list[str], n_boot: int = 1000) -> dict:
    """Scores per run (label -> overall, ci, paired difference to the baseline), over the scenes every run described."""
    from neverfade.scenes import bootstrap_ci, scene_metrics

    by_run = {
        run.id: {r["id"]: r for r in records if r.get("run") == run.id and r.get("caption") is not None} for run in runs
    }
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
        values = [x for r in records for x in (r.get("image_attention") or [])[lo - 1 : hi]]
        out[f"{lo}-{hi}"] = float(np.mean(values)) if values else None
    return out


def format_report(report: dict) -> str:
    from neverfade.eval.report import table

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
        table(report["runs"], columns),
        "",
        "attention on the image by caption position (token index):",
    ]
    buckets = [f"{lo}-{hi}" for lo, hi in POSITION_BUCKETS]
    shares = {label: {"overall": r["attention_by_position"]} for label, r in report["runs"].items()}
    lines.append(table(shares, [(b, b, True) for b in buckets]))
    return "\n".join(lines)
