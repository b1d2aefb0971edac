"""Settings: parsing, presets, and one-line errors naming the flag."""

from __future__ import annotations

import pytest
from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

from vllm_kvcompress.config import (
    KVCompressConfig,
    KVCompressConfigError,
    load_preset,
    resolve_settings,
)
from vllm_kvcompress.vllm_plugin import register
from vllm_kvcompress.vllm_plugin.request_settings import policy_for

register()


@pytest.fixture(autouse=True)
def _own_prometheus_dir(monkeypatch, tmp_path):
    # With compression on, from_cli_args has engine processes write metrics to files (an
    # environment variable, a collector on the default registry) unless this is set: keep
    # that out of the other tests of this process.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))


def serve_args(*argv: str):
    parser = make_arg_parser(FlexibleArgumentParser())
    return parser.parse_args(list(argv))


def engine_args_from_cli(*argv: str) -> AsyncEngineArgs:
    return AsyncEngineArgs.from_cli_args(serve_args(*argv))


def cli_error(*argv: str) -> str:
    """The one-line error `vllm serve ARGV` stops with (flags, then the engine config)."""
    with pytest.raises(SystemExit) as excinfo:
        engine_args_from_cli(*argv).create_engine_config()
    message = str(excinfo.value.code)
    assert "\n" not in message
    return message


def test_defaults_leave_additional_config_untouched(model_dir):
    engine_args = engine_args_from_cli("--model", str(model_dir))
    assert engine_args.additional_config == {}
    engine_args = engine_args_from_cli("--model", str(model_dir), "--kv-policy", "none")
    assert engine_args.additional_config == {}


def test_unknown_policy_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        serve_args("--model", "m", "--kv-policy", "lru")
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--kv-policy" in err and "'lru'" in err and "snapkv" in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--budget", "0"), "--budget=0"),
        (("--budget", "-5"), "--budget=-5"),
        (("--kv-window", "-1"), "--kv-window=-1"),
        (("--kv-sinks", "-2"), "--kv-sinks=-2"),
        (("--kv-interval", "0"), "--kv-interval=0"),
    ],
)
def test_bad_numbers_name_the_flag(model_dir, argv, expected):
    message = cli_error("--model", str(model_dir), "--kv-policy", "snapkv", *argv)
    assert expected in message
    assert "greater than or equal to" in message


def test_budget_larger_than_max_model_len(model_dir):
    message = cli_error("--model", str(model_dir), "--max-model-len", "1024",
                        "--kv-policy", "snapkv", "--budget", "2048")
    assert "--budget=2048" in message and "max_model_len (1024)" in message
    # Without --max-model-len the model's own limit (8192 positions) applies.
    message = cli_error("--model", str(model_dir), "--kv-policy", "snapkv", "--budget", "9000")
    assert "max_model_len (8192)" in message


def test_missing_and_malformed_presets(tmp_path, model_dir):
    message = cli_error("--model", str(model_dir), "--kv-config", str(tmp_path / "nope.yaml"))
    assert "--kv-config=" in message and "no such file" in message and "ems-256" in message

    bad = tmp_path / "bad.yaml"
    bad.write_text("kv_policy: [snapkv\nbudget: 3\n")
    assert "malformed YAML" in cli_error("--model", str(model_dir), "--kv-config", str(bad))

    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert "must be a YAML mapping" in cli_error("--model", str(model_dir), "--kv-config", str(scalar))

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("kv_policy: snapkv\nbudgte: 64\n")
    message = cli_error("--model", str(model_dir), "--kv-config", str(unknown))
    assert "unknown setting(s) budgte" in message and "budget" in message

    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("kv_policy: snapkv\nbudget: lots\n")
    assert "--budget='lots'" in cli_error("--model", str(model_dir), "--kv-config", str(wrong_type))


@pytest.mark.parametrize(("policy_args", "expected"), [
    ("{key_bits: 9}", "kv_policy_args.key_bits=9: must be an integer >= 1 and <= 8 (policy 'mikv')"),
    ("{value_bits: 0}", "kv_policy_args.value_bits=0: must be an integer >= 1 and <= 8"),
    ("{base: nope}", "kv_policy_args.base='nope': must be one of: snapkv"),
    ("{lowbit_budget: -1}", "kv_policy_args.lowbit_budget=-1: must be an integer >= 0 (or null)"),
    ("{bits: 3}", "unknown option 'bits' for policy 'snapkv'"),
])
def test_bad_policy_options_stop_the_start(tmp_path, model_dir, policy_args, expected):
    preset = tmp_path / "mikv.yaml"
    preset.write_text(f"kv_policy: mikv\nkv_policy_args: {policy_args}\n")
    assert expected in cli_error("--model", str(model_dir), "--kv-config", str(preset))


def test_presets_load_and_flags_override_them():
    preset = load_preset("snapkv-1024")
    assert preset["kv_policy"] == "snapkv" and preset["budget"] == 1024
    settings = resolve_settings("snapkv-1024", {"budget": 128, "kv_window": None})
    assert settings.kv_policy == "snapkv"
    assert settings.budget == 128          # explicit flag wins
    assert settings.kv_window == 32        # from the preset, not overridden by a None flag
    assert settings.kv_policy_args == {"pool_kernel": 7, "pool": "max"}


