"""A failure during generation reaches lorax-client as an SSE `data:` error event (fake engine, real HTTP).

The real backend is tested end to end in test_serve.py; a mid-stream failure cannot be provoked there on
purpose, so this drives the same FastAPI app over a real socket with an engine that fails after one token.
"""

import threading

import pytest
from lorax import Client
from lorax.errors import GenerationError

from soppu_hub.launch import free_port, wait_http
from soppu_hub.serve.engine import TokenEvent
from soppu_hub.serve.errors import ServeError

pytestmark = pytest.mark.e2e  # real servers over loopback


class _Tok:
    def __call__(self, text, add_special_tokens=True):
        return type("Enc", (), {"input_ids": [1, 2, 3]})()


class _Adapters:
    def acquire(self, adapter_id, source, token):
        return "__base__", lambda: None


class FailingEngine:
    tokenizer, max_total_tokens, max_concurrent_requests, max_batch = _Tok(), 64, 4, 4
    adapters = _Adapters()

    def admit(self):
        return lambda: None

    def submit(self, job):
        def run():
            job.emit("token", TokenEvent(7, "ok", -0.1, False))
            job.emit("error", ServeError("generation failed: RuntimeError: device lost"))

        threading.Thread(target=run).start()


@pytest.fixture(scope="module")
def failing_url():
    import uvicorn

    from soppu_hub.serve.api import create_app

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(FailingEngine()), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health")
    yield url
    server.should_exit = True
    thread.join(10)


def test_mid_stream_failure_is_a_data_event(failing_url):
    seen = []
    with pytest.raises(GenerationError, match="device lost"):
        for event in Client(failing_url).generate_stream("hi", max_new_tokens=5):
            seen.append(event.token.text)
    assert seen == ["ok"]  # the token before the failure arrived first


def test_failure_without_stream_is_424(failing_url):
    import json
    import urllib.error
    import urllib.request

    with pytest.raises(GenerationError, match="device lost"):
        Client(failing_url).generate("hi", max_new_tokens=5)
    req = urllib.request.Request(
        f"{failing_url}/generate",
        data=json.dumps({"inputs": "hi"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 424
    assert json.loads(err.value.read()) == {
        "error": "generation failed: RuntimeError: device lost",
        "error_type": "generation",
    }
