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

Policies with a low-bit tier (policies.selection.LowBitTier) keep every token they do not
keep at full precision there, up to the tier's cap: the bound then counts bytes, as
head-blocks of either kind (a low-bit head-block holds `low_slots_per_block` tokens).
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
    low_slots_per_block: tokens per head-block of the policy's low-bit tier (0: no tier);
    low_cap: most tokens that tier keeps per stream (None: no cap).
    """

    budget: int
    interval: int
    block_size: int
    prefill_mode: str = "full"
    layer_budget: int | None = None
    shared_prefix: bool = False
    reread_tokens: int = 0
    low_slots_per_block: int = 0
    low_cap: int | None = None

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
        """Most tokens a compressed stream holds (on average per layer) between steps."""
        return max(self.budget, self.layer_budget or 0) + self.interval - 1

    def pages_for_tokens(self, mean_tokens: int, num_tokens: int) -> int:
        """Pages holding H streams of mean length `mean_tokens` (of `num_tokens` seen) at full
        precision, and with a low-bit tier the tokens they do not keep.

        Uncompressed streams all have the same length: ceil(n / block_size) pages. Once
        compressed, heads may differ in length, and each stream may leave its last
        head-block partly empty: sum_h ceil(len_h / bs) <= (H * mean + H * (bs - 1)) / bs.
        A low-bit tier adds sum_h ceil(low_h / P) head-blocks with low_h <= min(n - len_h,
        cap); a full slot costs more than a low one, so the sum over heads is largest when
        every full tier is at the mean: (mean + bs - 1) / bs + (low + P - 1) / P per stream.
        """
        block_size, per_block = self.block_size, self.low_slots_per_block
        if not per_block:
            if mean_tokens >= num_tokens:
                return _cdiv(num_tokens, block_size)
            return min(_cdiv(num_tokens, block_size),
                       _cdiv(mean_tokens + block_size - 1, block_size))
        full = min(mean_tokens, num_tokens)
        low = max(num_tokens - full, 0)
        low = low if self.low_cap is None else min(low, self.low_cap)
        return _cdiv((full + block_size - 1) * per_block + (low + per_block - 1) * block_size,
                     block_size * per_block)

    def pages_for_step(self, num_computed: int, num_scheduled: int, prompt_len: int,
                       compressed: bool) -> int:
        """Pages a request needs while a step with `num_scheduled` new tokens runs.

        compressed: whether the request's streams were compressed since it (re)started;
        until then they hold every token. With `shared_prefix`, the step that compresses
        first needs fresh pages for the survivors next to the full pages it reads.
        """
        num_tokens = num_computed + num_scheduled
        if compressed:
            kept = min(num_computed, self.compressed_tokens)
            return self.pages_for_tokens(kept + num_scheduled, num_tokens)
        first = self.should_compress(num_tokens, 0, prompt_len)
        after = self.pages_for_tokens(self.max_tokens_after_step(num_tokens, prompt_len),
                                      num_tokens)
        if self.shared_prefix and first:
            return self.shared_pages(num_tokens) + after
        whole = _cdiv(num_tokens, self.block_size)
        # A stream split between two tiers may leave two head-blocks partly empty.
        return max(whole, after) if first and self.low_slots_per_block else whole

    def pages_to_keep(self, num_computed: int, prompt_len: int, compressed: bool) -> int:
        """Pages a running request keeps between steps: enough for one more decode step,
        so a request in steady decode neither frees nor allocates pages."""
        return self.pages_for_step(num_computed, 1, prompt_len, compressed)

    def shared_pages(self, first_compressed_at: int) -> int:
        """Leading pages a `shared_prefix` request lets go after its first compression
        (its full pages then, which vLLM hashed); 0 without prefix sharing."""
        return first_compressed_at // self.block_size if self.shared_prefix else 0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
