"""Per-model calibration (`neverfade tune`): search a method's declared parameters on a dev split, choose the setting
by a metric there, and measure it against the baseline on a disjoint test split. The command line is
commands/tune.py; this module holds the search space, the trials, the splits, the selection and the params file.

Search space. Each searched parameter is an `Axis` derived from its `Param` (`derived_axis`): layer parameters
(layer, start, end) run over the model's depth; a parameter with a minimum and a maximum is linear between them;
any other positive number is log-spaced from a quarter to four times its default (the family's default where the
method takes it from the family). `DEFAULT_SPACES` names, per method, the parameters searched by default, with a
range where the generic one would be unreasonable (SPARC's alpha compounds per selection, so 4x its default is
nonsense). `--space` overrides it in the same syntax: "tau=1:16:log,alpha=1.05:1.3,layer" (name=low:high, linear
unless ":log"; a bare name takes the derived range). Values given in the method's spec are held fixed.

Splits. Scenes: the test split is held-out seeds 0.. (`HELD_OUT_SEEDS`, as `neverfade eval scenes` uses); the dev
split is seeds 10_000.. (`DEV_SEEDS`), which are neither held out nor trained on (the embedded model trained on
seeds >= 1_000_000 and its tokenizer on 997_000..999_999; the testbed on seeds >= 2_000_000). The testbed's scenes
come from the hard world (`scenes/hard.py`), the others' from the default one. COCO: a manifest per split and the
2014 annotation folder, scored by CHAIR (`neverfade.eval.chair`).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neverfade.errors import ParameterError

DEV_SEEDS = range(10_000, 20_000)  # tuning scenes: not held out (0..9_999), not trained on (>= 997_000)
METRICS = {
    "f1": ("f1", 1),
    "precision": ("precision", 1),
    "recall": ("recall", 1),
    "chairs": ("chair_s", -1),
    "chairi": ("chair_i", -1),
}  # --metric -> (key in the scores, +1 higher is better / -1 lower is)
LAYER_PARAMS = ("layer", "start", "end")
DEFAULT_SPACES = {
    "sparc": "tau=1:16:log,alpha=1.02:1.3,layer",
    "locore": "beta,window",
    "naive": "alpha=1:2",
    "pai": "alpha",
    "vcd": "alpha,beta",
    "sgrs": "alpha,k",
    "opera": "penalty,scale",
}
PARAMS_FORMAT = 1


@dataclass(frozen=True)
class Axis:
    """One searched parameter: values in [low, high], linear or log-spaced, float or int; `default` is taken when
    the budget leaves this axis a single value (and lies in range)."""

    name: str
    low: float
    high: float
    scale: str = "linear"  # "linear" | "log"
    integer: bool = False
    default: float | None = None

    def size(self) -> float:
        return self.high - self.low + 1 if self.integer else math.inf

    def points(self, n: int) -> list:
        if n == 1 and self.default is not None and self.low <= self.default <= self.high:
            return [self._value(self.default)]
        if n == 1:
            return [self._value(math.sqrt(self.low * self.high) if self.scale == "log" else (self.low + self.high) / 2)]
        spaced = np.geomspace if self.scale == "log" else np.linspace
        return list(dict.fromkeys(self._value(v) for v in spaced(self.low, self.high, n)))

    def draw(self, rng: np.random.Generator):
        if self.scale == "log":
            return self._value(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        if self.integer:
            return int(rng.integers(int(self.low), int(self.high) + 1))
        return self._value(rng.uniform(self.low, self.high))

    def _value(self, v: float):
        return int(round(v)) if self.integer else float(f"{v:.4g}")


def derived_axis(method: str, param, info) -> Axis:
    """The search range of one declared parameter (see the module's doc); `info` gives the model's depth
    (`num_layers`) and the family's defaults (`default(method, name)`)."""
    if param.type not in (int, float):
        raise ParameterError(f"{method} {param.name} is not a number; it cannot be searched")
    integer = param.type is int
    default = param.default if param.default is not None else info.default(method, param.name)
    if param.name in LAYER_PARAMS and integer:
        return Axis(param.name, param.minimum or 0, info.num_layers - 1, integer=True, default=default)
    if param.minimum is not None and param.maximum is not None:
        return Axis(param.name, param.minimum, param.maximum, integer=integer, default=default)
    if default is None or default <= 0:
        low = param.minimum or 0
        return Axis(param.name, low, low + (8 if integer else 1), integer=integer, default=default)
    low, high = default / 4, default * 4
    if integer:
        low, high = max(1, round(low)), round(high)
    if param.minimum is not None:
        low = max(low, param.minimum)
    return Axis(param.name, low, high, "log" if low > 0 else "linear", integer, default)


def parse_space(text: str, method: str, info, fixed: dict[str, Any] | None = None) -> list[Axis]:
    """The axes of a space string "tau=1:16:log,alpha=1.05:1.3,layer" for `method`; every bound is checked by the
    parameter's own check and layers against the model's depth. ParameterError for anything wrong."""
    from neverfade.methods import METHODS

    params = {p.name: p for p in METHODS[method].params}
    axes: list[Axis] = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        name, eq, bounds = entry.partition("=")
        name = name.strip().replace("-", "_")
        if name not in params:
            raise ParameterError(f"--space {entry!r}: {method} has no parameter {name}; it has {', '.join(params)}")
        if name in (fixed or {}):
            raise ParameterError(f"--space {entry!r}: {name} is fixed by the method's spec; search it or fix it")
        if name in (a.name for a in axes):
            raise ParameterError(f"--space: {name} is given twice")
        axis = derived_axis(method, params[name], info)
        if eq:
            parts = bounds.split(":")
            if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("log", "linear")):
                raise ParameterError(f"--space {entry!r}: expected {name}=LOW:HIGH or {name}=LOW:HIGH:log")
            try:
                low, high = (params[name].check(p) for p in parts[:2])
            except ParameterError as err:
                raise ParameterError(f"--space {entry!r}: {err}") from None
            scale = parts[2] if len(parts) == 3 else "linear"
            if low > high or (scale == "log" and low <= 0):
                need = "LOW <= HIGH" + (" and LOW > 0" if scale == "log" else "")
                raise ParameterError(f"--space {entry!r}: need {need}")
            axis = Axis(name, low, high, scale, axis.integer, axis.default)
        if name in LAYER_PARAMS and axis.high > info.num_layers - 1:
            raise ParameterError(
                f"--space {entry!r}: the model has {info.num_layers} layers (0..{info.num_layers - 1})"
            )
        axes.append(axis)
    if not axes:
        raise ParameterError(f"--space {text!r}: no parameter to search")
    return axes


