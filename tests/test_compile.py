"""`compile=True` (--compile): the static loop's decode step compiled by torch.compile (inductor on a CPU here; on
CUDA the captured graph replays the compiled kernels, which `neverfade bench --compile --check` checks there).

Compiling takes tens of seconds on two cores when inductor's cache is cold, so this module is marked slow
(tests/conftest.py); CI runs it. Its inductor cache is kept beside pytest's temporary folders, so a second local run
finds the kernels compiled."""

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import neverfade
from neverfade.cli import main
from neverfade.decoding.captured import CompileRefused, StaticLoop, inductor_cache_dir
from tests.conftest import make_images

STEPS = 6
SETTINGS = [([], None), (["sparc"], {"sparc": {"tau": 0.05, "alpha": 1.5}})]


@pytest.fixture(scope="module", autouse=True)
def inductor_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp().parent / "neverfade-inductor"))
        yield


def _tokens(c, inputs):
    with torch.no_grad():
        out = c.generate(**inputs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    return out[:, -STEPS:]


@pytest.mark.parametrize("methods,params", SETTINGS, ids=["baseline", "sparc"])
def test_compiled_step_gives_the_uncompiled_tokens(tiny_models, methods, params):
    from torch._dynamo.utils import counters

    c = neverfade.load(tiny_models["llava"], device="cpu", methods=methods, method_params=params)
    inputs = c.inputs(make_images())
    eager = _tokens(c, inputs)  # generate's own loop: neither the static loop nor compiled
    c.decode = "static"
    static = _tokens(c, inputs)
    c.decode, c.compile = "auto", True
    assert c.decode_path() == "static"  # on a CPU, compile takes the static loop
    graphs = counters["stats"]["unique_graphs"]
    compiled = _tokens(c, inputs)
    loop = c.model._neverfade_last_loop
    assert isinstance(loop, StaticLoop) and loop.compile and loop.compile_s > 0
    assert counters["stats"]["unique_graphs"] == graphs + 1, "one graph, compiled once for every decode step"
    assert len(set(map(tuple, eager.tolist()))) > 1, "the images must give different outputs"
    assert torch.equal(compiled, eager) and torch.equal(compiled, static)
    if methods:  # the methods acted in the compiled steps, and their rows were counted
        assert c.attention_path() == "explicit"
        assert c.engine.batch.rows == (STEPS - 1) * sum(1 for layer in c.engine.decode_layers if layer)
    again = _tokens(c, inputs)  # the compiled step is kept on the model: no compiling again
    assert torch.equal(again, eager) and counters["stats"]["unique_graphs"] == graphs + 1
    assert c.model._neverfade_last_loop.compile_s < loop.compile_s
    with sdpa_kernel([SDPBackend.MATH]):  # other SDPA kernels (bench --check pins them): a variant of their own
        pinned = _tokens(c, inputs)
    assert torch.equal(pinned, eager) and counters["stats"]["unique_graphs"] == graphs + 2


def test_the_compiled_step_runs_the_fused_kernel_as_one_operator(tiny_models):
    """SPARC with the fused kernel (Triton's interpreter here, as "auto" takes it on CUDA): torch.compile leaves the
    kernel's launch whole (a custom operator) and the compiled steps give the uncompiled fused tokens, every row
    fused and SPARC selecting from the kernel's probabilities."""
    from torch._dynamo.utils import counters

    c = neverfade.load(tiny_models["llava"], device="cpu", methods=SETTINGS[1][0], method_params=SETTINGS[1][1])
    c.attention, c.decode = "fused", "static"
    inputs = c.inputs(make_images())
    fused = _tokens(c, inputs)
    assert c.attention_path() == "fused"
    c.attention = "explicit"
    assert not torch.equal(_tokens(c, inputs), _tokens(c.use([]), inputs)), "SPARC must change the tokens here"
    c.use(*SETTINGS[1])
    c.attention, c.compile = "fused", True
    graphs = counters["stats"]["unique_graphs"]
    compiled = _tokens(c, inputs)
    assert counters["stats"]["unique_graphs"] == graphs + 1 and c.model._neverfade_last_loop.compile
    assert torch.equal(compiled, fused)
    assert c.attention_path() == "fused" and c.engine.batch.fused == c.engine.batch.rows > 0
    assert (c.engine.batch.state(c.methods[0]).count > 0).any()


def test_max_autotune_compiles_its_own_step_with_the_uncompiled_tokens(tiny_models):
    """compile="max-autotune" (--compile-mode): inductor's tuned GEMMs and kernels, a variant of its own beside the
    default mode's, and (float32, a CPU) the tokens of the uncompiled static loop. In bfloat16 on the H200 its GEMV
    reductions' order turned near-ties of random weights after 7 to 20 tokens (README, Speed)."""
    from torch._dynamo.utils import counters

    c = neverfade.load(tiny_models["llava"], device="cpu", methods=SETTINGS[1][0], method_params=SETTINGS[1][1])
    inputs = c.inputs(make_images())
    c.decode = "static"
    static = _tokens(c, inputs)
    c.compile = "max-autotune"
    graphs = counters["stats"]["unique_graphs"]
    tuned = _tokens(c, inputs)
    loop = c.model._neverfade_last_loop
    assert loop.compile == "max-autotune" and loop.forward_step is c.model._neverfade_compiled_forwards["max-autotune"]
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert torch.equal(tuned, static)
    c.compile = "fastest"
    with pytest.raises(ValueError, match="compile mode 'fastest'"):
        _tokens(c, inputs)


def test_compile_mode_implies_compile_on_the_command_line():
    from neverfade.cli import build_parser
    from neverfade.commands.options import compile_choice

    parser = build_parser()
    choices = (([], False), (["--compile"], "default"), (["--compile-mode", "max-autotune"], "max-autotune"))
    for given, expected in choices:
        for command in (["caption", "x.jpg"], ["bench"]):
            assert compile_choice(parser.parse_args([*command, *given])) == expected
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--compile-mode", "fastest"])


def test_what_cannot_be_compiled_is_refused_in_one_line(tiny_models):
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sgrs"])
    c.compile = True
    inputs = c.inputs(make_images()[:1])
    with pytest.raises(CompileRefused, match="sgrs's own decoding loop is not compiled") as refused:
        _tokens(c, inputs)
    assert "\n" not in str(refused.value)
    c.use([])
    c.decode = "eager"
    with pytest.raises(CompileRefused, match="generate's own loop"):
        _tokens(c, inputs)


def test_the_inductor_cache_is_the_users_or_neverfades(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert inductor_cache_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path / "nf"))
    assert inductor_cache_dir() == str(tmp_path / "nf" / "inductor")


