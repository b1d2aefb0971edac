"""Trained token scorers: small networks that score each KV slot from its q, k, v when the
slot is written (no attention probabilities needed). Plain torch, no vLLM."""

from vllm_kvcompress.scorers import attention_gate, retaining_heads  # noqa: F401  (register)
