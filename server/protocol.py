"""The OpenAI wire format: request bodies in, response bodies and SSE chunks out.

Requests are checked here, before anything reaches the engine: every field's JSON type,
the ranges the engine could not carry, and the parameters this server refuses. A bad
field raises `RequestError`, which the app turns into OpenAI's error body

    {"error": {"message": ..., "type": "invalid_request_error", "param": "top_p", "code": null}}

Sampling parameters keep OpenAI's (and vLLM's) names and land in `SamplingParams`, whose
own checks name the field too. Responses follow OpenAI's schemas field for field, plus
vLLM's `stop_reason` on each choice; the OpenAPI document at /openapi.json is built from
the same field table, so it cannot drift from what is accepted.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.params import MAX_LOGPROBS, CompletionOutput, Logprob, ParamError, SamplingParams

INT32_MAX = 2**31 - 1
LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity; as vLLM, a -inf logprob is reported as this


class RequestError(Exception):
    """A request the server refuses; becomes an OpenAI error body with this status."""

    def __init__(self, message: str, param: str | None = None, *, status: int = 400, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def parse_json(raw: bytes) -> Any:
    """The request body as JSON; NaN and Infinity are refused (JSON has neither)."""

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"the request body is not valid JSON: {e}") from None


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---- field checks -------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _number(name: str, value: Any, *, integer: bool = False, lo: float | None = None, hi: float | None = None):
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(f"{name} must be {'an integer' if integer else 'a number'}, not {_type_name(value)}", name)
    if not integer and not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else f"<= {hi}"
        raise RequestError(f"{name} must be {bounds} (got {value})", name)
    return float(value) if not integer else value


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, not {_type_name(value)}", name)
    return value


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string, not {_type_name(value)}", name)
    return value


def _text(name: str, value: Any) -> str:
    """A string the tokenizer can take: valid Unicode (JSON escapes can spell lone surrogates)."""
    _string(name, value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{name} is not valid Unicode (it holds a lone surrogate)", name) from None
    return value


def _token_ids(name: str, value: Any, *, allow_empty: bool = True) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise RequestError(f"{name} must be an array of integer token ids", name)
    if not allow_empty and not value:
        raise RequestError(f"{name} must not be empty", name)
    if any(not 0 <= t <= INT32_MAX for t in value):
        raise RequestError(f"{name} holds a negative or too large token id", name)
    return value


def _stop(value: Any) -> list[str]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError("stop must be a string or an array of strings", "stop")
    for s in stops:
        _text("stop", s)
    if any(not s for s in stops):
        raise RequestError("stop strings must not be empty", "stop")
    return stops


def _logit_bias(value: Any) -> dict[int, float]:
    if not isinstance(value, dict):
        raise RequestError(f"logit_bias must be an object mapping token ids to biases, not {_type_name(value)}",
                           "logit_bias")
    bias = {}
    for key, b in value.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"logit_bias keys must be token ids (got {key!r})", "logit_bias") from None
        if not 0 <= token <= INT32_MAX:
            raise RequestError(f"logit_bias holds the invalid token id {key}", "logit_bias")
        bias[token] = _number("logit_bias", b, lo=-100, hi=100)
    return bias


@dataclass(frozen=True)
class Field:
    """One sampling parameter as the API takes it; `check` turns a non-null JSON value into the engine's."""

    schema: dict  # its JSON schema (the OpenAPI document shows it)
    doc: str
    check: Callable[[str, Any], Any] | None = None  # (name, JSON value) -> engine value; None: by the schema's type


