"""Counting the ops that make the host wait for the device.

On CUDA, reading a tensor's value on the host (`.item()`, `int(t)`, `bool(t)`) and ops
whose output shape depends on the data (`nonzero`, boolean-mask indexing, `unique`,
`repeat_interleave` without `output_size`) block until the GPU has caught up: each one
drains the launch queue. On CPU nothing waits, but the same ops run, so counting them
in a CPU test bounds what the GPU step will pay.

Data-dependent ops are seen by a dispatch mode. Value reads are seen by wrapping
`Tensor.item` and the number conversions, because under `torch.inference_mode` (vLLM's
forward) a CPU tensor's `item()` skips the dispatcher. Copies to the host (`.cpu()`,
`.tolist()`) are not counted: on CPU they cannot be told from host bookkeeping; on a GPU
`torch.cuda.set_sync_debug_mode` sees them.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops that size their output by the data (value reads are counted by VALUE_READS).
SYNCING_OPS = {
    _aten.nonzero.default: "nonzero",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_consecutive.default: "unique",
    _aten.unique_dim.default: "unique",
}
VALUE_READS = ("item", "__bool__", "__int__", "__float__", "__index__")


class HostSyncCounter(TorchDispatchMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.total`, `syncs.by_kind` and
    `syncs.sites` (the first "file:line" outside torch that led to each). One counter at
    a time: value reads are counted by patching `torch.Tensor`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_kind: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self):
        for name in VALUE_READS:
            self._saved[name] = original = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counted(original))
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def _counted(self, read):
        def counted_read(tensor, *args, **kwargs):
            self._count("item")
            return read(tensor, *args, **kwargs)
        return counted_read

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = SYNCING_OPS.get(func) or _data_dependent_kind(func, args, kwargs)
        if kind is not None:
            self._count(kind)
        return func(*args, **kwargs)

    def _count(self, kind: str) -> None:
        self.by_kind[kind] += 1
        frame = sys._getframe(1)
        while frame is not None and (frame.f_code.co_filename == __file__
                                     or f"{os.sep}torch{os.sep}" in frame.f_code.co_filename):
            frame = frame.f_back
        if frame is not None:
            name = frame.f_code.co_filename.split(f"vllm_kvcompress{os.sep}", 1)[-1]
            self.sites[f"{name}:{frame.f_lineno}"] += 1


def _data_dependent_kind(func, args, kwargs) -> str | None:
    repeats_from_a_tensor = (_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor)
    if func in repeats_from_a_tensor and kwargs.get("output_size") is None:
        return "repeat_interleave"
    if func in (_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(i is not None and i.dtype == torch.bool for i in indices):
            return "boolean mask"
    return None
