"""Host values to the device without stalling the host.

`torch.tensor(values, device="cuda")` copies from pageable memory and waits for the copy
(and so for every kernel queued before it): a host sync that no dispatch-mode counter
sees. Staging through pinned memory (PyTorch's caching host allocator, which keeps a
buffer until its copy is done) lets the copy queue behind the step's kernels instead.
"""

from __future__ import annotations

from typing import Sequence

import torch


def host_to_device(values: Sequence[int] | torch.Tensor, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a tensor of `dtype` on `device`."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
