"""AsyncEngine's thread and streams, against a scripted stand-in for LLMEngine (no model, milliseconds).

The stand-in emits one token per live sequence per step and records what it was asked,
so the tests can check the loop itself: outputs in order, sleeping while idle, aborts
reaching the engine by its next step, the queue bound, draining, and a crashed thread.
"""

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

import engine.async_engine as async_engine
from engine.async_engine import AsyncEngine, EngineState, EngineUnavailable, QueueFull
from engine.config import EngineConfig
from engine.engine import EngineStats
from engine.params import CompletionOutput, RequestOutput, SamplingParams
from engine.scheduler import RequestTooLong


class FakeEngine:
    """Each step appends one token (its step number) to every live request; finishes at max_tokens."""

    max_model_len = 2048
    step_seconds = 0.002
    fail_at_step: int | None = None

    def __init__(self, config, progress=True):
        self.requests: dict[str, dict] = {}
        self.steps = 0
        self.aborted_at: dict[str, int] = {}  # request id -> step count when abort_request came
        self.released: list[str] = []
        self.lock = threading.Lock()
        self.scheduler = SimpleNamespace(get_sequences=self._sequences)

    def _sequences(self, rid):
        r = self.requests[rid]
        return [SimpleNamespace(num_computed_tokens=len(r["tokens"]), output_token_ids=r["tokens"])]

    def add_request(self, rid, ids, params, arrival_time=None):
        if len(ids) + params.max_tokens > self.max_model_len:
            raise RequestTooLong(f"{len(ids)} + {params.max_tokens} > max_model_len {self.max_model_len}")
        self.requests[rid] = {"ids": ids, "params": params, "tokens": [], "finish": None}

    def abort_request(self, rid):
        self.aborted_at[rid] = self.steps
        if rid in self.requests and self.requests[rid]["finish"] is None:
            self.requests[rid]["finish"] = "abort"

    def has_unfinished_requests(self):
        return any(r["finish"] is None for r in self.requests.values())

    def step(self, before_schedule=None):
        self.steps += 1
        if self.fail_at_step == self.steps:
            raise RuntimeError("device on fire")
        time.sleep(self.step_seconds)  # the device runs; then, as LLMEngine, take arrivals and plan
        if before_schedule is not None:
            before_schedule()
        outputs = []
        for rid, r in list(self.requests.items()):
            if r["finish"] is None:
                r["tokens"].append(self.steps)
                if len(r["tokens"]) >= r["params"].max_tokens:
                    r["finish"] = "length"
            out = CompletionOutput(0, " ".join(map(str, r["tokens"])), list(r["tokens"]), None, r["finish"])
            outputs.append(RequestOutput(rid, None, r["ids"], [out], r["finish"] is not None))
            if r["finish"] is not None:
                del self.requests[rid]
                self.released.append(rid)
        return outputs

    def stats(self):
        return EngineStats(len(self.requests), 0, 0.0, 0)


@pytest.fixture
def fake(monkeypatch):
    made = []

    class Recording(FakeEngine):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    monkeypatch.setattr(async_engine, "LLMEngine", Recording)
    return made


async def _drain(stream):
    async for _ in stream:
        pass


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(**kw) -> AsyncEngine:
    engine = AsyncEngine(EngineConfig(model="tiny"), **kw)
    engine.start()
    await engine.wait_ready()
    return engine


def test_outputs_arrive_in_order_and_finish(fake):
    async def main():
        engine = await started()
        stream = await engine.add_request([1, 2], SamplingParams(max_tokens=5))
        seen = [out async for out in stream]
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "length"
        assert len(seen[-1].outputs[0].token_ids) == 5
        lengths = [len(o.outputs[0].token_ids) for o in seen]
        assert lengths == sorted(lengths)  # cumulative snapshots, never going back
        assert engine.num_live == 0 and engine.num_waiting == 0
        await engine.shutdown()

    run(main())


def test_requests_arriving_during_a_step_join_the_call_it_plans(fake):
    """The engine plans its next call inside step(); what arrived meanwhile is handed over just
    before, so a new request does not wait for one more step (its first token is that step's)."""
    FakeEngine.step_seconds = 0.1
    try:
        async def main():
            engine = await started()
            first = await engine.add_request([1], SamplingParams(max_tokens=4))
            await asyncio.sleep(0.15)  # inside the second step
            second = await engine.add_request([2], SamplingParams(max_tokens=1))
            [out] = [o async for o in second]
            await _drain(first)
            assert out.outputs[0].token_ids == [2]
            await engine.shutdown()

        run(main())
    finally:
        FakeEngine.step_seconds = 0.002


