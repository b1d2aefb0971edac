"""The compression flags on vLLM's EngineArgs: parse, validate, carry.

`vllm serve` adds EngineArgs' flags to its parser after plugins are loaded, and builds
EngineArgs with `from_cli_args`, which copies dataclass fields only; offline `LLM(...)`
builds EngineArgs directly. So we wrap three EngineArgs methods:
- `add_cli_args`: add `--kv-policy`, `--budget`, ... (argparse checks types and choices);
- `from_cli_args`: merge preset + flags into `additional_config` and validate them;
- `create_engine_config`: validate whatever reached `additional_config` (the offline and
  `--additional-config` paths) against the model, then switch compression on.
On the command line every bad value ends the start with one line, no traceback.
With `--kv-policy none` and no flags, `additional_config` is left exactly as given.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vllm.engine.arg_utils import EngineArgs

from vllm_kvcompress.config import KVCompressConfig, KVCompressConfigError, resolve_settings
from vllm_kvcompress.policies.registry import KNOWN_POLICIES
from vllm_kvcompress.vllm_plugin.engine_setup import (
    enable_compression,
    enable_prefix_cache_plugin,
    prepare_engine_args,
)
from vllm_kvcompress.vllm_plugin.metrics import collect_engine_processes

# argparse dest -> KVCompressConfig field (same names: the flags map 1:1).
FLAG_FIELDS = ("kv_policy", "budget", "kv_window", "kv_sinks", "kv_interval", "kv_prefill_mode",
               "kv_quality", "kv_cache_replacement", "kv_trace", "kv_scheduling")


def add_compression_flags(parser: argparse.ArgumentParser) -> None:
    """Add the compression flags to `parser`; defaults are None so presets can fill them."""
    group = parser.add_argument_group(
        title="KV compression (vllm-kvcompress)",
        description="Per-head KV cache eviction and merging. Explicit flags override --kv-config.",
    )
    group.add_argument(
        "--kv-policy", choices=KNOWN_POLICIES, default=None,
        help="Compression policy; 'none' (default) is stock vLLM.",
    )
    group.add_argument(
        "--budget", type=int, default=None,
        help="Tokens kept per KV head per layer on average, sinks and window included "
        "(default 256).",
    )
    group.add_argument(
        "--kv-window", type=int, default=None,
        help="Protected recent tokens, never evicted (default: the policy's own).",
    )
    group.add_argument(
        "--kv-sinks", type=int, default=None,
        help="Protected first tokens, never evicted (default: the policy's own).",
    )
    group.add_argument(
        "--kv-interval", type=int, default=None,
        help="Decode steps between compressions of a stream (default 16).",
    )
    group.add_argument(
        "--kv-prefill-mode", choices=("full", "chunked"), default=None,
        help="full: compress once the whole prompt is in (default); chunked: after "
        "every prefill chunk (bounded memory for prompts larger than the cache).",
    )
    group.add_argument(
        "--kv-quality", type=float, default=None,
        help="Instead of --budget: per request, the smallest budget whose predicted "
        "retention of attention reaches this target in (0, 1] (needs a profile's "
        "kv_quality_curves in --kv-config, see `vllm-kvcompress profile`).",
    )
    group.add_argument(
        "--kv-cache-replacement", choices=("lru", "predicted"), default=None,
        help="Which cached prefix pages vLLM evicts first: lru (default, vLLM's own) or "
        "predicted (marking with one-bit predictions: request hints, else learned online).",
    )
    group.add_argument(
        "--kv-trace", default=None, metavar="FILE.jsonl",
        help="Append every admitted request's page-hash chain to FILE "
        "(the format `vllm-kvcompress cache-sim` replays).",
    )
    group.add_argument(
        "--kv-scheduling", choices=("vllm", "batch"), default=None,
        help="Admission: vllm (default, as many requests as fit now) or batch (by the KV "
        "pages each request needs at its peak, so nothing is preempted; a kv_group's "
        "shared prefix is held until its last member ends).",
    )
    group.add_argument(
        "--kv-config", default=None, metavar="FILE.yaml",
        help="YAML preset of the settings above (a path, or a name from configs/).",
    )


def settings_from_cli(args: argparse.Namespace, additional_config: dict[str, Any]) -> KVCompressConfig:
    """additional_config's keys, then the preset, then explicit flags (later wins)."""
    explicit = {field: getattr(args, field, None) for field in FLAG_FIELDS}
    base = {k: v for k, v in additional_config.items() if k in KVCompressConfig.model_fields}
    preset = getattr(args, "kv_config", None)
    return resolve_settings(preset, {**base, **{k: v for k, v in explicit.items() if v is not None}})


def install() -> None:
    """Wrap EngineArgs' CLI and config hooks; a second call changes nothing."""
    if getattr(EngineArgs.add_cli_args, "_kvcompress", False):
        return
    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__
    original_create = EngineArgs.create_engine_config

    def add_cli_args(parser):
        parser = original_add(parser)
        add_compression_flags(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        additional = dict(engine_args.additional_config or {})
        try:
            settings = settings_from_cli(args, additional)
        except KVCompressConfigError as exc:
            sys.exit(f"vllm-kvcompress: error: {exc}")
        if (settings.enabled or settings.prefix_cache_plugin
                or any(k in additional for k in KVCompressConfig.model_fields)):
            additional.update(settings.to_additional_config())
            engine_args.additional_config = additional
        if settings.enabled or settings.prefix_cache_plugin:
            # Our counters live in the engine and worker processes.
            collect_engine_processes()
        # Errors found later, once the model config exists, also end in one line.
        engine_args._kvcompress_from_cli = True
        return engine_args

    def create_engine_config(self, *args, **kwargs):
        try:
            settings = KVCompressConfig.from_additional_config(self.additional_config)
            prefix_caching_requested = self.enable_prefix_caching  # None unless the user set it
            if settings.enabled:
                prepare_engine_args(self)
            vllm_config = original_create(self, *args, **kwargs)
            if settings.enabled:
                settings.check_max_model_len(vllm_config.model_config.max_model_len)
                enable_compression(vllm_config, settings, prefix_caching_requested)
            elif settings.prefix_cache_plugin:
                enable_prefix_cache_plugin(vllm_config, settings)
        except KVCompressConfigError as exc:
            if getattr(self, "_kvcompress_from_cli", False):
                sys.exit(f"vllm-kvcompress: error: {exc}")
            raise
        return vllm_config

    add_cli_args._kvcompress = True
    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    EngineArgs.create_engine_config = create_engine_config
