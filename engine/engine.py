"""The engine: requests in, token deltas out, one step at a time.

    plan = scheduler.schedule()        # which sequences, how many tokens, which pages
    call = runner.dispatch(plan, ...)  # one compiled step queued on the device
    scheduler.advance(plan)            # its tokens count as computed, its samples as pending
    out  = runner.collect(call)        # its sampled ids back
    scheduler.update(plan, out)        # append tokens, finish on EOS / length

then the output side detokenizes incrementally and applies stop strings. `step()` runs
these verbs shifted by one call (the next call is queued before this one is read), so
the device never waits for the host (see its NOTE). Both the offline `LLM` and the
server's `AsyncEngine` drive this class.

On a mesh with dp data shards, `schedule()` gives one plan per shard (each shard
has its own scheduler and page pool, engine.data_parallel) and the runner runs
them side by side in one step. With several processes, process 0 drives the
engine and the others call `follow()`.
"""

import atexit
import gc
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.experimental import multihost_utils

from engine.allocator import PageAllocator
from engine.config import EngineConfig, EngineConfigError
from engine.data_parallel import DataParallelScheduler
from engine.detokenizer import IncrementalDetokenizer
from engine.params import CompletionOutput, Logprob, ParamError, RequestOutput, SamplingParams
from engine.runner import ModelRunner, Sampled
from engine.sampling import MAX_LOGIT_BIAS, MAX_SUPPRESS
from engine.scheduler import SchedulerConfig
from engine.sequence import Sequence
from engine.source import load_model_and_tokenizer
from models import allocate_kv_cache, kv_cache_bytes_per_page
from models.attention import attention_backend_for
from models.kv_cache import CACHE_AXES
from sharding import make_mesh
from sharding.distributed import initialize as join_processes

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Completion:
    """Output-side state of one sequence."""

    seq: Sequence
    detok: IncrementalDetokenizer
    logprobs: list[Logprob] | None
    emitted_tokens: int = 0  # output tokens already handed to the detokenizer


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    completions: list[_Completion] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.seq.finish_reason is not None for c in self.completions)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions_total: int


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.config = config
        join_processes(config.coordinator_address, config.num_processes, config.process_id)  # before any device use
        if config.compilation_cache_dir:
            os.makedirs(config.compilation_cache_dir, exist_ok=True)
            jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        if config.matmul_backend == "pallas" and jax.default_backend() not in ("gpu", "cuda"):
            raise EngineConfigError(f"engine config: matmul_backend 'pallas' needs a GPU (this is {jax.default_backend()})")
        self.mesh = make_mesh(config.dp, config.tp)
        t0 = time.perf_counter()
        self.model, self.model_config, self.tokenizer, self.model_name, self.dtype, placement = (
            load_model_and_tokenizer(config, self.mesh)
        )
        self.load_seconds = time.perf_counter() - t0
        self.model.attention_backend = config.attention_backend or attention_backend_for(jax.default_backend())
        self.model.matmul_backend = config.matmul_backend
        mc = self.model_config
        self.max_model_len = config.max_model_len or min(mc.max_position_embeddings, 4096)
        # The cache holds the heads as served: padded or replicated when tp does not divide them.
        served = mc.replace(num_heads=placement.heads.served_heads, num_kv_heads=placement.heads.served_kv_heads)
        num_pages = config.num_pages or self._pages_from_memory(served)  # of each data shard
        shape = (served.num_kv_heads, config.dp * num_pages, config.page_size, served.head_dim)
        cache_sharding = placement.sharding(CACHE_AXES, shape)
        # The steps compile against the cache's shape before it is allocated: XLA's autotuner borrows
        # device memory while it compiles (a split-K trial of the 8B logits product asked for 1018 MiB
        # on an H100), which a pool already given to the cache cannot lend, and start-up failed.
        pages_spec = jax.ShapeDtypeStruct(shape, self.dtype, sharding=cache_sharding)
        cache_spec = [(pages_spec, pages_spec) for _ in range(served.num_layers)]  # (K, V) a layer
        eos = set(mc.eos_token_ids) | set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.scheduler = DataParallelScheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=self.max_model_len),
            num_pages, config.page_size, self.eos_token_ids, config.dp, seed=config.seed,
        )
        self.runner = ModelRunner(
            self.model, cache_spec, page_size=config.page_size, max_model_len=self.max_model_len,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            token_buckets=config.token_buckets, page_buckets=config.page_buckets, mesh=self.mesh,
            decode_steps=config.decode_steps or (1 if jax.default_backend() == "cpu" else 8),
        )
        self.warmup_seconds = self.runner.warmup(progress=progress)
        # The runner owns (and donates) the only reference.
        self.runner.kv_cache = allocate_kv_cache(served, config.dp * num_pages, config.page_size, self.dtype,
                                                 sharding=cache_sharding)
        check_scratch_fits(self.memory_stats(), self.runner.warmup_report["scratch_bytes"], config.memory_utilization)
        self._requests: dict[str, _Request] = {}
        self._inflight = None  # _dispatch's (plans, runner.Call, ahead_ok): the call queued, not yet recorded
        if jax.process_count() > 1 and jax.process_index() == 0:
            atexit.register(self.shutdown)  # followers wait for the lead's word to stop
        # What start-up made (modules, the model, compiled steps) lives as long as the engine: kept
        # out of Python's cyclic collector, its full passes stay short. One such pass stalled the
        # host for 143 ms inside a dispatch (8B, dp=2, two H200s: profile_step --offline), the
        # device idle all along.
        gc.collect()
        gc.freeze()

    @property
    def allocator(self) -> PageAllocator:
        """The page pool; with dp > 1 each data shard has its own, in `scheduler.allocators`."""
        if len(self.scheduler.allocators) > 1:
            raise AttributeError(f"with dp={self.config.dp} each data shard has its own pool: use scheduler.allocators")
        return self.scheduler.allocators[0]

    def follow(self) -> None:
        """On every process but 0 of a multi-host run: execute process 0's steps until it shuts down."""
        self.runner.follow()

    def shutdown(self) -> None:
        """On process 0 of a multi-host run: release the other processes from `follow()`."""
        self.runner.stop_followers()

    def memory_stats(self) -> dict:
        """This process's first device's memory pool (jax's memory_stats(): bytes_limit, bytes_in_use,
        peak_bytes_in_use, ...); {} where the device reports none (CPU)."""
        return self.mesh.local_devices[0].memory_stats() or {}

    def _pages_from_memory(self, served) -> int:
        """Pages of one data shard: what one device's free memory holds of its share of each page."""
        per_page = kv_cache_bytes_per_page(served, self.config.page_size, self.dtype) // self.config.tp
        stats = self.memory_stats()
        if "bytes_limit" in stats:
            free = stats["bytes_limit"] * self.config.memory_utilization - stats.get("bytes_in_use", 0)
        else:  # CPU: no device memory figure; enough for every sequence at full length, capped at 1 GiB
            want = self.config.max_num_seqs * (-(-self.max_model_len // self.config.page_size)) + 1
            free = min(want * per_page, 1 << 30)
        pages = max(2, int(free // per_page))
        if jax.process_count() > 1:  # every process must build the same cache: the fewest any device holds
            pages = int(multihost_utils.process_allgather(np.int64(pages)).min())
        return pages

    # ---- requests ------------------------------------------------------------------

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Queue a request; raises ValueError subclasses (with the numbers) for prompts that cannot run."""
        params = params or SamplingParams()
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(i) for i in prompt]
            bad = [i for i in ids if not 0 <= i < self.model_config.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.model_config.vocab_size - 1})")
        self._check_params(params)
        if params.max_tokens is None:
            params = params.replace(max_tokens=max(1, self.max_model_len - len(ids)))
        seqs = self.scheduler.add_request(request_id, ids, params, arrival_time)
        req = _Request(request_id, text, ids, params)
        for seq in seqs:
            detok = IncrementalDetokenizer(
                self.tokenizer, ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            req.completions.append(_Completion(seq, detok, [] if params.logprobs is not None else None))
        self._requests[request_id] = req
        return request_id

    def _check_params(self, params: SamplingParams) -> None:
        """Refuse what the step could not carry, before the request is queued."""
        vocab = self.model_config.vocab_size
        bias = params.logit_bias or {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ParamError("logit_bias", f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are supported")
        for what, ids in (("logit_bias", bias), ("stop_token_ids", params.stop_token_ids or ())):
            bad = [i for i in ids if not 0 <= int(i) < vocab]
            if bad:
                raise ParamError(what, f"{what} holds token id {bad[0]}, outside the vocabulary (0..{vocab - 1})")
        if params.min_tokens and len(set(params.stop_token_ids or ()) | self.eos_token_ids) > MAX_SUPPRESS:
            raise ParamError("stop_token_ids", f"with min_tokens, at most {MAX_SUPPRESS} stop/EOS token ids are supported")

    def abort_request(self, request_id: str) -> None:
        if request_id in self._requests:
            self.scheduler.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return (self._inflight is not None or self.scheduler.has_unfinished()
                or any(not r.finished for r in self._requests.values()))

    def stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.scheduler.usage,
                           self.scheduler.num_preemptions_total)

    # ---- the step ------------------------------------------------------------------

    def step(self, before_schedule: Callable[[], object] | None = None) -> list[RequestOutput]:
        """Run one call on the device; returns the requests that changed (cumulative outputs).

        NOTE: the host plans and queues each call before it reads the one in flight, so the
        device goes from call to call without waiting for the host. A call (a step, or a
        fused call of several decode steps) stays queued across step() returns; step()
        schedules the next call with the scheduler advanced past the one in flight (its
        sampled tokens pending, engine.sequence's NOTE), queues it, and only then reads the
        call in flight, records its tokens and turns them into text while the device
        computes. A sequence that the call in flight ends on a token (EOS, a stop token or
        string) runs in the next call as well, and that call's token for it is dropped.
        The host must read a call before it plans the next when the next needs its tokens
        on the host: a sequence with penalties (the penalty history).
        `before_schedule` runs right before each schedule() (a server adds what arrived).
        """
        if jax.process_index() != 0:
            raise RuntimeError(f"process {jax.process_index()} of a multi-host run only executes process 0's steps: "
                               "call follow() instead")
        touched: dict[str, _Request] = {}
        if self._inflight is None:
            self._inflight = self._dispatch(touched)
            if self._inflight is None:
                return self._outputs(touched)
        plans, call, ahead_ok = self._inflight
        if before_schedule is not None:
            before_schedule()
        ahead = self._dispatch(touched) if ahead_ok else None
        later = self._record(plans, self.runner.collect(call), touched)
        self._inflight = ahead or self._dispatch(touched)
        for comp, sampled in later.items():  # the device runs the next call meanwhile
            self._emit(comp, sampled)
        return self._outputs(touched)

    def _dispatch(self, touched: dict[str, _Request]):
        """Schedule and queue the next call: (plans, runner.Call, whether the call after it may be
        planned before this one is read), or None when nothing is to run. Requests whose
        sequences the schedule released (finished or aborted) join `touched`."""
        plans = self.scheduler.schedule()  # one per data shard
        for seq_id in (f for plan in plans for f in plan.freed):  # aborted requests show up here
            rid = self._request_of(seq_id)
            if rid in self._requests:
                touched[rid] = self._requests[rid]
        seqs = {s.seq_id: self._seq(s.seq_id) for plan in plans for s in plan.seqs}
        if not seqs:
            return None
        fused = self._reserve_fused(plans, seqs)
        if fused is None:
            steps = None
            call = self.runner.dispatch(plans, seqs, self._suppressed(seqs))
        else:
            plans, steps = fused
            call = self.runner.dispatch_fused(plans, seqs, steps)
        self.scheduler.advance(plans, steps)
        ahead_ok = not any(s.sample and seqs[s.seq_id].params.uses_penalties for plan in plans for s in plan.seqs)
        return plans, call, ahead_ok

    def _record(self, plans, steps: list[dict[str, Sampled]], touched: dict[str, _Request]):
        """Record the sampled tokens of a call's steps in the scheduler. Returns what is left to
        emit: {completion: its Sampled, step by step} of the sequences without stop strings."""
        later: dict[_Completion, list[Sampled]] = {}
        for sampled in steps:
            for seq in self.scheduler.update(plans, {k: v.token_id for k, v in sampled.items()}):
                req = self._requests.get(seq.request_id)
                if req is None:
                    continue
                comp = req.completions[seq.index]
                touched[req.request_id] = req
                if comp.detok.stop:  # its text may end it: finish it before the next schedule()
                    self._emit(comp, [sampled[seq.seq_id]])
                else:
                    later.setdefault(comp, []).append(sampled[seq.seq_id])
        return later

    def _outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        outputs = [self._output(r) for r in touched.values()]
        for r in touched.values():
            if r.finished:
                del self._requests[r.request_id]
        return outputs

    def _reserve_fused(self, plans, seqs: dict[str, Sequence]):
        """(plans grown for one fused call, steps per sequence), or None when a single step is due.

        Fusing pays when nothing could join meanwhile (no waiting sequence, or no free seat for
        one), every sequence is decoding, and nothing changes per step on the host (penalty
        history, min_tokens suppression). A sequence that reaches its length inside the call
        decodes only up to it.
        """
        k = self.runner.decode_steps
        if k < 2 or not seqs or self.scheduler.can_admit_waiting():
            return None
        steps = {}
        for plan in plans:
            for s in plan.seqs:
                seq = seqs[s.seq_id]
                p = seq.params
                if len(s.token_ids) != 1 or not s.sample or p.uses_penalties or seq.num_output_tokens < p.min_tokens:
                    return None
                steps[s.seq_id] = min(k, self._tokens_left(seq))
        grown = self.scheduler.reserve_ahead(plans, steps)
        return None if grown is None else (grown, steps)

    def _tokens_left(self, seq: Sequence) -> int:
        """Tokens `seq` may still generate (its max_tokens, or the model length, whichever ends first),
        counting its pending tokens as generated."""
        return min(seq.params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens)

    def _seq(self, seq_id: str, missing_ok: bool = False) -> Sequence | None:
        req = self._requests.get(self._request_of(seq_id)) if missing_ok else self._requests[self._request_of(seq_id)]
        return req.completions[int(seq_id.rsplit("-", 1)[1])].seq if req else None

    @staticmethod
    def _request_of(seq_id: str) -> str:
        return seq_id.rsplit("-", 1)[0]

    def _suppressed(self, seqs: dict[str, Sequence]) -> dict[str, list[int]]:
        """EOS and stop token ids are banned while a sequence is under min_tokens."""
        out = {}
        for sid, seq in seqs.items():
            p = seq.params
            if seq.num_output_tokens < p.min_tokens:
                ids = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    ids |= self.eos_token_ids
                out[sid] = sorted(ids)
        return out

    def _emit(self, comp: _Completion, sampled: list[Sampled]) -> None:
        """Hand a sequence's new tokens (`sampled`, one per step since its last emit) to its
        detokenizer and logprobs; finish it on a stop string."""
        seq = comp.seq
        new_ids = seq.output_token_ids[comp.emitted_tokens:]
        comp.emitted_tokens = len(seq.output_token_ids)
        if comp.logprobs is not None:
            k = seq.params.logprobs or 0
            for s in sampled:
                top = {} if s.top_ids is None else {
                    int(i): float(lp) for i, lp in zip(s.top_ids[:k], s.top_logprobs[:k])
                }
                comp.logprobs.append(Logprob(s.token_id, s.logprob, top))
        if isinstance(seq.stop_reason, int) and new_ids and new_ids[-1] == seq.stop_reason:
            new_ids = new_ids[:-1]  # a stop token id ends the text without appearing in it
        if seq.finish_reason is None or new_ids:
            comp.detok.add(new_ids)
        if comp.detok.stop_reason is not None and seq.finish_reason is None:
            self.scheduler.finish_sequence(seq.seq_id, "stop", comp.detok.stop_reason)
        if seq.finish_reason is not None:
            comp.detok.finish()

    def _output(self, req: _Request) -> RequestOutput:
        outs = [
            CompletionOutput(
                index=c.seq.index, text=c.detok.text, token_ids=list(c.seq.output_token_ids),
                logprobs=c.logprobs, finish_reason=c.seq.finish_reason, stop_reason=c.seq.stop_reason,
            )
            for c in req.completions
        ]
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, req.finished)


def check_scratch_fits(stats: dict, need: int, memory_utilization: float) -> None:
    """Fail at start-up, not at the first long step, when weights and KV cache leave the compiled
    steps too little of the device's memory pool (`stats`: a device's memory_stats()) to run in."""
    if "bytes_limit" not in stats:  # CPU: no pool
        return
    free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    if need > free:
        gib = 1 << 30
        raise EngineConfigError(
            f"engine config: the compiled steps need up to {need / gib:.2f} GiB of scratch memory, but weights "
            f"and KV cache leave {free / gib:.2f} GiB of the device's {stats['bytes_limit'] / gib:.2f} GiB pool: "
            f"lower memory_utilization (now {memory_utilization}) or num_pages")
