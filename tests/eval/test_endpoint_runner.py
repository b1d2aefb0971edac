"""The endpoint runner: request bodies (a stub server), then a real `vllm serve` with
policy none answering exactly as the reference runner at full KV."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from vllm_kvcompress.eval.endpoint_runner import EndpointRunner, vllm_xargs
from vllm_kvcompress.eval.harness import evaluate
from vllm_kvcompress.eval.samples import Sample
from vllm_kvcompress.eval.settings import Setting, settings_grid
from vllm_kvcompress.eval.tasks import make_samples
from vllm_kvcompress.serve_process import CPU_DEFAULT_ARGS, VllmServer

SAMPLE = Sample(task="t", index=0, target_length=8, num_tokens=5, depth=0.5, prompt="Say 42:",
                references=("42",), metric="all", max_new_tokens=4)


class StubServer(HTTPServer):
    """Answers /v1/models and /v1/completions, remembering the completion bodies."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.max_model_len = 16
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._reply({"data": [{"id": "stub-model", "max_model_len": server.max_model_len}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.bodies.append(body)
                self._reply({"choices": [{"text": " 42"}]})

            def _reply(self, document):
                payload = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def stub():
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.mark.parametrize("mode, sent", [
    ("auto", [None, {"kv_policy": "snapkv", "budget": 64, "kv_window": 8}]),
    ("always", [{"kv_policy": "none"}, {"kv_policy": "snapkv", "budget": 64, "kv_window": 8}]),
])
def test_settings_travel_as_vllm_xargs(stub, mode, sent):
    runner = EndpointRunner(stub.url, xargs=mode, concurrency=1)
    # Interval and sinks are the server's flags: they do not travel per request.
    records = evaluate(runner, [SAMPLE], [Setting(), Setting("snapkv", 64, window=8, sinks=4)])
    assert [r.score for r in records] == [1.0, 1.0]
    assert [body.get("vllm_xargs") for body in stub.bodies] == sent
    assert {body["model"] for body in stub.bodies} == {"stub-model"}
    assert all(body["temperature"] == 0.0 and body["max_tokens"] == 4 for body in stub.bodies)


def test_never_sends_settings_and_takes_one_label(stub):
    runner = EndpointRunner(stub.url, model="m", xargs="never")
    evaluate(runner, [SAMPLE], [Setting("snapkv", 64)])
    assert "vllm_xargs" not in stub.bodies[0]
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(runner, [SAMPLE], [Setting(), Setting("snapkv", 64)])


def test_refuses_prompts_that_leave_no_room_for_the_answer(stub):
    # vLLM would cut max_tokens to the context left and the truncated answer would score 0.
    stub.max_model_len = SAMPLE.num_tokens + SAMPLE.max_new_tokens - 1
    with pytest.raises(ValueError, match="max_model_len 8; use --lengths of at most 4"):
        evaluate(EndpointRunner(stub.url), [SAMPLE], [Setting()])
    assert stub.bodies == []
    stub.max_model_len += 1
    assert [r.score for r in evaluate(EndpointRunner(stub.url), [SAMPLE], [Setting()])] == [1.0]


@pytest.mark.slow   # 100 s: a real server start plus two passkeys (the stub covers the protocol)
def test_real_vllm_serve_with_policy_none_answers_like_the_reference_runner(
        model_dir, runner, count_tokens, tmp_path):
    samples = make_samples(["passkey"], [512], num_samples=2, seed=0, count_tokens=count_tokens)
    args = [*CPU_DEFAULT_ARGS, "--dtype", "float32", "--max-model-len", "1024",
            "--kv-policy", "none"]
    with VllmServer(model_dir, args, tmp_path / "vllm.log") as server:
        served = evaluate(EndpointRunner(server.url, xargs="auto"), samples, [Setting()])
    reference = evaluate(runner, samples, [Setting()])
    by_index = {r.index: r.output for r in reference}
    assert {r.index: r.output for r in served} == by_index
    assert all(r.score == 1.0 for r in served)


def test_a_quality_target_sends_kv_quality_and_resolves_a_budget_per_length():
    curves = {"fractions": [0.25, 0.5, 1.0], "oracle": [0.7, 0.9, 1.0], "snapkv": [0.5, 0.8, 1.0]}
    (setting,) = settings_grid(["snapkv"], [64], qualities=[0.8], curves=curves)
    assert setting.label == "snapkv@q0.8" and setting.per_length
    assert vllm_xargs(setting) == {"kv_policy": "snapkv", "kv_quality": 0.8}
    assert setting.at_length(2000, shape=None).budget == 1000
    assert setting.plugin_settings()["kv_quality_curves"] == curves
