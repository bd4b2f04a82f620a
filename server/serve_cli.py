"""`pagedjax serve`: load the model, warm up, then serve the OpenAI-compatible API with uvicorn.

The socket is bound first (so a busy port fails at once), the app starts the engine
thread, and /health answers 503 until loading and compilation are done; then one line
says the server is ready and where. SIGTERM or SIGINT stops admitting (503), lets
running requests finish for up to --drain-timeout seconds, and exits 0; a second
signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

START = time.monotonic()  # when the command started, near enough: this module loads with the CLI


def add_parser(subparsers, add_engine_args) -> None:
    p = subparsers.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                              description="Serve the OpenAI-compatible HTTP API on one model.")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default: 8000)")
    p.add_argument("--served-model-name", help="the model name clients use (default: the model's own)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* (default: $PAGEDJAX_API_KEY)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests that may wait for their first token before new ones get 429 (default: 256)")
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body; larger ones get 413 (default: 4 MiB)")
    p.add_argument("--max-n", type=int, default=16, help="largest n a request may ask for (default: 16)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM/SIGINT (default: 30)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every HTTP request (default: on)")
    p.set_defaults(func=run)


def _check(args) -> None:
    for name, lo in (("port", 0), ("max_queued_requests", 1), ("max_body_bytes", 1), ("max_n", 1)):
        if getattr(args, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo} (got {getattr(args, name)})")
    if args.port > 65535:
        raise ValueError(f"--port must be <= 65535 (got {args.port})")
    if args.drain_timeout < 0:
        raise ValueError(f"--drain-timeout must be >= 0 (got {args.drain_timeout})")


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def run(args) -> int:
    import uvicorn

    from engine.async_engine import AsyncEngine, EngineUnavailable
    from server.app import ServerSettings, build_app
    from server.cli import engine_config

    _check(args)
    config = engine_config(args)  # a bad setting fails here, naming it
    settings = ServerSettings(api_key=args.api_key or os.environ.get("PAGEDJAX_API_KEY") or None,
                              max_body_bytes=args.max_body_bytes, max_n=args.max_n,
                              served_model_name=args.served_model_name)
    sock = _listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("engine", "server"):
        logging.getLogger(name).setLevel(logging.INFO)

    engine = AsyncEngine(config, max_queued_requests=args.max_queued_requests, progress=True)

    def on_ready(model: str) -> None:
        core = engine.engine
        server.announce(f"pagedjax: ready in {time.monotonic() - START:.1f} s (load {core.load_seconds:.1f} s, "
                        f"compile {core.warmup_seconds:.1f} s): serving {model!r} at {url}/v1 "
                        f"(max_model_len {core.max_model_len}{', API key required' if settings.api_key else ''})")

    def on_load_failed(error: BaseException) -> None:
        if not isinstance(error, (ValueError, OSError)):  # not a user's mistake: show where it came from
            logging.getLogger("server").error("loading failed", exc_info=error)
        print(f"pagedjax: error: the model failed to load: {error}", file=sys.stderr, flush=True)
        server.exit_code = 1
        server.should_exit = True

    app = build_app(engine, settings, on_ready=on_ready, on_load_failed=on_load_failed)
    uv_config = uvicorn.Config(app, log_level="info", access_log=args.access_log, timeout_graceful_shutdown=5,
                               lifespan="on")
    server = _make_server_class()(uv_config, engine, args.drain_timeout, EngineUnavailable)
    print(f"pagedjax: loading {config.model or 'the default model (SmolLM2-135M-Instruct)'}; "
          f"{url}/health answers 503 until ready", flush=True)
    server.run(sockets=[sock])
    if engine.loading_in_progress:
        # Stopped while still compiling: the engine thread cannot be interrupted, so leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(server.exit_code)
    return server.exit_code


def _make_server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, with a drain on the first SIGTERM/SIGINT and a plain exit status (no re-raised signal)."""

        def __init__(self, config, engine, drain_timeout: float, unavailable: type[Exception]):
            super().__init__(config)
            self.engine = engine
            self.drain_timeout = drain_timeout
            self.unavailable = unavailable
            self.exit_code = 0
            self._loop: asyncio.AbstractEventLoop | None = None
            self._listening: asyncio.Event | None = None
            self._draining = False
            self._tasks: set[asyncio.Task] = set()

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            self._listening = asyncio.Event()
            await super().startup(sockets)
            self._listening.set()

        def announce(self, line: str) -> None:
            """Print `line` once the socket accepts connections (the engine may be ready first)."""

            async def wait_then_print():
                await self._listening.wait()
                print(line, flush=True)

            self._spawn(wait_then_print())

        def _spawn(self, coro) -> None:
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        def handle_exit(self, sig: int, frame) -> None:
            if self._draining or self._loop is None:
                self.should_exit = self.force_exit = True
                return
            self._draining = True
            self._loop.call_soon_threadsafe(self._spawn, self._drain(signal.Signals(sig).name))

        async def _drain(self, name: str) -> None:
            live = self.engine.num_live
            print(f"pagedjax: {name}: admitting no new requests; {live} running get up to {self.drain_timeout:g} s "
                  "to finish (send the signal again to stop at once)", flush=True)
            if not await self.engine.drain(self.drain_timeout):
                print(f"pagedjax: {self.engine.num_live} requests still running after {self.drain_timeout:g} s; "
                      "ending them", flush=True)
                self.engine.fail_all(self.unavailable("the server is shutting down; the request was stopped"))
            self.should_exit = True

    return Server
