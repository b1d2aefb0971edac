"""When streams are compressed, and the memory bound that follows from it.

The same rule runs in three places that must agree exactly: the worker (which compresses),
the scheduler's KV manager (which allocates pages by the bound without asking the worker)
and the reference runner outside vLLM. It is therefore a pure function of token counts
(and of whether the request has compressed since it started, which all three track).

Rule: after a step that leaves a request with n processed tokens, its streams are
compressed down to their budgets when n >= budget + interval and at least `interval`
tokens arrived since the last compression (in `full` prefill mode, never before the whole
prompt is in). Hence, once compressed, a stream holds at most budget + interval - 1
tokens after any step, plus the tokens scheduled in the step while it runs.

With prefix caching, the full pages a request wrote (or found in the cache) before its
first compression are hashed by vLLM and may be read by other requests: compression never
writes them. The first compression writes the survivors to fresh pages instead, and the
request releases the full ones afterwards; they stay in vLLM's prefix cache.

Policies with a second tier (policies.selection) store some tokens in rows smaller than a
full token; the bound then counts bytes, as head-blocks of either kind (a second-tier
head-block holds `tier_slots_per_block` rows):
- a low-bit tier (MiKV) holds every token the full tier does not keep, up to its cap;
- a narrow-key tier (ThinK) holds the kept tokens its first compression narrowed: the
  tokens a stream holds at full width are then at most the `narrow_recent` it left
  whole plus every token since.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompressionSchedule:
    """budget: kept tokens per stream on average (window included); triggers compression.
    interval: tokens between compressions. block_size: slots per head-block (= tokens
    per vLLM page). prefill_mode: "full" or "chunked". layer_budget: the largest mean
    budget of any layer when layers differ (PyramidKV); bounds memory. None = budget.
    shared_prefix: the request takes part in prefix caching ("full" mode only): its full
    pages written before its first compression are shared and read-only, so that
    compression copies the survivors into fresh pages and then lets the full ones go.
    reread_tokens: a prefix-cache hit leaves at least this many prompt tokens to compute
    (the policy's observation window needs their queries).
    second_tier: "low_bit", "narrow_key" or None (see above); tier_slots_per_block: its
    rows per head-block; low_cap: most rows a low-bit tier keeps per stream (None: no
    cap); narrow_recent: kept tokens a first compression leaves whole (narrow-key tier).
    """

    budget: int
    interval: int
    block_size: int
    prefill_mode: str = "full"
    layer_budget: int | None = None
    shared_prefix: bool = False
    reread_tokens: int = 0
    second_tier: str | None = None
    tier_slots_per_block: int = 0
    low_cap: int | None = None
    narrow_recent: int = 0

    def should_compress(self, num_tokens: int, last_compressed_at: int, prompt_len: int) -> bool:
        """Compress after a step that ends with `num_tokens` processed?

        last_compressed_at: num_tokens at the previous compression (0 = never).
        """
        if self.prefill_mode == "full" and num_tokens < prompt_len:
            return False
        return (num_tokens >= self.budget + self.interval
                and num_tokens - last_compressed_at >= self.interval)

    def max_tokens_after_step(self, num_tokens: int, prompt_len: int) -> int:
        """Upper bound on a stream's mean length after a step ending at `num_tokens`."""
        if self.prefill_mode == "full" and num_tokens < prompt_len:
            return num_tokens
        return min(num_tokens, self.compressed_tokens)

    @property
    def compressed_tokens(self) -> int:
        """Most tokens a compressed stream holds at full precision (on average per layer)
        between steps."""
        kept = self.budget if self.layer_budget is None else self.layer_budget
        return kept + self.interval - 1

    def pages_for_tokens(self, mean_tokens: int, num_tokens: int, compressed_at: int) -> int:
        """Pages holding H streams that keep `mean_tokens` on average (of `num_tokens`
        seen), in both tiers; compressed_at: tokens at the request's first compression
        (0: none yet).

        Uncompressed streams all have the same length: ceil(n / block_size) pages. Once
        compressed, heads may differ in length, and each stream may leave its last
        head-block partly empty: sum_h ceil(len_h / bs) <= (H * mean + H * (bs - 1)) / bs.
        A second tier splits a stream into full slots and rows, (full + bs - 1) / bs +
        (rows + P - 1) / P head-blocks. That is linear in the split, so over the heads the
        sum is largest with every stream at the most full slots it can hold, or at none
        (when a row costs more than a full slot):
        - low-bit: full <= mean, rows <= min(n - full, cap) (it keeps what full does not);
        - narrow-key: full + rows <= mean, full <= narrow_recent + n - compressed_at.
        """
        block_size = self.block_size
        if self.second_tier is None:
            if mean_tokens >= num_tokens:
                return _cdiv(num_tokens, block_size)
            return min(_cdiv(num_tokens, block_size),
                       _cdiv(mean_tokens + block_size - 1, block_size))
        kept = min(mean_tokens, num_tokens)
        if self.second_tier == "low_bit":
            full, rows, rows_alone = kept, num_tokens - kept, num_tokens
            if self.low_cap is not None:
                rows, rows_alone = min(rows, self.low_cap), min(rows_alone, self.low_cap)
        else:
            whole = self.narrow_recent + num_tokens - compressed_at if compressed_at else kept
            full = min(kept, whole)
            rows, rows_alone = kept - full, kept
        return max(self._tier_pages(full, rows), self._tier_pages(0, rows_alone))

    def _tier_pages(self, full: int, rows: int) -> int:
        """ceil((full + bs - 1) / bs + (rows + P - 1) / P): pages for H streams of `full`
        slots and `rows` second-tier rows each, partial head-blocks included."""
        block_size, per_block = self.block_size, self.tier_slots_per_block
        return _cdiv((full + block_size - 1) * per_block + (rows + per_block - 1) * block_size,
                     block_size * per_block)

    def pages_for_step(self, num_computed: int, num_scheduled: int, prompt_len: int,
                       compressed_at: int) -> int:
        """Pages a request needs while a step with `num_scheduled` new tokens runs.

        compressed_at: tokens processed at the request's first compression since it
        (re)started, 0 if none; until then its streams hold every token. With
        `shared_prefix`, the step that compresses first needs fresh pages for the
        survivors next to the full pages it reads.
        """
        num_tokens = num_computed + num_scheduled
        if compressed_at:
            kept = min(num_computed, self.compressed_tokens)
            return self.pages_for_tokens(kept + num_scheduled, num_tokens, compressed_at)
        first = self.should_compress(num_tokens, 0, prompt_len)
        after = self.pages_for_tokens(self.max_tokens_after_step(num_tokens, prompt_len),
                                      num_tokens, num_tokens if first else 0)
        if self.shared_prefix and first:
            return self.shared_pages(num_tokens) + after
        whole = _cdiv(num_tokens, self.block_size)
        # A stream split between two tiers may leave two head-blocks partly empty.
        return max(whole, after) if first and self.second_tier else whole

    def pages_to_keep(self, num_computed: int, prompt_len: int, compressed_at: int) -> int:
        """Pages a running request keeps between steps: enough for one more decode step,
        so a request in steady decode neither frees nor allocates pages."""
        return self.pages_for_step(num_computed, 1, prompt_len, compressed_at)

    def peak_pages(self, prompt_len: int, final_len: int, num_computed: int = 0,
                   compressed_at: int = 0) -> int:
        """Most pages a request holds from `num_computed` processed tokens until it ends
        with `final_len`, the rest of its prompt computed in one step and then one token
        per step (chunked prefill only lowers it). What batch admission reserves.

        Before the first compression the pages grow with the tokens and peak in the step
        that compresses (survivors copied next to the full pages with `shared_prefix`);
        after it they grow with the kept tokens, so the last step holds the most."""
        peaks = []
        if num_computed < prompt_len:
            peaks.append(self.pages_for_step(num_computed, prompt_len - num_computed,
                                             prompt_len, compressed_at))
            if not compressed_at and self.should_compress(prompt_len, 0, prompt_len):
                compressed_at = prompt_len
            num_computed = prompt_len
        if num_computed < final_len:
            first = max(self.budget + self.interval, num_computed + 1)
            if not compressed_at and first <= final_len:
                peaks.append(self.pages_for_step(first - 1, 1, prompt_len, 0))
                compressed_at = first
            peaks.append(self.pages_for_step(final_len - 1, 1, prompt_len, compressed_at))
        return max(peaks, default=0)

    def chunked_peak_pages(self, chunk: int, max_len: int) -> int:
        """Most pages a request of at most `max_len` tokens holds in `chunked` prefill mode
        when no step brings more than `chunk` tokens: before its first compression it
        holds fewer than budget + interval + chunk tokens; after it, the kept tokens plus a
        step's (and a second tier, which grows with the tokens seen: hence max_len)."""
        assert self.prefill_mode == "chunked" and not self.shared_prefix
        first = self.budget + self.interval
        before = _cdiv(min(first - 1 + chunk, max_len), self.block_size)
        if max_len < first:
            return before
        after = self.pages_for_step(max(first, max_len - chunk), min(chunk, max_len - first),
                                    max_len, compressed_at=first)
        return max(before, after)

    def shared_pages(self, first_compressed_at: int) -> int:
        """Leading pages a `shared_prefix` request lets go after its first compression
        (its full pages then, which vLLM hashed); 0 without prefix sharing."""
        return first_compressed_at // self.block_size if self.shared_prefix else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
