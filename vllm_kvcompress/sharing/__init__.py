"""Memory reused across requests: prefix-cache and chunk-store replacement (replacement/),
traces of page lookups and their simulator (traces.py, cache_sim.py), one-bit predictors
(predictors.py). Plain Python; vLLM's seams are in vllm_plugin/."""
