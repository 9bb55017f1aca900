"""A guard against host synchronisation, for CPU tests: inside `no_host_sync()`, neverfade's own code may not read a
tensor on the host. `torch.cuda.set_sync_debug_mode` needs CUDA; this patches, for the duration, the Python entry
points that read a tensor's values on the host (or make a shape depend on them) so that a call from a module whose
name starts with `prefix` raises `HostSync`. Calls from transformers or torch pass: only the caller's module counts,
so a read inside a torch or transformers function that neverfade calls is not seen."""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch


class HostSync(AssertionError):  # not a RuntimeError: no `except RuntimeError` fallback may swallow it
    pass


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_cpu(args, kwargs) -> bool:
    devices = [*args, kwargs.get("device")]
    return any(str(d) == "cpu" for d in devices if isinstance(d, (str, torch.device)))


# (owner, name, when): `when(args, kwargs)` says whether this call reads the device (None: always)
GUARDED = (
    *((torch.Tensor, name, None) for name in ("item", "tolist", "cpu", "numpy", "nonzero", "masked_select")),
    *((torch.Tensor, name, None) for name in ("__bool__", "__int__", "__float__", "__index__")),
    *((torch.Tensor, name, None) for name in ("__repr__", "__format__", "multinomial")),  # printing; multinomial
    (torch.Tensor, "to", lambda args, kwargs: _to_cpu(args[1:], kwargs)),
    (torch.Tensor, "__getitem__", lambda args, kwargs: _has_bool_index(args[1])),  # boolean indexing
    (torch.Tensor, "__setitem__", lambda args, kwargs: _has_bool_index(args[1])),
    *((torch, name, None) for name in ("nonzero", "masked_select", "multinomial")),
)


@contextmanager
def no_host_sync(prefix: str = "neverfade", seen: list | None = None):
    """Raise HostSync at each guarded call made from a module named `prefix...`; each is also appended to `seen`
    (if given), in case some caller catches the error."""
    saved = []

    def guard(owner, name, when):
        original = getattr(owner, name)

        def guarded(*args, **kwargs):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith(prefix) and (when is None or when(args, kwargs)):
                where = f"{name} from {module}:{caller.f_lineno} ({caller.f_code.co_name})"
                if seen is not None:
                    seen.append(where)
                raise HostSync(f"host synchronisation: {where}")
            return original(*args, **kwargs)

        saved.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, guarded)

    try:
        for owner, name, when in GUARDED:
            guard(owner, name, when)
        yield
    finally:
        for owner, name, original in reversed(saved):
            if original is _ABSENT:
                delattr(owner, name)  # it was inherited (torch._C.TensorBase)
            else:
                setattr(owner, name, original)


_ABSENT = object()
