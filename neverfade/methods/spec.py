"""Method settings written as one string, the same for every command and the demo (parsed here only):

    sparc:tau=8,alpha=1.2+locore      methods joined by "+", each with optional name=value pairs after ":"
    baseline                          no method

`parse_spec` gives [(method, {parameter: value})], values checked and typed by the method's `Param.check`;
`format_spec` writes it back; `label` names it as result records do ("sparc+locore", "baseline"). Values given
another way (a command's `--sparc-tau 8`, the demo's flags) are `sugar`: merged in, and refused where they disagree
with the string.
"""

from __future__ import annotations

from typing import Any

from neverfade.errors import ParameterError

BASELINE = "baseline"
Spec = list[tuple[str, dict[str, Any]]]


def parse_run(text: str, params: dict[str, dict[str, Any]] | None = None) -> tuple[list[str], dict[str, dict]]:
    """The grammar alone: "sparc:tau=8,alpha=1.2+locore" -> (["sparc", "locore"], {"sparc": {"tau": "8", "alpha":
    "1.2"}}), values as written, on top of `params` (values given another way, e.g. --sparc-tau; a value given both
    ways must agree)."""
    names, values = [], {}
    for part in text.split("+"):
        name, _, assignments = part.strip().partition(":")
        if not name:
            raise ParameterError(f"{text!r}: a method name is missing (methods are joined by '+')")
        names.append(name)
        own = dict((params or {}).get(name, {}))
        written: set[str] = set()
        for assignment in filter(None, assignments.split(",")):
            key, eq, value = assignment.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key:
                raise ParameterError(f"{text!r}: expected name=value, got {assignment!r}")
            if key in written:
                raise ParameterError(f"{text!r}: {name} {key} is given twice")
            written.add(key)
            if key in own and _checked(name, key, own[key]) != _checked(name, key, value.strip()):
                raise ParameterError(
                    f"{name} {key} is {value.strip()} in {text!r} but {own[key]} from "
                    f"--{name}-{key.replace('_', '-')}; give it once"
                )
            own[key] = value.strip()
        if own:
            values[name] = own
    return names, values


def parse_spec(text: str, sugar: dict[str, dict[str, Any]] | None = None) -> Spec:
    """[(method, {parameter: checked value})] for `text`, with the `sugar` values of the methods it names merged in;
    `baseline` stands for no method. ParameterError for a bad string, an unknown method or parameter, a bad value."""
    from neverfade.methods import METHODS

    names, values = parse_run(text, sugar)
    spec: Spec = []
    for name in names:
        if name == BASELINE:
            if values.get(name):
                raise ParameterError(f"{text!r}: baseline takes no parameters")
            continue
        if name not in METHODS:
            raise ParameterError(f"unknown method {name!r}; known: {', '.join([BASELINE, *METHODS])}")
        if name in (n for n, _ in spec):
            raise ParameterError(f"{text!r}: {name} is listed twice")
        spec.append((name, {key: _checked(name, key, v, strict=True) for key, v in values.get(name, {}).items()}))
    return spec


def format_spec(spec: Spec) -> str:
    """The string `parse_spec` reads back as `spec`."""
    return (
        "+".join(
            name + (":" + ",".join(f"{k}={_written(v)}" for k, v in values.items()) if values else "")
            for name, values in spec
        )
        or BASELINE
    )


def label(spec: Spec) -> str:
    """The methods' names, as result records name a run (runner.Run.label): "sparc+locore", or "baseline"."""
    return "+".join(name for name, _ in spec) or BASELINE


def setting(spec: Spec) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """(names, parameters) as `build_methods`, `Captioner.use` and `runner.prepare_runs` take them."""
    return [name for name, _ in spec] or [BASELINE], {name: dict(values) for name, values in spec if values}


def split_list(text: str) -> list[str]:
    """Settings separated by commas, "baseline,sparc:tau=8,alpha=1.2+locore" -> ["baseline", "sparc:tau=8,alpha=1.2
    +locore"]: a comma followed by name=value continues the setting before it."""
    out: list[str] = []
    for piece in text.split(","):
        key, eq, _ = piece.partition("=")
        if out and eq and not any(c in key for c in ":+"):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return [s.strip() for s in out if s.strip()]


def _checked(method: str, key: str, value: Any, strict: bool = False) -> Any:
    """`value` checked by the method's declared parameter; as it is where the method or parameter is unknown
    (unless `strict`: then that is the error)."""
    from neverfade.methods import METHODS

    params = {p.name: p for p in getattr(METHODS.get(method), "params", ())}
    if key not in params:
        if strict:
            raise ParameterError(f"{method} has no parameter {key}; it has {', '.join(params) or 'none'}")
        return value
    try:
        return params[key].check(value)
    except ParameterError as err:
        if strict:
            raise ParameterError(f"{method}: {err}") from None
        return value


def _written(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):  # no "+" in an exponent: it joins methods
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value).replace("e+", "e")
    return str(value)
