"""Bad input, auth and limits, over httpx: every refusal is a 4xx OpenAI error body, never a 500.

The server runs one sequence at a time (--max-num-seqs 1) with room for two waiting
requests, so the queue bound can be reached on purpose.
"""

import asyncio
import json

import httpx
import pytest

from server_process import metric, start_server, wait_until

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 65536
ARGS = ["--model", "tiny", "--max-model-len", "1024", "--max-num-seqs", "1", "--max-num-batched-tokens", "64",
        "--token-buckets", "16,64", "--page-buckets", "64", "--api-key", KEY, "--max-queued-requests", "2",
        "--max-n", "4", "--max-body-bytes", str(MAX_BODY)]
PROMPT = [81, 278, 265, 287, 297, 275]
MSGS = [{"role": "user", "content": "a b"}]


@pytest.fixture(scope="module")
def server():
    s = start_server(*ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if status == 400:
        assert err["type"] == "invalid_request_error"
    if param != "any":
        assert err["param"] == param, err
    return err


COMPLETION_CASES = [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ({"prompt": PROMPT, "n": 0}, "n"),
    ({"prompt": PROMPT, "n": 5}, "n"),  # above --max-n
    ({"prompt": PROMPT, "n": 1.5}, "n"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": PROMPT, "max_tokens": -3}, "max_tokens"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "logprobs": True}, "logprobs"),
    ({"prompt": PROMPT, "model": "gpt-4"}, "model"),
    ({"prompt": PROMPT, "suffix": "x"}, "suffix"),
    ({"prompt": PROMPT, "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": PROMPT, "best_of": 3}, "best_of"),
    ({}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": {"text": "a"}}, "prompt"),
    ({"prompt": [100000]}, "prompt"),  # outside the 512-id vocabulary
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": PROMPT, "stop": 3}, "stop"),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ({"prompt": PROMPT, "stop_token_ids": [1.5]}, "stop_token_ids"),
    ({"prompt": PROMPT, "stop_token_ids": [99999]}, "stop_token_ids"),
    ({"prompt": PROMPT, "logit_bias": {"x": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"5": 500}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": {"99999": 1}}, "logit_bias"),
    ({"prompt": PROMPT, "logit_bias": [1]}, "logit_bias"),
    ({"prompt": PROMPT, "top_k": 2**40}, "top_k"),
    ({"prompt": PROMPT, "top_k": -2}, "top_k"),
    ({"prompt": PROMPT, "min_p": 2}, "min_p"),
    ({"prompt": PROMPT, "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": PROMPT, "frequency_penalty": -3}, "frequency_penalty"),
    ({"prompt": PROMPT, "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": PROMPT, "min_tokens": 20, "max_tokens": 5}, "min_tokens"),
    ({"prompt": PROMPT, "seed": "x"}, "seed"),
    ({"prompt": PROMPT, "seed": 2**70}, "seed"),
    ({"prompt": PROMPT, "stream": "yes"}, "stream"),
    ({"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"prompt": PROMPT, "ignore_eos": "no"}, "ignore_eos"),
    ({"prompt": PROMPT, "user": 5}, "user"),
    ({"prompt": "\ud800"}, "prompt"),  # a lone surrogate: not text a tokenizer can take
    ({"prompt": PROMPT, "stop": ["\udfff"]}, "stop"),
]

CHAT_CASES = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": MSGS, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSGS, "model": "nope"}, "model"),
    ({"messages": MSGS, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": MSGS, "tool_choice": "auto"}, "tool_choice"),
    ({"messages": MSGS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": MSGS, "n": 9}, "n"),
    ({"messages": MSGS, "temperature": -0.5}, "temperature"),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
]


@pytest.mark.parametrize("body,param", COMPLETION_CASES, ids=[json.dumps(c[0])[:60] for c in COMPLETION_CASES])
def test_completion_refusals(http, body, param):
    # json.dumps escapes non-ASCII, so even a lone surrogate travels as valid JSON.
    assert_error(http.post("/v1/completions", content=json.dumps(body)), 400, param)


@pytest.mark.parametrize("body,param", CHAT_CASES, ids=[json.dumps(c[0])[:60] for c in CHAT_CASES])
def test_chat_refusals(http, body, param):
    assert_error(http.post("/v1/chat/completions", content=json.dumps(body)), 400, param)


def test_tokenize_refusals(http):
    for body, param in (({"prompt": "\ud800"}, "prompt"), ({}, "prompt"), ({"prompt": "a", "messages": MSGS}, "prompt"),
                        ({"messages": [{"role": "x", "content": "a"}]}, "messages"), ({"model": "x", "prompt": "a"}, "model")):
        assert_error(http.post("/tokenize", content=json.dumps(body)), 400, param)
    for body, param in (({"tokens": [1, "a"]}, "tokens"), ({"tokens": [10**9]}, "tokens"), ({}, "tokens")):
        assert_error(http.post("/detokenize", content=json.dumps(body)), 400, param)


def test_unknown_model_names_the_served_one(http):
    err = assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "model": "gpt-4"}), 400, "model")
    assert "gpt-4" in err["message"] and "tiny" in err["message"] and err["code"] == "model_not_found"


def test_context_length_names_the_numbers(http):
    err = assert_error(http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 1020}), 400, "max_tokens")
    assert err["code"] == "context_length_exceeded"
    for number in ("6", "1020", "1024"):
        assert number in err["message"]
    long_prompt = [5] * 1030
    err = assert_error(http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}), 400)
    assert "1030" in err["message"] and "1024" in err["message"]
    # Chat without max_tokens: the default fills the context, so only an overlong prompt is refused.
    err = assert_error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a " * 1100}]}),
                       400, "messages")
    assert err["code"] == "context_length_exceeded" and "1024" in err["message"]


@pytest.mark.parametrize("raw", [b"{", b"not json", b'{"prompt": NaN}', b'{"prompt": [1], "temperature": Infinity}',
                                 b"\xff\xfe", b"[1, 2]", b'"text"', b"null", b"", b"[" * 60000])
def test_malformed_bodies(http, raw):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        assert_error(http.post(path, content=raw, headers={"Content-Type": "application/json"}), 400)


def test_non_finite_numbers(http):
    raw = b'{"prompt": [1, 2], "temperature": 1e400}'  # parses as inf
    assert_error(http.post("/v1/completions", content=raw), 400, "temperature")


FUZZ_VALUES = [None, "x", -1, 0, 1, 0.5, 1e300, -1e300, 2**63, [], {}, True, [1, "a"], {"a": 1}]
FUZZ_FIELDS = ["n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
               "repetition_penalty", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
               "logit_bias", "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "echo", "user",
               "model", "stream_options", "best_of", "suffix"]


def test_no_input_yields_a_server_error(http):
    """Every field with every kind of value: a result or a 4xx, never a 5xx, and the engine stays up."""

    async def run():
        async with httpx.AsyncClient(base_url=str(http.base_url), headers=AUTH, timeout=60) as c:
            sem = asyncio.Semaphore(2)  # stay under the queue bound

            async def one(field, value):
                body = {"prompt": PROMPT, "max_tokens": 2, field: value}
                if field == "max_tokens":
                    body["max_tokens"] = value
                async with sem:
                    return field, value, await c.post("/v1/completions", json=body)

            return await asyncio.gather(*(one(f, v) for f in FUZZ_FIELDS for v in FUZZ_VALUES))

    for field, value, r in asyncio.run(run()):
        assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
        assert "Traceback" not in r.text
        if r.status_code == 400:
            assert r.json()["error"]["param"] in (field, "prompt", f"{field}.include_usage"), (field, value, r.text)
    assert http.get("/health").status_code == 200


def test_body_size_limit(http):
    big = {"prompt": "a " * MAX_BODY}
    assert_error(http.post("/v1/completions", json=big), 413)
    # The same without a Content-Length (chunked upload).
    data = json.dumps(big).encode()
    r = http.post("/v1/completions", content=iter([data[i:i + 4096] for i in range(0, len(data), 4096)]))
    assert_error(r, 413)


def test_unknown_routes_and_methods(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/completions"), 405)
    assert_error(http.delete("/v1/models"), 405)


def test_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"bearer {KEY}x"}):
        err = assert_error(httpx.get(f"{server.url}/v1/models", headers=headers), 401)
        assert err["code"] == "invalid_api_key"
        assert_error(httpx.post(f"{server.url}/v1/completions", json={"prompt": PROMPT}, headers=headers), 401)
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # open
    assert httpx.get(f"{server.url}/metrics").status_code == 200  # open


def test_queue_bound_gives_429_with_retry_after(server):
    """One sequence runs at a time; two may wait; the next request gets 429."""
    url = server.url
    long = {"prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True, "stream": True}
    short = {"prompt": PROMPT, "max_tokens": 1}

    async def run():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=120) as c:
            async with c.stream("POST", "/v1/completions", json=long) as running:
                chunks = running.aiter_raw()
                await anext(chunks)  # the long request holds the only seat
                waiting = [asyncio.create_task(c.post("/v1/completions", json=short)) for _ in range(2)]
                assert await asyncio.to_thread(
                    wait_until, lambda: metric(url, "pagedjax:num_requests_waiting") == 2, 30)
                refused = await c.post("/v1/completions", json=short)
                assert_error(refused, 429)
                assert int(refused.headers["Retry-After"]) >= 1
            # Closing the stream aborts the long request; the waiting ones then run.
            return [await w for w in waiting]

    assert [r.status_code for r in asyncio.run(run())] == [200, 200]
