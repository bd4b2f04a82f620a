"""The server on the real default model (SmolLM2-135M-Instruct): chat through its template, against HF.

Greedy outputs are checked against HF transformers' (tests/golden/smollm2/greedy.json),
so these tests also show that the server adds nothing and loses nothing on the way.
"""

import asyncio
import json
from pathlib import Path

import httpx
import openai
import pytest

from server_process import start_server

pytestmark = pytest.mark.slow

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "smollm2" / "greedy.json").read_text())
ARGS = ["--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
        "--token-buckets", "16,64", "--page-buckets", "32"]
MODEL = "SmolLM2-135M-Instruct.Q4_1"


@pytest.fixture(scope="module")
def server():
    s = start_server(*ARGS)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def golden_text(case) -> str:
    return case["text"].removesuffix("<|im_end|>")


def test_greedy_equals_hf_while_batched(server):
    """All golden cases at once (so they share steps), through the chat template or as plain text."""
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=300)
    kw = dict(model=MODEL, temperature=0)

    async def one(case):
        if case["kind"] == "chat":
            r = await client.chat.completions.create(messages=[{"role": "user", "content": case["prompt"]}],
                                                     max_completion_tokens=GOLDEN["max_new_tokens"], **kw)
            text = r.choices[0].message.content
            assert r.id.startswith("chatcmpl-") and r.choices[0].message.role == "assistant"
        else:
            r = await client.completions.create(prompt=case["prompt"], max_tokens=GOLDEN["max_new_tokens"], **kw)
            text = r.choices[0].text
        return r, text

    async def run():
        try:
            return await asyncio.gather(*(one(c) for c in GOLDEN["cases"]))
        finally:
            await client.close()

    for case, (r, text) in zip(GOLDEN["cases"], asyncio.run(run())):
        assert text == golden_text(case)
        assert r.choices[0].finish_reason == ("stop" if case["stopped_at_eos"] else "length")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(case["prompt_ids"]), len(case["new_ids"]))


def test_chat_streaming_with_usage(client):
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "Name three primary colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == full.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in body) == full.choices[0].message.content
    assert body[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_chat_stop_string(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                       max_tokens=32, temperature=0, stop=["Paris"])
    assert r.choices[0].message.content == "The capital of France is "
    assert r.choices[0].finish_reason == "stop" and r.choices[0].model_dump()["stop_reason"] == "Paris"


def test_chat_context_length(server):
    messages = [{"role": "user", "content": "word " * 600}]
    r = httpx.post(f"{server.base_url}/chat/completions", json={"messages": messages})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded" and "512" in err["message"]