# Request fields that map one to one onto SamplingParams fields of the same name.
SAMPLING_FIELDS: dict[str, Field] = {
    "n": Field({"type": "integer", "minimum": 1, "default": 1}, "completions to generate for each prompt"),
    "temperature": Field({"type": "number", "minimum": 0, "default": 1.0}, "0 is greedy"),
    "top_p": Field({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0}, "nucleus mass kept"),
    "top_k": Field({"type": "integer", "minimum": -1, "default": -1}, "keep the k most likely tokens; -1 or 0 keeps all"),
    "min_p": Field({"type": "number", "minimum": 0, "maximum": 1, "default": 0.0},
                   "drop tokens less likely than min_p times the most likely"),
    "presence_penalty": Field({"type": "number", "minimum": -2, "maximum": 2, "default": 0.0},
                              "subtracted once from every token already generated"),
    "frequency_penalty": Field({"type": "number", "minimum": -2, "maximum": 2, "default": 0.0},
                               "subtracted per occurrence in the generated tokens"),
    "repetition_penalty": Field({"type": "number", "exclusiveMinimum": 0, "default": 1.0},
                                "divides positive / multiplies negative logits of tokens seen in prompt or output"),
    "seed": Field({"type": "integer"}, "fixes this request's random stream, whatever else is batched with it",
                  lambda name, v: _number(name, v, integer=True, lo=-(2**63), hi=2**64 - 1)),
    "stop": Field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                  "strings that end generation; not included in the text", lambda name, v: _stop(v)),
    "stop_token_ids": Field({"type": "array", "items": {"type": "integer"}}, "token ids that end generation",
                            lambda name, v: _token_ids(name, v)),
    "min_tokens": Field({"type": "integer", "minimum": 0, "default": 0},
                        "EOS and stop_token_ids cannot end the output before this many tokens"),
    "logit_bias": Field({"type": "object", "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                        "token id (as a string) -> bias added to its logit", lambda name, v: _logit_bias(v)),
    "ignore_eos": Field({"type": "boolean", "default": False}, "keep generating past the end-of-sequence token"),
    "skip_special_tokens": Field({"type": "boolean", "default": True}, "leave special tokens out of the text"),
    "include_stop_str_in_output": Field({"type": "boolean", "default": False}, "keep the matched stop string in the text"),
}


def _check_field(name: str, field: Field, value: Any) -> Any:
    if field.check is not None:
        return field.check(name, value)
    kind = field.schema["type"]
    if kind == "boolean":
        return _bool(name, value)
    # Integers are bounded to int32 here, because the step carries them in int32 arrays.
    return _number(name, value, integer=kind == "integer", hi=INT32_MAX if kind == "integer" else None)


def _reject_unsupported(body: dict, refused: dict[str, str]) -> None:
    for name, why in refused.items():
        if body.get(name) not in (None, False, "", [], {}):
            raise RequestError(f"{name} is not supported: {why}", name)


@dataclass(frozen=True)
class GenerationRequest:
    """What both endpoints share once parsed."""

    model: str | None
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_param: str | None  # the name under which the client set max_tokens, if it did


def _common(body: Any, max_n: int, *, default_max_tokens: int | None, logprobs: int | None,
            max_tokens_names: tuple[str, ...]) -> GenerationRequest:
    model = body.get("model")
    if model is not None:
        _string("model", model)
    if body.get("user") is not None:
        _string("user", body["user"])
    stream = _bool("stream", body["stream"]) if body.get("stream") is not None else False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict):
            raise RequestError("stream_options must be an object", "stream_options")
        if options.get("include_usage") is not None:
            include_usage = _bool("stream_options.include_usage", options["include_usage"])

    values: dict[str, Any] = {}
    for name, field in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            values[name] = _check_field(name, field, body[name])
    n = values.get("n", 1)
    if n > max_n:
        raise RequestError(f"n must be at most {max_n} on this server (got {n})", "n")

    max_tokens, max_tokens_param = default_max_tokens, None
    for name in max_tokens_names:  # the first one given wins (chat: max_completion_tokens)
        if body.get(name) is not None:
            max_tokens = _number(name, body[name], integer=True, lo=1, hi=INT32_MAX)
            max_tokens_param = name
            break
    try:
        params = SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **values)
    except ParamError as e:
        param = max_tokens_param if e.param == "max_tokens" else e.param
        raise RequestError(str(e), param) from None
    return GenerationRequest(model, params, stream, include_usage, max_tokens_param)


