"""Memory reused across requests: prefix-cache and chunk-store replacement (replacement/),
traces of page lookups and their simulator (traces.py, cache_sim.py), one-bit predictors
(predictors.py), RAG chunks and their store (chunks.py, chunk_store.py, chunk_reuse.py).
Plain Python and torch; vLLM's seams are in vllm_plugin/."""
