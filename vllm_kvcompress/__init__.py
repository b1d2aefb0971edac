"""vllm-kvcompress: per-head KV cache compression for vLLM.

`vllm_kvcompress.LLM` is vLLM's offline LLM with compression settings as arguments; it is
imported lazily so that the pure-torch parts (policies, cache, kernels) load without vLLM.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":
        from vllm_kvcompress.llm import LLM

        return LLM
    raise AttributeError(name)