def default_space(method: str) -> str:
    """The space searched when --space is not given: DEFAULT_SPACES, else every numeric parameter but the layer
    range and seeds."""
    from neverfade.methods import METHODS

    if method in DEFAULT_SPACES:
        return DEFAULT_SPACES[method]
    return ",".join(
        p.name for p in METHODS[method].params if p.type in (int, float) and p.name not in ("start", "end", "seed")
    )


def grid(axes: list[Axis], budget: int) -> list[dict[str, Any]]:
    """The largest balanced grid of at most `budget` points: points are added one axis at a time, to the axis with
    the fewest, while the product stays within the budget (an int axis has at most its number of values)."""
    counts = [1] * len(axes)
    while True:
        for i in sorted(range(len(axes)), key=lambda i: counts[i]):
            grown = counts[:i] + [counts[i] + 1] + counts[i + 1 :]
            if grown[i] <= axes[i].size() and math.prod(grown) <= budget:
                counts = grown
                break
        else:
            break
    values = [axis.points(n) for axis, n in zip(axes, counts)]
    return [dict(zip((a.name for a in axes), point)) for point in itertools.product(*values)]


def random_points(axes: list[Axis], budget: int, seed: int) -> list[dict[str, Any]]:
    """`budget` distinct points drawn independently per axis (uniform, or uniform in log), by `seed`; fewer when
    the space has fewer distinct points."""
    rng = np.random.default_rng(seed)
    points: list[dict[str, Any]] = []
    for _ in range(100 * budget):
        if len(points) == budget:
            break
        point = {a.name: a.draw(rng) for a in axes}
        if point not in points:
            points.append(point)
    return points