def test_preset_through_the_serve_parser(model_dir):
    engine_args = engine_args_from_cli("--model", str(model_dir), "--kv-config", "ems-256",
                                       "--budget", "64")
    assert engine_args.additional_config["kv_policy"] == "ems"
    assert engine_args.additional_config["budget"] == 64          # the flag beats the preset
    config = engine_args.create_engine_config()
    assert config.additional_config["budget"] == 64
    assert config.cache_config.enable_prefix_caching is True      # vLLM's default, kept


def test_prefix_caching_with_chunked_prefill_mode(model_dir):
    base = ("--model", str(model_dir), "--kv-policy", "snapkv", "--budget", "64",
            "--kv-prefill-mode", "chunked")
    config = engine_args_from_cli(*base).create_engine_config()
    assert config.cache_config.enable_prefix_caching is False     # turned off, not refused
    message = cli_error(*base, "--enable-prefix-caching")
    assert "--enable-prefix-caching with --kv-prefill-mode chunked" in message


def test_offline_additional_config_is_validated_before_the_engine_starts(model_dir):
    for bad, expected in [
        ({"kv_policy": "lru"}, "--kv-policy='lru'"),
        ({"kv_policy": "snapkv", "budget": 0}, "--budget=0"),
        ({"kv_policy": "snapkv", "kv_prefill_mode": "eager"}, "--kv-prefill-mode='eager'"),
        ({"kv_policy": "snapkv", "budget": 4096}, "max_model_len (1024)"),
    ]:
        engine_args = EngineArgs(model=str(model_dir), max_model_len=1024, additional_config=bad)
        with pytest.raises(KVCompressConfigError, match=r".*") as excinfo:
            engine_args.create_engine_config()
        assert expected in str(excinfo.value), (bad, str(excinfo.value))


def test_config_round_trips_through_additional_config():
    settings = KVCompressConfig(kv_policy="h2o", budget=100, kv_sinks=0)
    extra = {"unrelated_key": 1, **settings.to_additional_config()}
    assert KVCompressConfig.from_additional_config(extra) == settings
    assert KVCompressConfig.from_additional_config(None) == KVCompressConfig()


def test_policy_for_shares_one_policy_per_configuration():
    # A layer list from a config file is a JSON list: it must not break the sharing.
    settings = KVCompressConfig.from_dict({"kv_policy": "d2o", "budget": 64,
                                           "kv_policy_args": {"full_layers": [0, 1]}})
    policy = policy_for(settings)
    assert policy is policy_for(KVCompressConfig.from_dict(settings.model_dump()))
    assert policy is not policy_for(KVCompressConfig.from_dict(
        {**settings.model_dump(), "kv_policy_args": {"full_layers": [0]}}))


def test_prefix_cache_replacement_flags(model_dir, tmp_path):
    base = ("--model", str(model_dir))
    # lru without a trace is vLLM's own scheduler, untouched.
    config = engine_args_from_cli(*base, "--kv-cache-replacement", "lru").create_engine_config()
    assert "kvcompress" not in str(config.scheduler_config.scheduler_cls)
    trace = str(tmp_path / "trace.jsonl")
    config = engine_args_from_cli(*base, "--kv-cache-replacement", "predicted",
                                  "--kv-trace", trace).create_engine_config()
    assert config.scheduler_config.scheduler_cls.endswith("PrefixCacheScheduler")
    assert config.additional_config["kv_cache_replacement"] == "predicted"
    assert config.additional_config["kv_trace"] == trace
    config = engine_args_from_cli(*base, "--kv-cache-replacement", "predicted", "--kv-policy",
                                  "snapkv").create_engine_config()
    assert config.scheduler_config.scheduler_cls.endswith("KVCompressScheduler")
    message = cli_error(*base, "--kv-cache-replacement", "predicted",
                        "--no-enable-prefix-caching")
    assert "--kv-cache-replacement=predicted: needs prefix caching" in message
    with pytest.raises(SystemExit):
        serve_args(*base, "--kv-cache-replacement", "lfu")


def test_batch_scheduling_flag(model_dir, capsys):
    base = ("--model", str(model_dir))
    config = engine_args_from_cli(*base, "--kv-scheduling", "vllm").create_engine_config()
    assert "kvcompress" not in str(config.scheduler_config.scheduler_cls)
    # Admission by peak pages needs no prefix cache (holding groups then has nothing to hold).
    config = engine_args_from_cli(*base, "--kv-scheduling", "batch",
                                  "--no-enable-prefix-caching").create_engine_config()
    assert config.scheduler_config.scheduler_cls.endswith("PrefixCacheScheduler")
    assert config.additional_config["kv_scheduling"] == "batch"
    with pytest.raises(SystemExit):
        serve_args(*base, "--kv-scheduling", "groups")
    assert "invalid choice: 'groups'" in capsys.readouterr().err
