"""The OpenAI-compatible API on the tiny random model, driven by the official `openai` client and httpx.

The model's outputs are random text; the tests check the wire format, counts, and that
the same request gives the same answer (greedy or seeded) whichever way it is asked.
"""

import asyncio
import json
import time

import httpx
import openai
import pytest

from server_process import TINY, metric, start_server, wait_until

PROMPT = [81, 278, 265, 287, 297, 275]  # "a b c d e f"
GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    s = start_server(*TINY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].object == "model"


def test_health_and_openapi(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                 "/metrics"):
        assert path in doc["paths"]
    fields = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    for name in ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "stop", "stop_token_ids", "max_tokens", "min_tokens", "logprobs",
                 "logit_bias", "ignore_eos", "stream", "stream_options", "user", "echo"):
        assert name in fields


def test_completion_schema_and_usage(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, extra_body=NO_EOS, **GREEDY)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == "tiny"
    assert abs(r.created - time.time()) < 60
    (choice,) = r.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert isinstance(choice.text, str)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (6, 7, 13)
    again = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=7, extra_body=NO_EOS, **GREEDY)
    assert again.choices[0].text == choice.text  # greedy is deterministic


def test_prompt_forms(client):
    # A string, a list of strings, token ids and a list of token-id lists all work; model may be omitted.
    as_text = client.completions.create(model="tiny", prompt="a b c d e f", max_tokens=4, extra_body=NO_EOS, **GREEDY)
    as_ids = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, extra_body=NO_EOS, **GREEDY)
    assert as_text.choices[0].text == as_ids.choices[0].text
    batch = client.completions.create(model="tiny", prompt=[PROMPT, [1, 2, 3]], n=2, max_tokens=3,
                                      extra_body=NO_EOS, **GREEDY)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.prompt_tokens == 6 + 3 and batch.usage.completion_tokens == 4 * 3
    by_index = {c.index: c.text for c in batch.choices}
    assert by_index[0] == by_index[1] == as_ids.choices[0].text[:len(by_index[0])]
    texts = httpx.post(f"{client.base_url}completions",
                       json={"prompt": ["a b", "c d"], "max_tokens": 2, "ignore_eos": True}).json()
    assert len(texts["choices"]) == 2 and texts["usage"]["completion_tokens"] == 4


def test_echo(client, server):
    prompt_text = httpx.post(f"{server.url}/detokenize", json={"tokens": PROMPT}).json()["prompt"]
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, extra_body=NO_EOS, **GREEDY)
    echoed = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, echo=True, extra_body=NO_EOS,
                                       **GREEDY)
    assert echoed.choices[0].text == prompt_text + plain.choices[0].text


def test_n_and_seed(client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=12, temperature=1.0, extra_body=NO_EOS)
    a = client.completions.create(n=2, seed=1234, **kw)
    b = client.completions.create(n=2, seed=1234, **kw)
    c = client.completions.create(n=2, seed=4321, **kw)
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert len(a.choices) == 2 and a.usage.completion_tokens == 24
    assert texts(a) == texts(b)  # seeded: reproducible
    assert texts(a) != texts(c)
    assert texts(a)[0] != texts(a)[1]  # the n completions draw different streams


def test_seeded_request_unaffected_by_concurrent_traffic(server):
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    alone = httpx.post(f"{server.base_url}/completions", json=body).json()["choices"][0]["text"]

    async def crowd():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as c:
            noise = [c.post("/completions", json={**body, "seed": s, "prompt": [5, 6, 7, s]}) for s in range(8)]
            results = await asyncio.gather(c.post("/completions", json=body), *noise)
            return results[0].json()["choices"][0]["text"]

    assert asyncio.run(crowd()) == alone


