"""`neverfade demo`: a local web page that compares methods on an image, streaming the captions."""

from __future__ import annotations

import argparse
import sys

from neverfade.commands.options import (
    add_method_options,
    add_model_options,
    add_world_option,
    check_prompt_room,
    load_captioner,
    method_sugar,
    scene_world,
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="a local web page that compares methods side by side (http://127.0.0.1:8765)",
        description="Serve a page on 127.0.0.1 where you upload or pick an image, choose methods, and watch the "
        "captions stream side by side, with object words marked right or wrong on the synthetic scenes "
        "and a heatmap of where SPARC reinforced attention while each word was written. Method "
        "parameter flags (e.g. --sparc-tau 8) apply whenever that method is chosen on the page; a "
        "setting the page asks for may also carry values (sparc:tau=8+locore), which must agree with "
        "the flags.",
    )
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free port)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--prompt", default=None, help='default "Please describe this image in detail."')
    p.add_argument("--samples", type=int, default=8, help="synthetic scenes offered on the page (default 8)")
    add_world_option(p)
    p.add_argument("--max-upload-mb", type=float, default=20, help="largest upload accepted (default 20 MB)")
    add_model_options(p)
    add_method_options(p, with_method=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from neverfade.demo.server import DemoApp, make_server
    from neverfade.errors import UserError
    from neverfade.methods import ParameterError, build_methods

    if args.max_new_tokens < 1 or not 1 <= args.samples <= 64 or args.max_upload_mb <= 0:
        raise UserError("--max-new-tokens must be at least 1, --samples 1..64, --max-upload-mb above 0")
    params = method_sugar(args)
    try:
        for name, values in params.items():
            build_methods([name], {name: values})
    except ParameterError as err:
        raise UserError(str(err)) from None
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    captioner = load_captioner(args, [], {})
    check_prompt_room(captioner, args.prompt, args.max_new_tokens)
    app = DemoApp(
        captioner, params, args.max_new_tokens, args.prompt, args.samples, args.max_upload_mb, scene_world(args)
    )
    try:
        server = make_server(app, args.port)
    except OSError as err:
        raise UserError(f"cannot listen on 127.0.0.1:{args.port}: {err.strerror}") from None
    print(
        f"neverfade demo: http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", file=sys.stderr, flush=True
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