def test_thread_sleeps_while_idle(fake):
    async def main():
        engine = await started()
        stream = await engine.add_request([1], SamplingParams(max_tokens=3))
        async for _ in stream:
            pass
        await asyncio.sleep(0.05)  # the settling step after the finish
        steps = fake[0].steps
        await asyncio.sleep(0.3)
        assert fake[0].steps == steps  # no work, no steps: the thread waits on its condition
        # ...and wakes at once for new work.
        t = time.monotonic()
        stream = await engine.add_request([1], SamplingParams(max_tokens=1))
        [out] = [o async for o in stream]
        assert out.finished and time.monotonic() - t < 0.5
        await engine.shutdown()

    run(main())


def test_abort_reaches_the_engine_by_its_next_step(fake):
    async def main():
        engine = await started()
        stream = await engine.add_request([1], SamplingParams(max_tokens=1000))
        await anext(stream)
        consumer = asyncio.create_task(asyncio.wait_for(_drain(stream), 5))
        await asyncio.sleep(0.01)
        steps_at_abort = fake[0].steps
        stream.abort()
        await consumer  # an iterator waiting on an aborted stream stops
        deadline = time.monotonic() + 5
        while stream.request_id not in fake[0].released and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        rid = stream.request_id
        assert fake[0].aborted_at[rid] <= steps_at_abort + 1  # the step in flight finishes, then the abort
        assert rid in fake[0].released  # its state is released by the next step
        assert engine.num_live == 0
        await engine.shutdown()

    run(main())


def test_engine_refusal_is_raised_by_add_request(fake):
    async def main():
        engine = await started()
        with pytest.raises(RequestTooLong):
            await engine.add_request([1] * 2046, SamplingParams(max_tokens=5))
        assert engine.num_live == 0 and engine.num_waiting == 0
        # One bad prompt among several: none of them runs.
        with pytest.raises(RequestTooLong):
            await engine.add_requests([[1], [1] * 2046], SamplingParams(max_tokens=5))
        assert engine.num_live == 0
        await engine.shutdown()

    run(main())


def test_queue_bound(fake):
    FakeEngine.step_seconds = 0.05
    try:
        async def main():
            engine = await started(max_queued_requests=2)
            first = await engine.add_request([1], SamplingParams(max_tokens=50))
            second = asyncio.create_task(engine.add_request([1], SamplingParams(max_tokens=50)))
            await asyncio.sleep(0)
            assert engine.num_waiting == 2  # neither has a token yet
            with pytest.raises(QueueFull):
                engine.check_admission()
            await anext(first)
            stream = await second
            await anext(stream)
            assert engine.num_waiting == 0
            engine.check_admission()
            await engine.shutdown()

        run(main())
    finally:
        FakeEngine.step_seconds = 0.002


def test_drain_waits_for_running_requests_then_refuses_new_ones(fake):
    async def main():
        engine = await started()
        stream = await engine.add_request([1], SamplingParams(max_tokens=20))
        drained = asyncio.create_task(engine.drain(timeout=10))
        await asyncio.sleep(0)
        assert engine.state is EngineState.DRAINING and not engine.is_healthy
        with pytest.raises(EngineUnavailable):
            await engine.add_request([1], SamplingParams(max_tokens=1))
        outs = [o async for o in stream]
        assert outs[-1].outputs[0].finish_reason == "length"
        assert await drained is True
        await engine.shutdown()

    run(main())


def test_drain_timeout_ends_requests_with_an_error(fake):
    async def main():
        engine = await started()
        stream = await engine.add_request([1], SamplingParams(max_tokens=1000))
        assert await engine.drain(timeout=0.05) is False
        engine.fail_all(EngineUnavailable("shutting down"))
        with pytest.raises(EngineUnavailable):
            async for _ in stream:
                pass
        await engine.shutdown()
        assert engine.state is EngineState.STOPPED

    run(main())


def test_crashed_thread_fails_requests_and_health(fake):
    FakeEngine.fail_at_step = 3
    try:
        async def main():
            engine = await started()
            stream = await engine.add_request([1], SamplingParams(max_tokens=100))
            with pytest.raises(EngineUnavailable, match="device on fire"):
                async for _ in stream:
                    pass
            assert engine.state is EngineState.DEAD and not engine.is_healthy
            with pytest.raises(EngineUnavailable):
                await engine.add_request([1], SamplingParams(max_tokens=1))
            await engine.shutdown()

        run(main())
    finally:
        FakeEngine.fail_at_step = None


def test_load_failure_is_reported(monkeypatch):
    def broken(config, progress=True):
        raise FileNotFoundError("no such model")

    monkeypatch.setattr(async_engine, "LLMEngine", broken)

    async def main():
        engine = AsyncEngine(EngineConfig(model="tiny"))
        engine.start()
        with pytest.raises(FileNotFoundError):
            await engine.wait_ready()
        assert engine.state is EngineState.DEAD
        await engine.shutdown()

    run(main())
