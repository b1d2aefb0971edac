"""Compression settings: one validated model shared by the CLI, offline use and requests.

Settings travel to every vLLM process as top-level keys of
`VllmConfig.additional_config` (`kv_policy`, `budget`, ...), so `--additional-config`
and `LLM(additional_config=...)` accept the same names as the flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from vllm_kvcompress.policies.registry import KNOWN_POLICIES

# Where bare preset names given to --kv-config are looked up.
PRESETS_DIR = Path(__file__).resolve().parent.parent / "configs"

# Setting name -> the flag a user types; errors name the flag.
FLAGS = {
    "kv_policy": "--kv-policy",
    "budget": "--budget",
    "kv_window": "--kv-window",
    "kv_sinks": "--kv-sinks",
    "kv_interval": "--kv-interval",
    "kv_prefill_mode": "--kv-prefill-mode",
    "kv_policy_args": "kv_policy_args (in --kv-config)",
    "kv_quality": "--kv-quality",
    "kv_quality_curves": "kv_quality_curves (in --kv-config)",
    "kv_cache_replacement": "--kv-cache-replacement",
    "kv_trace": "--kv-trace",
    "kv_scheduling": "--kv-scheduling",
}


class KVCompressConfigError(ValueError):
    """A bad compression setting; the message is one line naming the flag."""


class KVCompressConfig(BaseModel):
    """Validated compression settings.

    `budget` counts tokens kept per KV head per layer on average (sinks and the
    protected window included). `kv_window` and `kv_sinks` left as None take the
    policy's published defaults.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kv_policy: str = "none"
    budget: int = Field(default=256, ge=1)
    kv_window: int | None = Field(default=None, ge=0)
    kv_sinks: int | None = Field(default=None, ge=0)
    kv_interval: int = Field(default=16, ge=1)
    kv_prefill_mode: Literal["full", "chunked"] = "full"
    kv_policy_args: dict[str, Any] = Field(default_factory=dict)
    # A quality target instead of a fixed budget (policies/quality_budget.py), and the
    # retention curves it is read from (written by `vllm-kvcompress profile`).
    kv_quality: float | None = Field(default=None, gt=0, le=1)
    kv_quality_curves: dict[str, list[float]] | None = None
    # Prefix-cache replacement (sharing/replacement/): vLLM's LRU, or marking with one-bit
    # predictions; independent of compression.
    kv_cache_replacement: Literal["lru", "predicted"] = "lru"
    kv_trace: str | None = None   # JSONL file that logs every admitted request's lookup
    # Admission: vLLM's (as many requests as fit now), or batch (BatchLLM's: by the pages
    # each request needs at its peak, holding a kv_group's shared prefix until its end).
    kv_scheduling: Literal["vllm", "batch"] = "vllm"

    @field_validator("kv_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in KNOWN_POLICIES:
            raise ValueError(f"must be one of: {', '.join(KNOWN_POLICIES)}")
        return value

    @field_validator("kv_quality_curves")
    @classmethod
    def _valid_curves(cls, value: dict[str, list[float]] | None) -> dict[str, list[float]] | None:
        from vllm_kvcompress.policies.quality_budget import check_curves

        problem = None if value is None else check_curves(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _quality_needs_curves(self) -> KVCompressConfig:
        if self.kv_quality is not None and self.kv_quality_curves is None:
            raise ValueError("kv_quality needs kv_quality_curves: start the server with a "
                             "profile's --kv-config (written by `vllm-kvcompress profile`, "
                             "e.g. --kv-config profile-smollm2-135m)")
        return self

    @model_validator(mode="after")
    def _policy_accepts_its_options(self) -> KVCompressConfig:
        # Building the policy checks kv_policy_args (and window, sinks) against it; its
        # error names the option and the values it allows.
        if self.enabled:
            from vllm_kvcompress.policies.registry import make_policy

            make_policy(self.kv_policy, self.kv_window, self.kv_sinks, **self.kv_policy_args)
        return self

    @property
    def enabled(self) -> bool:
        return self.kv_policy != "none"

    @property
    def needs_prefix_cache(self) -> bool:
        """Replacement or tracing on: both act on vLLM's prefix cache."""
        return self.kv_cache_replacement != "lru" or self.kv_trace is not None

    @property
    def prefix_cache_plugin(self) -> bool:
        """Our scheduler is needed even without compression (replacement, trace or batch
        scheduling on)."""
        return self.needs_prefix_cache or self.kv_scheduling != "vllm"

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> KVCompressConfig:
        """Validate `values`, turning pydantic's report into one line per flag."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise KVCompressConfigError(_one_line(exc, values)) from None

    def check_max_model_len(self, max_model_len: int) -> None:
        if self.enabled and self.budget > max_model_len:
            raise KVCompressConfigError(
                f"--budget={self.budget}: must be <= max_model_len ({max_model_len}), "
                "the most tokens a request can hold"
            )

    def to_additional_config(self) -> dict[str, Any]:
        """Plain JSON-able dict for VllmConfig.additional_config (it is hashed as JSON)."""
        return self.model_dump()

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> KVCompressConfig:
        """The settings found among `additional_config`'s keys (other keys are ignored)."""
        additional_config = additional_config or {}
        return cls.from_dict({k: v for k, v in additional_config.items() if k in cls.model_fields})


def load_preset(path_or_name: str) -> dict[str, Any]:
    """Read a YAML preset: a path, or a bare name looked up in configs/ (`ems-256`)."""
    path = Path(path_or_name)
    if not path.exists() and not path.suffix:
        path = PRESETS_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        presets = ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.yaml")))
        raise KVCompressConfigError(
            f"--kv-config={path_or_name}: no such file (give a YAML path or a preset: {presets})"
        )
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise KVCompressConfigError(f"--kv-config={path_or_name}: malformed YAML: {problem}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise KVCompressConfigError(
            f"--kv-config={path_or_name}: must be a YAML mapping of settings, got {type(values).__name__}"
        )
    unknown = sorted(set(values) - set(KVCompressConfig.model_fields))
    if unknown:
        raise KVCompressConfigError(
            f"--kv-config={path_or_name}: unknown setting(s) {', '.join(unknown)}; "
            f"allowed: {', '.join(KVCompressConfig.model_fields)}"
        )
    return values


def resolve_settings(preset: str | None, explicit: dict[str, Any]) -> KVCompressConfig:
    """Preset values overridden by the explicitly given ones (None means not given)."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in explicit.items() if v is not None})
    return KVCompressConfig.from_dict(values)


def _one_line(exc: ValidationError, values: dict[str, Any]) -> str:
    error = exc.errors()[0]
    if not error["loc"]:  # the policy refused its options: its message names them
        return error["msg"].removeprefix("Value error, ")
    field = str(error["loc"][0])
    flag = FLAGS.get(field, field)
    if error["type"] == "extra_forbidden":
        return f"{flag}: unknown setting; allowed: {', '.join(KVCompressConfig.model_fields)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{flag}={values.get(field)!r}: {message}"