@dataclass(frozen=True)
class CompletionRequest:
    common: GenerationRequest
    prompts: list[str | list[int]]  # one engine request each
    echo: bool
    logprobs: int | None  # top alternatives per token; None: no logprobs


def parse_completion_request(body: Any, max_n: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    _reject_unsupported(body, {
        "suffix": "this server does not insert text between a prompt and a suffix",
    })
    if body.get("best_of") is not None and body["best_of"] != body.get("n", 1):
        raise RequestError("best_of is not supported (it must equal n)", "best_of")
    if "prompt" not in body or body["prompt"] is None:
        raise RequestError("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts: list = [_text("prompt", prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [_text("prompt", p) for p in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        prompts = [_token_ids("prompt", prompt)]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
        prompts = [_token_ids("prompt", p, allow_empty=False) for p in prompt]
    else:
        raise RequestError(
            "prompt must be a string, an array of strings, an array of token ids or an array of arrays of token ids, "
            "and not empty", "prompt")
    echo = _bool("echo", body["echo"]) if body.get("echo") is not None else False
    logprobs = None
    if body.get("logprobs") is not None:
        logprobs = _number("logprobs", body["logprobs"], integer=True, lo=0, hi=MAX_LOGPROBS)
        if echo:
            raise RequestError("echo together with logprobs is not supported: the server does not compute the "
                               "prompt's logprobs", "echo")
    common = _common(body, max_n, default_max_tokens=16, logprobs=logprobs, max_tokens_names=("max_tokens",))
    return CompletionRequest(common, prompts, echo, logprobs)


CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class ChatRequest:
    common: GenerationRequest
    messages: list[dict]  # {"role", "content"} with text content, ready for the chat template
    logprobs: bool
    top_logprobs: int
    add_generation_prompt: bool


def parse_messages(value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty array of {role, content} objects", "messages")
    messages = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with role and content", "messages")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(CHAT_ROLES)} (got {role!r})", "messages")
        if m.get("tool_calls") or m.get("function_call"):
            raise RequestError(f"{where}: tool and function calls are not supported", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text, joined as vLLM joins them
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content: only parts of type 'text' are supported", "messages")
            content = "\n".join(_text("messages", p["text"]) for p in content)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string or an array of text parts", "messages")
        else:
            _text("messages", content)
        messages.append({"role": CHAT_ROLES[role], "content": content})
    return messages


def parse_chat_request(body: Any, max_n: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    _reject_unsupported(body, {
        "tools": "this server does not call tools",
        "functions": "this server does not call functions",
        "function_call": "this server does not call functions",
        "audio": "this server produces text only",
        "prediction": "predicted outputs are not supported",
    })
    if body.get("tool_choice") not in (None, "none"):
        raise RequestError("tool_choice is not supported: this server does not call tools", "tool_choice")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise RequestError("response_format is not supported: only {\"type\": \"text\"}", "response_format")
    if body.get("modalities") not in (None, ["text"]):
        raise RequestError("modalities is not supported: this server produces text only", "modalities")
    if "messages" not in body:
        raise RequestError("messages is required", "messages")
    messages = parse_messages(body["messages"])
    logprobs = _bool("logprobs", body["logprobs"]) if body.get("logprobs") is not None else False
    top = 0
    if body.get("top_logprobs") is not None:
        top = _number("top_logprobs", body["top_logprobs"], integer=True, lo=0, hi=MAX_LOGPROBS)
        if top and not logprobs:
            raise RequestError("top_logprobs needs logprobs set to true", "top_logprobs")
    add_generation_prompt = True
    if body.get("add_generation_prompt") is not None:
        add_generation_prompt = _bool("add_generation_prompt", body["add_generation_prompt"])
    common = _common(body, max_n, default_max_tokens=None, logprobs=top if logprobs else None,
                     max_tokens_names=("max_completion_tokens", "max_tokens"))
    return ChatRequest(common, messages, logprobs, top, add_generation_prompt)


@dataclass(frozen=True)
class TokenizeRequest:
    model: str | None
    prompt: str | None
    messages: list[dict] | None
    add_special_tokens: bool
    add_generation_prompt: bool


def parse_tokenize_request(body: Any) -> TokenizeRequest:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    model = _string("model", body["model"]) if body.get("model") is not None else None
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise RequestError("give exactly one of prompt (a string) or messages (a chat)", "prompt")
    prompt = _text("prompt", body["prompt"]) if has_prompt else None
    messages = parse_messages(body["messages"]) if has_messages else None
    add_special = body.get("add_special_tokens")
    add_special = _bool("add_special_tokens", add_special) if add_special is not None else has_prompt
    agp = body.get("add_generation_prompt")
    agp = _bool("add_generation_prompt", agp) if agp is not None else True
    return TokenizeRequest(model, prompt, messages, add_special, agp)


def parse_detokenize_request(body: Any) -> tuple[str | None, list[int]]:
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_type_name(body)}")
    model = _string("model", body["model"]) if body.get("model") is not None else None
    if "tokens" not in body:
        raise RequestError("tokens is required", "tokens")
    return model, _token_ids("tokens", body["tokens"])


# ---- responses ------------------------------------------------------------------------------


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def chat_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR) if not math.isnan(value) else LOGPROB_FLOOR


class TokenText:
    """Token id -> the text OpenAI shows for it in logprobs (its decoded piece), cached."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id], skip_special_tokens=False)
        return text


def completion_logprobs(entries: list[Logprob], k: int, token_text: TokenText, offset: int) -> dict:
    """The completions format: parallel arrays; top_logprobs has the top k plus the chosen token."""
    tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for e in entries:
        text = token_text(e.token_id)
        tokens.append(text)
        token_logprobs.append(_lp(e.logprob))
        top = {token_text(t): _lp(lp) for t, lp in list(e.top.items())[:k]}
        top.setdefault(text, _lp(e.logprob))
        top_logprobs.append(top)
        text_offset.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": text_offset}


def chat_logprobs(entries: list[Logprob], k: int, token_text: TokenText) -> dict:
    """The chat format: one object per token, with its UTF-8 bytes and exactly k alternatives."""

    def item(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _lp(logprob), "bytes": list(text.encode("utf-8"))}

    return {"content": [
        {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in list(e.top.items())[:k]]}
        for e in entries
    ]}


def completion_choice(index: int, text: str, logprobs: dict | None, out: CompletionOutput | None) -> dict:
    """A completions choice; `out` gives finish_reason and stop_reason (None while running)."""
    finish = out.finish_reason if out is not None else None
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            "stop_reason": out.stop_reason if finish else None}


def completion_body(id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
                    *, with_usage_field: bool = True) -> dict:
    """A completion, or one of its stream's chunks (OpenAI names both "text_completion").

    Chunks carry `"usage": null` only when the client asked for usage (as OpenAI's do)."""
    body = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "system_fingerprint": None}
    if with_usage_field:
        body["usage"] = usage_
    return body


def chat_choice(index: int, text: str, logprobs: dict | None, out: CompletionOutput) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}


def chat_chunk_choice(index: int, delta: dict, logprobs: dict | None, out: CompletionOutput | None) -> dict:
    finish = out.finish_reason if out is not None else None
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish,
            "stop_reason": out.stop_reason if finish else None}


