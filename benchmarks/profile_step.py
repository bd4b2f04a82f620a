"""Where a step's time goes: device kernels per step, by kind, from a jax.profiler trace.

    python -m benchmarks.profile_step --model llama-3.1-8b [engine flags as for pagedjax serve] \\
        --batch 1 --batch 192 --prefill 1024 --out profile.json [--trace-dir DIR]

For each workload the engine is first brought to the state being measured (untraced),
then a few engine steps run under `jax.profiler.trace`:

* `--batch B`: B random prompts of `--context` tokens, all decoding; the steps traced are
  decode steps (fused calls of `decode_steps` tokens where the engine fuses);
* `--prefill L`: one prompt of L tokens on an idle engine and its first token (the TTFT step);
* `--mixed B`: B sequences decoding at `--context` when a fresh prompt of `--context` tokens
  joins: the step that runs its prefill beside the B decodes (offline runs are full of these);
* `--offline N`: N prompts of `--context` tokens asking for `--output-len` tokens, all at once
  (benchmarks.throughput's workload); once the first requests have finished and newcomers
  join as they leave, `--offline-steps` engine steps of this steady state are traced: fused
  decode calls, the steps that carry prompts, and the switches between them.

The trace's GPU kernels are summed by name and sorted into kinds (attention = our Pallas
kernels, gemm, KV write (scatter), sampling (sort/top-k/argmax), other fusions), and set
beside the host's wall time of the same steps: wall - device busy estimates the time the GPU
sat idle waiting for the host or for launches. For decode, a call is always in flight, so
both count from the first traced step()'s return to the last one's (`step_window`). It is
rough: tracing lengthens kernels. Results go to `--out` as JSON and to stdout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import math
import re
import tempfile
import time

from benchmarks.common import (add_engine_args, build_engine, engine_config, engine_info, environment,
                               random_prompts, write_json)
from engine.params import SamplingParams

KINDS = (  # first match wins; names are GPU kernel names (Pallas kernels carry their own)
    ("attention", re.compile(r"paged_attention|flash|fmha|cudnn", re.I)),
    ("collective", re.compile(r"nccl|all_reduce|all-reduce|allreduce|all_gather|one_shot", re.I)),
    ("gemm", re.compile(r"gemm|cutlass|xmma|cublas|matmul|sm90_|sm80_|dot", re.I)),
    ("kv_write", re.compile(r"scatter|dynamic.update.slice|rope_and_write", re.I)),
    ("sampling", re.compile(r"sort|top_?k|argmax|reduce|gumbel|threefry|random", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy", re.I)),
)


HOST_EVENTS = re.compile(r" (step|_dispatch|dispatch|dispatch_fused|collect|_record|_emit|_outputs|schedule|_pack|build|"
                         r"_execute|_put|_host|result)$|Execute|Transfer|Await|Compile", re.I)


LAYER_CALLS = 8  # a kernel run this often a step belongs to the layers, not to the sampler (which runs once)


def kind_of(name: str, calls_per_step: float = 0.0) -> str:
    """The kind of a kernel by its name; a "sampling" match (a reduction, say) that runs at least
    LAYER_CALLS times a step is a layer's (an RMSNorm, a split-K sum): "other"."""
    kind = next((k for k, pattern in KINDS if pattern.search(name)), "other")
    return "other" if kind == "sampling" and calls_per_step >= LAYER_CALLS else kind


Trace = tuple[list[list[tuple[int, int, str]]], list[tuple[int, int, str, str]]]  # (GPUs' kernels, host events)


def read_trace(trace_dir: str) -> Trace:
    """(kernels of each GPU as (start ns, stop ns, name), sorted; host events as (start ns, ns, name, thread))."""
    from jax.profiler import ProfileData

    gpus, host = [], []
    for path in glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True):
        for plane in ProfileData.from_file(path).planes:
            if plane.name.startswith("/device:GPU"):
                lines = [ln for ln in plane.lines if ln.name.startswith("Stream")] or list(plane.lines)
                gpus.append(sorted((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name) for ln in lines for ev in ln.events))
            elif plane.name.startswith("/host"):
                host += [(ev.start_ns, ev.duration_ns, ev.name, ln.name) for ln in plane.lines for ev in ln.events]
    return gpus, host


def step_window(host) -> tuple[int, int] | None:
    """From the first to the last engine.step() return the Python tracer saw: the calls those steps
    read (the trace also holds parts of the calls in flight at either end)."""
    returns = sorted(st + d for st, d, n, _ in host if n.startswith("$engine.py") and n.endswith(" step"))
    return (returns[0], returns[-1]) if len(returns) >= 2 else None


