"""The method-spec grammar (neverfade.methods.spec), shared by caption, eval, bench and the demo; the library does
not import the command line."""

import ast
import json
import re
from pathlib import Path

import pytest

from neverfade.cli import build_parser, main
from neverfade.commands.options import method_choice, method_settings
from neverfade.errors import UserError
from neverfade.methods import ParameterError
from neverfade.methods.spec import format_spec, label, parse_spec, setting, split_list


def test_parse_types_values_with_the_methods_params():
    assert parse_spec("sparc:tau=8,alpha=1.2+locore") == [("sparc", {"tau": 8.0, "alpha": 1.2}), ("locore", {})]
    assert parse_spec("pai:cfg=true,cfg-cutoff=0.5+opera:num_beams=3") == [
        ("pai", {"cfg": True, "cfg_cutoff": 0.5}),
        ("opera", {"num_beams": 3}),
    ]
    assert parse_spec("baseline") == []
    assert setting(parse_spec("baseline")) == (["baseline"], {})
    assert setting(parse_spec("sparc:tau=8+locore")) == (["sparc", "locore"], {"sparc": {"tau": 8.0}})


@pytest.mark.parametrize(
    "text",
    [
        "baseline",
        "sparc",
        "sparc:tau=8,alpha=1.2+locore",
        "naive+locore:beta=0.3,window=4",
        "pai:cfg=true,cfg_cutoff=0.05",
        "opera:num_beams=3",
        "vcd:alpha=0.5,seed=7",
    ],
)
def test_format_is_the_inverse_of_parse(text):
    spec = parse_spec(text)
    assert format_spec(spec) == text
    assert parse_spec(format_spec(spec)) == spec


