"""`neverfade tune`: the search space from the methods' declared parameters, grid and random search, the disjoint
splits, the selection, resume after an interrupt, and the params file end to end on the embedded model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from neverfade import tune
from neverfade.cli import main
from neverfade.methods import METHODS, ParameterError
from neverfade.methods.spec import parse_spec
from neverfade.models.families import ModelInfo, family_of
from neverfade.results import read_records
from neverfade.scenes import HELD_OUT_SEEDS, TRAIN_SEED_START, make_scene, mentioned_objects
from neverfade.scenes.hard import HARD_TRAIN_SEED_START, make_hard_scene

INFO = ModelInfo(family_of("LlavaForConditionalGeneration"), 8, 0)  # a LLaVA-1.5 of 8 layers


def params_of(method):
    return {p.name: p for p in METHODS[method].params}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("search", ["grid", "random"])
def test_every_trial_is_within_the_declared_bounds_and_the_budget(method, search):
    axes = tune.parse_space(tune.default_space(method), method, INFO)
    declared = params_of(method)
    for budget in (1, 5, 12):
        specs = tune.trials(method, axes, budget, search, seed=1)
        assert 1 <= len(specs) <= budget
        assert len(set(specs)) == len(specs)
        for spec in specs:
            [(name, values)] = parse_spec(spec)  # parse_spec runs each Param's check
            assert name == method and set(values) == {a.name for a in axes}
            for axis in axes:
                p, v = declared[axis.name], values[axis.name]
                assert axis.low <= v <= axis.high
                assert p.minimum is None or v >= p.minimum
                assert p.maximum is None or v <= p.maximum
                assert isinstance(v, int) == (p.type is int)


def test_axes_follow_the_declared_parameters():
    sparc = {a.name: a for a in tune.parse_space("tau,alpha,beta,layer", "sparc", INFO)}
    assert (sparc["layer"].low, sparc["layer"].high, sparc["layer"].integer) == (0, 7, True)  # over the depth
    assert (sparc["beta"].low, sparc["beta"].high, sparc["beta"].scale) == (0.0, 1.0, "linear")  # [min, max]
    tau = sparc["tau"]  # the family's default (LLaVA-1.5: 1.5), a quarter to four times, log-spaced
    assert (tau.low, tau.high, tau.scale, tau.default) == (0.375, 6.0, "log", 1.5)
    assert sparc["layer"].default == round(20 * 8 / 32)  # the paper's layer at the same relative depth
    window = tune.parse_space("window", "locore", INFO)[0]
    assert (window.low, window.high, window.scale, window.integer) == (2, 32, "log", True)
    assert tune.grid([window], 5) == [{"window": w} for w in (2, 4, 8, 16, 32)]
    assert tune.parse_space("noise_step", "vcd", INFO)[0].high == 999


def test_space_overrides_and_their_errors():
    tau, alpha = tune.parse_space("tau=1:10:log, alpha=1.05:1.3", "sparc", INFO)
    assert (tau.low, tau.high, tau.scale) == (1.0, 10.0, "log")
    assert (alpha.low, alpha.high, alpha.scale) == (1.05, 1.3, "linear")
    assert [p["tau"] for p in tune.grid([tau], 3)] == [1.0, 3.162, 10.0]
    for bad, words in (
        ("gamma=1:2", "no parameter gamma"),
        ("beta=0:2", "<= 1"),
        ("tau=0:4:log", "LOW > 0"),
        ("layer=0:8", "8 layers"),
        ("tau=3:1", "LOW <= HIGH"),
        ("tau=1", "LOW:HIGH"),
        ("tau,tau", "twice"),
        ("cfg", "not a number"),
        ("", "no parameter"),
    ):
        with pytest.raises(ParameterError, match=words):
            tune.parse_space(bad, "sparc" if "cfg" not in bad else "pai", INFO)
    with pytest.raises(ParameterError, match="fixed"):
        tune.parse_space("tau", "sparc", INFO, fixed={"tau": 8.0})


def test_grid_is_balanced_and_spends_the_budget_random_is_seeded():
    axes = tune.parse_space(tune.DEFAULT_SPACES["sparc"], "sparc", INFO)
    eight = tune.grid(axes, 8)
    assert len(eight) == 8 and all(len({p[a.name] for p in eight}) == 2 for a in axes)  # 2 x 2 x 2
    assert len(tune.grid(axes[:2], 8)) == 8  # 4 x 2: the budget is used, not left at 3 x 2
    assert tune.grid(axes, 1) == [{"tau": 1.5, "alpha": 1.1, "layer": 5}]  # every default: the paper setting
    assert tune.grid(axes, 8) == eight
    drawn = tune.random_points(axes, 6, seed=3)
    assert drawn == tune.random_points(axes, 6, seed=3) != tune.random_points(axes, 6, seed=4)
    assert len(drawn) == 6 and len({json.dumps(p, sort_keys=True) for p in drawn}) == 6
    layer_only = tune.parse_space("layer=2:3", "sparc", INFO)
    assert tune.random_points(layer_only, 5, seed=0) in ([{"layer": 2}, {"layer": 3}], [{"layer": 3}, {"layer": 2}])
    assert tune.trials("sparc", layer_only, 5, "grid", fixed={"tau": 8.0}) == [
        "sparc:tau=8,layer=2",
        "sparc:tau=8,layer=3",
    ]


def test_dev_and_test_scenes_are_disjoint_and_never_trained_on():
    train_log = json.loads((__import__("neverfade").scenes.embedded_model_path() / "training_log.json").read_text())
    first_trained = int(train_log["train_seeds"].split("..")[0])
    dev, test = set(tune.DEV_SEEDS), set(HELD_OUT_SEEDS)
    assert not dev & test
    assert max(dev) < min(first_trained, TRAIN_SEED_START, 997_000)  # 997_000..999_999: the tokenizer's captions
    assert max(dev) < HARD_TRAIN_SEED_START  # the testbed's training scenes
    a, b = tune.SceneSplit(tune.DEV_SEEDS[:3]), tune.SceneSplit(HELD_OUT_SEEDS[:3])
    assert not {it.id for it in a.items} & {it.id for it in b.items}
    assert a.items[0].meta["objects"] == sorted(make_scene(10_000).kinds)
    hard = tune.SceneSplit(range(0, 1), "hard")  # the testbed's world: its own images, never the default world's
    assert hard.items[0].meta["objects"] == sorted(make_hard_scene(0).kinds) and hard.items[0].image != b.items[0].image


class StubSplit:
    """Scores a caption by the number written in it: precision = recall = f1 = chair_i = mean of them."""

    def __init__(self, n):
        self.items = [SimpleNamespace(id=f"i{k}", image=f"/x/i{k}.png", prompt=None) for k in range(n)]

    def point(self, items, captions):
        v = sum(float(c) for c in captions) / len(captions)
        return dict(precision=v, recall=v, f1=v, chair_i=v, chair_s=v, words=1.0)


def test_selection_takes_the_best_dev_trial_by_the_metric():
    split = StubSplit(3)
    runs = [SimpleNamespace(id=f"run{k}") for k in range(4)]
    means = [0.5, 0.9, 0.2, 0.9]
    records = [
        {
            "id": it.id,
            "run": run.id,
            "image": it.image,
            "prompt": None,
            "error": None,
            "caption": str(m + (k - 1) * 0.01),
        }
        for run, m in zip(runs, means)
        for k, it in enumerate(split.items)
    ]
    records.append({**records[0], "caption": None, "error": "boom", "id": "i9"})  # an unknown item: ignored
    n, scores = tune.dev_scores(split, records, runs)
    assert n == 3 and [s["f1"] for s in scores] == pytest.approx(means)
    assert tune.select(scores, "f1") == 1  # the first of the two best
    assert tune.select(scores, "chairi") == 2  # lower is better
    assert tune.select([{"recall": 0.1}, {"recall": 0.3}], "recall") == 1
    records[-2] = {**records[-2], "caption": None, "error": "out of memory"}  # run3 failed on i2: i2 is left out
    n, scores = tune.dev_scores(split, records, runs)
    assert n == 2 and scores[0]["f1"] == pytest.approx(0.495)


def test_coco_split_scores_by_chair_and_the_manifests_must_be_disjoint(tmp_path, monkeypatch, capsys):
    from eval_fixtures import write_coco, write_jsonl
    from test_eval_chair import CAPTIONS, TRAIN, VAL

    from neverfade.eval.chair import GroundTruth

    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path / "cache"))
    root = write_coco(tmp_path / "ann", VAL)
    write_coco(root, TRAIN, split="train")
    scored = [c for c in CAPTIONS if c["caption"]]
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"id": c["id"], "image": f"{c['id']}.jpg"} for c in scored])
    split = tune.CocoSplit(str(dev), GroundTruth.from_coco(root))
    captions = [c["caption"] for c in scored]
    point = split.point(split.items, captions)  # the values test_eval_chair checked by hand
    assert point["chair_s"] == pytest.approx(3 / 5) and point["chair_i"] == pytest.approx(4 / 14)
    assert point["recall"] == pytest.approx(10 / 11) and point["f1"] == pytest.approx(0.8)
    assert set(split.interval(split.items, captions, captions, 50)["f1"]) == {0.0}  # paired with itself
    test = write_jsonl(tmp_path / "test.jsonl", [{"id": "3", "image": "3.jpg"}])
    args = ["tune", "--method", "sparc", "--annotations", str(root), "--out", str(tmp_path / "t")]
    assert main([*args, "--dev-manifest", str(dev), "--test-manifest", str(test)]) == 2
    assert "share 1 image(s)" in capsys.readouterr().err
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"id": "77", "image": "77.jpg"}])
    assert main([*args, "--dev-manifest", str(dev), "--test-manifest", str(unknown)]) == 2
    assert "absent from the annotations" in capsys.readouterr().err


# ---- end to end on the embedded model, interrupted once ----

ARGS = [
    "tune",
    "--method",
    "sparc:beta=0.2",
    "--space",
    "tau=2:32:log",
    "--budget",
    "2",
    "--dev-scenes",
    "4",
    "--test-scenes",
    "4",
    "--max-new-tokens",
    "64",
    "--batch-size",
    "4",
    "--bootstrap",
    "200",
]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    from neverfade.api import Captioner

    out = tmp_path_factory.mktemp("tune") / "sparc"
    args = ARGS + ["--out", str(out)]
    images = []
    original = Captioner.caption

    def counting(self, batch, *a, **k):
        if stop_at and len(images) == stop_at:
            raise KeyboardInterrupt
        images.append(len(batch))
        return original(self, batch, *a, **k)

    mp = pytest.MonkeyPatch()
    mp.setattr(Captioner, "caption", counting)
    try:
        stop_at = 2  # killed while describing the third batch: two batches (2 of the 3 dev runs) are done
        assert main(args) == 130
        first = list(images)
        stop_at = None
        images.clear()
        assert main(args) == 0
        second = list(images)
        images.clear()
        params = json.loads((out / "params.json").read_text())
        assert main(args) == 0  # everything done: nothing is described again, the same choice
        third = list(images)
    finally:
        mp.undo()
    return SimpleNamespace(
        out=out,
        first=first,
        second=second,
        third=third,
        params=params,
        again=json.loads((out / "params.json").read_text()),
    )


def test_resume_describes_only_what_was_not_finished(tuned):
    assert tuned.first == [4, 4]
    assert tuned.second == [4, 4, 4]  # the third dev run, then the test split's baseline and tuned setting
    assert tuned.third == []
    assert tuned.again["method"] == tuned.params["method"] and tuned.again["test"] == tuned.params["test"]
    records = read_records(tuned.out / "captions.jsonl")
    assert len(records) == 4 * 3 + 4 * 2 and len({(r["id"], r["run"]) for r in records}) == len(records)


def recount(captions: list[str], seeds: list[int]) -> dict:
    mentioned = correct = present = 0
    for caption, seed in zip(captions, seeds):
        said, kinds = mentioned_objects(caption), make_scene(seed).kinds
        mentioned, correct, present = mentioned + len(said), correct + len(said & kinds), present + len(kinds)
    precision = correct / mentioned if mentioned else 1.0
    recall = correct / present
    return dict(
        precision=precision,
        recall=recall,
        f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0,
    )


def test_params_file_is_consistent_with_the_captions(tuned):
    p = tuned.params
    records = read_records(tuned.out / "captions.jsonl")
    by_setting: dict[str, dict[str, str]] = {}
    for r in records:
        key = "+".join(f"{m['name']}:tau={m['params']['tau']},beta={m['params']['beta']}" for m in r["methods"])
        by_setting.setdefault(key or "baseline", {})[r["id"]] = r["caption"]
    dev_ids = [f"scene-{s:05d}" for s in range(10_000, 10_004)]
    test_ids = [f"scene-{s:05d}" for s in range(4)]
    assert (p["dev"]["seeds"], p["test"]["seeds"]) == ("10000..10003", "0..3")
    assert p["search"]["trials"] == 2 and [t["method"] for t in p["dev"]["trials"]] == [
        "sparc:beta=0.2,tau=2",
        "sparc:beta=0.2,tau=32",
    ]
    for trial in p["dev"]["trials"]:
        tau = parse_spec(trial["method"])[0][1]["tau"]
        captions = by_setting[f"sparc:tau={tau},beta=0.2"]
        assert trial["scores"]["f1"] == pytest.approx(
            recount([captions[i] for i in dev_ids], list(range(10_000, 10_004)))["f1"]
        )
    best = max(range(2), key=lambda i: (p["dev"]["trials"][i]["scores"]["f1"], -i))
    assert p["dev"]["chosen"] == best and p["method"] == p["dev"]["trials"][best]["method"]
    assert p["values"] == {"tau": parse_spec(p["method"])[0][1]["tau"]} and p["methods"][0]["params"]["beta"] == 0.2
    tuned_captions = by_setting[f"sparc:tau={p['values']['tau']},beta=0.2"]
    for name, captions in (("baseline", by_setting["baseline"]), ("tuned", tuned_captions)):
        expected = recount([captions[i] for i in test_ids], list(range(4)))
        for metric, value in expected.items():
            assert p["test"][name]["overall"][metric] == pytest.approx(value)
    for metric, diff in p["test"]["difference"].items():
        assert diff == pytest.approx(p["test"]["tuned"]["overall"][metric] - p["test"]["baseline"]["overall"][metric])
        low, high = p["test"]["difference_ci"][metric]
        assert low <= diff + 1e-12 and diff - 1e-12 <= high
    assert p["metric"] == "f1" and p["model_name"] == "neverfade-embedded" and p["generate"]["max_new_tokens"] == 64
    assert p["command"].startswith("neverfade tune --method sparc:beta=0.2 --budget 2")


def test_params_file_feeds_caption_and_refuses_a_conflicting_method(tuned, tmp_path, capsys):
    params = str(tuned.out / "params.json")
    out = tmp_path / "c.jsonl"
    assert main(["caption", "--samples", "1", "--params", params, "--max-new-tokens", "3", "--out", str(out)]) == 0
    [record] = read_records(out)
    assert record["methods"] == tuned.params["methods"]
    scores = tmp_path / "s.json"
    assert (
        main(
            [
                "eval",
                "scenes",
                "--n",
                "2",
                "--max-new-tokens",
                "3",
                "--bootstrap",
                "10",
                "--params",
                params,
                "--out",
                str(scores),
            ]
        )
        == 0
    )
    runs = json.loads(scores.read_text())["runs"]
    assert list(runs) == ["baseline", tuned.params["method"]]
    assert runs[tuned.params["method"]]["methods"] == tuned.params["methods"]
    capsys.readouterr()
    assert main(["caption", "--samples", "1", "--params", params, "--method", "sparc:tau=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "conflicts with --params" in err and len(err.splitlines()) == 1
    assert main(["bench", "--params", params, "--method", "naive"]) == 2
    assert main(["caption", "--samples", "1", "--params", str(tuned.out / "captions.jsonl")]) == 2
    assert "not a params file" in capsys.readouterr().err


def test_bad_tune_arguments_are_one_line_errors(tmp_path, capsys):
    for args, words in (
        (["--method", "sparc+locore"], "one method"),
        (["--method", "sparc", "--budget", "0"], "budget"),
        (["--method", "sparc", "--dev-scenes", "10001"], "--dev-scenes"),
        (["--method", "sparc", "--dev-manifest", "x.jsonl"], "together"),
    ):
        assert main(["tune", *args, "--out", str(tmp_path / "t")]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_deal_the_trials_and_give_the_records_and_choice_of_one_process(tuned, tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "two"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "localhost:0",
        "-m",
        "neverfade",
        *ARGS,
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 1 of 2: 1 of 3 (setting, batch) pairs left" in proc.stderr  # dev: one of the three settings
    assert "rank 1 of 2: 1 of 2 (setting, batch) pairs left" in proc.stderr  # test: the baseline or the tuned one

    def essentials(folder):
        return sorted((r["id"], r["run"], r["caption"]) for r in read_records(folder / "captions.jsonl"))

    assert essentials(out) == essentials(tuned.out)
    assert not (out / "captions.jsonl.parts").exists()  # merged
    two = json.loads((out / "params.json").read_text())
    assert {k: two[k] for k in ("method", "values", "dev", "test")} == {
        k: tuned.params[k] for k in ("method", "values", "dev", "test")
    }
