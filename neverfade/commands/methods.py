"""`neverfade methods`: every method, its parameters, their defaults and where each default comes from."""

from __future__ import annotations

import json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "methods",
        help="list the methods with their parameters and defaults",
        description="List every method, its parameters, defaults and their sources.",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def catalogue() -> list[dict]:
    from neverfade.methods import METHODS
    from neverfade.models.families import FAMILIES

    out = []
    for method in METHODS.values():
        params = []
        for p in method.params:
            per_family = {
                f.name: f.method_defaults[method.name][p.name]
                for f in FAMILIES.values()
                if p.name in f.method_defaults.get(method.name, {})
            }
            unvalidated = sorted(
                {f.name for f in FAMILIES.values() if f.name in per_family and method.name in f.unvalidated}
            )
            params.append(
                {
                    "name": p.name,
                    "type": p.type.__name__,
                    "default": p.default,
                    "per_family": per_family or None,
                    "unvalidated": unvalidated,  # families whose default here is extrapolated: `neverfade tune`
                    "source": p.source,
                    "help": p.help,
                }
            )
        out.append({"name": method.name, "summary": method.summary, "params": params})
    return out


def run(args) -> int:
    methods = catalogue()
    if args.json:
        print(json.dumps(methods, indent=2))
        return 0
    for m in methods:
        print(f"{m['name']}: {m['summary']}")
        for p in m["params"]:
            default = (
                p["default"] if p["per_family"] is None else ", ".join(f"{k} {v}" for k, v in p["per_family"].items())
            )
            if p["unvalidated"]:
                default += f" (unvalidated: {', '.join(p['unvalidated'])}; calibrate with `neverfade tune`)"
            print(f"  --{m['name']}-{p['name'].replace('_', '-')} ({p['type']}) default {default}")
            print(f"      {p['help']}; source: {p['source']}")
    return 0