def device_kernels(trace: Trace, windowed: bool = False) -> dict[str, dict]:
    """Kernel name -> {ms, count} of one GPU: summed over the trace's GPU planes, divided by their number
    (with several GPUs, each runs the same step on its shards); `windowed`: only the kernels that
    start inside `step_window` (each clipped to it)."""
    gpus, host = trace
    window = step_window(host) if windowed else None
    lo, hi = window or (-math.inf, math.inf)
    totals: dict[str, dict] = collections.defaultdict(lambda: {"ms": 0.0, "count": 0})
    for kernels in gpus:
        for start, stop, name in kernels:
            if lo <= start < hi:
                t = totals[name]
                t["ms"] += (min(stop, hi) - start) / 1e6
                t["count"] += 1
    n = max(1, len(gpus))
    return {name: {"ms": t["ms"] / n, "count": t["count"] / n} for name, t in totals.items()}


def timeline(trace: Trace, top: int = 10) -> dict:
    """Where the GPU sat idle inside a trace, for one GPU: its span from the first kernel's start to
    the last one's end, the longest gaps between kernels (with the kernels on either side), and the
    host's engine and XLA events of interest over 20 us (thread, start relative to the first kernel),
    and every host event over 20 us from 2 ms before the longest gap to its end, to see what the
    GPU waited for."""
    gpus, host = trace
    if not gpus or not gpus[0]:
        return {}
    kernels = gpus[0]
    t0 = kernels[0][0]
    gaps, end, prev = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((start - end, end, prev, name))
        if stop > end:
            end, prev = stop, name
    gaps.sort(reverse=True)
    lo, hi = (gaps[0][1] - 2_000_000, gaps[0][1] + gaps[0][0]) if gaps else (0, -1)  # the longest gap, 2 ms before
    return {
        "device_span_ms": (end - t0) / 1e6,
        "gap_ms": sum(g[0] for g in gaps) / 1e6,
        "longest_gaps": [{"ms": g / 1e6, "at_ms": (at - t0) / 1e6, "after": a[:80], "before": b[:80]}
                         for g, at, a, b in gaps[:top]],
        "host_events": [{"name": n[:100], "thread": th[:40], "start_ms": (st - t0) / 1e6, "ms": d / 1e6}
                        for st, d, n, th in sorted(h for h in host if HOST_EVENTS.search(h[2]) and h[1] > 20_000)][:60],
        "host_events_in_longest_gap": [
            {"name": n[:100], "thread": th[:40], "start_ms": (st - t0) / 1e6, "ms": d / 1e6}
            for st, d, n, th in sorted(h for h in host if h[1] > 20_000 and h[0] < hi and h[0] + h[1] > lo)][:80],
    }


def summarize(kernels: dict[str, dict], wall_ms: float, steps: int) -> dict:
    """Per-step figures: device busy time by kind, the idle rest of the wall time, the top kernels."""
    by_kind = collections.Counter()
    for name, t in kernels.items():
        by_kind[kind_of(name, t["count"] / steps)] += t["ms"]
    busy = sum(by_kind.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:30]
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms / steps,
        "device_busy_ms_per_step": busy / steps,
        "idle_ms_per_step": (wall_ms - busy) / steps,
        "by_kind_ms_per_step": {k: v / steps for k, v in by_kind.most_common()},
        "top_kernels": [{"name": n[:160], "kind": kind_of(n, t["count"] / steps), "ms_per_step": t["ms"] / steps,
                         "calls_per_step": t["count"] / steps} for n, t in top],
    }


def traced(engine, trace_dir: str, num_steps: int) -> tuple[float, int]:
    """Run `num_steps` engine steps under the profiler; (wall ms, decode steps they made)."""
    import jax

    seq = engine.scheduler.shards[0].running[0]  # every sequence decodes in every step
    with jax.profiler.trace(trace_dir):
        # NOTE: a call is always in flight (engine.step's NOTE), partly run before tracing began:
        # the clock starts when the first traced step() has read it, so the wall time covers
        # exactly the calls the counted steps read.
        engine.step()
        before, t0 = seq.num_output_tokens, time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        wall = (time.perf_counter() - t0) * 1e3
    return wall, seq.num_output_tokens - before


def _decoding(engine, batch: int, context: int) -> list[str]:
    """Start `batch` requests of `context` random tokens and step until all of them decode."""
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=engine.max_model_len - context, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in random_prompts(batch, context, vocab, seed=batch)]
    while engine.scheduler.num_waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                              for sh in engine.scheduler.shards for s in sh.running):
        engine.step()
    for _ in range(2):  # the fused graphs run once before any trace
        engine.step()
    return ids


def _finish(engine, ids: list[str]) -> None:
    for rid in ids:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()


