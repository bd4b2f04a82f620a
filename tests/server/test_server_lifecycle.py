"""Start-up, health and shutdown of `pagedjax serve`: 503 while loading, drain on SIGTERM/SIGINT, exit 0."""

import json
import signal
import socket

import httpx
import pytest

from engine.config import EngineConfig
from server_process import REPO, ServerProcess

# One sequence at a time and a long context, so a request can outlast a signal.
ARGS = ["--model", "tiny", "--max-model-len", "1024", "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
        "--token-buckets", "16,64", "--page-buckets", "64"]
LONG = {"prompt": [81, 278, 265], "max_tokens": 600, "ignore_eos": True, "stream": True,
        "stream_options": {"include_usage": True}}


def events(lines):
    """SSE payloads (parsed JSON, or the string "[DONE]") from an iterator of lines."""
    for line in lines:
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield data if data == "[DONE]" else json.loads(data)


def test_loading_then_ready_then_drain_on_sigterm():
    server = ServerProcess(*ARGS)
    try:
        url = server.wait_listening()
        # The socket is bound before the model loads: health says so, and the API refuses politely.
        health = httpx.get(f"{url}/health", timeout=30)
        assert (health.status_code, health.json()) == (503, {"status": "loading"})
        r = httpx.get(f"{url}/v1/models", timeout=30)
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]

        assert server.wait_ready() == url
        assert httpx.get(f"{url}/health").status_code == 200

        with httpx.stream("POST", f"{url}/v1/completions", json=LONG, timeout=60) as stream:
            received = events(stream.iter_lines())
            first = next(received)
            assert first["choices"][0]["text"] is not None
            server.signal(signal.SIGTERM)
            server.wait_for("SIGTERM: admitting no new requests")
            # Draining: not healthy, nothing new admitted...
            health = httpx.get(f"{url}/health")
            assert (health.status_code, health.json()) == (503, {"status": "draining"})
            refused = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "service_unavailable"
            # ...but the running request finishes in full.
            rest = list(received)
        assert rest[-1] == "[DONE]"
        assert rest[-2]["usage"]["completion_tokens"] == 600
        assert rest[-3]["choices"][0]["finish_reason"] == "length"
        assert server.wait_exit(60) == 0
    finally:
        server.stop()


def test_drain_timeout_ends_the_stream_with_an_error_then_exits_0():
    server = ServerProcess(*ARGS, "--drain-timeout", "0.5")
    try:
        server.wait_ready()
        with httpx.stream("POST", f"{server.url}/v1/completions", json=LONG, timeout=60) as stream:
            received = events(stream.iter_lines())
            next(received)
            server.signal(signal.SIGINT)
            rest = list(received)
        assert rest[-1] == "[DONE]"
        assert "error" in rest[-2] and "shutting down" in rest[-2]["error"]["message"]
        assert server.wait_exit(60) == 0
        assert "still running after 0.5 s" in server.output()
    finally:
        server.stop()


def test_signal_while_loading_exits_0_at_once():
    server = ServerProcess(*ARGS)
    try:
        url = server.wait_listening()
        assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "loading"}
        server.signal(signal.SIGTERM)
        assert server.wait_exit(15) == 0  # no waiting for the compilation to end
        assert "error" not in server.output()
    finally:
        server.stop()


def test_bad_start_ups_fail_fast_with_a_message():
    missing = ServerProcess("--model", "/no/such/model")
    try:
        assert missing.wait_exit(120) == 1
        assert "pagedjax: error: the model failed to load" in missing.output()
        assert "/no/such/model" in missing.output()
    finally:
        missing.stop()

    missing_config = ServerProcess("--config", "configs/no-such-preset.toml")
    try:
        assert missing_config.wait_exit(120) == 2
        assert "cannot read engine config configs/no-such-preset.toml" in missing_config.output()
    finally:
        missing_config.stop()

    bad_flag = ServerProcess("--model", "tiny", "--max-n", "0")
    try:
        assert bad_flag.wait_exit(120) == 2
        assert "--max-n must be >= 1" in bad_flag.output()
    finally:
        bad_flag.stop()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = ServerProcess("--model", "tiny", "--port", str(taken.getsockname()[1]))
        try:
            assert busy.wait_exit(120) == 2
            assert "cannot listen on 127.0.0.1" in busy.output()
        finally:
            busy.stop()


@pytest.mark.parametrize("preset", sorted(p.name for p in (REPO / "configs").glob("*.toml")))
def test_config_presets_load(preset):
    config = EngineConfig.from_toml(REPO / "configs" / preset)
    assert config.max_model_len and config.max_num_seqs >= 1
