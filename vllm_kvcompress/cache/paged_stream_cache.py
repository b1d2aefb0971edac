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
from vllm_kvcompress.cache.device_copy import host_to_device
from vllm_kvcompress.cache.invariants import check_invariants
from vllm_kvcompress.cache.narrow_tier import compact_narrow, gather_streams
from vllm_kvcompress.cache.pools import (LayerPools, create_layer_pools, fresh_head_blocks,
                                         head_block_cells)
from vllm_kvcompress.cache.second_tier import (TierLayer, TierTables, TierView, row_format,
                                               view_tier)
from vllm_kvcompress.cache.stream_tables import StreamTables, stream_slot_ids
from vllm_kvcompress.kernels import paged_attention, write_slots
from vllm_kvcompress.kernels.tier_attention import add_tier_scores, tier_attention
from vllm_kvcompress.policies.selection import NarrowKeyTier, SecondTier, Selection

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

    kv_memory: optional list of L externally allocated layer tensors (vLLM's KV cache), each
    num_pages * H head-blocks of 2 * block_size * head_size elements, contiguous, with
    kv_pools: their L (keys, values) head-block views, each [num_pages * H, block_size,
    head_size] with any strides; both allocated here when None. max_blocks_per_stream
    defaults to max_pages_per_request (a stream never holds more tokens than its request).
    impl: kernel implementation ("torch", "triton", None = automatic, kernels/dispatch.py).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_size: int, num_pages: int,
                 max_requests: int, max_pages_per_request: int, block_size: int = 32,
                 dtype: torch.dtype = torch.float16, device: torch.device | str = "cpu",
                 kv_memory: Sequence[torch.Tensor] | None = None,
                 kv_pools: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 max_blocks_per_stream: int | None = None, impl: str | None = None):
        self.num_layers, self.num_kv_heads, self.head_size = num_layers, num_kv_heads, head_size
        self.block_size, self.num_pages, self.max_requests = block_size, num_pages, max_requests
        self.device = torch.device(device)
        self.impl = impl
        num_head_blocks = num_pages * num_kv_heads
        if (kv_memory is None) != (kv_pools is None):
            raise ValueError("kv_memory and kv_pools are given together (or neither)")
        if kv_memory is None:
            kv_memory = fresh_head_blocks(num_layers, num_head_blocks, block_size, head_size,
                                          dtype, device)
            kv_pools = [(kv[:, 0], kv[:, 1]) for kv in kv_memory]
        self.layers: list[LayerPools] = create_layer_pools(
            num_layers, num_head_blocks, block_size, head_size, dtype, device, kv_pools)
        self.cells = [head_block_cells(kv, num_head_blocks) for kv in kv_memory]
        self.tables = StreamTables.create(
            num_layers, num_kv_heads, max_requests, max_pages_per_request,
            max_blocks_per_stream or max_pages_per_request, device)
        # Second tiers (second_tier.py): tables, and each request's tier (host side).
        self.tier_tables = TierTables.create(num_layers, num_kv_heads, max_requests,
                                             self.tables.max_blocks_per_stream, head_size, device)
        self.slot_tiers: list[SecondTier | None] = [None] * max_requests
        # Host copy of the page counts: the caller's own bookkeeping, read without syncs.
        self._page_counts = [0] * max_requests
        # [L, S] host upper bound of each request's longest full-tier stream per layer:
        # what gather pads to without reading the lengths off the device.
        self.length_bounds = torch.zeros(num_layers, max_requests, dtype=torch.int64)
        # Leading pages each request reads but another request wrote (share_prefix).
        self.shared_pages = [0] * max_requests

    # ----- pages (request level) -----

    def add_pages(self, slot: int, page_ids: IntsLike) -> None:
        """Append pages to request `slot`'s page list (ids chosen by the caller)."""
        page_ids = host_to_device(page_ids, torch.int32, self.device)
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
        if self.slot_tiers[slot] is not None:
            self._scrub(released)
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
        self.length_bounds[:, slot] = num_tokens
        self.tables.used_blocks[:, slot] = num_pages * heads
        self.shared_pages[slot] = num_pages

    def share_streams(self, slot: int, block_tables: torch.Tensor, length: int) -> None:
        """Start request `slot`'s empty streams on another request's streams that fill
        whole head-blocks: block_tables [L, H, B] (every stream `length` = B * block_size
        tokens) in the first B pages of this request, which it only reads."""
        num_blocks = block_tables.shape[-1]
        if length != num_blocks * self.block_size or num_blocks > self._page_counts[slot]:
            raise ValueError(f"request slot {slot}: shared streams of {length} tokens must "
                             f"fill {num_blocks} head-blocks among its "
                             f"{self._page_counts[slot]} pages")
        self.tables.block_tables[:, slot, :, :num_blocks] = block_tables.to(self.device)
        self.tables.lengths[:, slot] = length
        self.length_bounds[:, slot] = length
        self.tables.used_blocks[:, slot] = num_blocks * self.num_kv_heads
        self.shared_pages[slot] = num_blocks

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
        for slot in slot_list:
            if self.slot_tiers[slot] is not None:   # it shares no page once it has a tier
                self._scrub(self.tables.request_pages[slot, :self._page_counts[slot]])
        self.tables.lengths[:, device_slots] = 0
        self.tables.used_blocks[:, device_slots] = 0
        self.tables.page_counts[device_slots] = 0
        self.tier_tables.reset(device_slots)
        self.length_bounds[:, slot_list] = 0
        for slot in slot_list:
            self._page_counts[slot] = 0
            self.shared_pages[slot] = 0
            self.slot_tiers[slot] = None
        return pages

    # ----- tokens -----

    def append(self, slots: IntsLike, num_new: IntsLike) -> torch.Tensor:
        """Make room for num_new [R] new tokens of requests `slots` [R] in every stream.

        Returns the flat slot ids [L, sum(num_new), H] int64 (head_block * block_size +
        offset) of the new tokens, request-major. Raises, changing nothing, when a request
        lacks pages (see pages_needed).
        """
        on_device, counts = self._counts(num_new)
        slot_ids = append_tokens(self.tables, self._slots(slots), on_device, sum(counts),
                                 max(counts, default=0), self.block_size)
        self.length_bounds[:, [int(s) for s in slots]] += torch.tensor(counts,
                                                                      dtype=torch.int64)
        return slot_ids

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
        """One layer's streams of requests `slots` as their policy sees them, padded to
        max_len (default: the host's bound of the longest stream, `length_bounds`, which
        may pad a little more than needed but reads nothing from the device): the full
        tier, after the narrow-key tier's rows when the requests have one (its streams are
        never padded past the longest)."""
        host_slots = [int(s) for s in slots]
        tier = self._tier_of(host_slots, None, record=False)
        slots = self._slots(slots)
        if isinstance(tier, NarrowKeyTier):
            batch, _ = gather_streams(self.layers[layer], self._tier_layer(layer, tier),
                                      self.tables, layer, slots)
            return StreamView(batch.keys, batch.values, batch.positions, batch.acc_scores,
                              batch.lengths)
        lengths = self.tables.lengths[layer, slots].reshape(-1).long()
        if max_len is None:
            max_len = max(self.length_bounds[layer, host_slots].tolist(), default=0)
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
        survivors (merged per the Selection) become each stream's first slots, demoted
        or narrowed slots join the second tier, and the request's live head-blocks of both
        tiers are repacked into its first pages. T must cover every live slot (slots past
        T count as evicted)."""
        host_slots = [int(s) for s in slots]
        tier = self._tier_of(host_slots, selection.second_tier)
        pools, slots = self.layers[layer], self._slots(slots)
        if isinstance(tier, NarrowKeyTier):
            compact_narrow(pools, self._tier_layer(layer, tier), self.tables, layer, slots,
                           selection, self.impl)
            # Survivors of T columns: at most T in the full tier.
            self.length_bounds[layer, host_slots] = selection.keep.shape[1]
            return
        low = None if tier is None else self._tier_layer(layer, tier)
        self.length_bounds[layer, host_slots] = compact_layer(
            pools, self.tables, layer, slots, selection, self.impl, low)

    def attention(self, layer: int, query: torch.Tensor, query_start_loc: torch.Tensor,
                  slots: IntsLike, scale: float, emit_scores: bool = False,
                  max_query_len: int | None = None,
                  second_tier: SecondTier | None = None) -> torch.Tensor:
        """Attention [tokens, Hq, D] of this step's queries [tokens, Hq, D] (request r's are
        query[qsl[r]:qsl[r + 1]], its last q_len tokens, already appended and written).
        emit_scores adds each slot's attention mass (over both tiers) to its accumulated
        score. second_tier: the tier of those requests that have one, attended in one
        softmax with the full tier."""
        pools = self.layers[layer]
        slots = self._slots(slots)
        if second_tier is None:
            return paged_attention(query, pools.keys, pools.values,
                                   self.tables.block_tables[layer], self.tables.lengths[layer],
                                   slots, query_start_loc, scale,
                                   pools.scores if emit_scores else None, max_query_len,
                                   self.impl)
        tier = self._tier_layer(layer, second_tier)
        rows = (tier.rows, tier.format, self.tier_tables.block_tables[layer],
                self.tier_tables.lengths[layer], self.tier_tables.key_scales[layer], slots,
                query_start_loc, scale)
        prior = tier_attention(query, *rows, self.impl, max_query_len)
        # A narrow tier's rows accumulate attention like full slots (a low-bit row's score
        # is its rank, fixed when it was demoted).
        emit_rows = emit_scores and isinstance(second_tier, NarrowKeyTier)
        lse = torch.empty(query.shape[:2], device=query.device) if emit_rows else None
        output = paged_attention(query, pools.keys, pools.values,
                                 self.tables.block_tables[layer], self.tables.lengths[layer],
                                 slots, query_start_loc, scale,
                                 pools.scores if emit_scores else None, max_query_len, self.impl,
                                 prior, lse)
        if emit_rows:
            add_tier_scores(query, *rows, lse)
        return output

    def tier_view(self, layer: int, slots: IntsLike) -> TierView:
        """One layer's second tiers of requests `slots` (which share a tier), decoded."""
        tier = self._tier_of([int(s) for s in slots], None, record=False)
        if tier is None:
            raise ValueError(f"requests {list(slots)} have no second tier")
        return view_tier(self._tier_layer(layer, tier), layer, self._slots(slots))

    def bytes_held(self, slots: list[int]) -> int:
        """KV bytes the requests' streams hold in both tiers, all layers (a host sync)."""
        full_token = 2 * self.head_size * self.layers[0].keys.element_size()
        row_bytes = torch.tensor([0 if self.slot_tiers[s] is None
                                  else self.row_format(self.slot_tiers[s]).row_bytes
                                  for s in slots])
        device_slots = self._slots(slots)
        full = self.tables.lengths[:, device_slots].sum(dim=(0, 2)).cpu()
        second = self.tier_tables.lengths[:, device_slots].sum(dim=(0, 2)).cpu()
        return int((full * full_token + second * row_bytes).sum())

    def check_invariants(self, free_pages: torch.Tensor | None = None) -> None:
        """Raise AssertionError unless the storage invariants hold (tests; syncs freely).
        free_pages: the caller's free page ids, to check free + owned = all pages."""
        check_invariants(self, free_pages)

    # ----- helpers -----

    def row_format(self, tier: SecondTier):
        """The rows `tier` is stored in here (second_tier.row_format)."""
        return row_format(tier, self.head_size, self.layers[0].keys.dtype)

    def _tier_layer(self, layer: int, tier: SecondTier) -> TierLayer:
        fmt = self.row_format(tier)
        return TierLayer(tier, fmt, fmt.row_pool(self.cells[layer]), self.tier_tables)

    def _tier_of(self, slots: list[int], tier: SecondTier | None,
                 record: bool = True) -> SecondTier | None:
        """The second tier shared by requests `slots` (recorded at their first compaction
        with one, when `record`); a request's tier never changes."""
        known = {self.slot_tiers[s] for s in slots} - {None}
        if tier is not None:
            known.add(tier)
        if len(known) > 1:
            raise ValueError(f"requests {slots} handled together have different second "
                             f"tiers: {sorted(map(str, known))}")
        tier = known.pop() if known else None
        if tier is not None and record:
            for slot in slots:
                self.slot_tiers[slot] = tier
        return tier

    def _slots(self, slots: IntsLike) -> torch.Tensor:
        if isinstance(slots, torch.Tensor) and slots.device == self.device:
            return slots.long()
        return host_to_device(slots, torch.int64, self.device)

    def _counts(self, num_new: IntsLike) -> tuple[torch.Tensor, list[int]]:
        """num_new on the device and on the host (host values size tensors; reading them
        from a GPU tensor is a sync, so callers pass host values)."""
        counts = torch.as_tensor(num_new, dtype=torch.int64).cpu().tolist()
        return host_to_device(counts, torch.int64, self.device), counts

    def _scrub(self, pages: torch.Tensor) -> None:
        """Zero the KV memory of pages [P] leaving a request that kept second-tier rows:
        rows read as keys and values may be NaN or inf, and a kernel that weighs a padding
        slot by 0 (vLLM's CPU kernel does) would turn the next owner's attention into NaN."""
        blocks = (pages.long()[:, None] * self.num_kv_heads
                  + torch.arange(self.num_kv_heads, device=self.device)).flatten()
        for cells in self.cells:
            cells[blocks] = 0

    def _set_page_count(self, slot: int, count: int) -> None:
        self._page_counts[slot] = count
        self.tables.page_counts[slot] = count