def profile_decode(engine, batch: int, context: int, trace_dir: str, num_steps: int) -> dict:
    ids = _decoding(engine, batch, context)
    wall, steps = traced(engine, trace_dir, num_steps)
    _finish(engine, ids)
    return {"workload": f"decode, batch {batch}, context ~{context}",
            **summarize(device_kernels(trace := read_trace(trace_dir), windowed=True), wall, steps),
            "timeline": timeline(trace)}


def profile_mixed(engine, batch: int, context: int, trace_dir: str) -> dict:
    import jax

    ids = _decoding(engine, batch, context)
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    vocab = engine.model_config.vocab_size
    for seed, trace in ((7, False), (8, True)):  # the first one untraced (its bucket's first run)
        ids.append(engine.add_request(None, random_prompts(1, context, vocab, seed=seed)[0], params))
        ctx = jax.profiler.trace(trace_dir) if trace else contextlib.nullcontext()
        with ctx:
            t0 = time.perf_counter()
            engine.step()
            wall = (time.perf_counter() - t0) * 1e3
    _finish(engine, ids)
    chunk = min(context, engine.config.max_num_batched_tokens - batch)  # the prompt's first chunk
    return {"workload": f"{batch} decodes at context ~{context} and the first {chunk} tokens of a fresh prompt "
                        f"of {context} in one step",
            **summarize(device_kernels(read_trace(trace_dir)), wall, 1)}


def profile_prefill(engine, length: int, trace_dir: str) -> dict:
    import jax

    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=1, ignore_eos=True)
    for seed, trace in ((1, False), (2, True)):  # untraced, then traced
        engine.add_request(None, random_prompts(1, length, vocab, seed=seed)[0], params)
        with jax.profiler.trace(trace_dir) if trace else contextlib.nullcontext():
            t0 = time.perf_counter()
            steps = 0
            while engine.has_unfinished_requests():
                engine.step()
                steps += 1
            wall = (time.perf_counter() - t0) * 1e3
    return {"workload": f"one prompt of {length} tokens, first token (TTFT)",
            **summarize(device_kernels(trace := read_trace(trace_dir)), wall, steps), "timeline": timeline(trace)}


def profile_offline(engine, num_prompts: int, context: int, output_len: int, trace_dir: str, num_steps: int) -> dict:
    import jax

    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in random_prompts(num_prompts, context, vocab, seed=3)]
    while not any(out.finished for out in engine.step()):  # steady state: requests leave and join
        pass
    with jax.profiler.trace(trace_dir):
        for _ in range(num_steps + 1):  # the wall time runs from the first traced step()'s return
            engine.step()
    trace = read_trace(trace_dir)
    lo, hi = step_window(trace[1])
    _finish(engine, ids)
    return {"workload": f"offline, {num_prompts} prompts x {context} in x {output_len} out, {num_steps} engine steps "
                        "once requests leave and join",
            **summarize(device_kernels(trace, windowed=True), (hi - lo) / 1e6, num_steps), "timeline": timeline(trace)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--batch", type=int, action="append", default=[], help="decode batch size to profile (repeatable)")
    p.add_argument("--context", type=int, default=1024, help="prompt length of the decode workloads")
    p.add_argument("--prefill", type=int, action="append", default=[], help="prompt length of a TTFT step (repeatable)")
    p.add_argument("--mixed", type=int, action="append", default=[],
                   help="decoding batch beside which a fresh prompt joins (repeatable)")
    p.add_argument("--steps", type=int, default=4, help="engine steps traced per decode workload")
    p.add_argument("--offline", type=int, action="append", default=[], help="prompts of an offline run (repeatable)")
    p.add_argument("--output-len", type=int, default=1024, help="tokens each offline prompt asks for")
    p.add_argument("--offline-steps", type=int, default=40, help="engine steps traced of the offline run")
    p.add_argument("--trace-dir", help="keep the traces here (default: a temporary folder)")
    p.add_argument("--out")
    args = p.parse_args()
    engine = build_engine(engine_config(args))
    root = args.trace_dir or tempfile.mkdtemp(prefix="pagedjax-trace-")
    results = []
    for b in args.batch:
        results.append(profile_decode(engine, b, args.context, f"{root}/decode{b}", args.steps))
        print(results[-1], flush=True)
    for b in args.mixed:
        results.append(profile_mixed(engine, b, args.context, f"{root}/mixed{b}"))
        print(results[-1], flush=True)
    for n in args.prefill:
        results.append(profile_prefill(engine, n, f"{root}/prefill{n}"))
        print(results[-1], flush=True)
    for n in args.offline:
        results.append(profile_offline(engine, n, args.context, args.output_len, f"{root}/offline{n}", args.offline_steps))
        print(results[-1], flush=True)
    if args.out:
        write_json(args.out, {**environment(), "kind": "profile", "model": args.model, "engine": engine_info(engine),
                              "profiles": results})


if __name__ == "__main__":
    main()
