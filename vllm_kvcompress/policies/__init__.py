"""Compression policies: engine-independent torch code (no vLLM here).

A policy compresses one layer's streams (`StreamBatch`) to an average budget and returns
a `Selection`; `apply_selection` is the padded definition of applying it. Importing this
package registers every policy module with the registry.
"""

from vllm_kvcompress.policies import (  # noqa: F401  (each module registers its policy)
    adakv,
    attention_gate,
    cam,
    d2o,
    elastic,
    ems,
    h2o,
    kvmerger,
    locret,
    mikv,
    pyramidkv,
    snapkv,
    streaming,
    think,
)
from vllm_kvcompress.policies.apply import apply_selection
from vllm_kvcompress.policies.base import Policy
from vllm_kvcompress.policies.selection import Selection
from vllm_kvcompress.policies.stream_batch import StreamBatch
from vllm_kvcompress.policies.registry import implemented_policies, make_policy

__all__ = [
    "Policy",
    "Selection",
    "StreamBatch",
    "apply_selection",
    "implemented_policies",
    "make_policy",
]
