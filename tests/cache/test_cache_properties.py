"""Property tests: random sequences of allocate / append / compact / release / end over
many requests keep the storage invariants and the stored data of both tiers after every
operation, and a low-bit row never changes once written (quantized once)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule)

from selection_cases import expected_after, expected_low_after, random_selection
from vllm_kvcompress.cache import PagedStreamCache, PagePool, StreamView
from vllm_kvcompress.cache.narrow_tier import settle_narrowing
from vllm_kvcompress.cache.second_tier import TierView
from vllm_kvcompress.policies.selection import LowBitTier

LAYERS, HEADS, HEAD_DIM, BLOCK_SIZE = 2, 3, 8, 4
# Selections a machine draws, by the second tier its requests have.
KINDS = {"low_bit": ("evict", "merge", "merge_unnormalized", "value_merge", "demote", "everything"),
         "narrow": ("evict", "merge", "value_merge", "narrow", "everything_narrow")}
NUM_PAGES, MAX_REQUESTS, MAX_PAGES_PER_REQUEST = 20, 4, 14


class CacheMachine(RuleBasedStateMachine):
    """Plays the scheduler (pages from a PagePool) and keeps a shadow copy of every stream."""

    def __init__(self):
        super().__init__()
        self.cache = PagedStreamCache(LAYERS, HEADS, HEAD_DIM, NUM_PAGES, MAX_REQUESTS,
                                      MAX_PAGES_PER_REQUEST, block_size=BLOCK_SIZE,
                                      dtype=torch.float32)
        self.pool = PagePool(NUM_PAGES)
        self.tokens_seen: dict[int, int] = {}      # request slot -> tokens appended
        self.shadow: dict[int, list[StreamView]] = {}  # slot -> per layer, its streams
        self.shadow_low: dict[int, list[TierView]] = {}   # slot -> per layer, its low tier
        self.balance: dict[int, list[torch.Tensor]] = {}     # slot -> per layer, [H, D]
        self.narrow: dict[int, list[torch.Tensor]] = {}      # slot -> per layer, [H] narrow slots
        self.rows: dict[tuple, torch.Tensor] = {}   # (slot, layer, head, position) -> row bytes

    # ----- helpers -----

    def _pages(self, slot: int) -> int:
        return self.cache._page_counts[slot]

    def _tables_snapshot(self):
        t = self.cache.tables
        return [x.clone() for x in (t.block_tables, t.lengths, t.used_blocks, t.request_pages,
                                    t.page_counts)]

    def _stream_view(self, layer: int, slot: int) -> StreamView:
        view = self.cache.gather(layer, [slot])
        return StreamView(*(x.double() if x.is_floating_point() else x for x in view))

    # ----- operations -----

    @initialize(tier=st.sampled_from(sorted(KINDS)))
    def first_request(self, tier):
        self.tier = tier
        self.start_request()

    @precondition(lambda self: len(self.tokens_seen) < MAX_REQUESTS)
    @rule()
    def start_request(self):
        slot = min(set(range(MAX_REQUESTS)) - set(self.tokens_seen))
        self.tokens_seen[slot] = 0
        empty = StreamView(torch.zeros(HEADS, 0, HEAD_DIM, dtype=torch.float64),
                           torch.zeros(HEADS, 0, HEAD_DIM, dtype=torch.float64),
                           torch.zeros(HEADS, 0, dtype=torch.int64),
                           torch.zeros(HEADS, 0, dtype=torch.float64),
                           torch.zeros(HEADS, dtype=torch.int64))
        self.shadow[slot] = [empty] * LAYERS
        self.shadow_low[slot] = [TierView.empty(HEADS, HEAD_DIM)] * LAYERS
        self.balance[slot] = [torch.zeros(HEADS, HEAD_DIM)] * LAYERS
        self.narrow[slot] = [torch.zeros(HEADS, dtype=torch.long)] * LAYERS

    @precondition(lambda self: self.tokens_seen)
    @rule(data=st.data(), seed=st.integers(0, 2**16))
    def append(self, data, seed):
        slots = data.draw(st.lists(st.sampled_from(sorted(self.tokens_seen)), min_size=1,
                                   max_size=len(self.tokens_seen), unique=True))
        num_new = data.draw(st.lists(st.integers(0, 9), min_size=len(slots),
                                     max_size=len(slots)))
        needed = self.cache.pages_needed(slots, num_new).tolist()
        missing = [max(0, n - self._pages(s)) for s, n in zip(slots, needed)]
        fits = all(self._pages(s) + m <= MAX_PAGES_PER_REQUEST for s, m in zip(slots, missing))
        too_long = any(int(view.lengths.max()) + n > MAX_PAGES_PER_REQUEST * BLOCK_SIZE
                       for s, n in zip(slots, num_new) for view in self.shadow[s])
        if too_long or not fits or sum(missing) > self.pool.num_free:
            event("append refused: " + ("stream too long" if too_long else "too few pages"))
            before = self._tables_snapshot()
            message = "max_blocks_per_stream" if too_long else "pages"
            with pytest.raises(RuntimeError, match=message):
                self.cache.append(slots, num_new)
            assert all(torch.equal(a, b) for a, b in zip(before, self._tables_snapshot()))
            return
        for slot, count in zip(slots, missing):
            self.cache.add_pages(slot, self.pool.allocate(count))
        slot_ids = self.cache.append(slots, num_new)
        self._write_tokens(slots, num_new, slot_ids, seed)

    def _write_tokens(self, slots, num_new, slot_ids, seed):
        gen = torch.Generator().manual_seed(seed)
        total = sum(num_new)
        positions = torch.cat([torch.arange(n) + self.tokens_seen[s]
                               for s, n in zip(slots, num_new)])
        for layer in range(LAYERS):
            keys, values = (torch.randn(total, HEADS, HEAD_DIM, generator=gen) for _ in "kv")
            scores = torch.rand(total, HEADS, generator=gen)
            self.cache.write(layer, slot_ids[layer], keys, values, positions, scores)
            start = 0
            for slot, n in zip(slots, num_new):
                old = self.shadow[slot][layer]
                part = slice(start, start + n)
                self.shadow[slot][layer] = _append_to_view(
                    old, keys[part].transpose(0, 1), values[part].transpose(0, 1),
                    positions[part], scores[part].transpose(0, 1))
                start += n
        for slot, n in zip(slots, num_new):
            self.tokens_seen[slot] += n

    @precondition(lambda self: self.tokens_seen)
    @rule(data=st.data(), seed=st.integers(0, 2**16),
          keep_prob=st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    def compact(self, data, seed, keep_prob):
        kind = data.draw(st.sampled_from(KINDS[self.tier]))
        slots = data.draw(st.lists(st.sampled_from(sorted(self.tokens_seen)), min_size=1,
                                   max_size=len(self.tokens_seen), unique=True))
        layers = data.draw(st.sampled_from([[0], [LAYERS - 1], list(range(LAYERS))]))
        for slot in slots:                  # room for a growing low-bit tier, when there is
            spare = min(2, MAX_PAGES_PER_REQUEST - self._pages(slot), self.pool.num_free)
            self.cache.add_pages(slot, self.pool.allocate(spare))
        for layer in layers:
            view = self.cache.gather(layer, slots)
            selection = random_selection(view, seed + layer, keep_prob, kind)
            scales = torch.cat([self.balance[s][layer] for s in slots])
            narrow_state = (scales, torch.cat([self.narrow[s][layer] for s in slots]))
            narrowing = self.tier == "narrow"
            expected = expected_after(view, selection, HEADS, narrow_state if narrowing else None)
            tiered = (self.tier == "low_bit"
                      and (selection.demote is not None or any(self.cache.slot_tiers[s] for s in slots)))
            if tiered:
                old_low = _concat_low([self.shadow_low[s][layer] for s in slots])
                low, balance = expected_low_after(old_low, scales, view, selection, HEADS)
            if narrowing:
                settled, balance = settle_narrowing(selection, *narrow_state)
                narrow = (settled.narrow & (settled.keep & view_live(view))).sum(dim=1)
            try:
                self.cache.compact(layer, slots, selection)
            except RuntimeError as error:
                assert "head-blocks after compaction" in str(error)
                event("compaction refused: low-bit tier outgrows the pages")
                return
            for r, slot in enumerate(slots):
                streams = slice(r * HEADS, (r + 1) * HEADS)
                self.shadow[slot][layer] = StreamView(*(x[streams] for x in expected))
                if narrowing:
                    if int(narrow[streams].sum()):
                        event("compaction with narrow rows")
                    self.balance[slot][layer] = balance[streams]
                    self.narrow[slot][layer] = narrow[streams]
                if tiered:
                    if int(low.lengths[streams].sum()):
                        event("compaction with low-bit rows")
                    self.shadow_low[slot][layer] = TierView(*(x[streams] for x in vars(low).values()))
                    self.balance[slot][layer] = balance[streams]

    @precondition(lambda self: self.tokens_seen)
    @rule(data=st.data())
    def release_unused_pages(self, data):
        slot = data.draw(st.sampled_from(sorted(self.tokens_seen)))
        in_use = int(self.cache.pages_in_use([slot])[0])
        event(f"release: {self._pages(slot) - in_use} pages")
        if in_use > 0:
            with pytest.raises(RuntimeError, match="head-blocks in use"):
                self.cache.release_pages(slot, in_use - 1)
        self.pool.free(self.cache.release_pages(slot, in_use))
        assert self._pages(slot) == min(in_use, self._pages(slot))

    @precondition(lambda self: self.tokens_seen)
    @rule(data=st.data())
    def end_request(self, data):
        slot = data.draw(st.sampled_from(sorted(self.tokens_seen)))
        self.pool.free(self.cache.reset([slot]))
        del self.tokens_seen[slot], self.shadow[slot], self.shadow_low[slot], self.balance[slot]
        del self.narrow[slot]
        self.rows = {key: row for key, row in self.rows.items() if key[0] != slot}

    # ----- invariants -----

    @invariant()
    def storage_invariants_hold(self):
        self.cache.check_invariants(self.pool.free_pages())

    @invariant()
    def streams_hold_their_tokens_in_order(self):
        for slot, layers in self.shadow.items():
            for layer, want in enumerate(layers):
                got = self._stream_view(layer, slot)
                assert torch.equal(got.lengths, want.lengths)
                width = int(want.lengths.max()) if len(want.lengths) else 0
                # Padded to the host's bound, which may pass the longest stream.
                assert got.positions.shape[1] >= width
                assert (got.positions[:, width:] == -1).all()
                assert torch.equal(got.positions[:, :width], want.positions[:, :width])
                for name in ("keys", "values", "scores"):
                    torch.testing.assert_close(getattr(got, name)[:, :width],
                                               getattr(want, name)[:, :width].double(),
                                               atol=1e-5, rtol=1e-5, msg=name)

    @invariant()
    def narrow_tiers_hold_the_first_kept_tokens(self):
        for slot, layers in self.narrow.items() if self.tier == "narrow" else ():
            for layer, want in enumerate(layers):
                got = self.cache.tier_tables.lengths[layer, slot].long()
                assert torch.equal(got, want), (slot, layer)

    @invariant()
    def low_bit_tiers_hold_their_rows(self):
        for slot, layers in self.shadow_low.items():
            if not isinstance(self.cache.slot_tiers[slot], LowBitTier):
                continue
            for layer, want in enumerate(layers):
                got = self.cache.tier_view(layer, [slot])
                assert torch.equal(got.lengths, want.lengths)
                width = got.positions.shape[1]
                assert torch.equal(got.positions, want.positions[:, :width])
                for name in ("keys", "values", "scores"):
                    assert torch.equal(getattr(got, name), getattr(want, name)[:, :width]), name

    @invariant()
    def a_low_bit_row_never_changes(self):
        for slot in self.shadow_low:
            tier = self.cache.slot_tiers[slot]
            for layer in range(LAYERS if isinstance(tier, LowBitTier) else 0):
                low = self.cache._tier_layer(layer, tier)
                for head in range(HEADS):
                    for t in range(int(self.cache.tier_tables.lengths[layer, slot, head])):
                        block = int(self.cache.tier_tables.block_tables[layer, slot, head,
                                                                t // low.slots_per_block])
                        row = low.rows[block, t % low.slots_per_block].clone()
                        key = (slot, layer, head, int(low.format.positions(row)))
                        assert torch.equal(self.rows.setdefault(key, row), row), key

    def teardown(self):
        for slot in list(self.tokens_seen):
            self.pool.free(self.cache.reset([slot]))
        self.cache.check_invariants(self.pool.free_pages())
        assert self.pool.num_free == NUM_PAGES, "pages leaked"


def view_live(view: StreamView) -> torch.Tensor:
    return torch.arange(view.positions.shape[1])[None, :] < view.lengths[:, None]


def _concat_low(views: list[TierView]) -> TierView:
    """The low tiers of several requests as one padded batch (request-major)."""
    width = max(v.positions.shape[1] for v in views)

    def pad(x, fill):
        shape = list(x.shape)
        shape[1] = width - x.shape[1]
        return torch.cat([x, x.new_full(shape, fill)], dim=1)

    return TierView(torch.cat([pad(v.keys, 0.0) for v in views]),
                       torch.cat([pad(v.values, 0.0) for v in views]),
                       torch.cat([pad(v.positions, -1) for v in views]),
                       torch.cat([pad(v.scores, 0.0) for v in views]),
                       torch.cat([v.lengths for v in views]))


def _append_to_view(view: StreamView, keys, values, positions, scores) -> StreamView:
    """Shadow of H streams after appending n tokens: keys, values [H, n, D], scores [H, n]."""
    heads = view.lengths.shape[0]
    rows = []
    for h in range(heads):
        live = int(view.lengths[h])
        rows.append((torch.cat([view.keys[h, :live], keys[h].double()]),
                     torch.cat([view.values[h, :live], values[h].double()]),
                     torch.cat([view.positions[h, :live], positions]),
                     torch.cat([view.scores[h, :live], scores[h].double()])))
    width = max(len(r[2]) for r in rows)

    def pad(x, fill):
        return torch.cat([x, x.new_full((width - len(x), *x.shape[1:]), fill)])

    return StreamView(torch.stack([pad(r[0], 0.0) for r in rows]),
                      torch.stack([pad(r[1], 0.0) for r in rows]),
                      torch.stack([pad(r[2], -1) for r in rows]),
                      torch.stack([pad(r[3], 0.0) for r in rows]),
                      torch.tensor([len(r[2]) for r in rows]))


TestCacheMachine = CacheMachine.TestCase
TestCacheMachine.settings = settings(max_examples=80, stateful_step_count=30, deadline=None)
