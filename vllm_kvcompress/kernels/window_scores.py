"""Op: observation-window scores (SnapKV-style), recomputed at compression time.

Same signature as policies.scoring (whose attention_probs is the torch reference here);
`window_attention_scores` returns the sum over the G heads (scoring.window_attention's
"mean" reduction times G).

For each stream, the last W queries of the G query heads of its group attend to all of the
stream's live keys whose position is <= the query's position (softmax over those keys);
a key's score is its probability summed over the W queries and the G heads.
"""

from __future__ import annotations

import torch

from vllm_kvcompress.kernels.dispatch import use_triton
from vllm_kvcompress.policies.scoring import attention_probs


def window_attention_scores(window_queries: torch.Tensor, keys: torch.Tensor,
                            lengths: torch.Tensor, key_positions: torch.Tensor,
                            query_positions: torch.Tensor, scale: float,
                            impl: str | None = None) -> torch.Tensor:
    """Scores [N, T] float32 (zero on padding slots).

    window_queries:  [N, G, W, D]
    keys:            [N, T, D] padded; slots t >= lengths[n] are ignored
    lengths:         [N]
    key_positions:   [N, T] token positions of the keys
    query_positions: [N, W] token positions of the queries; -1 = absent (contributes nothing)
    """
    if use_triton(keys, impl):
        from vllm_kvcompress.kernels.window_scores_triton import window_attention_scores_triton

        return window_attention_scores_triton(window_queries, keys, lengths, key_positions,
                                              query_positions, scale)
    return window_attention_scores_reference(window_queries, keys, lengths, key_positions,
                                             query_positions, scale)


def window_attention_scores_reference(window_queries, keys, lengths, key_positions,
                                      query_positions, scale) -> torch.Tensor:
    """Torch version of `window_attention_scores`: the policies' attention_probs summed over
    the window and the group (materialises [N, G, W, T] in float32)."""
    return attention_probs(window_queries, keys, lengths, key_positions, query_positions,
                           scale).sum(dim=(1, 2))