def test_format_reads_back_any_value():
    spec = [("sparc", {"tau": 1e20, "alpha": 1.0000001, "beta": 0.0}), ("pai", {"cfg": False})]
    assert parse_spec(format_spec(spec)) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("magic", "unknown method 'magic'; known: baseline, "),
        ("sparc:tua=1", "sparc has no parameter tua; it has alpha, "),
        ("sparc:tau=-1", "sparc: tau must be >= 0"),
        ("sparc:tau=abc", "sparc: tau must be a float, got 'abc'"),
        ("sparc:tau=nan", "tau must be a finite number"),
        ("opera:num_beams=2.5", "num_beams must be a int"),
        ("pai:cfg=maybe", "cfg must be true or false"),
        ("sparc:tau", "expected name=value, got 'tau'"),
        ("sparc+", "a method name is missing"),
        ("sparc+sparc", "sparc is listed twice"),
        ("sparc:tau=1,tau=2", "tau is given twice"),
        ("baseline:tau=1", "baseline takes no parameters"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(text, message):
    with pytest.raises(ParameterError, match=re.escape(message)):
        parse_spec(text)


def test_sugar_merges_and_must_agree():
    sugar = {"sparc": {"tau": 8.0}, "locore": {"beta": 0.3}}
    assert parse_spec("sparc+naive", sugar) == [("sparc", {"tau": 8.0}), ("naive", {})]
    assert parse_spec("sparc:tau=8.0,alpha=1.3", sugar) == [("sparc", {"tau": 8.0, "alpha": 1.3})]  # same value: fine
    with pytest.raises(ParameterError, match="sparc tau is 4 in 'sparc:tau=4' but 8.0 from --sparc-tau; give it once"):
        parse_spec("sparc:tau=4", sugar)


def parsed(*argv):
    return build_parser(list(argv)).parse_args(list(argv))


def test_caption_flags_compose_specs_and_sugar():
    args = parsed("caption", "x.png", "--method", "sparc:tau=8", "--method", "locore", "--locore-beta", "0.2")
    assert method_choice(args) == (["sparc", "locore"], {"sparc": {"tau": 8.0}, "locore": {"beta": 0.2}})
    args = parsed("caption", "x.png", "--method", "sparc:tau=8+locore", "--sparc-tau", "8")
    assert method_choice(args) == (["sparc", "locore"], {"sparc": {"tau": 8.0}})
    assert method_choice(parsed("caption", "x.png")) == (["baseline"], {})
    # a flag of a method not chosen stays, for build_methods to refuse ("not among the methods used")
    assert method_choice(parsed("caption", "x.png", "--sparc-tau", "2")) == (["baseline"], {"sparc": {"tau": 2.0}})
    with pytest.raises(UserError, match="give it once"):
        method_choice(parsed("caption", "x.png", "--method", "sparc:tau=8", "--sparc-tau", "4"))


def test_each_eval_run_gets_the_flags_of_its_methods():
    args = parsed("eval", "scenes", "--sparc-tau", "8")
    assert method_settings(args, ["baseline", "sparc", "sparc:alpha=1.3+locore"], "--run") == [
        (["baseline"], {}),
        (["sparc"], {"sparc": {"tau": 8.0}}),
        (["sparc", "locore"], {"sparc": {"tau": 8.0, "alpha": 1.3}}),
    ]
    with pytest.raises(UserError, match="parameters given for sparc, which no --run uses"):
        method_settings(args, ["baseline", "locore"], "--run")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["caption", "--samples", "1", "--method", "sparc:tau=8", "--sparc-tau", "4"], "give it once"),
        (
            ["caption", "--samples", "1", "--method", "vcd", "--method", "pai:cfg=true"],
            "vcd and pai each choose tokens",
        ),
        (["caption", "--samples", "1", "--method", "sparc:tua=8"], "sparc has no parameter tua"),
        (["eval", "scenes", "--run", "sparc:tau=x"], "sparc: tau must be a float"),
        (
            ["eval", "pope", "answer", "q.jsonl", "--images", ".", "--out", "OUT", "--method", "magic"],
            "unknown method 'magic'",
        ),
        (["bench", "--device", "cpu", "--method", "sparc:tau"], "expected name=value"),
    ],
)
def test_commands_refuse_a_bad_spec_in_one_line_before_loading(argv, message, capsys, tmp_path):
    if "pope" in argv:
        question = {"question_id": 1, "image": "a.jpg", "text": "Is there a cat?", "label": "yes"}
        (tmp_path / "q.jsonl").write_text(json.dumps(question) + "\n")
        argv = [str(tmp_path / a) if a in ("q.jsonl", "OUT") else a for a in argv]
    status = main(argv + ["--model", "/nonexistent-model-folder"] * ("bench" not in argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and message in err[0], err


def test_the_demo_takes_the_same_specs():
    from neverfade.demo.server import DemoApp, RequestError

    assert split_list("baseline,sparc:tau=8,alpha=1.2+locore,pai:cfg=true") == [
        "baseline",
        "sparc:tau=8,alpha=1.2+locore",
        "pai:cfg=true",
    ]
    app = DemoApp(None, {"sparc": {"tau": 8.0}})
    assert app.settings("baseline,sparc locore,naive:alpha=1.5,start=3") == [  # "+" unencoded arrives as a space
        ("baseline", ["baseline"], {}),
        ("sparc+locore", ["sparc", "locore"], {"sparc": {"tau": 8.0}}),
        ("naive:alpha=1.5,start=3", ["naive"], {"naive": {"alpha": 1.5, "start": 3}}),
    ]
    with pytest.raises(RequestError, match="give it once"):
        app.settings("sparc:tau=2")


# Run ids computed by the code before the grammar moved here (eval.scenes.parse_run, values as written): a record's
# "run" key, which resume matches, must not change for a setting written as before.
RUN_IDS = {
    "baseline": "6bd5e3943fa8",
    "sparc": "972e4b780d0d",
    "sparc:tau=8": "3c3a21eecb32",
    "sparc:tau=8,alpha=1.2+locore": "9bc1d8299e4d",
    "naive+locore:beta=0.3,window=4": "221aab521944",
    "pai:cfg=true": "c4da6f0471cb",
    "opera:num_beams=3": "5eed1f3fc4b7",
}


def test_run_ids_and_labels_are_as_before():
    import neverfade
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.runner import prepare_runs

    captioner = neverfade.load(None, device="cpu")
    generate = dict(max_new_tokens=256, do_sample=False)
    specs = [parse_spec(text) for text in RUN_IDS]
    runs = prepare_runs(captioner, [setting(s) for s in specs], DEFAULT_PROMPT, generate)
    assert {text: run.id for text, run in zip(RUN_IDS, runs)} == RUN_IDS
    assert [run.label for run in runs] == [label(s) for s in specs]
    flags = parsed("caption", "x", "--method", "sparc", "--sparc-tau", "8")
    [flagged] = prepare_runs(captioner, [method_choice(flags)], DEFAULT_PROMPT, generate)
    assert flagged.id == RUN_IDS["sparc:tau=8"]


def test_the_library_never_imports_the_command_line():
    root = Path(__file__).resolve().parent.parent / "neverfade"
    wrong = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if relative in ("cli.py", "__main__.py") or relative.startswith("commands/"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            wrong += [
                f"{relative}: {n}"
                for n in names
                if n.split(".")[0] == "argparse" or n.startswith(("neverfade.cli", "neverfade.commands"))
            ]
    assert wrong == []
