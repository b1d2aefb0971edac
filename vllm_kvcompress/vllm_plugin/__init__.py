"""The only package that touches vLLM internals.

`register()` is vLLM's `vllm.general_plugins` entry point: it runs in every vLLM process
(API server, engine core, workers), possibly more than once, so it only installs hooks
that are inert until a compression policy is configured. The rest (scheduler, KV manager,
worker, attention backend) is switched on through the VllmConfig by engine_setup.py.
"""


def register() -> None:
    from vllm_kvcompress.vllm_plugin import engine_args, request_validation

    engine_args.install()
    request_validation.install()
