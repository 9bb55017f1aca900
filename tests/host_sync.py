"""A guard against host synchronisation, for CPU tests: inside `no_host_sync()`, neverfade's own code may not read a
tensor on the host. `torch.cuda.set_sync_debug_mode` needs CUDA; this patches, for the duration, the Python entry
points that read a tensor's values on the host (or make a shape depend on them) so that a call from a module whose
name starts with `prefix` raises `HostSync`. Calls from transformers or torch pass: only the caller's module counts,
so a read inside a torch or transformers function that neverfade calls is not seen. Boolean indexing is watched
through a TorchFunctionMode instead: setting and then deleting `__getitem__` on torch.Tensor would leave the type
looking like a sequence to CPython (its `sq_item` slot is not restored), and `torch.tensor([tensor(1)])` breaks."""

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
        with _BoolIndexing(prefix, seen):
            yield
    finally:
        for owner, name, original in reversed(saved):
            if original is _ABSENT:
                delattr(owner, name)  # it was inherited (torch._C.TensorBase)
            else:
                setattr(owner, name, original)


_ABSENT = object()


class _BoolIndexing(torch.overrides.TorchFunctionMode):
    """Boolean indexing or assignment (a shape that depends on values) from a module named `prefix...`."""

    def __init__(self, prefix, seen):
        super().__init__()
        self.prefix, self.seen = prefix, seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _has_bool_index(args[1]):
            caller = sys._getframe(1)
            module = caller.f_globals.get("__name__", "")
            if module.startswith(self.prefix):
                where = f"{func.__name__} from {module}:{caller.f_lineno} ({caller.f_code.co_name})"
                if self.seen is not None:
                    self.seen.append(where)
                raise HostSync(f"host synchronisation: {where}")
        return func(*args, **(kwargs or {}))
