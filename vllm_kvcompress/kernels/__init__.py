"""Kernel ops over one layer's head-block pool, each with a torch reference (CPU path and
test oracle) and a Triton implementation (GPU); see dispatch.py for which one runs."""

from vllm_kvcompress.kernels.dispatch import IMPL_ENV, use_triton
from vllm_kvcompress.kernels.gather_merge import GatheredSlots, SlotMerge, gather_merge_slots
from vllm_kvcompress.kernels.paged_attention import paged_attention
from vllm_kvcompress.kernels.window_scores import window_attention_scores
from vllm_kvcompress.kernels.write_slots import write_slots

__all__ = [
    "IMPL_ENV",
    "GatheredSlots",
    "SlotMerge",
    "gather_merge_slots",
    "paged_attention",
    "use_triton",
    "window_attention_scores",
    "write_slots",
]
