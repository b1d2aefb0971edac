"""Policies by name.

Every policy the project plans is listed here from the start, so a name is either
known (implemented or not yet) or a typo; an unimplemented one fails loudly instead of
silently falling back to another policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_kvcompress.policies.base import Policy

# Names a user may pass to --kv-policy; "none" means stock vLLM behaviour.
KNOWN_POLICIES = (
    "none",
    "streaming",
    "h2o",
    "snapkv",
    "pyramidkv",
    "adakv",
    "ems",
    "kvmerger",
    "d2o",
    "cam",
    "elastic",
    "think",
    "mikv",
    "locret",
    "attention_gate",
)

_IMPLEMENTED: dict[str, type[Policy]] = {}


def register_policy(name: str):
    """Class decorator: make a Policy subclass available under `name`."""
    if name not in KNOWN_POLICIES:
        raise ValueError(f"policy {name!r} must be added to KNOWN_POLICIES first")

    def decorator(cls):
        _IMPLEMENTED[name] = cls
        cls.name = name
        return cls

    return decorator


def implemented_policies() -> tuple[str, ...]:
    _load_all()
    return tuple(name for name in KNOWN_POLICIES if name in _IMPLEMENTED)


def get_policy_class(name: str) -> type[Policy]:
    """The Policy class registered as `name`; NotImplementedError for planned ones."""
    if name not in KNOWN_POLICIES:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(KNOWN_POLICIES)}")
    _load_all()
    if name not in _IMPLEMENTED:
        raise NotImplementedError(f"policy {name!r} is not implemented yet")
    return _IMPLEMENTED[name]


def make_policy(name: str, window: int | None = None, sinks: int | None = None,
                **options: Any) -> Policy:
    """The policy `name` with protected `window`/`sinks` (None = its published defaults)
    and `options` (the user's kv_policy_args). ValueError names a bad or unknown option
    and the allowed ones."""
    if name == "none":
        raise ValueError("kv_policy 'none' means no compression: there is no policy object for it")
    return get_policy_class(name)(window=window, sinks=sinks, **options)


def _load_all() -> None:
    # Importing the package imports every policy module, which registers it.
    import vllm_kvcompress.policies  # noqa: F401
