"""`neverfade eval scenes` on 50 held-out scenes with the embedded model: assertions on the evaluator, not on which
method wins."""

import json

import pytest

from neverfade.cli import main
from neverfade.results import read_records
from neverfade.scenes import make_scene, mentioned_objects

RUNS = ["baseline", "sparc", "naive", "locore"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("scenes") / "scenes.json"
    args = [
        "eval",
        "scenes",
        "--n",
        "50",
        "--max-new-tokens",
        "96",
        "--batch-size",
        "25",
        "--bootstrap",
        "300",
        "--out",
        str(out),
    ] + [a for r in RUNS for a in ("--run", r)]
    assert main(args) == 0
    return out, json.loads(out.read_text()), args


def test_scores_equal_a_plain_recount_of_the_captions(report):
    out, data, _ = report
    records = read_records(str(out).replace(".json", ".captions.jsonl"))
    assert data["n_scenes"] == 50 and list(data["runs"]) == RUNS
    for label, result in data["runs"].items():
        mine = [
            r for r in records if "+".join(m["name"] for m in r["methods"]) == (label if label != "baseline" else "")
        ]
        assert len(mine) == 50
        mentioned = correct = present = 0
        for r in mine:
            kinds = make_scene(int(r["id"].split("-")[1])).kinds
            said = mentioned_objects(r["caption"])
            mentioned, correct, present = mentioned + len(said), correct + len(said & kinds), present + len(kinds)
        precision = correct / mentioned if mentioned else 1.0
        recall = correct / present
        overall = result["overall"]
        assert overall["precision"] == pytest.approx(precision)
        assert overall["recall"] == pytest.approx(recall)
        assert overall["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_intervals_attention_and_pairing(report):
    _, data, _ = report
    for label, result in data["runs"].items():
        for metric in ("precision", "recall", "f1", "chair_i", "chair_s"):
            low, high = result["ci"][metric]
            assert low <= result["overall"][metric] <= high
        shares = result["attention_by_position"]
        assert all(0 < shares[b] < 1 for b in ("1-16", "17-32", "33-64", "65-128"))
        assert shares["129-256"] is None  # no caption is longer than 96 tokens
        assert ("vs_baseline_ci" in result) == ("vs_baseline" in result) == (label != "baseline")
        assert len(result["profile"]["by_quarter"]) == 4 and len(result["profile"]["by_rank"]) == 5
        assert set(result["late_objects"]) >= {"precision_after_object_2", "precision_after_object_4"}


def test_rerun_resumes_without_captioning_again(report, capsys):
    out, data, args = report
    captions = str(out).replace(".json", ".captions.jsonl")
    before = len(read_records(captions))
    assert main(args) == 0
    assert len(read_records(captions)) == before == 200
    assert json.loads(out.read_text())["runs"]["sparc"]["overall"] == data["runs"]["sparc"]["overall"]


def test_shards_split_the_batches_and_the_plain_run_scores_them(report, tmp_path, capsys):
    """Two --shard processes describe alternate batches into part files and score nothing; the run without --shard
    then describes nothing new, folds the parts in and scores as one process did."""
    from neverfade.results import part_files

    _, data, args = report
    out, captions = tmp_path / "s.json", tmp_path / "s.captions.jsonl"
    runs = ["baseline", "naive"]
    base = [a for a in args[: args.index("--out")]] + ["--out", str(out)] + [a for r in runs for a in ("--run", r)]
    for k in (0, 1):
        assert main(base + ["--shard", f"{k}/2"]) == 0
    assert not out.exists()
    parts = part_files(captions)
    assert [p.name for p in parts] == ["rank-00000-of-00002.jsonl", "rank-00001-of-00002.jsonl"]
    for k, part in enumerate(parts):  # batch k of 25 scenes, both runs
        ids = {int(r["id"].split("-")[1]) for r in read_records(part)}
        assert len(read_records(part)) == 50 and ids == set(range(25 * k, 25 * k + 25))
    capsys.readouterr()
    assert main(base) == 0
    assert "resuming: 100 records already done" in capsys.readouterr().err  # every (scene, run) of 50 x 2
    assert len(read_records(captions)) == 100 and part_files(captions) == []
    scored = json.loads(out.read_text())["runs"]
    for label in runs:
        assert scored[label]["overall"] == data["runs"][label]["overall"]


def test_score_only_scores_the_scenes_described_and_describes_none(report, tmp_path, capsys):
    _, _, args = report
    out, captions = tmp_path / "p.json", tmp_path / "p.captions.jsonl"
    base = [a for a in args[: args.index("--out")]] + ["--out", str(out), "--run", "baseline", "--run", "naive"]
    assert main(base + ["--score-only"]) == 2  # nothing described yet
    assert "nothing to score" in capsys.readouterr().err
    assert main(base + ["--shard", "1/2"]) == 0  # scenes 25..49 only
    assert main(base + ["--score-only"]) == 0
    assert len(read_records(captions)) == 50
    scored = json.loads(out.read_text())
    assert scored["n_scenes"] == 25
    recount = [r for r in read_records(captions) if not r["methods"]]
    said = sum(len(mentioned_objects(r["caption"])) for r in recount)
    right = sum(len(mentioned_objects(r["caption"]) & make_scene(int(r["id"].split("-")[1])).kinds) for r in recount)
    assert scored["runs"]["baseline"]["overall"]["precision"] == pytest.approx(right / said)


def test_a_shard_refuses_while_a_plain_run_holds_the_captions(tmp_path):
    from neverfade.results import Locked, lock

    path = tmp_path / "c.jsonl"
    with lock(path, shared=True), lock(path, shared=True), pytest.raises(Locked):  # shards share it, a plain run not
        lock(path)
    with lock(path), pytest.raises(Locked):
        lock(path, shared=True)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b"])
def test_bad_shard(text, capsys):
    assert main(["eval", "scenes", "--n", "2", f"--shard={text}"]) == 2
    assert "--shard" in capsys.readouterr().err


def test_run_specs_carry_values():
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_run

    assert parse_run("sparc:tau=8,alpha=1.2+locore", {"locore": {"beta": 0.3}}) == (
        ["sparc", "locore"],
        {"sparc": {"tau": "8", "alpha": "1.2"}, "locore": {"beta": 0.3}},
    )
    with pytest.raises(ParameterError, match="expected name=value"):
        parse_run("sparc:tau", {})


# Two hand-made scenes, three runs. Every caption has 8 words ("here" pads), so word i is in quarter i // 2.
# Scene A holds cat, ball, tree; scene B cup, clock. Default-world priors: cat -> ball, cup -> spoon, clock -> lamp.
HAND = {
    "baseline": ["a cat and a ball near a fish", "one cup one moon and one star here"],
    "tuned": ["a cat and a ball and a tree", "a cup and a clock and a lamp"],
    "oracle": ["a cat and a ball and a tree", "a cup and a clock here here here"],
}


@pytest.fixture(scope="module")
def hand_report():
    from types import SimpleNamespace

    from neverfade.eval.scenes import evaluate

    items = [
        SimpleNamespace(id="A", meta={"objects": ["ball", "cat", "tree"]}),
        SimpleNamespace(id="B", meta={"objects": ["clock", "cup"]}),
    ]
    runs = [SimpleNamespace(id=label, described=[] if label == "baseline" else [{"name": label}]) for label in HAND]
    records = [{"id": it.id, "run": label, "caption": c} for label, cs in HAND.items() for it, c in zip(items, cs)]
    return evaluate(records, items, runs, list(HAND), n_boot=200)


def test_paired_difference_from_the_baseline(hand_report):
    # baseline: 6 named, 3 wrong (fish; moon, star), 3 of 5 present found: P 1/2, R 3/5, F1 6/11; both scenes wrong
    # tuned: 6 named, 1 wrong (lamp), 5 of 5 found: P 5/6, R 1, F1 10/11, CHAIRi 1/6; one scene of two wrong
    runs = hand_report["runs"]
    assert "vs_baseline" not in runs["baseline"] and "vs_baseline_ci" not in runs["baseline"]
    diff = runs["tuned"]["vs_baseline"]
    assert diff["f1"] == pytest.approx(10 / 11 - 6 / 11)
    assert diff["chair_i"] == pytest.approx(1 / 6 - 1 / 2)
    assert diff["chair_s"] == pytest.approx(1 / 2 - 1)
    for metric in ("f1", "chair_i", "chair_s"):
        low, high = runs["tuned"]["vs_baseline_ci"][metric]
        assert low <= high


def test_hallucination_by_quarter_rank_and_late_objects(hand_report):
    base, tuned = hand_report["runs"]["baseline"], hand_report["runs"]["tuned"]
    # baseline first mentions (word, quarter, rank): A cat 1 Q1 1st, ball 4 Q3 2nd, fish 7 Q4 3rd (wrong);
    # B cup 1 Q1 1st, moon 3 Q2 2nd (wrong), star 6 Q4 3rd (wrong)
    assert base["profile"]["by_quarter"] == [0.0, 100.0, 0.0, 100.0]
    assert base["profile"]["by_quarter_counts"] == [[0, 2], [1, 1], [0, 1], [2, 2]]
    assert base["profile"]["by_rank"] == [0.0, 50.0, 100.0, None, None]
    late = base["late_objects"]
    assert (late["precision_after_object_2"], late["named_after_object_2"]) == (0.0, 2)  # fish, star
    assert (late["precision_after_object_4"], late["named_after_object_4"]) == (None, 0)
    assert (late["precision_second_half"], late["named_second_half"]) == (pytest.approx(100 / 3, abs=0.01), 3)
    # tuned: A cat Q1, ball Q3, tree Q4; B cup Q1, clock Q3, lamp Q4 (wrong, 3rd)
    assert tuned["profile"]["by_quarter"] == [0.0, None, 0.0, 50.0]
    assert tuned["late_objects"]["precision_after_object_2"] == 50.0
    assert tuned["late_objects"]["precision_second_half"] == 75.0
    # co-occurrence: the baseline's fish, moon, star pair with nothing present; tuned's lamp pairs with clock
    assert base["profile"]["cooccurrence"] == 0.0
    assert tuned["profile"]["cooccurrence"] == 100.0
    assert hand_report["runs"]["oracle"]["profile"]["cooccurrence"] is None


def test_late_objects_after_the_fourth():
    from types import SimpleNamespace

    from neverfade.eval.scenes import late_objects
    from neverfade.scenes.profile import hallucination_profile

    # six words, six objects; fish (5th) is wrong; quarters by i/6: house 3/6 Q3, fish 4/6 Q3, car 5/6 Q4
    scene = SimpleNamespace(kinds={"cat", "ball", "tree", "house", "car"})
    late = late_objects(hallucination_profile(["cat ball tree house fish car"], [scene], lambda kind: set()))
    assert (late["precision_after_object_4"], late["named_after_object_4"]) == (50.0, 2)  # fish, car
    assert (late["precision_after_object_2"], late["named_after_object_2"]) == (75.0, 4)  # tree, house, fish, car
    assert late["precision_second_half"] == pytest.approx(200 / 3, abs=0.01)  # house, fish, car


def test_report_prints_the_difference_and_the_profile(hand_report):
    from neverfade.eval.scenes import format_report

    text = format_report(hand_report)
    after = text.split("difference from the baseline")[1].splitlines()
    row = next(line for line in after if line.startswith("tuned "))
    assert row.split()[1:] == ["36.36", "-33.33", "-50.00"]  # F1 +4/11, CHAIRi -1/3, CHAIRs -1/2, in points
    assert not any(line.startswith("baseline ") for line in after[: after.index("")])
    quarters = text.split("by quarter of the caption's words")[1].splitlines()
    assert next(line for line in quarters if line.startswith("baseline ")).split()[1:5] == [
        "0.00",
        "100.00",
        "0.00",
        "100.00",
    ]
    late = text.split("real share of the objects named late")[1].splitlines()
    assert next(line for line in late if line.startswith("oracle ")).split()[-2:] == ["n/a", "n/a"]


def test_world_partners():
    from neverfade.data.samples import world_partners

    assert world_partners("default")("cup") == {"spoon"} and world_partners("default")("sun") == set()
    assert world_partners("hard")("cup") == {"spoon", "apple", "clock"}  # the breakfast theme
