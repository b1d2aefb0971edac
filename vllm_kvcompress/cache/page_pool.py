"""Free pages of a KV pool, for callers outside vLLM (tests, the reference runner).

Inside vLLM the scheduler's block pool decides page ids; the cache never chooses pages, it
only places head-blocks inside the pages a request was given. This stack plays the
scheduler's part elsewhere.
"""

from __future__ import annotations

import torch


class PagePool:
    """A stack of free page ids on `device`; allocate and free are vectorized slices."""

    def __init__(self, num_pages: int, device: torch.device | str = "cpu"):
        self.num_pages = num_pages
        # Low ids on top of the stack, so a fresh pool hands out 0, 1, 2, ...
        self._stack = torch.arange(num_pages - 1, -1, -1, dtype=torch.int32, device=device)
        self.num_free = num_pages

    def allocate(self, count: int) -> torch.Tensor:
        """[count] int32 page ids taken off the free stack."""
        if count > self.num_free:
            raise RuntimeError(f"page pool exhausted: {count} pages asked, {self.num_free} free")
        self.num_free -= count
        return self._stack[self.num_free:self.num_free + count].flip(0).clone()

    def free(self, pages: torch.Tensor) -> None:
        """Return pages [n] to the pool."""
        count = pages.numel()
        if self.num_free + count > self.num_pages:
            raise RuntimeError("page pool overflow: a page was freed twice")
        self._stack[self.num_free:self.num_free + count] = pages.flip(0).to(torch.int32)
        self.num_free += count

    def free_pages(self) -> torch.Tensor:
        """[num_free] int32 ids currently free."""
        return self._stack[:self.num_free]