def test_bench_compiles_checks_against_eager_and_refuses_what_it_cannot(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--model", tiny_models["llava"], "--device", "cpu", "--batch-sizes", "2", "--new-tokens", "4"]
    args += ["--repeats", "1", "--no-stock", "--method", "sgrs", "--compile", "--check", "--check-tokens", "6"]
    assert main([*args, "--profile", "--profile-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert report["compile"] and report["environment"]["inductor_cache"] == inductor_cache_dir()
    base = rows["baseline"]
    assert base["path"] == "static" and base["compiled"] and base["compile_s"] > 0
    assert base["x_floor"] == pytest.approx(base["ms_per_token"] / base["floor_ms_per_token"], rel=1e-3, abs=1e-3)
    assert "sgrs's own decoding loop is not compiled" in rows["sgrs"]["error"]  # an error row, not an uncompiled one
    assert [(k["setting"], k["compiled"], k["reference"], k["same"]) for k in report["checks"]] == [
        ("baseline", "default", "eager", True)
    ]
    printed = capsys.readouterr().out
    assert "static+compiled" in printed and "compile s" in printed
    profiled = {p["setting"]: p for p in report["profiles"]}
    assert profiled["baseline"]["compiled"] and any("Compiled" in op for op in profiled["baseline"]["profile"]["ops"])
    assert "baseline (static+compiled, cpu aten operators)" in printed
    assert "sgrs's own decoding loop is not compiled" in profiled["sgrs"]["error"]
