"""`neverfade bench`: decoding speed and memory of each method, against the baseline measured in the same run."""

from __future__ import annotations

import datetime
import platform
import sys
import time

from neverfade.commands import bench_profile
from neverfade.commands.options import add_compile_mode_option

DEFAULT_METHODS = ["sparc", "naive", "locore", "sgrs"]
STOCK = "stock generate"
SLOW = ("eager", "strategy")  # decode paths timed in one round only: references, not the subject


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time decoding with each method against the baseline",
        description="Time decoding: ms per token, tokens per second and peak GPU memory for the baseline and each "
        "method, at each batch size, with one image per prompt and a forced caption length. ms per token is "
        "a run's time after the prefill over its decode steps, the eager first step and the capture included "
        "(the JSON's replay_ms_per_token leaves them out, and stages_s splits the run). A method's "
        "overhead is its ratio to the baseline timed in the same run (settings interleaved, best of "
        "--repeats). Stock transformers generate (dynamic cache, no neverfade) is timed alongside; it and "
        "methods with their own decoding loop (sgrs, vcd, opera, pai with cfg) are timed in one round.",
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        help="model to time (repeatable): random:<family>:small or random:<family>:7b for random weights at a "
        "real size (small: the family's smallest published checkpoint with vision, e.g. Qwen3-VL-2B; 7b: its "
        "7B-class one), a local folder or a hub id. Default: random:llava:7b and random:qwen2_vl:7b on CUDA, "
        "random:llava (tiny) on a CPU",
    )
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--method",
        action="append",
        default=None,
        metavar="SPEC",
        help="a method setting to time against the baseline, e.g. sparc, sparc:tau=2+locore "
        "(repeatable; default: " + ", ".join(DEFAULT_METHODS) + ")",
    )
    p.add_argument(
        "--params",
        metavar="FILE",
        help="a params file written by neverfade tune: its method setting is the one timed (a --method "
        "given too must be the same setting)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32], metavar="B", help="default: 1 8 32")
    p.add_argument("--new-tokens", type=int, default=512, help="forced caption length (default: 512)")
    p.add_argument("--image-size", type=int, default=336, help="side of the square image, in pixels (default: 336)")
    p.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs per setting; the best counts, and the JSON's runs_ms_per_token keeps each (default: 2)",
    )
    p.add_argument("--no-stock", action="store_true", help="skip timing stock generate")
    p.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "captured", "static", "eager"],
        help="neverfade's decode path (default auto: captured on CUDA, eager on a CPU)",
    )
    p.add_argument(
        "--attention",
        nargs="+",
        default=["auto"],
        choices=["auto", "fused", "explicit"],
        help="the decode steps' attention: auto (the fused Triton kernel on CUDA where it covers the call, in "
        "every layer; elsewhere the explicit row in the methods' layers), fused (the kernel), explicit (the "
        "reference row, in the methods' layers); several values time each method setting once per value, side "
        "by side (e.g. --attention fused explicit). The baseline runs SDPA; with fused it is also timed on the "
        "kernel ('baseline [fused]'). Each row records the path taken (default: auto)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also check, per setting, that the decode path gives the same tokens as the same loop run "
        "eagerly (on a CPU: the static loop against generate's own), over --check-tokens tokens; with --compile "
        "the checked run is the compiled one and the reference is not compiled; exit status 1 if any differs",
    )
    p.add_argument("--check-tokens", type=int, default=128, help="default: 128")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile each setting's decode step with torch.compile before capture (on a CPU: the static loop's "
        "step), per batch size; each row reports compile_s, the first decode step's seconds (compiling, or "
        "loading from the inductor cache). A setting it cannot compile is an error row, never an uncompiled one "
        "(stock generate is not compiled)",
    )
    add_compile_mode_option(p)
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile, per setting and batch size, one decode on the static loop (each kernel launched on its "
        "own: the kernels a captured step replays; with --compile, the compiled step's) with torch.profiler: the "
        "decode step's kernel time and count, and the kernels a method adds beside the baseline (JSON `profiles`; "
        "on a CPU, ATen operators and compiled kernels)",
    )
    p.add_argument("--profile-tokens", type=int, default=32, help="new tokens of each profiled decode (default: 32)")
    p.add_argument("--out", default="bench.json", help="JSON results (default: bench.json)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from neverfade.commands.options import check_device, compile_choice, method_settings, params_setting
    from neverfade.errors import UserError
    from neverfade.eval.report import write_json

    args.compile = compile_choice(args)  # False or the mode

    if args.new_tokens < 2 or args.repeats < 1 or min(args.batch_sizes) < 1 or args.profile_tokens < 2:
        raise UserError("--new-tokens and --profile-tokens must be >= 2, --repeats >= 1 and batch sizes >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    models = args.model or (
        ["random:llava:7b", "random:qwen2_vl:7b"] if device.startswith("cuda") else ["random:llava"]
    )
    tuned = params_setting(args, args.method or [])
    specs = [tuned] if tuned else args.method or DEFAULT_METHODS
    attention = list(dict.fromkeys(args.attention))
    baselines = [("baseline", [], {}, "auto")] + ([("baseline", [], {}, "fused")] if "fused" in attention else [])
    settings = baselines + [
        (spec, names, params, choice)
        for spec, (names, params) in zip(specs, method_settings(args, specs, "--method"))
        for choice in attention
    ]
    report = {
        "environment": environment(device),
        "new_tokens": args.new_tokens,
        "image_size": args.image_size,
        "compile": args.compile,
        "models": {},
        "rows": [],
        "checks": [],
    }
    if args.profile:
        report["profiles"] = []
    if args.compile:
        from neverfade.decoding.captured import inductor_cache_dir

        report["environment"]["inductor_cache"] = inductor_cache_dir()
    report["environment"]["copy_gb_per_s"] = round(copy_bandwidth(torch.device(device)) / 1e9, 2)
    for model_name in models:
        captioner = _load(model_name, device, args.dtype)
        report["models"][model_name] = floor(captioner.model, report["environment"]["copy_gb_per_s"] * 1e9)
        try:
            for choice in attention:
                captioner.attention = choice  # refuses "fused" where Triton cannot run, before any timing
        except ValueError as err:
            raise UserError(f"--attention: {err}") from None
        for batch_size in args.batch_sizes:
            rows = bench_batch(captioner, model_name, settings, batch_size, args)
            for row in rows:
                add_floor(row, report["models"][model_name]["floor_ms_per_token"])
            report["rows"] += rows
            if args.check:
                report["checks"] += check_batch(captioner, model_name, settings, batch_size, args)
            if args.profile:
                report["profiles"] += profile_batch(captioner, model_name, settings, batch_size, args)
            write_json(args.out, report)  # after every batch size, so an interrupted bench keeps what it measured
        del captioner
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    print(table(report["rows"]))
    for name, m in report["models"].items():
        print(
            f"floor {name}: {m['floor_ms_per_token']:.3f} ms/token ({m['weight_bytes'] / 1e9:.4g} GB of weights at "
            f"{report['environment']['copy_gb_per_s']:g} GB/s, a timed device-to-device copy)"
        )
    for c in report["checks"]:
        print(
            f"check {c['model']} batch {c['batch_size']} {c['setting']}: {c['path']}"
            + (f" {bench_profile.compiled_label(c.get('compiled'))} " if c.get("compiled") else " ")
            + f"({c.get('attention', 'not run')}) vs {c.get('reference', 'not run')}: "
            + ("same tokens" if c["same"] else c.get("error") or f"first difference at token {c['first_difference']}")
        )
    for entry in report.get("profiles", []):
        print(bench_profile.summary(entry))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0 if all(c["same"] for c in report["checks"]) else 1


def _load(model_name, device, dtype):
    import neverfade
    from neverfade.commands.options import quiet_transformers
    from neverfade.errors import UserError

    quiet_transformers()
    try:
        return neverfade.load(model_name, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise UserError(f"cannot load model {model_name!r}: {str(err).splitlines()[0]}") from None


def environment(device: str) -> dict:
    import torch
    import transformers

    import neverfade

    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu"
    return {
        "date": datetime.date.today().isoformat(),
        "device": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "neverfade": neverfade.__version__,
        "python": platform.python_version(),
    }


def copy_bandwidth(device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy (bytes read plus bytes written, over the time), the best of
    `repeats` after one untimed copy: 1 GiB on CUDA (timed by CUDA events), 64 MiB elsewhere (by the clock)."""
    import torch

    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**26)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            _sync(device)
            started = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            seconds = time.perf_counter() - started
        best = min(best, seconds)
    del src, dst
    return 2 * nbytes / best


def weight_bytes(model) -> int:
    """The bytes of the model's parameters (each shared one once; buffers left out: rotary tables and the like,
    not weights). The vision tower's are counted too, though a decode step does not read them."""
    return sum(p.nbytes for p in model.parameters())


def floor(model, bandwidth: float) -> dict:
    """The weight-read floor of a decode step: the weights' bytes read once at the copy bandwidth."""
    nbytes = weight_bytes(model)
    return {"weight_bytes": nbytes, "floor_ms_per_token": float(f"{nbytes / bandwidth * 1000:.5g}")}


def add_floor(row: dict, floor_ms: float) -> None:
    """`row` with the model's floor and its ms/token over it (`x_floor`)."""
    row["floor_ms_per_token"] = floor_ms
    if "ms_per_token" in row:
        row["x_floor"] = float(f"{row['ms_per_token'] / floor_ms:.4g}")


def _images(batch_size: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch_size)]


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(captioner, inputs, new_tokens: int):
    """Seconds of one forced-length greedy generate, and its output."""
    import torch

    _sync(captioner.model.device)
    start = time.perf_counter()
    with torch.no_grad():
        out = captioner.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    _sync(captioner.model.device)
    return time.perf_counter() - start, out


def _use(captioner, setting, decode: str, compile: str | bool = False):
    label, names, params, attention = setting
    captioner.attention = attention
    captioner.use(names, params)
    captioner.decode = "eager" if label == STOCK else decode
    captioner.compile = compile if label != STOCK else False


def _key(setting) -> str:
    """A setting's name among the timed ones: its spec, and the attention asked for when that is not auto."""
    return setting[0] if setting[3] == "auto" else f"{setting[0]} [{setting[3]}]"


def bench_batch(captioner, model_name, settings, batch_size, args) -> list[dict]:
    """Time every setting at one batch size, interleaved, best of `repeats`."""
    import torch

    from neverfade.decoding.captured import CaptureFailed, CompileRefused

    device = captioner.model.device
    inputs = captioner.inputs(_images(batch_size, args.image_size))
    runs = settings + ([(STOCK, [], {}, "auto")] if not args.no_stock else [])
    best: dict[str, dict] = {}
    compile_s: dict[str, float] = {}  # per setting: the longest first decode step (the one that compiled)
    for repeat in range(args.repeats + 1):  # the first round warms up kernels and allocators, untimed
        for setting in runs:
            label = _key(setting)
            if label in best and (best[label].get("error") or best[label]["path"] in SLOW):
                continue  # the slow references are timed once
            _use(captioner, setting, args.decode, args.compile)
            try:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                prefill, _ = _timed(captioner, inputs, 1)
                # the untimed first round is short, but compiles at the timed length: the static cache's length
                # is a shape of the compiled step
                warm = args.new_tokens if args.compile else 8
                total, out = _timed(captioner, inputs, args.new_tokens if repeat else warm)
            except torch.OutOfMemoryError:
                best[label] = {"error": "out of memory"}
                torch.cuda.empty_cache()
                continue
            except (CaptureFailed, CompileRefused) as err:
                best[label] = {"error": str(err)}
                continue
            loop_compile_s = getattr(getattr(captioner.model, "_neverfade_last_loop", None), "compile_s", None)
            if captioner.compile and loop_compile_s is not None:
                compile_s[label] = max(compile_s.get(label, 0.0), loop_compile_s)
            if not repeat:
                continue
            row = _row(captioner, label, prefill, total, batch_size, args.new_tokens, out)
            row["compiled"] = captioner.compile
            if label in compile_s:
                row["compile_s"] = round(compile_s[label], 2)
            runs_ms = best[label]["runs_ms_per_token"] if label in best else []
            if label not in best or row["ms_per_token"] < best[label]["ms_per_token"]:
                best[label] = row
            best[label]["runs_ms_per_token"] = runs_ms + [row["ms_per_token"]]  # every timed run, in order
    base = best.get("baseline", {}).get("ms_per_token")
    rows = []
    for setting in runs:
        row = {"model": model_name, "batch_size": batch_size, "setting": _key(setting), **best[_key(setting)]}
        if base and "ms_per_token" in row:
            row["overhead"] = round(row["ms_per_token"] / base, 4)
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _row(captioner, label, prefill, total, batch_size, new_tokens, out) -> dict:
    import torch

    device = captioner.model.device
    path = captioner.decode_path()
    stages = captioner.decode_stages()  # the static loop's: where the run's time went
    captioner.model._neverfade_last_loop = None
    ms = (total - prefill) / (new_tokens - 1) * 1000
    row = {
        "path": path,
        "attention": captioner.attention_path() or "sdpa",  # the methods' layers at decode steps; sdpa: none
        "ms_per_token": round(ms, 3),
        "tokens_per_s": float(f"{batch_size * 1000 / ms:.4g}"),
        "prefill_s": round(prefill, 4),
    }
    if device.type == "cuda":
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if "later steps" in stages and new_tokens > 3:
        row["stages_s"] = {k: round(v, 4) for k, v in stages.items()}
        # the replayed steps alone, without the eager first step and the capture that every run does again
        row["replay_ms_per_token"] = round(stages["later steps"] / (new_tokens - 3) * 1000, 3)
    state = state_floats_per_image_token(captioner)
    if state:
        row["state_floats_per_image_token"] = state
    return row


def state_floats_per_image_token(captioner) -> dict[str, float]:
    """Each method's per-batch state, in 4-byte floats per image token per sequence (beyond the KV cache): the bytes
    of its tensors (a state's other fields are constants of the batch, such as an offset) over the image tokens."""
    import torch

    engine = captioner.engine
    batch = engine.batch if engine is not None else None
    if batch is None or not batch.image_mask.any():
        return {}
    image_tokens = int(batch.image_mask.sum())
    out = {}
    for m in engine.methods:
        state = batch.states.get(m.name)
        tensors = [v for v in vars(state).values() if isinstance(v, torch.Tensor)] if state is not None else []
        if tensors:
            out[m.name] = round(sum(t.numel() * t.element_size() for t in tensors) / 4 / image_tokens, 3)
    return out


def profile_batch(captioner, model_name, settings, batch_size, args) -> list[dict]:
    """Each setting's decode step profiled (`bench_profile.step_profile`), and the methods' beside the baseline's."""
    import torch

    from neverfade.decoding.captured import CaptureFailed, CompileRefused

    inputs = captioner.inputs(_images(batch_size, args.image_size))
    entries, baseline = [], None
    for setting in settings:
        _use(captioner, setting, args.decode, args.compile)  # with --compile: the compiled step's kernels
        entry = {"model": model_name, "batch_size": batch_size, "setting": _key(setting), "compiled": captioner.compile}
        try:
            entry["profile"] = bench_profile.step_profile(captioner, inputs, args.profile_tokens)
        except (CaptureFailed, CompileRefused, torch.OutOfMemoryError) as err:
            entry["error"] = str(err) if isinstance(err, (CaptureFailed, CompileRefused)) else "out of memory"
            torch.cuda.empty_cache()
            entries.append(entry)
            continue
        entry["attention"] = captioner.attention_path() or "sdpa"
        if baseline is None:
            baseline = entry["profile"]
        else:
            entry["beside_baseline"] = bench_profile.beside(entry["profile"], baseline)
        entries.append(entry)
    return entries


def check_batch(captioner, model_name, settings, batch_size, args) -> list[dict]:
    """Tokens of the decode path against a plainer one, per setting: a captured replay against the same loop run
    eagerly ("static"); the static loop (on a CPU) against generate's own loop ("eager"). Both take the setting's
    attention (the fused kernel where asked for): the check is of the replay, not of the kernel."""
    import torch

    from neverfade.decoding.captured import CaptureFailed, CompileRefused

    inputs = captioner.inputs(_images(batch_size, args.image_size))
    results = []
    for setting in settings:
        _use(captioner, setting, args.decode, args.compile)
        path = captioner.decode_path()
        if path not in ("captured", "static"):
            continue
        reference_path = "static" if path == "captured" else "eager"
        with _reproducible_attention(captioner.model.device):
            try:
                _, fast = _timed(captioner, inputs, args.check_tokens)
            except CompileRefused:
                continue  # nothing to check: the setting's row is the refusal
            except CaptureFailed as err:
                results.append(
                    {
                        "model": model_name,
                        "batch_size": batch_size,
                        "setting": _key(setting),
                        "path": path,
                        "compiled": captioner.compile,
                        "same": False,
                        "error": str(err),
                    }
                )
                continue
            attention = captioner.attention_path() or "sdpa"  # the checked run's; the reference runs the same
            compiled, captioner.compile = captioner.compile, False  # the reference: not compiled, not captured
            captioner.decode = reference_path
            _, reference = _timed(captioner, inputs, args.check_tokens)
        prompt = inputs["input_ids"].shape[1]
        fast, reference = fast[:, prompt:], reference[:, prompt:]
        differs = (fast != reference).any(0).nonzero()
        results.append(
            {
                "model": model_name,
                "batch_size": batch_size,
                "setting": _key(setting),
                "path": path,
                "compiled": compiled,
                "attention": attention,
                "reference": reference_path,
                "tokens": int(fast.numel()),
                "same": bool(torch.equal(fast, reference)),
                "first_difference": int(differs[0]) if len(differs) else None,
            }
        )
    return results


def _reproducible_attention(device):
    """SDPA pinned to the memory-efficient and math kernels: cuDNN's attention kernel is not reproducible between a
    captured and an eager run (measured on the H100), which would hide what the check is for."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _line(row: dict) -> str:
    if "error" in row:
        return f"{row['model']} batch {row['batch_size']} {row['setting']}: {row['error']}"
    return (
        f"{row['model']} batch {row['batch_size']} {row['setting']} ({row['path']}, {row['attention']}): "
        f"{row['ms_per_token']:.2f} ms/token, x{row.get('overhead', float('nan')):.3f}"
    )


def table(rows: list[dict]) -> str:
    header = [
        "model",
        "batch",
        "setting",
        "path",
        "attention",
        "ms/token",
        "tokens/s",
        "x baseline",
        "x floor",
        "compile s",
        "peak GiB",
        "state floats/img token",
    ]
    lines = []
    for r in rows:
        state = ", ".join(f"{k} {v:g}" for k, v in r.get("state_floats_per_image_token", {}).items())
        if "error" in r:
            lines.append([r["model"], str(r["batch_size"]), r["setting"], r["error"]] + [""] * 8)
            continue
        lines.append(
            [
                r["model"],
                str(r["batch_size"]),
                r["setting"],
                r["path"] + (f"+{bench_profile.compiled_label(r['compiled'])}" if r.get("compiled") else ""),
                r["attention"],
                f"{r['ms_per_token']:.2f}",
                f"{r['tokens_per_s']:.1f}",
                f"{r['overhead']:.3f}" if "overhead" in r else "",
                f"{r['x_floor']:.2f}" if "x_floor" in r else "",
                f"{r['compile_s']:.1f}" if "compile_s" in r else "",
                f"{r['peak_gib']:.2f}" if "peak_gib" in r else "",
                state,
            ]
        )
    widths = [max(len(x[i]) for x in [header] + lines) for i in range(len(header))]

    def fmt(x):
        return " | ".join(c.ljust(w) for c, w in zip(x, widths))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])