def trials(
    method: str, axes: list[Axis], budget: int, search: str, seed: int = 0, fixed: dict[str, Any] | None = None
) -> list[str]:
    """The method settings to try, as spec strings, in a fixed order (the first of equal scores wins)."""
    from neverfade.methods.spec import format_spec, parse_spec

    if budget < 1:
        raise ParameterError(f"--budget must be at least 1, got {budget}")
    points = grid(axes, budget) if search == "grid" else random_points(axes, budget, seed)
    specs = [format_spec([(method, {**(fixed or {}), **p})]) for p in points]
    for spec in specs:
        parse_spec(spec)  # every value within its parameter's bounds
    return specs


def select(scores: list[dict[str, float]], metric: str) -> int:
    """The index of the best scores by `metric` (a METRICS name); the first on a tie."""
    key, sign = METRICS[metric]
    return max(range(len(scores)), key=lambda i: (sign * scores[i][key], -i))


# ---- splits: the items to describe and how their captions are scored ----


class SceneSplit:
    """Synthetic scenes of the given seeds in a world ("default": `make_scene`; "hard": `make_hard_scene`, the
    testbed's), scored exactly (`neverfade.scenes.metrics`)."""

    kind = "scenes"

    def __init__(self, seeds: range, world: str = "default"):
        self.seeds, self.world = seeds, world
        from neverfade.data.samples import scene_items

        self.items = scene_items(seeds, world)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "world": self.world,
            "seeds": f"{self.seeds.start}..{self.seeds.stop - 1}",
            "n": len(self.items),
        }

    def point(self, items, captions: list[str]) -> dict[str, float]:
        from neverfade.scenes import scene_metrics

        metrics = scene_metrics(captions, _kinds(items))
        return {k: v for k, v in metrics.items() if k not in ("per_caption", "n")}

    def interval(self, items, captions: list[str], baseline: list[str] | None, n_boot: int) -> dict:
        from neverfade.scenes import bootstrap_ci

        return {k: list(v) for k, v in bootstrap_ci(captions, _kinds(items), baseline=baseline, n_boot=n_boot).items()}


def _kinds(items):
    from types import SimpleNamespace

    return [SimpleNamespace(kinds=set(it.meta["objects"])) for it in items]


class CocoSplit:
    """The images of a manifest, scored by CHAIR against the COCO 2014 annotations (metric names as the scenes')."""

    kind = "coco"
    NAMES = {
        "Precision": "precision",
        "Recall": "recall",
        "F1": "f1",
        "CHAIRi": "chair_i",
        "CHAIRs": "chair_s",
        "words": "words",
        "objects": "objects",
    }

    def __init__(self, manifest: str, truth):
        from neverfade.data.images import read_items
        from neverfade.eval.chair import image_id

        self.manifest, self.truth = manifest, truth
        self.items = read_items(manifest)
        missing = [it.id for it in self.items if image_id(it.id, {"image": it.image}) not in truth.objects]
        if missing:
            raise ValueError(f"{manifest}: {len(missing)} image(s) absent from the annotations (first: {missing[0]})")

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "manifest": self.manifest, "annotations": self.truth.files, "n": len(self.items)}

    def _counts(self, items, captions: list[str]) -> np.ndarray:
        from neverfade.eval import chair, chair_words

        vocabulary = getattr(self, "_vocabulary", None) or chair_words.Vocabulary()
        self._vocabulary = vocabulary
        rows = []
        for item, caption in zip(items, captions):
            truth = self.truth.objects[chair.image_id(item.id, {"image": item.image})]
            s = chair.score_caption(vocabulary, caption, truth)
            rows.append(
                [
                    1,
                    s["CHAIRs"],
                    len(s["mentioned"]),
                    len(s["hallucinated"]),
                    len(s["gt"]),
                    len(s["recalled"]),
                    s["words"],
                ]
            )
        return np.array(rows, float).reshape(-1, 7)

    def point(self, items, captions: list[str]) -> dict[str, float]:
        from neverfade import stats
        from neverfade.eval import chair

        return {self.NAMES[k]: v for k, v in stats.point(self._counts(items, captions), chair.metrics).items()}

    def interval(self, items, captions: list[str], baseline: list[str] | None, n_boot: int) -> dict:
        from neverfade import stats
        from neverfade.eval import chair

        ci = stats.bootstrap(
            self._counts(items, captions),
            chair.metrics,
            n=n_boot,
            baseline=None if baseline is None else self._counts(items, baseline),
        )
        return {self.NAMES[k]: v for k, v in ci.items()}


