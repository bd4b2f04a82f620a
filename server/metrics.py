"""Prometheus metrics, named as vLLM's under our prefix so its dashboards port by renaming.

Every series carries a `model_name` label, as vLLM's do. Gauges and the preemption
count are read from the engine's latest step when /metrics is scraped; token counts and
latencies are recorded as each request's outputs reach the server.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.engine import EngineStats
from engine.params import RequestOutput

# Bucket bounds (seconds) as vLLM's.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)  # our own, not the process-global one
        r, labels = self.registry, ["model_name"]
        self.running = Gauge("pagedjax:num_requests_running", "Sequences in the running batch.", labels, registry=r)
        self.waiting = Gauge("pagedjax:num_requests_waiting", "Sequences waiting to be scheduled.", labels, registry=r)
        self.kv_usage = Gauge("pagedjax:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = full).",
                              labels, registry=r)
        self.preemptions = Counter("pagedjax:num_preemptions", "Sequences preempted (their pages taken back).",
                                   labels, registry=r)
        self.prompt_tokens = Counter("pagedjax:prompt_tokens", "Prompt tokens of requests that ran.", labels, registry=r)
        self.generation_tokens = Counter("pagedjax:generation_tokens", "Generated tokens.", labels, registry=r)
        self.success = Counter("pagedjax:request_success", "Finished completions, by why they finished.",
                               [*labels, "finished_reason"], registry=r)
        self.ttft = Histogram("pagedjax:time_to_first_token_seconds", "Arrival to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("pagedjax:inter_token_latency_seconds", "Time between a completion's tokens.", labels,
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pagedjax:e2e_request_latency_seconds", "Arrival to last token.", labels,
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("pagedjax:request_queue_time_seconds", "Arrival to the first step that ran it.",
                                    labels, buckets=REQUEST_BUCKETS, registry=r)
        self.model_name: str | None = None  # set once the engine has loaded
        self._preemptions_seen = 0

    def set_model(self, model_name: str) -> None:
        self.model_name = model_name
        for family in (self.running, self.waiting, self.kv_usage, self.preemptions, self.prompt_tokens,
                       self.generation_tokens, self.ttft, self.itl, self.e2e, self.queue_time):
            family.labels(model_name)  # so every series shows from the start, at zero

    def render(self, stats: EngineStats | None) -> bytes:
        """The exposition text, with the engine's gauges as of its latest step."""
        if self.model_name is not None and stats is not None:
            m = self.model_name
            self.running.labels(m).set(stats.num_running)
            self.waiting.labels(m).set(stats.num_waiting)
            self.kv_usage.labels(m).set(stats.kv_cache_usage)
            if stats.num_preemptions_total > self._preemptions_seen:
                self.preemptions.labels(m).inc(stats.num_preemptions_total - self._preemptions_seen)
                self._preemptions_seen = stats.num_preemptions_total
        return generate_latest(self.registry)


class RequestTimer:
    """One engine request's token counts and latencies, fed each output as it reaches the server."""

    def __init__(self, metrics: Metrics, arrival_time: float):
        self.metrics = metrics
        self.arrival = arrival_time  # time.monotonic()
        self._tokens: dict[int, int] = {}  # completion index -> tokens seen
        self._last: dict[int, float] = {}  # completion index -> when its latest tokens arrived
        self._first_seen = False
        self._done = False

    def observe(self, out: RequestOutput, queue_seconds: float | None) -> None:
        m = self.metrics
        name = m.model_name
        if self._done or name is None:
            return
        now = time.monotonic()
        for c in out.outputs:
            new = len(c.token_ids) - self._tokens.get(c.index, 0)
            if new <= 0:
                continue
            if not self._first_seen:
                self._first_seen = True
                m.ttft.labels(name).observe(now - self.arrival)
                m.prompt_tokens.labels(name).inc(out.num_prompt_tokens)
                if queue_seconds is not None:
                    m.queue_time.labels(name).observe(queue_seconds)
            elif c.index in self._last:
                gap = (now - self._last[c.index]) / new
                for _ in range(new):
                    m.itl.labels(name).observe(gap)
            self._tokens[c.index] = len(c.token_ids)
            self._last[c.index] = now
            m.generation_tokens.labels(name).inc(new)
        if out.finished:
            self._done = True
            m.e2e.labels(name).observe(now - self.arrival)
            for c in out.outputs:
                m.success.labels(name, c.finish_reason or "abort").inc()

    def aborted(self, num_completions: int) -> None:
        """The request ended without its final output (client gone, or an error)."""
        if not self._done and self.metrics.model_name is not None:
            self._done = True
            self.metrics.success.labels(self.metrics.model_name, "abort").inc(num_completions)