def test_logprobs(client):
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, logprobs=3, extra_body=NO_EOS, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0
        assert 3 <= len(top) <= 4 and top[token] == logprob  # the top 3, plus the chosen token
        assert logprob >= max(top.values()) - 1e-4  # greedy picks the most likely token
    zero = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, logprobs=0, **GREEDY)
    assert all(len(t) == 1 for t in zero.choices[0].logprobs.top_logprobs)


def test_stop_strings(client):
    base = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, extra_body=NO_EOS, **GREEDY)
    text = base.choices[0].text
    stop = next(text[i:i + 2] for i in range(4, len(text) - 2) if text[i:i + 2].strip() and "\ufffd" not in text[i:i + 2])
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=24, stop=[stop], extra_body=NO_EOS, **GREEDY)
    assert r.choices[0].text == text[:text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_dump()["stop_reason"] == stop


def test_stop_token_ids_min_tokens_and_logit_bias(client):
    # The bias makes token 100 the greedy choice at every step; it ends the output at once...
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=10, logit_bias={"100": 100}, **GREEDY)
    r = client.completions.create(extra_body={"stop_token_ids": [100]}, **kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens, r.choices[0].text) == ("stop", 1, "")
    assert r.choices[0].model_dump()["stop_reason"] == 100
    # ...unless min_tokens holds it back for three tokens.
    r = client.completions.create(extra_body={"stop_token_ids": [100], "min_tokens": 3}, **kw)
    assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("stop", 4)


def test_streaming_with_usage(client):
    full = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, extra_body=NO_EOS, **GREEDY)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, stream=True,
                                            stream_options={"include_usage": True}, extra_body=NO_EOS, **GREEDY))
    *body, last = chunks
    assert all(c.usage is None for c in body) and last.choices == []
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (6, 20)
    assert "".join(c.choices[0].text for c in body) == full.choices[0].text
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1])
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("cmpl-")


def test_sse_wire_format_and_timing(server):
    """Raw SSE: `data: {json}` then a blank line, [DONE] last; chunks come as tokens do, not in one burst."""
    body = {"prompt": PROMPT, "max_tokens": 200, "ignore_eos": True, "stream": True}
    arrivals, lines = [], []
    start = time.monotonic()
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for raw in r.iter_raw():
            arrivals.append(time.monotonic() - start)
            lines.append(raw.decode())
    text = "".join(lines)
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert sum(1 for p in payloads if p["choices"][0]["text"]) >= 5
    # The first bytes arrive long before the last: tokens are sent as they are made.
    assert len(arrivals) >= 5
    assert arrivals[0] < 0.5 * arrivals[-1]


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def test_chat_schema_and_usage(client, server):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=6,
                                       extra_body=NO_EOS, **GREEDY)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == "tiny"
    (choice,) = r.choices
    assert choice.index == 0 and choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 6)
    # The same prompt sent as token ids gives the same text; max_tokens is the older name.
    same = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, extra_body=NO_EOS, **GREEDY)
    assert same.choices[0].text == choice.message.content
    older = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, extra_body=NO_EOS, **GREEDY)
    assert older.choices[0].message.content == choice.message.content
    # Content given as text parts is joined, as vLLM does.
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, MESSAGES[1]]
    as_parts = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6, extra_body=NO_EOS, **GREEDY)
    assert as_parts.choices[0].message.content == choice.message.content


def test_chat_streaming_with_usage(client):
    full = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, n=2, seed=3,
                                          extra_body=NO_EOS)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, n=2, seed=3,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    roles = [c.choices[0] for c in chunks[:2]]  # as OpenAI: each choice's role comes first
    assert [(x.index, x.delta.role, x.delta.content) for x in roles] == [(0, "assistant", ""), (1, "assistant", "")]
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 24 and all(c.usage is None for c in body)
    for choice in full.choices:
        deltas = [x for c in body for x in c.choices if x.index == choice.index]
        assert "".join(x.delta.content or "" for x in deltas) == choice.message.content
        assert deltas[-1].finish_reason == "length" and all(x.finish_reason is None for x in deltas[:-1])


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True, top_logprobs=3,
                                       extra_body=NO_EOS, **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.bytes == list(item.token.encode()) and item.logprob <= 0
        assert len(item.top_logprobs) == 3
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-4)  # greedy takes the best
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, logprobs=True,
                                           extra_body=NO_EOS, **GREEDY)
    assert [item.top_logprobs for item in plain.choices[0].logprobs.content] == [[], [], []]
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, logprobs=True,
                                              top_logprobs=3, stream=True, extra_body=NO_EOS, **GREEDY)
    items = [i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.token for i in items] == [i.token for i in content]


