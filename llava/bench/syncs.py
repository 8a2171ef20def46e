"""Host synchronisations counted on any device, at the level of ATen operators.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports every call that makes the host wait for the device;
on a CPU there is no device to wait for, so that mode cannot be used. What it would report is decided
by the operator, not the device: an operator that *reads a value* on the host (``item``, ``int(t)``,
``bool(t)``: ATen ``_local_scalar_dense``) or whose *output size depends on the data* (``nonzero``,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, indexing with a boolean
mask) must wait for the device on CUDA. ``HostSyncAudit`` records those operators as they are
dispatched (a ``TorchDispatchMode``, so calls made inside library code count too, e.g. a boolean mask
inside an ``index`` call or ``torch.where(condition)``), plus the two reads that never reach the
dispatcher on a CPU tensor (``Tensor.tolist``, ``Tensor.numpy``; a ``TorchFunctionMode``).

Separately, ``host_copies`` lists tensors made from host data (``torch.tensor(list)``, indexing with a
Python list: ATen ``lift_fresh``): on CUDA each is a host-to-device copy, which blocks the host while the
copy is staged but does not wait for earlier device work (the sync debug mode does not report it).
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operators (overload packets) that wait for the device on CUDA, whatever their arguments
ALWAYS_SYNC = {
    "_local_scalar_dense": "read a value (item / int / bool)",
    "nonzero": "nonzero (also torch.where(condition))",
    "masked_select": "masked_select",
    "_unique": "unique",
    "_unique2": "unique",
    "unique_dim": "unique",
    "unique_consecutive": "unique",
    "_assert_async": "assert on a device value",
}
# operators that sync only with a boolean-mask index
INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
HOST_READS = {"torch.Tensor.tolist": "tolist", "torch.Tensor.numpy": "numpy"}


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def classify(func, args, kwargs) -> str | None:
    """What makes ``func(*args, **kwargs)`` (an ATen overload) a host sync on CUDA, or None."""
    name = func.overloadpacket.__name__
    if name in ALWAYS_SYNC:
        return ALWAYS_SYNC[name]
    if name in INDEX_OPS and _has_mask_index(args):
        return "boolean-mask indexing"
    if name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"  # repeats on the device: the output size is a read
    return None


class _Dispatch(TorchDispatchMode):
    def __init__(self, audit: HostSyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = classify(func, args, kwargs)
        if reason is not None:
            self.audit.syncs.append(reason)
        elif func.overloadpacket.__name__ == "lift_fresh":
            self.audit.host_copies.append("tensor from host data")
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, audit: HostSyncAudit):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = resolve_name(func)
        if name in HOST_READS:
            self.audit.syncs.append(HOST_READS[name])
        return func(*args, **(kwargs or {}))


class HostSyncAudit:
    """``with HostSyncAudit() as audit: ...`` -> ``audit.syncs``: one reason per operator call that waits
    for the device on CUDA (in call order); ``audit.host_copies``: tensors made from host data."""

    def __init__(self):
        self.syncs: list[str] = []
        self.host_copies: list[str] = []
        self._modes = (_Function(self), _Dispatch(self))

    def __enter__(self) -> HostSyncAudit:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False

    @property
    def count(self) -> int:
        return len(self.syncs)

    def summary(self) -> dict[str, int]:
        """{reason: calls}."""
        out: dict[str, int] = {}
        for reason in self.syncs:
            out[reason] = out.get(reason, 0) + 1
        return out


def count_host_syncs(fn) -> HostSyncAudit:
    """Run ``fn()`` once under ``HostSyncAudit`` (no autograd) and return the audit."""
    audit = HostSyncAudit()
    with torch.no_grad(), audit:
        fn()
    return audit
