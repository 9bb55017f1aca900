"""PNG plots of an analysis run (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _by_position(series: list[np.ndarray]) -> np.ndarray:
    """Mean over the captions long enough to have each position."""
    longest = max((len(s) for s in series), default=0)
    table = np.full((len(series), longest), np.nan)
    for row, s in zip(table, series):
        row[: len(s)] = s
    with np.errstate(invalid="ignore"):
        return np.nanmean(table, axis=0) if longest else np.array([])


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def share_plot(settings: dict, layer: int, path: Path) -> Path:
    """Visual attention by output position (the SPARC paper's Fig. 5 and 7a): attention on the image tokens, mean
    over images, one line per setting; each image's own curve faintly behind it."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for color, (label, analyses) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], settings.items()):
        if len(analyses) <= 8:
            for a in analyses:
                ax.plot(np.arange(1, len(a.share) + 1), a.share, color=color, alpha=0.15, lw=0.8)
        mean = _by_position([a.share for a in analyses])
        ax.plot(np.arange(1, len(mean) + 1), mean, color=color, lw=1.8, label=f"{label} (mean of {len(analyses)})")
    ax.set(
        xlabel="output token position",
        ylabel="attention on image tokens",
        title=f"Visual attention by position, layer {layer} (head mean)",
        ylim=(0, None),
    )
    ax.legend()
    return _save(fig, path)


def diversity_plot(settings: dict, path: Path) -> Path:
    """Wasserstein distance between consecutive visual-attention maps (the SPARC paper's Fig. 3): by position, and
    the distribution per setting."""
    fig, (by_pos, spread) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (label, analyses) in zip(colors, settings.items()):
        mean = _by_position([a.diversity for a in analyses])
        by_pos.plot(np.arange(2, len(mean) + 2), mean, color=color, label=label)
    by_pos.set(
        xlabel="output token position t",
        ylabel="W1(map t-1, map t), in tokens",
        title="Visual-attention diversity (mean over images)",
    )
    by_pos.legend()
    values = [
        np.concatenate([a.diversity for a in analyses]) if analyses else np.array([]) for analyses in settings.values()
    ]
    values = [v[np.isfinite(v)] for v in values]
    if any(len(v) for v in values):
        spread.boxplot([v if len(v) else [np.nan] for v in values], showfliers=False)
        spread.set_xticks(range(1, len(values) + 1), list(settings), rotation=20)
    spread.set(ylabel="W1 between consecutive maps", title="Distribution")
    return _save(fig, path)


def _overlay(ax, image, grid_values, title, cmap="magma", label=""):
    ax.imshow(image, extent=(0, 1, 1, 0))
    shown = ax.imshow(
        np.ma.masked_equal(grid_values, 0) if grid_values.any() else grid_values,
        cmap=cmap,
        alpha=0.6,
        extent=(0, 1, 1, 0),
        interpolation="nearest",
    )
    ax.set(title=title, xticks=[], yticks=[])
    plt.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label=label)


def selection_plot(analysis, label: str, path: Path) -> Path:
    """How often SPARC selected each image token over the caption, over the image."""
    counts = analysis.selection_counts
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4))
    _overlay(
        left,
        analysis.image,
        counts.astype(float),
        f"{label}: selections per image token ({int(counts.sum())} in {len(analysis.tokens)} steps)",
        label="times selected",
    )
    per_step = analysis.selections.reshape(len(analysis.selections), -1).sum(1)
    right.plot(np.arange(1, len(per_step) + 1), per_step, lw=0.8)
    right.set(xlabel="output token position", ylabel="image tokens selected", title="Selections per step")
    fig.suptitle(analysis.id, fontsize=9)
    return _save(fig, path)


def saliency_plot(analysis, label: str, path: Path, context: int = 24) -> Path:
    """LVLMs-Saliency of the chosen output tokens (Fig. 1-2 of the saliency paper), one row per token: the attention
    and the saliency |A * dL/dA| (l2-normalised per layer) of the row that predicted it, per layer, over the
    `context` tokens written before it; and its saliency on the image (mean over layers)."""
    entries = analysis.saliency
    height = 2.3 * len(entries) + 0.8
    fig, axes = plt.subplots(
        len(entries),
        3,
        figsize=(13, height),
        squeeze=False,
        gridspec_kw={"width_ratios": [3, 3, 1.1], "hspace": 0.95, "wspace": 0.15},
    )
    fig.subplots_adjust(left=0.04, right=0.99, top=1 - 0.75 / height, bottom=0.6 / height)
    for row, entry in zip(axes, entries):
        p = entry["position"]
        words = [t.replace("\n", " ") for t in analysis.tokens[max(0, p - 1 - context) : p - 1]]
        for ax, key in ((row[0], "output_attention"), (row[1], "output")):
            ax.imshow(
                entry[key][:, len(entry[key][0]) - len(words) :], aspect="auto", cmap="viridis", interpolation="nearest"
            )
            ax.set_xticks(range(len(words)), words, rotation=90, fontsize=6)
            ax.set_ylabel("layer", fontsize=8)
            ax.tick_params(axis="y", labelsize=6)
        mark = {True: " (in the scene)", False: " (HALLUCINATED)", None: ""}[entry["present"]]
        row[0].set_title(
            f"token {p} {entry['token'].strip()!r}{mark}: attention to the tokens before it", fontsize=8, loc="left"
        )
        row[1].set_title("saliency |A * dL/dA|, l2-normalised per layer", fontsize=8, loc="left")
        row[2].imshow(analysis.image, extent=(0, 1, 1, 0))
        row[2].imshow(entry["image"].mean(0), cmap="viridis", alpha=0.6, extent=(0, 1, 1, 0), interpolation="nearest")
        row[2].set_title("saliency on the image", fontsize=8)
        row[2].set(xticks=[], yticks=[])
    fig.suptitle(f"{label}, {analysis.id}: LVLMs-Saliency of {len(entries)} output tokens", fontsize=10)
    return _save(fig, path, tight=False)
