"""The engine on a thread of its own, for an asyncio server.

    event loop (server)                               engine thread
    add_requests() -> inbox, notify -------------->   loop: take inbox and aborts
                                                            engine.add_request / abort_request
    RequestStream  <- call_soon_threadsafe --------         outputs = engine.step(before_schedule=take inbox)
    (an asyncio.Queue per request)                    sleeps on the Condition when there is no work

NOTE: `LLMEngine` is not thread-safe, so only the engine thread touches it. The event
loop hands it work through the inbox (under the Condition's lock) and hears back through
`loop.call_soon_threadsafe`; nothing polls. Bookkeeping of streams, the waiting count and
the state lives on the event loop, so it needs no lock.

Outputs are cumulative snapshots (`RequestOutput`, as `LLMEngine.step` gives them); a
consumer that falls behind gets the newest one and loses nothing. An aborted request's
pages go back at the engine's next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.engine import EngineStats, LLMEngine
from engine.params import RequestOutput, SamplingParams

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"  # loading weights and compiling; nothing admitted yet
    READY = "ready"  # admitting requests
    DRAINING = "draining"  # shutting down: finishing what runs, admitting nothing
    STOPPED = "stopped"  # the thread has exited on request
    DEAD = "dead"  # loading failed or the engine thread crashed


class EngineUnavailable(RuntimeError):
    """The engine admits nothing now (loading, draining, stopped or dead); the message says which."""


class QueueFull(RuntimeError):
    """More requests are waiting than the bound allows; try again shortly."""


@dataclass
class _Submission:
    stream: RequestStream
    prompt_token_ids: list[int]
    params: SamplingParams
    accepted: asyncio.Future  # None when the engine took the request, else the ValueError it raised


class RequestStream:
    """One request's outputs, in order: `async for out in stream`; each is a cumulative snapshot.

    Iteration ends after the finished output, or raises the error that ended the request.
    """

    def __init__(self, request_id: str, engine: AsyncEngine):
        self.request_id = request_id
        self.arrival_time = time.monotonic()
        self.queue_seconds: float | None = None  # arrival until its first step, once it ran
        self.started = False  # some output has arrived
        self.finished = False  # nothing more will arrive
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()  # None: aborted
        self._engine = engine
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        # Snapshots are cumulative: skip to the newest one already queued.
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            item = self._queue.get_nowait()
        if item is None:  # aborted
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        return item

    def abort(self) -> None:
        """Stop generating (e.g. the client went away); iteration ends. A no-op once finished."""
        if not self.finished:
            self._engine.abort(self.request_id)

    def _put(self, item: RequestOutput | BaseException) -> None:
        if not self.finished:
            self._queue.put_nowait(item)

    def _close(self) -> None:
        """Nothing more will come; an iterator still waiting stops."""
        if not self.finished:
            self.finished = True
            self._queue.put_nowait(None)


class AsyncEngine:
    def __init__(self, config: EngineConfig, *, max_queued_requests: int | None = None, progress: bool = True):
        """`max_queued_requests`: requests that may wait for their first token before new ones get QueueFull."""
        self.config = config
        self.max_queued_requests = max_queued_requests
        self.progress = progress
        self.state = EngineState.LOADING
        self.error: BaseException | None = None  # why the engine is DEAD
        self.engine: LLMEngine | None = None  # set once loaded; only the engine thread may call it
        self.stats: EngineStats | None = None  # the engine's counters after the latest step
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready: asyncio.Future | None = None
        self._cond = threading.Condition()
        self._inbox: list[_Submission] = []  # guarded by _cond
        self._aborts: list[str] = []  # guarded by _cond
        self._stop = False  # guarded by _cond
        self._streams: dict[str, RequestStream] = {}  # event loop only: live requests
        self._unaccepted: dict[str, _Submission] = {}  # event loop only: submitted, not yet answered
        self._num_waiting = 0  # event loop only: live requests without any output yet
        self._idle: asyncio.Event | None = None  # set while no request is live

    # ---- lifecycle (event loop) ---------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread, which loads the model, warms up, then serves."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="pagedjax-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> None:
        """Return once the engine serves; raise the error if loading failed."""
        await asyncio.shield(self._ready)

    @property
    def is_healthy(self) -> bool:
        return self.state is EngineState.READY and self._thread is not None and self._thread.is_alive()

    @property
    def loading_in_progress(self) -> bool:
        """The thread is still loading or compiling (it cannot be interrupted there)."""
        return self.engine is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_live(self) -> int:
        return len(self._streams)

    def start_draining(self) -> None:
        """Admit nothing more; what runs goes on."""
        if self.state in (EngineState.LOADING, EngineState.READY):
            self.state = EngineState.DRAINING

    async def drain(self, timeout: float) -> bool:
        """Stop admitting and wait up to `timeout` s for live requests; True if all finished."""
        self.start_draining()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def fail_all(self, error: BaseException) -> None:
        """End every live request with `error` (e.g. the drain timed out) and abort it in the engine."""
        for sub in list(self._unaccepted.values()):
            if not sub.accepted.done():
                sub.accepted.set_result(error)
        for stream in list(self._streams.values()):
            stream._put(error)
            self.abort(stream.request_id)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fail what is left, stop the thread, and wait for it (a step in flight finishes first).

        A thread still loading cannot be stopped and is not waited for (it is a daemon)."""
        loading = self.loading_in_progress
        if self.state is not EngineState.DEAD:
            self.state = EngineState.STOPPED
        self.fail_all(EngineUnavailable("the server is shutting down"))
        with self._cond:
            self._stop = True
            self._cond.notify()
        if not loading and self._thread is not None and self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, timeout)

    # ---- requests (event loop) ----------------------------------------------------------

    def check_admission(self) -> None:
        """Raise EngineUnavailable or QueueFull if a request arriving now would be refused."""
        if self.state is not EngineState.READY or not self.is_healthy:
            raise EngineUnavailable(self.unavailable_reason())
        if self.max_queued_requests is not None and self._num_waiting >= self.max_queued_requests:
            raise QueueFull(f"{self._num_waiting} requests are already waiting (the bound is "
                            f"{self.max_queued_requests}); retry shortly")

    def unavailable_reason(self) -> str:
        """Why requests are refused now, for the 503 message."""
        if self.state is EngineState.LOADING or self.is_healthy:
            return "the model is still loading; retry when /health returns 200"
        if self.state in (EngineState.DRAINING, EngineState.STOPPED):
            return "the server is shutting down and admits no new requests"
        return f"the engine has stopped{f' ({self.error})' if self.error else ''}; restart the server"

    async def add_request(self, prompt_token_ids: list[int], params: SamplingParams,
                          request_id: str | None = None) -> RequestStream:
        """Queue one request and return its stream of outputs (see add_requests)."""
        (stream,) = await self.add_requests([prompt_token_ids], params, [request_id] if request_id else None)
        return stream

    async def add_requests(self, prompts: Sequence[list[int]], params: SamplingParams,
                           request_ids: Sequence[str] | None = None) -> list[RequestStream]:
        """Queue requests admitted together (one HTTP request's prompts) and return their streams.

        Raises EngineUnavailable or QueueFull at once, or the ValueError the engine raised for
        a request it cannot run (e.g. RequestTooLong), after aborting the others.
        """
        self.check_admission()
        ids = list(request_ids) if request_ids else [uuid.uuid4().hex for _ in prompts]
        subs = []
        for rid, ids_ in zip(ids, prompts):
            stream = RequestStream(rid, self)
            sub = _Submission(stream, list(ids_), params, self._loop.create_future())
            self._streams[rid] = stream
            self._unaccepted[rid] = sub
            self._num_waiting += 1
            self._idle.clear()
            subs.append(sub)
        with self._cond:
            self._inbox.extend(subs)
            self._cond.notify()
        try:
            errors = await asyncio.gather(*(s.accepted for s in subs))
        except BaseException:  # cancelled: the client went away while we waited
            for s in subs:
                self.abort(s.stream.request_id)
            raise
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            for s in subs:
                self.abort(s.stream.request_id)
            raise error
        return [s.stream for s in subs]

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        self._forget(stream)
        with self._cond:
            queued = next((s for s in self._inbox if s.stream is stream), None)
            if queued is not None:  # never reached the engine
                self._inbox.remove(queued)
            else:
                self._aborts.append(request_id)
                self._cond.notify()
        sub = self._unaccepted.pop(request_id, None)
        if sub is not None and not sub.accepted.done():
            sub.accepted.set_result(EngineUnavailable("the request was aborted"))

    def _forget(self, stream: RequestStream) -> None:
        if self._streams.pop(stream.request_id, None) is None:
            return
        stream._close()
        if not stream.started:
            self._num_waiting -= 1
        if not self._streams:
            self._idle.set()

    # ---- callbacks from the engine thread (run on the event loop) -------------------------

    def _on_ready(self, engine: LLMEngine) -> None:
        self.engine = engine
        if self.state is EngineState.LOADING:
            self.state = EngineState.READY
        self._ready.set_result(None)

    def _on_dead(self, error: BaseException) -> None:
        self.state, self.error = EngineState.DEAD, error
        if not self._ready.done():
            self._ready.set_exception(error)
        self.fail_all(EngineUnavailable(f"the engine stopped: {error!r}"))

    def _on_accepted(self, results: list[tuple[_Submission, ValueError | None]]) -> None:
        for sub, error in results:
            self._unaccepted.pop(sub.stream.request_id, None)
            if not sub.accepted.done():
                sub.accepted.set_result(error)
            if error is not None:
                self._forget(sub.stream)

    def _on_step(self, outputs: list[RequestOutput], queue_seconds: dict[str, float], stats: EngineStats) -> None:
        self.stats = stats
        for rid, seconds in queue_seconds.items():
            if rid in self._streams:
                self._streams[rid].queue_seconds = seconds
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted by its client; its last output is of no use
                continue
            if not stream.started:
                stream.started = True
                self._num_waiting -= 1
            stream._put(out)
            if out.finished:
                self._forget(stream)

    # ---- the engine thread ------------------------------------------------------------------

    def _post(self, callback, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
            return True
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            return False

    def _run(self) -> None:
        try:
            engine = LLMEngine(self.config, progress=self.progress)
        except BaseException as e:  # noqa: BLE001 - any failure to load is reported, not raised on a thread
            self._post(self._on_dead, e)
            return
        self._post(self._on_ready, engine)
        try:
            self._serve(engine)
        except BaseException as e:  # noqa: BLE001
            log.exception("the engine thread stopped on an error")
            self._post(self._on_dead, e)

    def _serve(self, engine: LLMEngine) -> None:
        unscheduled: dict[str, float] = {}  # request id -> arrival, until its first step
        # Sequences that finished or were aborted keep their pages until the next step's
        # schedule(); with nothing else to run, one more (empty) step gives them back.
        settle = False
        while True:
            with self._cond:
                while not (self._inbox or self._aborts or self._stop or settle or engine.has_unfinished_requests()):
                    self._cond.wait()
                if self._stop:
                    return
            aborted = self._admit(engine, unscheduled)
            step_start = time.monotonic()
            # Requests that arrive while the engine reads a call join the next one it plans.
            outputs = engine.step(before_schedule=lambda: self._admit(engine, unscheduled)) \
                if settle or aborted or engine.has_unfinished_requests() else []
            outputs = [_snapshot(o) for o in outputs]
            settle = aborted or any(o.finished for o in outputs)
            queue_seconds = {}
            for rid, arrival in list(unscheduled.items()):
                if _has_run(engine, rid):
                    queue_seconds[rid] = step_start - arrival
                    del unscheduled[rid]
            for out in outputs:
                if out.finished:
                    unscheduled.pop(out.request_id, None)
            if not self._post(self._on_step, outputs, queue_seconds, engine.stats()):
                return

    def _admit(self, engine: LLMEngine, unscheduled: dict[str, float]) -> bool:
        """Hand the engine what arrived (new requests, aborts); True if something was aborted."""
        with self._cond:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
        accepted = []
        for sub in inbox:
            rid = sub.stream.request_id
            try:
                engine.add_request(rid, sub.prompt_token_ids, sub.params, arrival_time=sub.stream.arrival_time)
                unscheduled[rid] = sub.stream.arrival_time
                accepted.append((sub, None))
            except ValueError as e:
                accepted.append((sub, e))
        for rid in aborts:
            engine.abort_request(rid)
            unscheduled.pop(rid, None)
        if accepted:
            self._post(self._on_accepted, accepted)
        return bool(aborts)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the engine thread will not change further (the engine keeps appending to logprobs)."""
    return dataclasses.replace(out, outputs=[
        dataclasses.replace(c, logprobs=list(c.logprobs) if c.logprobs is not None else None) for c in out.outputs
    ])


def _has_run(engine: LLMEngine, request_id: str) -> bool:
    """Whether a step has computed anything for the request yet."""
    try:
        seqs = engine.scheduler.get_sequences(request_id)
    except KeyError:  # released already: it ran, or was aborted while waiting
        return False
    return any(s.num_computed_tokens or s.output_token_ids for s in seqs)
