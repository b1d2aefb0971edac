"""How far a merge may reach: a merged slot folds at most a bounded span of tokens.

A merge class that spans hundreds of positions averages unrelated text into one slot
(Elastic Cache folded runs of up to 419 tokens at budget 256 on the bundled model, and its
perplexity suffered for it). The merging policies therefore merge a token only into a
centre at most `max_merge_span` positions away; farther tokens are evicted (or demoted,
for a policy with a low-bit tier), so a class covers at most 2 * span + 1 positions
(span 0: no merges at all).
"""

from __future__ import annotations

import torch

from vllm_kvcompress.policies.options import Option, integer

# The bound the merging policies use unless told otherwise (docs/policies.md: measured).
DEFAULT_MAX_MERGE_SPAN = 32


def merge_span_option() -> Option:
    return integer(DEFAULT_MAX_MERGE_SPAN, 0, optional=True)


def within_merge_span(positions: torch.Tensor, target: torch.Tensor,
                      max_span: int | None) -> torch.Tensor:
    """[N, T] bool: slots whose merge target (slot index [N, T] of the same stream; any
    value where unused) lies at most max_span token positions away (None: any distance)."""
    if max_span is None:
        return torch.ones(target.shape, dtype=torch.bool, device=target.device)
    centre = positions.gather(1, target.clamp(0, positions.shape[1] - 1))
    return (positions - centre).abs() <= max_span
