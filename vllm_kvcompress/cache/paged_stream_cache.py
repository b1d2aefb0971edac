"""PagedStreamCache: per-head paged KV storage of all layers, and its operations.

The caller (vLLM's scheduler, or the reference runner with a PagePool) decides which pages
each request owns and passes them in with `add_pages`; the cache places head-blocks inside
them. Requests are addressed by a slot 0 .. max_requests - 1 that the caller assigns. All
state lives in tensors on `device`; see pools.py and stream_tables.py for the layout.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from vllm_kvcompress.cache.append import append_tokens, pages_needed, plan_growth
from vllm_kvcompress.cache.compaction import compact_layer
from vllm_kvcompress.cache.invariants import check_invariants
from vllm_kvcompress.cache.pools import LayerPools, create_layer_pools
from vllm_kvcompress.cache.stream_tables import StreamTables, stream_slot_ids
from vllm_kvcompress.kernels import paged_attention, write_slots
from vllm_kvcompress.policies.base import Selection

IntsLike = Sequence[int] | torch.Tensor


class StreamView(NamedTuple):
    """One layer's streams of R requests, padded to T slots, request-major (N = R * H):
    keys, values [N, T, D]; positions [N, T] int64 (-1 in padding); scores [N, T] float32;
    lengths [N] int64."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