def test_tokenize_and_detokenize(server):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world"}).json()
    assert r["tokens"] == [19556, 905] and r["count"] == 2 and r["max_model_len"] == 256
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": PROMPT}).json() == {"prompt": "a b c d e f"}
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"][0] == 1 and chat["count"] == len(chat["tokens"])  # <|im_start|> opens the template


def test_64_concurrent_streaming_clients(server):
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
    wanted = [3 + (i * 7) % 29 for i in range(64)]

    async def one(i: int, max_tokens: int):
        stream = await client.completions.create(
            model="tiny", prompt=[10 + i % 50, 20, 30], max_tokens=max_tokens, stream=True, temperature=0.8,
            seed=i, stream_options={"include_usage": True}, extra_body=NO_EOS)
        text, finish, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            usage = chunk.usage or usage
        return text, finish, usage

    async def run():
        try:
            return await asyncio.gather(*(one(i, n) for i, n in enumerate(wanted)))
        finally:
            await client.close()

    results = asyncio.run(run())
    assert [u.completion_tokens for _, _, u in results] == wanted
    assert all(f == "length" for _, f, _ in results)
    assert all(u.prompt_tokens == 3 for _, _, u in results)


def _idle(server) -> bool:
    return (metric(server.url, "pagedjax:num_requests_running") == 0
            and metric(server.url, "pagedjax:kv_cache_usage_perc") == 0)


def test_disconnect_aborts_and_frees_pages(server):
    assert wait_until(lambda: _idle(server))
    body = {"prompt": PROMPT, "max_tokens": 240, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/completions", json=body, timeout=60) as r:
        chunks = r.iter_raw()
        for _ in range(3):
            next(chunks)
        assert metric(server.url, "pagedjax:num_requests_running") == 1
        assert metric(server.url, "pagedjax:kv_cache_usage_perc") > 0
    # Leaving the block closes the connection mid-stream.
    assert wait_until(lambda: _idle(server), timeout=5)
    aborted = metric(server.url, 'pagedjax:request_success_total{finished_reason="abort"')

    # A non-streaming client that gives up is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/completions", json={**body, "stream": False}, timeout=0.3)
    assert wait_until(lambda: _idle(server), timeout=5)
    assert metric(server.url, 'pagedjax:request_success_total{finished_reason="abort"') == aborted + 1


def test_metrics_names(server):
    httpx.post(f"{server.base_url}/completions", json={"prompt": PROMPT, "max_tokens": 3, "ignore_eos": True})
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("pagedjax:num_requests_running", "pagedjax:num_requests_waiting", "pagedjax:kv_cache_usage_perc",
                 "pagedjax:num_preemptions_total", "pagedjax:prompt_tokens_total", "pagedjax:generation_tokens_total",
                 'pagedjax:request_success_total{finished_reason="length"',
                 "pagedjax:time_to_first_token_seconds_bucket", "pagedjax:inter_token_latency_seconds_bucket",
                 "pagedjax:e2e_request_latency_seconds_bucket", "pagedjax:request_queue_time_seconds_bucket"):
        assert name in text, name
    assert metric(server.url, "pagedjax:generation_tokens_total") >= 3
    assert metric(server.url, "pagedjax:request_queue_time_seconds_count") >= 1
