"""`neverfade bench --profile`: where a setting's decode step spends its time, beside the baseline's.

Each setting decodes once on the static loop under torch.profiler: the captured path's step with each kernel
launched on its own, so the profiler sees every kernel (a CUDA graph's replay runs the same ones). A decode step's
figures are the difference between a generate of `tokens` new tokens and one of a single token (the prefill), over
the steps between: the device's kernel time and kernel count on CUDA, or on a CPU the ATen operators' own time and
count (nested operators counted each). The kernels a method adds or lengthens beside the baseline say why it costs
what bench measures."""

from __future__ import annotations

TOP = 12  # kernels listed per setting


def _ops(captioner, inputs, new_tokens: int) -> dict[str, tuple[float, int]]:
    """{kernel or operator: (microseconds, count)} over one forced-length greedy generate."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = captioner.model.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof, torch.no_grad():
        captioner.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        if cuda:
            torch.cuda.synchronize(captioner.model.device)
    ops: dict[str, tuple[float, int]] = {}
    for e in prof.key_averages():
        if cuda and e.device_type != DeviceType.CUDA:
            continue
        time_us = e.self_device_time_total if cuda else e.self_cpu_time_total
        time_before, count_before = ops.get(e.key, (0.0, 0))
        ops[e.key] = (time_before + time_us, count_before + e.count)
    return ops


def step_profile(captioner, inputs, tokens: int) -> dict:
    """Per decode step on the static loop: ms of kernel time, kernel count, and each kernel's share."""
    if tokens < 2:
        raise ValueError("a step profile needs at least 2 new tokens")
    decode = captioner.decode
    captioner.decode = "static"
    try:
        path = captioner.decode_path()  # "static", or "strategy" for a method with its own loop
        _ops(captioner, inputs, tokens)  # warm-up: allocations, first calls and compiling stay out of the profile
        prefill = _ops(captioner, inputs, 1)
        whole = _ops(captioner, inputs, tokens)
    finally:
        captioner.decode = decode
    steps = tokens - 1
    per_step = {}
    for name, (time_us, count) in whole.items():
        t0, c0 = prefill.get(name, (0.0, 0))
        if count - c0 > 0 or time_us - t0 > 0:
            per_step[name] = ((time_us - t0) / steps / 1e3, (count - c0) / steps)
    return {
        "path": path,
        "unit": "cuda kernels" if captioner.model.device.type == "cuda" else "cpu aten operators",
        "steps": steps,
        "ms_per_step": round(sum(t for t, _ in per_step.values()), 4),
        "ops_per_step": round(sum(c for _, c in per_step.values()), 2),
        "ops": {k: [round(t, 5), round(c, 3)] for k, (t, c) in sorted(per_step.items(), key=lambda kv: -kv[1][0])},
    }


def beside(profile: dict, baseline: dict) -> dict:
    """What a setting's step adds to the baseline's: in total, and the kernels that grew most (time, then count)."""
    ops, base = profile["ops"], baseline["ops"]
    grown = {
        name: [round(t - base.get(name, [0.0, 0])[0], 5), round(c - base.get(name, [0.0, 0])[1], 3)]
        for name, (t, c) in ops.items()
    }
    grown.update({name: [-t, -c] for name, (t, c) in base.items() if name not in ops})
    top = sorted(grown.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:TOP]
    return {
        "ms_per_step": round(profile["ms_per_step"] - baseline["ms_per_step"], 4),
        "ops_per_step": round(profile["ops_per_step"] - baseline["ops_per_step"], 2),
        "top": [{"name": name, "ms_per_step": t, "per_step": c} for name, (t, c) in top],
    }


def compiled_label(mode: str | bool) -> str:
    """A compiled row's path suffix: "compiled", with its mode when not the default."""
    return "compiled" if mode in (True, "default") else f"compiled[{mode}]"


def summary(entry: dict) -> str:
    """One setting's profile in a few lines (or its error)."""
    head = f"profile {entry['model']} batch {entry['batch_size']} {entry['setting']}"
    if "error" in entry:
        return f"{head}: not profiled: {entry['error']}"
    p = entry["profile"]
    text = (
        f"{head} ({p['path']}{'+' + compiled_label(entry['compiled']) if entry.get('compiled') else ''}, {p['unit']}): "
        f"{p['ms_per_step']:.3f} ms in {p['ops_per_step']:g} per step"
    )
    extra = entry.get("beside_baseline")
    if extra:
        text += f"; beside the baseline {extra['ms_per_step']:+.3f} ms, {extra['ops_per_step']:+g}"
        for k in extra["top"][:5]:
            text += f"\n    {k['ms_per_step']:+.4f} ms {k['per_step']:+g}x {k['name'][:100]}"
    return text
