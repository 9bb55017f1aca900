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
        assert ("vs_baseline_ci" in result) == (label != "baseline")


def test_rerun_resumes_without_captioning_again(report, capsys):
    out, data, args = report
    captions = str(out).replace(".json", ".captions.jsonl")
    before = len(read_records(captions))
    assert main(args) == 0
    assert len(read_records(captions)) == before == 200
    assert json.loads(out.read_text())["runs"]["sparc"]["overall"] == data["runs"]["sparc"]["overall"]


def test_run_specs_carry_values():
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_run

    assert parse_run("sparc:tau=8,alpha=1.2+locore", {"locore": {"beta": 0.3}}) == (
        ["sparc", "locore"],
        {"sparc": {"tau": "8", "alpha": "1.2"}, "locore": {"beta": 0.3}},
    )
    with pytest.raises(ParameterError, match="expected name=value"):
        parse_run("sparc:tau", {})
