"""Trained token scorers: small networks that score each KV slot from its own q, k, v
when the slot is written (no attention probabilities needed). Plain torch, no vLLM."""