def chat_body(id: str, created: int, model: str, choices: list[dict], usage_: dict | None,
              *, chunk: bool = False, with_usage_field: bool = True) -> dict:
    """A chat completion, or with `chunk` one of its stream's chunks."""
    body = {"id": id, "object": "chat.completion.chunk" if chunk else "chat.completion", "created": created,
            "model": model, "choices": choices, "system_fingerprint": None}
    if with_usage_field:
        body["usage"] = usage_
    return body


def sse(obj: Any) -> str:
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n"


SSE_DONE = sse("[DONE]")


def models_body(model: str, max_model_len: int, created: int) -> dict:
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "pagedjax", "root": model, "parent": None,
        "max_model_len": max_model_len,
    }]}


# ---- OpenAPI ----------------------------------------------------------------------------------


def openapi_document(version: str) -> dict:
    """The server's OpenAPI 3.1 document; request schemas come from the same table the parser uses."""
    sampling = {name: {**f.schema, "description": f.doc} for name, f in SAMPLING_FIELDS.items()}
    common = {
        "model": {"type": "string", "description": "the served model's name (see /v1/models); may be omitted"},
        **sampling,
        "stream": {"type": "boolean", "default": False, "description": "send server-sent events as tokens come"},
        "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}},
                           "description": "with include_usage, a last chunk carries the token counts"},
        "user": {"type": "string", "description": "accepted and ignored"},
    }
    token_ids = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    completion = {"type": "object", "required": ["prompt"], "properties": {
        "prompt": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, token_ids,
                             {"type": "array", "items": token_ids}]},
        "max_tokens": {"type": "integer", "minimum": 1, "default": 16},
        "echo": {"type": "boolean", "default": False, "description": "put the prompt before the completion"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS,
                     "description": "logprob of each chosen token and of the top k alternatives"},
        "best_of": {"type": "integer", "description": "must equal n"},
        **common,
    }}
    message = {"type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": list(CHAT_ROLES)},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": {
            "type": "object", "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}]},
    }}
    chat = {"type": "object", "required": ["messages"], "properties": {
        "messages": {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1},
        "max_completion_tokens": {"type": "integer", "minimum": 1, "description": "default: up to max_model_len"},
        "max_tokens": {"type": "integer", "minimum": 1, "description": "older name of max_completion_tokens"},
        "logprobs": {"type": "boolean", "default": False},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        "add_generation_prompt": {"type": "boolean", "default": True},
        **common,
    }}
    error = {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["string", "null"]}}}}}

    def ref(name: str) -> dict:
        return {"$ref": f"#/components/schemas/{name}"}

    def post(summary: str, schema: str, *, stream: bool) -> dict:
        ok = {"description": "the result", "content": {"application/json": {}}}
        if stream:
            ok["content"]["text/event-stream"] = {"description": "`data: {chunk}` lines, then `data: [DONE]`"}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": ref(schema)}}}, "responses": {
            "200": ok, "400": {"description": "invalid request", "content": {"application/json": {"schema": ref("Error")}}},
            "401": {"description": "missing or wrong API key"},
            "413": {"description": "request body too large"},
            "429": {"description": "too many waiting requests; see Retry-After"},
            "503": {"description": "loading, shutting down, or the engine stopped"},
        }}}

    def get(summary: str, content_type: str = "application/json") -> dict:
        return {"get": {"summary": summary, "responses": {"200": {"description": "ok", "content": {content_type: {}}}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "pagedjax", "version": version,
                 "description": "OpenAI-compatible completions and chat completions served by pagedjax"},
        "paths": {
            "/v1/completions": post("Complete a prompt", "CompletionRequest", stream=True),
            "/v1/chat/completions": post("Answer a conversation", "ChatCompletionRequest", stream=True),
            "/v1/models": get("The served model"),
            "/tokenize": post("Text or a chat to token ids", "TokenizeRequest", stream=False),
            "/detokenize": post("Token ids to text", "DetokenizeRequest", stream=False),
            "/health": get("200 when ready, 503 while loading, draining or after the engine stopped"),
            "/metrics": get("Prometheus metrics", "text/plain"),
        },
        "components": {
            "schemas": {
                "CompletionRequest": completion,
                "ChatCompletionRequest": chat,
                "ChatMessage": message,
                "TokenizeRequest": {"type": "object", "properties": {
                    "model": {"type": "string"}, "prompt": {"type": "string"},
                    "messages": {"type": "array", "items": ref("ChatMessage")},
                    "add_special_tokens": {"type": "boolean"}, "add_generation_prompt": {"type": "boolean"}}},
                "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
                    "model": {"type": "string"}, "tokens": token_ids}},
                "Error": error,
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