class PagedStreamCache:
    """Per-head paged KV cache: L layers x H KV heads, head-blocks of `block_size` slots.

    kv_pools: optional list of L (keys, values) pairs of externally allocated head-block
    pools, each [num_pages * H, block_size, head_size] with any strides (views of vLLM's KV
    tensors); allocated here when None. max_blocks_per_stream defaults to
    max_pages_per_request (a stream never holds more tokens than its request). impl: kernel
    implementation ("torch", "triton", None = automatic, see kernels/dispatch.py).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int, num_pages: int,
                 max_requests: int, max_pages_per_request: int, block_size: int = 32,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 kv_pools: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 max_blocks_per_stream: int | None = None, impl: str | None = None):
        self.num_layers, self.num_kv_heads, self.head_size = num_layers, num_kv_heads, head_size
        self.block_size, self.num_pages, self.max_requests = block_size, num_pages, max_requests
        self.device = torch.device(device)
        self.impl = impl
        self.layers: list[LayerPools] = create_layer_pools(
            num_layers, num_pages * num_kv_heads, block_size, head_size, dtype, device, kv_pools)
        self.tables = StreamTables.create(
            num_layers, num_kv_heads, max_requests, max_pages_per_request,
            max_blocks_per_stream or max_pages_per_request, device)
        # Host copy of the page counts: the caller's own bookkeeping, read without syncs.
        self._page_counts = [0] * max_requests
        # Leading pages each request reads but another request wrote (share_prefix).
        self.shared_pages = [0] * max_requests

    # ----- pages (request level) -----

    def add_pages(self, slot: int, page_ids: IntsLike) -> None:
        """Append pages to request `slot`'s page list (ids chosen by the caller)."""
        page_ids = torch.as_tensor(page_ids, dtype=torch.int32).to(self.device)
        count = self._page_counts[slot]
        if count + len(page_ids) > self.tables.request_pages.shape[1]:
            raise RuntimeError(f"request slot {slot}: {count + len(page_ids)} pages exceed "
                               f"max_pages_per_request={self.tables.request_pages.shape[1]}")
        self.tables.request_pages[slot, count:count + len(page_ids)] = page_ids
        self._set_page_count(slot, count + len(page_ids))

    def release_pages(self, slot: int, keep_pages: int) -> torch.Tensor:
        """Drop request `slot`'s pages after the first `keep_pages`; returns their ids.

        Compaction packs live head-blocks into the first pages; releasing a page that
        still holds one is an error.
        """
        count = self._page_counts[slot]
        if keep_pages >= count:
            return self.tables.request_pages.new_zeros(0)
        used = int(self.tables.used_blocks[:, slot].max())
        if used > keep_pages * self.num_kv_heads:
            raise RuntimeError(f"request slot {slot}: {used} head-blocks in use need "
                               f"{-(-used // self.num_kv_heads)} pages, cannot keep {keep_pages}")
        released = self.tables.request_pages[slot, keep_pages:count].clone()
        self._set_page_count(slot, keep_pages)
        return released

    def share_prefix(self, slot: int, num_tokens: int) -> None:
        """Start request `slot`'s empty streams on its first num_tokens / block_size pages,
        which already hold those tokens in the uncompressed layout (page p: head-block p
        of every stream), e.g. pages of vLLM's prefix cache that another request wrote.

        The request only reads them: its appends go to later pages, and compaction
        writes to the pages left after `drop_leading_pages`."""
        num_pages, rest = divmod(num_tokens, self.block_size)
        if rest or num_pages > self._page_counts[slot]:
            raise ValueError(f"request slot {slot}: a shared prefix of {num_tokens} tokens "
                             f"must fill whole pages among its {self._page_counts[slot]}")
        heads = self.num_kv_heads
        pages = self.tables.request_pages[slot, :num_pages].long()
        blocks = pages[None, :] * heads + torch.arange(heads, device=self.device)[:, None]
        self.tables.block_tables[:, slot, :, :num_pages] = blocks.int()
        self.tables.lengths[:, slot] = num_tokens
        self.tables.used_blocks[:, slot] = num_pages * heads
        self.shared_pages[slot] = num_pages

    def drop_leading_pages(self, slot: int, count: int) -> None:
        """Take request `slot`'s first `count` pages off its page list, just before every
        layer of it is compacted: the compaction then writes its survivors to the pages
        after them and reads the old slots where they are. The dropped pages (shared
        ones, hashed by the caller) are never written by this request."""
        if count <= 0:
            return
        held = self._page_counts[slot]
        if count >= held:
            raise RuntimeError(f"request slot {slot}: dropping {count} of its {held} pages "
                               f"leaves none to compact into")
        pages = self.tables.request_pages
        pages[slot, :held - count] = pages[slot, count:held].clone()
        self._set_page_count(slot, held - count)
        self.shared_pages[slot] = max(self.shared_pages[slot] - count, 0)

    def pages_in_use(self, slots: IntsLike) -> torch.Tensor:
        """[R] int64: pages holding live head-blocks of each request (its largest layer)."""
        used = self.tables.used_blocks[:, self._slots(slots)].long()
        return (-(-used // self.num_kv_heads)).amax(dim=0)

    def pages_needed(self, slots: IntsLike, num_new: IntsLike) -> torch.Tensor:
        """[R] int64: pages each request needs to append num_new [R] tokens."""
        slots = self._slots(slots)
        growth = plan_growth(self.tables, slots, self._counts(num_new)[0], self.block_size)
        return pages_needed(growth, self.num_kv_heads)

    def reset(self, slots: IntsLike) -> torch.Tensor:
        """Forget requests (finished or preempted): empty streams, no pages. Returns the
        pages they held, request after request."""
        slot_list = [int(s) for s in slots]
        counts = torch.tensor([self._page_counts[s] for s in slot_list])
        owned = torch.arange(self.tables.request_pages.shape[1]) < counts[:, None]
        device_slots = self._slots(slot_list)
        pages = self.tables.request_pages[device_slots][owned.to(self.device)]
        self.tables.lengths[:, device_slots] = 0
        self.tables.used_blocks[:, device_slots] = 0
        self.tables.page_counts[device_slots] = 0
        for slot in slot_list:
            self._page_counts[slot] = 0
            self.shared_pages[slot] = 0
        return pages

    # ----- tokens -----

    def append(self, slots: IntsLike, num_new: IntsLike) -> torch.Tensor:
        """Make room for num_new [R] new tokens of requests `slots` [R] in every stream.

        Returns the flat slot ids [L, sum(num_new), H] int64 (head_block * block_size +
        offset) of the new tokens, request-major. Raises, changing nothing, when a request
        lacks pages (see pages_needed).
        """
        num_new, num_tokens, max_new = self._counts(num_new)
        return append_tokens(self.tables, self._slots(slots), num_new, num_tokens, max_new,
                             self.block_size)

    def write(self, layer: int, slot_ids: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor, positions: torch.Tensor,
              scores: torch.Tensor | None = None) -> None:
        """Store new tokens of one layer: slot_ids [tokens, H] (append's [layer]), keys and
        values [tokens, H, D], positions [tokens]; scores [tokens, H] start at 0 if None."""
        num_tokens, num_heads = slot_ids.shape
        pools = self.layers[layer]
        write_slots(*pools, slot_ids.reshape(-1),
                    keys.reshape(-1, self.head_size), values.reshape(-1, self.head_size),
                    positions[:, None].expand(num_tokens, num_heads).reshape(-1),
                    None if scores is None else scores.reshape(-1), self.impl)

    def gather(self, layer: int, slots: IntsLike, max_len: int | None = None) -> StreamView:
        """One layer's streams of requests `slots`, padded to max_len (default: the
        longest stream, read from the device: a sync on a GPU)."""
        slots = self._slots(slots)
        lengths = self.tables.lengths[layer, slots].reshape(-1).long()
        if max_len is None:
            max_len = int(lengths.max()) if len(lengths) else 0
        tables = self.tables.block_tables[layer, slots].reshape(len(lengths), -1)
        flat, live = stream_slot_ids(tables, lengths, self.block_size, max_len)
        pools = self.layers[layer]
        head_block, offset = flat // self.block_size, flat % self.block_size
        live_d = live[..., None]
        return StreamView(
            keys=torch.where(live_d, pools.keys[head_block, offset], 0),
            values=torch.where(live_d, pools.values[head_block, offset], 0),
            positions=torch.where(live, pools.positions[head_block, offset].long(), -1),
            scores=torch.where(live, pools.scores[head_block, offset], 0.0),
            lengths=lengths)

    def compact(self, layer: int, slots: IntsLike, selection: Selection) -> None:
        """Apply a policy's Selection over `gather(layer, slots)`'s padded [R * H, T] layout:
        survivors (merged per the Selection) become each stream's first slots, the
        request's live head-blocks are repacked into its first pages. T must cover every
        live slot (slots past T count as evicted)."""
        compact_layer(self.layers[layer], self.tables, layer, self._slots(slots), selection,
                      self.impl)

    def attention(self, layer: int, query: torch.Tensor, query_start_loc: torch.Tensor,
                  slots: IntsLike, scale: float, emit_scores: bool = False,
                  max_query_len: int | None = None) -> torch.Tensor:
        """Attention [tokens, Hq, D] of this step's queries [tokens, Hq, D] (request r's are
        query[qsl[r]:qsl[r + 1]], its last q_len tokens, already appended and written).
        emit_scores adds each slot's attention mass to its accumulated score."""
        pools = self.layers[layer]
        return paged_attention(query, pools.keys, pools.values,
                               self.tables.block_tables[layer], self.tables.lengths[layer],
                               self._slots(slots), query_start_loc, scale,
                               pools.scores if emit_scores else None, max_query_len, self.impl)

    def check_invariants(self, free_pages: torch.Tensor | None = None) -> None:
        """Raise AssertionError unless the storage invariants hold (tests; syncs freely).
        free_pages: the caller's free page ids, to check free + owned = all pages."""
        check_invariants(self, free_pages)

    # ----- helpers -----

    def _slots(self, slots: IntsLike) -> torch.Tensor:
        return torch.as_tensor(slots, dtype=torch.int64).to(self.device)

    def _counts(self, num_new: IntsLike) -> tuple[torch.Tensor, int, int]:
        """num_new on the device, plus its sum and max on the host (they size tensors;
        reading them from a GPU tensor is a sync, so callers pass host values)."""
        host = torch.as_tensor(num_new, dtype=torch.int64).cpu()
        total, most = (int(host.sum()), int(host.max())) if len(host) else (0, 0)
        return host.to(self.device), total, most

    def _set_page_count(self, slot: int, count: int) -> None:
        self._page_counts[slot] = count
        self.tables.page_counts[slot] = count
