"""Quality harness: synthetic long-context tasks, scoring, runners and reports.

Runners answer the same prompts through different engines so their accuracies compare:
the reference runner (transformers, policies applied outside vLLM), an OpenAI-compatible
endpoint (`vllm serve` with or without this plugin, or anything else), and offline
vLLM `LLM`. `vllm-kvcompress eval` drives them; docs/quality.md shows the results.
"""
