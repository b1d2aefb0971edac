"""Per-head paged KV storage (PagedStreamCache), page bookkeeping for callers outside vLLM
(PagePool), and the compression schedule (schedule.py)."""

from vllm_kvcompress.cache.page_pool import PagePool
from vllm_kvcompress.cache.paged_stream_cache import PagedStreamCache, StreamView

__all__ = ["PagePool", "PagedStreamCache", "StreamView"]
