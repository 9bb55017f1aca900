"""Writing an analysis run: PNG plots and one JSON with the numbers behind them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from neverfade.analysis import plots


def _round(values) -> list:
    """Numbers to 6 significant digits (NaN as null), nested lists kept."""
    array = np.asarray(values, dtype=float)
    return (
        [None if not np.isfinite(v) else float(f"{v:.6g}") for v in array]
        if array.ndim == 1
        else [_round(row) for row in array]
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "x"


def write_report(out: Path, settings: dict, meta: dict) -> dict:
    """`settings`: label -> list of run.ImageAnalysis. Writes analysis.json and the PNGs into `out`; returns the
    JSON."""
    out.mkdir(parents=True, exist_ok=True)
    files = [
        plots.share_plot(settings, meta["layer"], out / "attention_share.png"),
        plots.diversity_plot(settings, out / "diversity.png"),
    ]
    report = {**meta, "settings": []}
    for label, analyses in settings.items():
        images = []
        for a in analyses:
            record = {
                "id": a.id,
                "caption": a.caption,
                "tokens": a.tokens,
                "grid": a.grid.describe(),
                "objects": a.objects,
                "attention_share": _round(a.share),
                "diversity": _round(a.diversity),
                "diversity_mean": float(np.nanmean(a.diversity)) if np.isfinite(a.diversity).any() else None,
                "selection_counts": None,
                "saliency": [],
                "saliency_not_found": a.not_found,
            }
            if a.selections is not None:
                record["selection_counts"] = a.selection_counts.astype(int).tolist()
                record["selections_per_step"] = a.selections.reshape(len(a.selections), -1).sum(1).tolist()
                files.append(plots.selection_plot(a, label, out / f"selections_{_slug(label)}_{_slug(a.id)}.png"))
            for entry in a.saliency:
                record["saliency"].append(
                    {
                        "position": entry["position"],
                        "token": entry["token"],
                        "present": entry["present"],
                        "to_output": _round(entry["output"]),
                        "attention_to_output": _round(entry["output_attention"]),
                        "to_image": _round(entry["image"].mean(0)),
                    }
                )
            if a.saliency:
                files.append(plots.saliency_plot(a, label, out / f"saliency_{_slug(label)}_{_slug(a.id)}.png"))
            images.append(record)
        report["settings"].append({"label": label, "images": images})
    report["plots"] = [f.name for f in files]
    (out / "analysis.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return report
