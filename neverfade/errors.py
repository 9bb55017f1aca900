"""Errors that end a command with one line and exit status 2. No heavy imports here: the CLI imports this first."""


class CannotAct(RuntimeError):
    """neverfade cannot do what was asked here (a transformers release that changed, a step that cannot be
    captured): it stops, instead of quietly giving the baseline or a slower path."""


class ParameterError(ValueError):
    """An impossible or unknown method parameter."""


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""