# ---- scoring the captions of runs on a split ----


def captions_of(records: list[dict], items, runs) -> tuple[list, dict[str, list[str]]]:
    """The items every run described without error, and each run's captions of them, in item order."""
    from neverfade.results import best_records
    from neverfade.runner import is_for, item_score

    best = best_records(records, item_score(items))
    ok = {
        run.id: {
            it.id: rec["caption"]
            for it in items
            if (rec := best.get((it.id, run.id))) is not None
            and is_for(rec, it)
            and rec.get("error") is None
            and rec.get("caption") is not None
        }
        for run in runs
    }
    common = [it for it in items if all(it.id in ok[run.id] for run in runs)]
    return common, {run.id: [ok[run.id][it.id] for it in common] for run in runs}


def dev_scores(split, records: list[dict], runs) -> tuple[int, list[dict[str, float]]]:
    """(scenes scored, each run's scores) on the dev split, over the items every run described."""
    common, captions = captions_of(records, split.items, runs)
    if not common:
        raise ValueError("no dev item was described by every trial; see the errors in the captions file")
    return len(common), [split.point(common, captions[run.id]) for run in runs]


def test_report(split, records: list[dict], baseline, tuned, n_boot: int, metric: str) -> dict[str, Any]:
    """The baseline and the tuned setting on the test split: their scores with 95% intervals, and the paired
    difference tuned - baseline with its 95% bootstrap interval over the same resampled items."""
    common, captions = captions_of(records, split.items, [baseline, tuned])
    if not common:
        raise ValueError("no test item was described by both settings; see the errors in the captions file")
    base, mine = captions[baseline.id], captions[tuned.id]
    scores = {name: split.point(common, c) for name, c in (("baseline", base), ("tuned", mine))}
    diff = {k: scores["tuned"][k] - scores["baseline"][k] for k in scores["tuned"]}
    diff_ci = split.interval(common, mine, base, n_boot)
    key = METRICS[metric][0]
    return {
        "n": len(common),
        "baseline": {"overall": scores["baseline"], "ci": split.interval(common, base, None, n_boot)},
        "tuned": {"overall": scores["tuned"], "ci": split.interval(common, mine, None, n_boot)},
        "difference": diff,
        "difference_ci": diff_ci,
        "bootstrap": {"n": n_boot, "level": 0.95, "over": "images, paired"},
        "verdict": _verdict(diff_ci[key], METRICS[metric][1]),
    }


def _verdict(interval, sign: int) -> str:
    low, high = interval
    if low > 0 or high < 0:
        return "better than the baseline" if (low > 0) == (sign > 0) else "worse than the baseline"
    return "not distinguishable from the baseline (the interval holds 0)"


# ---- the params file ----


def write_params(path: str | Path, data: dict[str, Any]) -> None:
    from neverfade.eval.report import write_json

    write_json(path, {"neverfade_params": PARAMS_FORMAT, **data})


def read_params(path: str | Path) -> dict[str, Any]:
    """A params file written by `neverfade tune`: its "method" is checked against the methods' parameters.
    ValueError (one line) for anything else."""
    from neverfade.methods.spec import parse_spec

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--params {path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--params {path}: not a params file ({err})") from None
    if (
        not isinstance(data, dict)
        or data.get("neverfade_params") != PARAMS_FORMAT
        or not isinstance(data.get("method"), str)
    ):
        raise ValueError(f"--params {path}: not a params file written by neverfade tune")
    try:
        parse_spec(data["method"])
    except ParameterError as err:
        raise ValueError(f"--params {path}: {err}") from None
    return data


def axes_json(axes: list[Axis]) -> list[dict[str, Any]]:
    return [{k: v for k, v in asdict(a).items() if k != "default"} for a in axes]
