"""The static-cache decode loop (the path whose steps a GPU replays from a CUDA graph) against generate's own loop.

On a CPU the loop runs its steps eagerly with exactly the buffers and update rules a captured replay uses (positions
advanced in place, the new key unmasked, the window of LocoRE following the device-side query index), so these
tests check those rules; `neverfade bench --check` checks the replay itself on a GPU."""

import json

import pytest
import torch
import transformers

import neverfade
from neverfade import decoding
from neverfade.cli import main
from neverfade.decoding.captured import CaptureFailed, StaticLoop
from neverfade.models.random import FAMILIES
from tests.conftest import make_images

STEPS = 20
SETTINGS = [
    ([], None),
    (["sparc"], {"sparc": {"tau": 0.05, "alpha": 1.5}}),
    (["sparc", "locore"], {"sparc": {"tau": 0.05, "alpha": 1.5}, "locore": {"beta": 2.0, "window": 3}}),
    (["naive", "pai"], {"naive": {"alpha": 2.0}, "pai": {"alpha": 0.5}}),
]


def _generate(c, decode, inputs, **kwargs):
    c.decode = decode
    with torch.no_grad():
        return c.generate(**inputs, return_dict_in_generate=True, output_scores=True, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("methods,params", SETTINGS, ids=["baseline", "sparc", "sparc+locore", "naive+pai"])
def test_static_loop_equals_generate(tiny_models, family, methods, params):
    c = neverfade.load(tiny_models[family], device="cpu", methods=methods, method_params=params)
    inputs = c.inputs(make_images(), ["Describe it.", neverfade.DEFAULT_PROMPT, "What is in this picture?"])
    forced = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    eager = _generate(c, "eager", inputs, **forced)
    static = _generate(c, "static", inputs, **forced)
    assert c.decode_path() == "static" and isinstance(c.model._neverfade_last_loop, StaticLoop)
    assert len(set(map(tuple, eager.sequences[:, -STEPS:].tolist()))) > 1, "the images must give different outputs"
    assert torch.equal(eager.sequences, static.sequences)
    assert len(eager.scores) == len(static.scores) == STEPS
    for e, s in zip(eager.scores, static.scores):
        torch.testing.assert_close(e, s, atol=1e-4, rtol=1e-4)


def test_the_caption_time_line_splits_describing_into_the_loops_stages(tiny_models, tmp_path, capsys):
    """`neverfade caption` on the static loop: "describing" is followed by the prefill, the first step, the second and
    the later steps, summed over the batches, which add up to no more than describing itself; another loop has no
    stages to give."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(make_images()):
        image.save(folder / f"{i}.png")
    args = ["caption", str(folder), "--model", str(tiny_models["llava"]), "--method", "sparc", "--device", "cpu"]
    args += ["--max-new-tokens", "6", "--min-new-tokens", "6", "--batch-size", "2", "--out", str(tmp_path / "o.jsonl")]
    assert main([*args, "--decode", "static"]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("time:"))
    describing = line.split("describing ", 1)[1]
    total = float(describing.split(" s", 1)[0])
    stages = dict(part.rsplit(" ", 2)[:2] for part in describing.split("(", 1)[1].split(")", 1)[0].split(", "))
    assert list(stages) == ["prefill", "first step", "second step", "later steps"]
    assert sum(map(float, stages.values())) <= total + 0.2  # each printed to 0.1 s (a tiny model: often 0.0)
    c = neverfade.load(tiny_models["llava"], device="cpu")
    inputs = c.inputs(make_images()[:1])
    _generate(c, "static", inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert list(c.decode_stages()) == ["prefill", "first step", "second step", "later steps"]
    assert all(s > 0 for s in c.decode_stages().values())
    _generate(c, "eager", inputs, max_new_tokens=3, do_sample=False)
    assert c.decode_stages() == {}


def test_static_loop_stops_and_pads_where_generate_does(tiny_models):
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"], method_params={"sparc": {"tau": 0.05}})
    inputs = c.inputs(make_images())
    free = _generate(c, "eager", inputs, max_new_tokens=STEPS, do_sample=False).sequences[:, -STEPS:]
    eos = [int(free[0, 9]), int(free[1, 3]), int(free[2, 6])]  # each sequence ends by its step 10, at its own step
    runs = [
        _generate(c, mode, inputs, max_new_tokens=STEPS, do_sample=False, eos_token_id=eos).sequences
        for mode in ("eager", "static")
    ]
    assert runs[0].shape[1] <= inputs["input_ids"].shape[1] + 10, "generation must stop early here"
    assert (runs[0][:, -1] == c.model.generation_config.pad_token_id).any(), "a sequence that ended first is padded"
    assert torch.equal(runs[0], runs[1])


def test_seeded_sampling_is_the_same_on_both_loops(tiny_models):
    c = neverfade.load(tiny_models["qwen2_vl"], device="cpu", methods=["locore"])
    inputs = c.inputs(make_images())
    runs = []
    for mode in ("eager", "static"):
        torch.manual_seed(3)
        runs.append(_generate(c, mode, inputs, max_new_tokens=STEPS, do_sample=True, temperature=1.5).sequences)
    greedy = _generate(c, "eager", inputs, max_new_tokens=STEPS, do_sample=False).sequences
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)


def test_decode_path_follows_methods_and_device(tiny_models, monkeypatch):
    c = neverfade.load(tiny_models["llava"], device="cpu")
    assert c.decode_path() == "eager"  # auto on a CPU
    c.decode = "captured"
    assert c.decode_path() == "static"  # no CUDA graph without CUDA: the same loop, eagerly
    c.use(["sgrs"])
    assert c.decode_path() == "static"  # SGRS's own loop has a captured form
    for decode in ("eager", "auto"):  # auto on a CPU: its eager loop
        c.decode = decode
        assert c.decode_path() == "strategy"
    with monkeypatch.context() as m:
        m.setattr(type(c.model), "device", property(lambda model: torch.device("cuda")))
        assert c.decode_path() == "captured"  # auto on CUDA: its loop replayed from CUDA graphs
    c.decode = "captured"
    c.use(["vcd"])
    assert c.decode_path() == "strategy"  # VCD's has none
    c.use(["sparc"]).record_attention()
    assert c.decode_path() == "eager"  # a probe keeps per-step lists on the host
    with pytest.raises(ValueError, match="decode must be"):
        c.decode = "fast"


def test_bench_reports_ratios_state_and_checks(tiny_models, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench",
            "--model",
            tiny_models["llava"],
            "--device",
            "cpu",
            "--batch-sizes",
            "2",
            "--new-tokens",
            "6",
            "--repeats",
            "2",
            "--decode",
            "captured",
            "--method",
            "sparc",
            "--method",
            "naive+locore",
            "--check",
            "--check-tokens",
            "10",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    rows = {r["setting"]: r for r in report["rows"]}
    assert set(rows) == {"baseline", "sparc", "naive+locore", "stock generate"}
    base = rows["baseline"]["ms_per_token"]
    for r in rows.values():
        assert r["overhead"] == pytest.approx(r["ms_per_token"] / base, abs=1e-3)
        assert r["tokens_per_s"] == pytest.approx(2 * 1000 / r["ms_per_token"], rel=1e-2)
        # every timed run is kept, the best is the row's; stock generate (a reference) is timed once
        assert len(r["runs_ms_per_token"]) == (1 if r["setting"] == "stock generate" else 2)
        assert r["ms_per_token"] == min(r["runs_ms_per_token"])
        if r["setting"] != "stock generate":  # the static loop's stages: the later steps are 6 - 3 replayed ones
            assert list(r["stages_s"]) == ["prefill", "first step", "second step", "later steps"]
            assert r["replay_ms_per_token"] == pytest.approx(r["stages_s"]["later steps"] / 3 * 1000, abs=0.02)
    assert "stages_s" not in rows["stock generate"]
    assert rows["sparc"]["path"] == "static" and rows["stock generate"]["path"] == "eager"
    c = neverfade.load(tiny_models["llava"], device="cpu")
    # the weight-read floor: the parameters' bytes (buffers left out) over the timed copy's bandwidth, per model
    model = report["models"][tiny_models["llava"]]
    assert model["weight_bytes"] == sum(p.nbytes for p in c.model.parameters()) > 0
    floor = model["weight_bytes"] / (report["environment"]["copy_gb_per_s"] * 1e9) * 1000
    assert model["floor_ms_per_token"] == pytest.approx(floor, rel=1e-2) and floor > 0
    for r in rows.values():
        assert r["floor_ms_per_token"] == model["floor_ms_per_token"]
        assert r["x_floor"] == pytest.approx(r["ms_per_token"] / r["floor_ms_per_token"], rel=1e-3, abs=1e-3)
        assert not r["compiled"] and "compile_s" not in r
    ids = c.inputs(make_images()[:1] * 2)["input_ids"]  # the bench's images share one size
    image = ids == c.model.config.image_token_id
    positions = image.any(0).nonzero().flatten()
    span = int(positions[-1] - positions[0] + 1)  # the first to the last image token
    # SPARC keeps an EMA (float32) and a selection count (int16) per position of the image span, in each sequence
    assert rows["sparc"]["state_floats_per_image_token"]["sparc"] == pytest.approx(
        (4 + 2) / 4 * span * ids.shape[0] / int(image.sum()), abs=1e-3
    )
    assert [(k["setting"], k["reference"], k["same"]) for k in report["checks"]] == [
        ("baseline", "eager", True),
        ("sparc", "eager", True),
        ("naive+locore", "eager", True),
    ]
    printed = capsys.readouterr().out
    assert "x baseline" in printed and "x floor" in printed and f"floor {tiny_models['llava']}: " in printed


def test_a_step_that_cannot_be_captured_is_an_error_naming_the_versions(tiny_models):
    """Asking for capture where there is no CUDA fails at the capture: one error line, never a quiet eager run."""
    c = neverfade.load(tiny_models["llava"], device="cpu", methods=["sparc"], method_params={"sparc": {"tau": 0.05}})
    inputs = c.inputs(make_images())
    forced = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    with pytest.raises(CaptureFailed) as failed, torch.no_grad():
        c.model.generate(
            **inputs,
            cache_implementation="static",
            **forced,
            custom_generate=decoding.custom_generate("static", capture=True),
        )
    message = str(failed.value)
    assert "\n" not in message and f"transformers {transformers.__version__}" in message
    assert "--decode eager" in message


def test_bench_profiles_each_setting_beside_the_baseline(tiny_models, tmp_path, capsys):
    """--profile on a CPU with the default decode path (generate's own loop there): the profile is of the static
    loop's step; SPARC's step runs its own operators (its selection's in-place OR) on top of the baseline's."""
    out = tmp_path / "bench.json"
    argv = ["bench", "--model", tiny_models["llava"], "--device", "cpu", "--batch-sizes", "2", "--new-tokens", "4"]
    argv += ["--repeats", "1", "--no-stock", "--method", "sparc", "--profile", "--profile-tokens", "5"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["rows"]] == ["eager", "eager"]  # what was timed: the CPU's default path
    base, sparc = report["profiles"]
    assert (base["setting"], sparc["setting"]) == ("baseline", "sparc")
    for entry in (base, sparc):
        p = entry["profile"]
        assert p["path"] == "static" and p["steps"] == 4 and p["unit"] == "cpu aten operators"
        assert p["ms_per_step"] == pytest.approx(sum(t for t, _ in p["ops"].values()), abs=1e-3)
        assert p["ops_per_step"] == pytest.approx(sum(c for _, c in p["ops"].values()), abs=0.05)
    assert "aten::bitwise_or_" in sparc["profile"]["ops"] and "aten::bitwise_or_" not in base["profile"]["ops"]
    extra = sparc["beside_baseline"]
    assert extra["ops_per_step"] == pytest.approx(sparc["profile"]["ops_per_step"] - base["profile"]["ops_per_step"])
    assert extra["ops_per_step"] > 0 and "beside_baseline" not in base
    tops = [k["ms_per_step"] for k in extra["top"]]
    assert tops == sorted(tops, reverse=True)
    assert "profile " in capsys.readouterr().out
