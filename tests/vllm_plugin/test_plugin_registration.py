"""The plugin arrives through vLLM's entry point, and registering twice is harmless."""

from importlib.metadata import entry_points

from vllm.engine.arg_utils import EngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

import vllm_kvcompress.vllm_plugin as plugin


def test_entry_point_resolves_to_register():
    found = {ep.name: ep for ep in entry_points(group="vllm.general_plugins")}
    assert "kvcompress" in found
    assert found["kvcompress"].load() is plugin.register


def test_vllm_loads_the_plugin_and_flags_appear_once():
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    plugin.register()
    plugin.register()
    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    flags = [opt for action in parser._actions for opt in action.option_strings]
    for flag in ("--kv-policy", "--budget", "--kv-window", "--kv-sinks", "--kv-interval",
                 "--kv-prefill-mode", "--kv-config"):
        assert flags.count(flag) == 1, flag
    args = parser.parse_args(["--model", "m", "--kv-policy", "none"])
    assert args.kv_policy == "none"
