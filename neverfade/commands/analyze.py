"""`neverfade analyze`: caption images while probes watch, and plot what the attention did."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from neverfade.commands.options import (
    add_method_options,
    add_model_options,
    add_world_option,
    load_captioner,
    method_choice,
    scene_world,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="attention diagnostics of a caption run: plots (PNG) and numbers (JSON)",
        description="Caption images with the chosen methods while probes watch the attention, and write into --out: "
        "attention_share.png (visual attention by output position, the SPARC paper's Fig. 5/7a), "
        "diversity.png (Wasserstein distance between consecutive visual-attention maps, its Fig. 3), "
        "selections_*.png (SPARC's selections per image token, over the image), saliency_*.png "
        "(LVLMs-Saliency of chosen output tokens: attention times gradient) and analysis.json.",
    )
    p.add_argument("input", nargs="?", help="an image file, a folder of images, or a JSONL manifest")
    p.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="analyze N held-out synthetic scenes instead of INPUT "
        "(their objects are known: saliency plots say which "
        "object words are hallucinated)",
    )
    add_world_option(p)
    p.add_argument("--out", default="analysis", help="output folder (default: ./analysis)")
    p.add_argument("--vs-baseline", action="store_true", help="also analyze the baseline (no methods), for comparison")
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer whose attention is read, 0-indexed (default: SPARC's selection layer for the family)",
    )
    p.add_argument(
        "--saliency-tokens",
        default="objects",
        help='output tokens that get saliency maps: "objects" (the default: the first token of each object '
        'named, at its first mention), "none", or a comma list of 1-based output positions and words, '
        'e.g. "5,12,house"',
    )
    p.add_argument("--saliency-max", type=int, default=8, help="at most this many saliency maps per caption")
    p.add_argument(
        "--diversity-tokens",
        type=int,
        default=100,
        help="first output tokens whose consecutive maps are compared (default 100, as the paper)",
    )
    p.add_argument("--prompt", default=None, help='default "Please describe this image in detail."')
    p.add_argument("--max-new-tokens", type=int, default=256)
    add_model_options(p)
    add_method_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neverfade.analysis.report import write_report
    from neverfade.analysis.run import analyze_setting, parse_saliency_tokens
    from neverfade.api import DEFAULT_PROMPT
    from neverfade.data.images import ImageError, InputError, load_image, read_items
    from neverfade.data.samples import sample_scene_items
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError, build_methods

    try:
        import matplotlib  # noqa: F401
        import ot  # noqa: F401
    except ImportError:
        raise UserError("neverfade analyze needs matplotlib and POT: pip install 'neverfade[analysis]'") from None
    for name, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--saliency-max", args.saliency_max),
        ("--diversity-tokens", args.diversity_tokens),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if (args.input is None) == (args.samples is None):
        raise UserError("give either INPUT or --samples N")
    try:
        items = (
            sample_scene_items(args.samples, scene_world(args)) if args.samples is not None else read_items(args.input)
        )
        for item in items:
            load_image(item.image)
        names, params = method_choice(args)
        if any(m.flags().strategy == "beam" for m in build_methods(names, params)):
            raise UserError("attention diagnostics cannot follow beam search (opera); analyze the other methods")
    except (InputError, ImageError, ParameterError, ValueError) as err:
        raise UserError(str(err)) from None

    captioner = load_captioner(args, names, params)
    settings = [(names, params)] + ([(["baseline"], {})] if args.vs_baseline and names != ["baseline"] else [])
    spec = parse_saliency_tokens(args.saliency_tokens)
    results, described, started = {}, {}, time.perf_counter()
    for setting_names, setting_params in settings:
        try:
            captioner.use(setting_names, setting_params)
            label = "+".join(m.name for m in captioner.methods) or "baseline"
            described[label] = captioner.describe()
            results[label] = analyze_setting(
                captioner,
                items,
                args.prompt or DEFAULT_PROMPT,
                args.max_new_tokens,
                args.layer,
                spec,
                args.diversity_tokens,
                args.saliency_max,
            )
        except ParameterError as err:
            raise UserError(str(err)) from None
        print(f"{label}: {len(items)} images analyzed", file=sys.stderr)
    meta = {
        "model": captioner.name,
        "layer": _layer(captioner, args.layer),
        "prompt": args.prompt or DEFAULT_PROMPT,
        "max_new_tokens": args.max_new_tokens,
        "diversity_tokens": args.diversity_tokens,
        "methods": described,
    }
    report = write_report(Path(args.out), results, meta)
    print(
        f"wrote {Path(args.out) / 'analysis.json'} and {len(report['plots'])} plots in "
        f"{time.perf_counter() - started:.1f}s",
        file=sys.stderr,
    )
    return 0


def _layer(captioner, layer: int | None) -> int:
    from neverfade.models.families import model_info

    return layer if layer is not None else model_info(captioner.model).default("sparc", "layer")
