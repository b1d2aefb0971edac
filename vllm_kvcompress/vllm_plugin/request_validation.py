"""Reject bad per-request compression settings in the API server (HTTP 400), not in the engine.

vLLM validates every request's SamplingParams in its InputProcessor, in the process that
receives the request, and turns a VLLMValidationError into a 400 reply (offline: a
ValueError from LLM.generate). We add our check after vLLM's own.
"""

from __future__ import annotations

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from vllm_kvcompress.config import KVCompressConfigError
from vllm_kvcompress.vllm_plugin.engine_setup import BLOCK_SIZE
from vllm_kvcompress.vllm_plugin.kv_cache_spec import chunked_peak_pages
from vllm_kvcompress.sharing.batch_scheduling import (
    GROUP_KEY,
    GROUP_SIZE_KEY,
    MAX_GROUP_SIZE,
    valid_group,
    valid_group_size,
)
from vllm_kvcompress.sharing.chunks import CHUNKS_KEY, validate_chunks
from vllm_kvcompress.sharing.group_prefix import GROUP_PREFIX_KEY, PREFIX_POLICIES, is_leader
from vllm_kvcompress.sharing.predictors import HINT_KEY, HINTS, valid_hint
from vllm_kvcompress.vllm_plugin.request_settings import (
    REQUEST_KEYS,
    check_scorer_model,
    resolve_request_settings,
    server_settings,
)

# Request keys read by the scheduler, not the compression settings: key, check, allowed.
SCHEDULING_HINTS = (
    (HINT_KEY, valid_hint, f"{', '.join(HINTS)}, or a list of 0/1 per prompt page"),
    (GROUP_KEY, valid_group, "a non-empty string of at most 256 characters or an integer"),
    (GROUP_SIZE_KEY, valid_group_size, f"an integer from 1 to {MAX_GROUP_SIZE}, with kv_group"),
)


def validate_request(vllm_config, params: SamplingParams) -> None:
    """Raise VLLMValidationError if the request's compression overrides are invalid."""
    _check_chunks(vllm_config, (params.extra_args or {}).get(CHUNKS_KEY))
    for key, valid, allowed in SCHEDULING_HINTS:
        value = (params.extra_args or {}).get(key)
        if value is not None and not valid(value):
            raise VLLMValidationError(
                f"invalid {key} in vllm_xargs: {value!r}; allowed values: {allowed}",
                parameter="vllm_xargs", value={key: value})
    extra = params.extra_args or {}
    if extra.get(GROUP_SIZE_KEY) is not None and extra.get(GROUP_KEY) is None:
        raise VLLMValidationError(f"{GROUP_SIZE_KEY} in vllm_xargs needs {GROUP_KEY}: the "
                                  f"size of which group?", parameter="vllm_xargs",
                                  value={GROUP_SIZE_KEY: extra[GROUP_SIZE_KEY]})
    if is_leader(extra):
        _check_group_prefix(vllm_config, extra)
    given = {k: v for k, v in (params.extra_args or {}).items() if k in REQUEST_KEYS}
    if not given:
        return
    try:
        settings = resolve_request_settings(server_settings(vllm_config), params.extra_args,
                                            vllm_config.model_config.max_model_len)
        check_scorer_model(settings, vllm_config.model_config.hf_config)
        _check_chunked_peak(settings, vllm_config)
    except KVCompressConfigError as exc:
        raise VLLMValidationError(f"invalid KV compression setting in vllm_xargs: {exc}",
                                  parameter="vllm_xargs", value=given) from None


def _check_group_prefix(vllm_config, extra: dict) -> None:
    """A group's leader: its prompt is the prefix the members read, so its streams must
    fill whole pages alike (sharing/group_prefix.py) and batch scheduling must track the
    group's members."""
    server = server_settings(vllm_config)
    problem = None
    if extra.get(GROUP_PREFIX_KEY) not in (True, 1):   # vLLM's schema turns JSON true to 1
        problem = "must be true"
    elif extra.get(GROUP_KEY) is None:
        problem = f"needs {GROUP_KEY}"
    elif not server.enabled or server.kv_scheduling != "batch":
        problem = ("needs a server started with compression on (--kv-policy) and "
                   "--kv-scheduling batch")
    elif not vllm_config.cache_config.enable_prefix_caching:
        problem = "needs prefix caching on"
    else:
        try:
            settings = resolve_request_settings(server, extra,
                                                vllm_config.model_config.max_model_len)
        except KVCompressConfigError:
            return      # reported with the other compression settings
        if settings.enabled and settings.kv_policy not in PREFIX_POLICIES:
            problem = (f"compresses with kv_policy {settings.kv_policy}; allowed: "
                       f"{', '.join(PREFIX_POLICIES)} or none (every head keeps its budget)")
        elif settings.enabled and settings.budget % BLOCK_SIZE:
            problem = f"needs a budget that is a multiple of {BLOCK_SIZE}; got {settings.budget}"
    if problem is not None:
        raise VLLMValidationError(f"{GROUP_PREFIX_KEY} in vllm_xargs {problem}",
                                  parameter="vllm_xargs",
                                  value={GROUP_PREFIX_KEY: extra.get(GROUP_PREFIX_KEY)})


def _check_chunks(vllm_config, chunks) -> None:
    """kv_chunks: a bad value names what is wrong; a good one is refused, since chunk reuse
    runs in the reference runner only so far (the prompt length is not known here, so
    spans are checked against max_model_len)."""
    if chunks is None:
        return
    try:
        validate_chunks(chunks, vllm_config.model_config.max_model_len)
    except ValueError as exc:
        raise VLLMValidationError(str(exc), parameter="vllm_xargs", value={CHUNKS_KEY: chunks}) from None
    raise VLLMValidationError(
        f"{CHUNKS_KEY}: chunk reuse is not built inside vLLM yet (it runs in the reference "
        f"runner: benchmarks/chunk_reuse.py); send the request without {CHUNKS_KEY}",
        parameter="vllm_xargs", value={CHUNKS_KEY: chunks})


def _check_chunked_peak(settings, vllm_config) -> None:
    """In chunked prefill mode vLLM's start-up check sized the cache for the server's
    compressed bound, not for max_model_len: a request needing more pages than the cache
    holds would wait forever."""
    server, model_config = server_settings(vllm_config), vllm_config.model_config
    num_pages = vllm_config.cache_config.num_gpu_blocks  # known once the engine is up
    if server.kv_prefill_mode != "chunked" or not server.enabled or not num_pages:
        return
    whole = -(-model_config.max_model_len // BLOCK_SIZE)
    peak = chunked_peak_pages(settings, vllm_config, BLOCK_SIZE, model_config.get_head_size(),
                              model_config.dtype)
    needed = whole if peak is None else min(peak, whole)
    if needed > num_pages - 1:  # vLLM keeps one page back (its null block)
        raise KVCompressConfigError(
            f"these settings need up to {needed} KV pages per request in chunked prefill "
            f"mode and the KV cache holds {num_pages - 1}; use a smaller budget or the "
            f"server's settings ({server.kv_policy}, budget {server.budget})")


def install() -> None:
    original = InputProcessor._validate_params
    if getattr(original, "_kvcompress", False):
        return

    def _validate_params(self, params, supported_tasks):
        result = original(self, params, supported_tasks)
        if isinstance(params, SamplingParams):
            validate_request(self.vllm_config, params)
        return result

    _validate_params._kvcompress = True
    InputProcessor._validate_params = _validate_params
