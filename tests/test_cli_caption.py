"""`neverfade caption` end to end: bad images inside a folder, bad input as a whole, interruption and resume."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_images

from neverfade.cli import main
from neverfade.results import read_records


def write_folder(folder: Path, n_good: int) -> Path:
    folder.mkdir()
    base = make_images()
    for i in range(n_good):
        base[i % 3].rotate(90 * (i // 3)).save(folder / f"img{i:03d}.png")
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "neverfade", "caption", *args]


def test_folder_with_bad_images_records_them_and_goes_on(tiny_models, tmp_path):
    folder = write_folder(tmp_path / "images", 3)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "out.jsonl"
    proc = subprocess.run(
        cli(
            str(folder),
            "--model",
            tiny_models["llava"],
            "--method",
            "sparc",
            "--sparc-tau",
            "0.05",
            "--max-new-tokens",
            "6",
            "--batch-size",
            "2",
            "--out",
            str(out),
        ),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    records = {r["id"]: r for r in read_records(out)}
    assert sorted(records) == ["broken.jpg", "empty.png", "img000.png", "img001.png", "img002.png"]
    for bad in ("broken.jpg", "empty.png"):
        assert records[bad]["caption"] is None and bad in records[bad]["error"]
    for good in ("img000.png", "img001.png", "img002.png"):
        r = records[good]
        assert r["error"] is None and isinstance(r["caption"], str) and r["new_tokens"] == 6
        assert r["methods"] == [
            {"name": "sparc", "params": {"alpha": 1.1, "beta": 0.1, "tau": 0.05, "layer": 2, "start": 0, "end": 3}}
        ]
        assert r["model"] == tiny_models["llava"] and r["seconds"] > 0
    assert "2 images could not be read" in proc.stderr


def _run_until_records(cmd, out: Path, at_least: int, sig) -> int:
    # SIGINT at its default, as in a terminal: a shell starts background jobs with it ignored, and so would the child
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= at_least:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.communicate(timeout=60)
    return proc.returncode


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_resumes_without_loss_or_repeats(tiny_models, tmp_path, sig):
    n = 30
    folder = write_folder(tmp_path / "images", n)
    args = [
        str(folder),
        "--model",
        tiny_models["qwen2_vl"],
        "--method",
        "sparc",
        "--sparc-tau",
        "0.05",
        "--max-new-tokens",
        "40",
        "--batch-size",
        "1",
    ]
    whole = tmp_path / "whole.jsonl"
    subprocess.run(cli(*args, "--out", str(whole)), check=True, capture_output=True)

    out = tmp_path / "out.jsonl"
    rc = _run_until_records(cli(*args, "--out", str(out)), out, 2, sig)
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 130)
    kept = read_records(out)
    assert 2 <= len(kept) < n, "the run must be stopped part-way"
    with open(out, "a") as f:  # what a write cut short by a kill leaves behind
        f.write('{"id": "img029.png", "capt')
    resumed = subprocess.run(cli(*args, "--out", str(out)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} records already" in resumed.stderr
    records = read_records(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == n
    assert {r["id"]: r["caption"] for r in records} == {r["id"]: r["caption"] for r in read_records(whole)}
    assert records[: len(kept)] == kept


def test_manifest_ids_and_prompts(tiny_models, tmp_path):
    folder = write_folder(tmp_path / "images", 2)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"id": "first", "image": "images/img000.png", "prompt": "Describe."})
        + "\n"
        + json.dumps({"image": "images/img001.png"})
        + "\n"
    )
    out = tmp_path / "out.jsonl"
    assert (
        main(["caption", str(manifest), "--model", tiny_models["llava"], "--max-new-tokens", "3", "--out", str(out)])
        == 0
    )
    records = {r["id"]: r for r in read_records(out)}
    assert set(records) == {"first", "images/img001.png"}
    assert records["first"]["prompt"] == "Describe." and records["images/img001.png"]["prompt"] is None
    assert records["first"]["methods"] == [] and folder.exists()


BAD_INPUT = {
    "missing file": (["nowhere/at/all.png"], "no such file or folder"),
    "folder without images": (["EMPTY"], "no images in folder"),
    "corrupt image": (["CORRUPT"], "cannot read image"),
    "unknown method": (["GOOD", "--method", "magic"], "unknown method 'magic'"),
    "negative tau": (["GOOD", "--method", "sparc", "--sparc-tau", "-1"], "tau must be >= 0.0"),
    "layer beyond depth": (["GOOD", "--method", "sparc", "--sparc-layer", "4"], "beyond the model's depth"),
    "parameter of an unused method": (["GOOD", "--sparc-tau", "2"], "not among the methods"),
    "manifest line without image": (["MANIFEST"], ':1: each line needs an "image" field'),
    "zero batch size": (["GOOD", "--batch-size", "0"], "--batch-size must be at least 1"),
    "unsupported model": (["GOOD", "--model", "UNSUPPORTED"], "is not supported; supported architectures"),
    "missing model folder": (["GOOD", "--model", "./no/such-model-dir"], "no such model folder"),
    "unknown random family": (["GOOD", "--model", "random:gpt"], "unknown family 'gpt'"),
    "min above max tokens": (
        ["GOOD", "--min-new-tokens", "9", "--max-new-tokens", "8"],
        "--min-new-tokens must be between 0 and --max-new-tokens",
    ),
}


def test_min_new_tokens_forces_the_length(tmp_path):
    """The embedded model ends its captions itself; --min-new-tokens keeps it writing (benchmarks use it)."""
    lengths = {}
    for forced in (0, 600):
        out = tmp_path / f"{forced}.jsonl"
        assert (
            main(
                [
                    "caption",
                    "--samples",
                    "2",
                    "--max-new-tokens",
                    "600",
                    "--min-new-tokens",
                    str(forced),
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        lengths[forced] = [r["new_tokens"] for r in read_records(out)]
    assert max(lengths[0]) < 600, "the free captions must end before the limit for this test to mean anything"
    assert lengths[600] == [600, 600]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tiny_models, tmp_path, capsys, case):
    args, message = BAD_INPUT[case]
    (tmp_path / "empty").mkdir()
    make_images()[0].save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"PNG? no")
    (tmp_path / "m.jsonl").write_text('{"id": "x"}\n')
    if "UNSUPPORTED" in args:
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64)
        ).save_pretrained(tmp_path / "llama")
    subst = {
        "EMPTY": tmp_path / "empty",
        "CORRUPT": tmp_path / "bad.png",
        "GOOD": tmp_path / "good.png",
        "MANIFEST": tmp_path / "m.jsonl",
        "UNSUPPORTED": tmp_path / "llama",
    }
    args = [str(subst.get(a, a)) for a in args]
    if "--model" not in args:
        args += ["--model", tiny_models["llava"]]
    assert main(["caption", *args, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("neverfade caption: error:") and message in err, err


def _methods():
    from neverfade.methods import METHODS

    return sorted(METHODS)


@pytest.mark.parametrize("method", _methods())
def test_caption_runs_every_method(tiny_models, tmp_path, method):
    from neverfade.methods import METHODS

    make_images()[2].save(tmp_path / "one.png")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "caption",
                str(tmp_path / "one.png"),
                "--model",
                tiny_models["llava"],
                "--method",
                method,
                "--max-new-tokens",
                "4",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    [record] = read_records(out)
    [described] = record["methods"]
    assert described["name"] == method
    assert set(described["params"]) == {p.name for p in METHODS[method].params}
    assert 1 <= record["new_tokens"] <= 4 and record["error"] is None


def test_boolean_method_flag(tiny_models, tmp_path):
    make_images()[0].save(tmp_path / "one.png")
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "caption",
                str(tmp_path / "one.png"),
                "--model",
                tiny_models["qwen2_vl"],
                "--method",
                "pai",
                "--pai-cfg",
                "--pai-gamma",
                "1.5",
                "--max-new-tokens",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    params = read_records(out)[0]["methods"][0]["params"]
    assert params["cfg"] is True and params["gamma"] == 1.5
