"""The HTTP server: OpenAI-compatible routes over an `AsyncEngine`, plus health and metrics.

    POST /v1/completions, /v1/chat/completions   JSON, or SSE with "stream": true
    GET  /v1/models                               the one served model
    POST /tokenize, /detokenize                   vLLM's extra routes
    GET  /health, /metrics, /openapi.json         open even when an API key is set

Every refusal is an OpenAI error body with a 4xx status (400 bad input, 401 API key,
404 unknown route, 413 body too large, 429 too many waiting, 503 loading or shutting
down); nothing a client sends can produce a 500 or a traceback. A client that goes
away has its requests aborted, so their pages are free by the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.async_engine import AsyncEngine, EngineState, EngineUnavailable, QueueFull, RequestStream
from engine.params import CompletionOutput, Logprob, ParamError, RequestOutput
from engine.scheduler import RequestTooLong
from engine.tokenizer import ChatTemplateError, Tokenizer
from server import protocol
from server.metrics import Metrics, RequestTimer
from server.protocol import RequestError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 4 << 20  # larger request bodies get 413
    max_n: int = 16  # largest n (completions per prompt) a request may ask for
    served_model_name: str | None = None  # the name clients use; None: the engine's model name
    retry_after_seconds: int = 1  # what a 429 tells clients to wait


def build_app(engine: AsyncEngine, settings: ServerSettings = ServerSettings(), *,
              on_ready: Callable[[str], None] | None = None,
              on_load_failed: Callable[[BaseException], None] | None = None) -> Starlette:
    """The Starlette app; its lifespan starts the engine thread and stops it at shutdown.

    `on_ready(model_name)` runs once the engine serves; `on_load_failed(error)` if it never will.
    """
    api = _Api(engine, settings)

    async def when_ready():
        try:
            await engine.wait_ready()
        except asyncio.CancelledError:  # shut down while loading
            raise
        except BaseException as e:  # noqa: BLE001 - reported to the CLI, which exits
            if on_load_failed is not None:
                on_load_failed(e)
            return
        name = api.engine_ready()
        if on_ready is not None:
            on_ready(name)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        watcher = asyncio.create_task(when_ready())
        try:
            yield
        finally:
            watcher.cancel()
            await engine.shutdown()

    routes = [
        Route("/v1/completions", _endpoint(api.completions, settings), methods=["POST"]),
        Route("/v1/chat/completions", _endpoint(api.chat_completions, settings), methods=["POST"]),
        Route("/v1/models", _endpoint(api.models, settings), methods=["GET"]),
        Route("/tokenize", _endpoint(api.tokenize, settings), methods=["POST"]),
        Route("/detokenize", _endpoint(api.detokenize, settings), methods=["POST"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_text, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    return app


@dataclass
class _Served:
    """What the routes need once the engine has loaded."""

    model: str
    max_model_len: int
    vocab_size: int
    tokenizer: Tokenizer
    token_text: protocol.TokenText
    created: int = field(default_factory=protocol.now)


class _Api:
    """The route handlers. Each parses and checks its request, then talks to the engine."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.metrics = Metrics()
        self.served: _Served | None = None  # set once the engine is ready

    def engine_ready(self) -> str:
        core = self.engine.engine
        name = self.settings.served_model_name or core.model_name
        self.served = _Served(name, core.max_model_len, core.model_config.vocab_size, core.tokenizer,
                              protocol.TokenText(core.tokenizer))
        self.metrics.set_model(name)
        return name

    # ---- helpers -------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> _Served:
        s = self.served
        if s is None:
            raise EngineUnavailable(self.engine.unavailable_reason())
        if name is not None and name != s.model:
            raise RequestError(f"the model {name!r} does not exist; this server serves {s.model!r} (see /v1/models)",
                               "model", code="model_not_found")
        return s

    async def _read_json(self, request: Request):
        limit = self.settings.max_body_bytes
        too_large = RequestError(f"the request body is larger than {limit} bytes", None, status=413,
                                 code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return protocol.parse_json(b"".join(chunks))

    async def _add(self, prompts: list[list[int]], req: protocol.GenerationRequest, response_id: str,
                   prompt_param: str) -> tuple[list[RequestStream], list[RequestTimer]]:
        """Queue one engine request per prompt; the engine's refusals become 400s naming the parameter."""
        try:
            streams = await self.engine.add_requests(prompts, req.params,
                                                     [f"{response_id}-{i}" for i in range(len(prompts))])
        except RequestTooLong as e:
            raise RequestError(str(e), req.max_tokens_param or prompt_param, code="context_length_exceeded") from None
        except ParamError as e:
            raise RequestError(str(e), e.param) from None
        except ValueError as e:  # e.g. a token id outside the vocabulary, an empty prompt
            raise RequestError(str(e), prompt_param) from None
        return streams, [RequestTimer(self.metrics, s.arrival_time) for s in streams]

    async def _final_outputs(self, request: Request, streams: list[RequestStream],
                             timers: list[RequestTimer]) -> list[RequestOutput]:
        """Each stream's finished output; aborts them all if the client goes away first."""

        async def collect() -> list[RequestOutput]:
            last: list[RequestOutput | None] = [None] * len(streams)
            async for i, out in _merged(streams, timers):
                last[i] = out
            return last

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                work.cancel()
                raise _ClientGone
            return work.result()
        finally:
            gone.cancel()
            _end_requests(streams, timers)

    # ---- generation ----------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = protocol.parse_completion_request(await self._read_json(request), self.settings.max_n)
        s = self._check_model(req.common.model)
        self.engine.check_admission()  # before tokenizing: a 503 or 429 should be cheap
        tok = s.tokenizer
        ids = await asyncio.to_thread(lambda: [tok.encode(p) if isinstance(p, str) else p for p in req.prompts])
        rid = protocol.completion_id()
        streams, timers = await self._add(ids, req.common, rid, "prompt")
        echoes = ([p if isinstance(p, str) else tok.decode(p, skip_special_tokens=False) for p in req.prompts]
                  if req.echo else None)
        created, n, k = protocol.now(), req.common.params.n, req.logprobs

        def logprobs_of(entries: list[Logprob], offset: int) -> dict | None:
            return protocol.completion_logprobs(entries, k, s.token_text, offset) if k is not None else None

        if not req.common.stream:
            outs = await self._final_outputs(request, streams, timers)
            choices = [
                protocol.completion_choice(i * n + c.index, (echoes[i] if echoes else "") + c.text,
                                           logprobs_of(c.logprobs or [], 0), c)
                for i, out in enumerate(outs) for c in out.outputs
            ]
            return JSONResponse(protocol.completion_body(rid, created, s.model, choices, _usage(outs)))

        include_usage = req.common.include_usage

        async def chunks() -> AsyncIterator[dict]:
            states: dict[int, _ChoiceState] = {}  # by choice index: prompt index * n + completion index
            last: dict[int, RequestOutput] = {}
            async for i, out in _merged(streams, timers):
                last[i] = out
                choices = []
                for c in out.outputs:
                    idx = i * n + c.index
                    st = states.setdefault(idx, _ChoiceState())
                    first = not st.started
                    step = st.advance(c)
                    if step is None:
                        continue
                    delta, new_lp = step
                    lp = logprobs_of(new_lp, st.offset)
                    if lp is not None:
                        st.offset += sum(len(t) for t in lp["tokens"])
                    text = (echoes[i] if echoes and first else "") + delta
                    choices.append(protocol.completion_choice(idx, text, lp, c if st.finished else None))
                if choices:
                    yield protocol.completion_body(rid, created, s.model, choices, None,
                                                   with_usage_field=include_usage)
            if include_usage:
                yield protocol.completion_body(rid, created, s.model, [], _usage(last.values()))

        return _sse_response(chunks(), streams, timers)

    async def chat_completions(self, request: Request) -> Response:
        req = protocol.parse_chat_request(await self._read_json(request), self.settings.max_n)
        s = self._check_model(req.common.model)
        self.engine.check_admission()
        ids = await _render_chat(s.tokenizer, req.messages, req.add_generation_prompt)
        rid = protocol.chat_completion_id()
        streams, timers = await self._add([ids], req.common, rid, "messages")
        created, k, n = protocol.now(), req.top_logprobs, req.common.params.n

        def logprobs_of(entries: list[Logprob]) -> dict | None:
            return protocol.chat_logprobs(entries, k, s.token_text) if req.logprobs else None

        if not req.common.stream:
            (out,) = await self._final_outputs(request, streams, timers)
            choices = [protocol.chat_choice(c.index, c.text, logprobs_of(c.logprobs or []), c) for c in out.outputs]
            return JSONResponse(protocol.chat_body(rid, created, s.model, choices, _usage([out])))

        include_usage = req.common.include_usage

        def chunk(choices: list[dict]) -> dict:
            return protocol.chat_body(rid, created, s.model, choices, None, chunk=True, with_usage_field=include_usage)

        async def chunks() -> AsyncIterator[dict]:
            for idx in range(n):  # as OpenAI: each choice's role first, before any token
                yield chunk([protocol.chat_chunk_choice(idx, {"role": "assistant", "content": ""}, None, None)])
            states = [_ChoiceState() for _ in range(n)]
            last = None
            async for _, out in _merged(streams, timers):
                last = out
                choices = []
                for c in out.outputs:
                    st = states[c.index]
                    step = st.advance(c)
                    if step is None:
                        continue
                    delta, new_lp = step
                    choices.append(protocol.chat_chunk_choice(
                        c.index, {"content": delta} if delta else {}, logprobs_of(new_lp), c if st.finished else None))
                if choices:
                    yield chunk(choices)
            if include_usage and last is not None:
                yield protocol.chat_body(rid, created, s.model, [], _usage([last]), chunk=True)

        return _sse_response(chunks(), streams, timers)

    # ---- everything else -----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        s = self._check_model(None)
        return JSONResponse(protocol.models_body(s.model, s.max_model_len, s.created))

    async def tokenize(self, request: Request) -> Response:
        req = protocol.parse_tokenize_request(await self._read_json(request))
        s = self._check_model(req.model)
        if req.messages is not None:
            ids = await _render_chat(s.tokenizer, req.messages, req.add_generation_prompt)
        else:
            ids = await asyncio.to_thread(s.tokenizer.encode, req.prompt, req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": s.max_model_len, "tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        model, ids = protocol.parse_detokenize_request(await self._read_json(request))
        s = self._check_model(model)
        bad = [t for t in ids if t >= s.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{s.vocab_size - 1})", "tokens")
        return JSONResponse({"prompt": s.tokenizer.decode(ids, skip_special_tokens=False)})

    async def health(self, request: Request) -> Response:
        if self.engine.is_healthy:
            return JSONResponse({"status": "ready"})
        state = self.engine.state
        return JSONResponse({"status": "dead" if state is EngineState.READY else state.value}, status_code=503)

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(self.engine.stats), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(protocol.openapi_document(_version()))


# ---- streaming ---------------------------------------------------------------------------------


@dataclass
class _ChoiceState:
    """How much of one streamed choice the client has had."""

    text: int = 0  # characters sent
    logprobs: int = 0  # logprob entries sent
    offset: int = 0  # text_offset of the next token (completions logprobs)
    started: bool = False
    finished: bool = False

    def advance(self, c: CompletionOutput) -> tuple[str, list[Logprob]] | None:
        """(new text, new logprob entries) to send now, or None: nothing to say yet, or finished already.

        Tokens that have made no text yet (half a character, or a possible stop string) wait,
        and their logprobs go with the text they become.
        """
        if self.finished:
            return None
        done = c.finish_reason is not None
        delta = c.text[self.text:]
        if not delta and not done:
            return None
        new_lp = (c.logprobs or [])[self.logprobs:]
        self.text, self.logprobs = len(c.text), self.logprobs + len(new_lp)
        self.started, self.finished = True, done
        return delta, new_lp


async def _merged(streams: list[RequestStream], timers: list[RequestTimer]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from all of a response's streams, as they come; records metrics on the way."""
    if len(streams) == 1:
        async for out in streams[0]:
            timers[0].observe(out, streams[0].queue_seconds)
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream):
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                timers[i].observe(item, streams[i].queue_seconds)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _sse_response(chunks: AsyncIterator[dict], streams: list[RequestStream],
                  timers: list[RequestTimer]) -> StreamingResponse:
    """`data: {chunk}` events, then `data: [DONE]`; an error mid-stream is sent as an error object first."""

    async def body():
        try:
            try:
                async for chunk in chunks:
                    yield protocol.sse(chunk)
            except Exception as e:  # noqa: BLE001 - the status line is long gone: report it in the stream
                yield protocol.sse(_stream_error(e))
            yield protocol.SSE_DONE
        finally:  # also when the client disconnects: Starlette cancels the response
            _end_requests(streams, timers)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _stream_error(e: Exception) -> dict:
    if isinstance(e, EngineUnavailable):
        return protocol.error_body(str(e), "server_error", None, "service_unavailable")
    log.error("a request failed during generation", exc_info=e)
    return protocol.error_body(f"generation failed ({type(e).__name__}); the server log has the details",
                               "server_error", None, "internal_error")


def _end_requests(streams: list[RequestStream], timers: list[RequestTimer]) -> None:
    """Abort whatever has not finished (the client left, or the response failed)."""
    for s, t in zip(streams, timers):
        if not s.finished:
            s.abort()
            t.aborted(1)


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def _render_chat(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    try:
        return await asyncio.to_thread(tokenizer.apply_chat_template, messages,
                                       add_generation_prompt=add_generation_prompt, tokenize=True)
    except ChatTemplateError as e:
        raise RequestError(str(e), "messages") from None


def _usage(outputs) -> dict:
    outs = [o for o in outputs if o is not None]
    return protocol.usage(sum(o.num_prompt_tokens for o in outs), sum(o.num_generated_tokens for o in outs))


def _version() -> str:
    try:
        return importlib.metadata.version("pagedjax")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


# ---- errors and auth -----------------------------------------------------------------------------


def _endpoint(handler, settings: ServerSettings):
    """Turn every refusal into an OpenAI error body with its status."""

    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except QueueFull as e:
            return JSONResponse(protocol.error_body(str(e), "rate_limit_error", None, "rate_limit_exceeded"),
                                status_code=429, headers={"Retry-After": str(settings.retry_after_seconds)})
        except EngineUnavailable as e:
            return JSONResponse(protocol.error_body(str(e), "server_error", None, "service_unavailable"),
                                status_code=503)
        except (ClientDisconnect, _ClientGone):
            return Response(status_code=499)  # nobody is listening; uvicorn drops it

    return wrapped


async def _http_error(request: Request, exc: HTTPException) -> Response:
    """Routing errors (404, 405) as OpenAI error bodies."""
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return JSONResponse(protocol.error_body(message.get(exc.status_code, str(exc.detail)), "invalid_request_error",
                                            None, "not_found" if exc.status_code == 404 else None),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _server_error(request: Request, exc: Exception) -> Response:
    """A bug, not a bad request: logged in full, answered without a traceback."""
    log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(protocol.error_body("internal server error; the server log has the details",
                                            "server_error", None, "internal_error"), status_code=500)


class ApiKeyMiddleware:
    """/v1/* needs `Authorization: Bearer <key>`, compared in constant time. Other routes stay open."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse(
                    protocol.error_body("missing or incorrect API key: send 'Authorization: Bearer <key>'",
                                        "invalid_request_error", None, "invalid_api_key"),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
