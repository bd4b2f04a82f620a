"""Offline throughput through the engine, with the semantics of vLLM's `bench throughput`.

    python -m benchmarks.throughput --model llama-3.2-1b --num-prompts 1000 --input-len 1024 \\
        --output-len 1024 --out throughput.json [--max-seconds 90] [--warmup-probe] [engine flags]

N prompts of random token ids, fixed input and output lengths (ignore_eos, temperature 1),
all submitted at once, the engine stepped until every request finishes. The clock runs
from the first submission to the last finish; `tokens_per_second` counts prompt and output
tokens, `output_tokens_per_second` output tokens alone. The engine's warm-up (compiling
every bucket) and one small untimed run come before the clock starts.

`--max-seconds S` keeps the run inside a time budget: a short probe first measures the
prefill rate and the decode step at the run's mean context (`probe`), the run's time is
estimated from them, and N is lowered when the requested N would not fit: to whole waves
of the concurrency, or to part of one wave; when not even one request fits, the offline
run is skipped and the result says why. The result names the N actually run.

`--warmup-probe` measures start-up: the engine's warm-up in a fresh process twice with
one persistent compilation cache, first empty (`warmup_cold_s`), then filled by the first
(`warmup_cached_s`). Both processes run before this one touches the device, so each has
the whole device to itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks import roofline
from benchmarks.common import (REPO, add_engine_args, build_engine, drive, engine_config, engine_flags, engine_info,
                               environment, random_prompts, write_json)
from benchmarks.latency import measure_case, sampling_params

PROBE_OUTPUT_LEN = 16  # decode steps the probe times (after its prefill)
ESTIMATE_MARGIN = 1.15  # the run's estimate is scaled by this before it is compared with the budget


def concurrency(engine, input_len: int, output_len: int) -> int:
    """Requests sure to run at once: the sequence limit, or fewer if their full lengths' pages do not all fit
    (per data shard). The probe's estimate; the run reports the most it ran (`peak_running`, which may be
    more: a request takes its pages as it grows), and the floor takes that."""
    pages_each = -(-(input_len + output_len) // engine.config.page_size)
    per_shard = min(engine.config.max_num_seqs, engine.allocator.num_usable_pages // pages_each)
    return max(1, per_shard * engine.config.dp)


def probe(engine, input_len: int, output_len: int, budget_s: float, seed: int = 0) -> dict:
    """Prefill rate and decode step time at the run's mean context, measured at a cost the budget allows.

    The probe's prompts are as long as the run's mean context (input + output / 2), so its
    decode steps read as much K/V as the run's average step. First one prompt alone gives
    the prefill rate; that rate bounds how many rows the batch probe may prefill in a
    quarter of the budget (all of the concurrency on a fast engine, a few on a slow one).
    The decode step at other row counts scales with the bytes a step reads (weights once,
    K/V per row), the roofline's model of a memory-bound step.
    """
    t0 = time.perf_counter()
    b_max = concurrency(engine, input_len, output_len)
    context = min(input_len + output_len // 2, engine.max_model_len - PROBE_OUTPUT_LEN)
    one = measure_case(engine, 1, context, 2, repeats=1, seed=seed + 5, warmup=False)  # the estimate errs slow
    rate_one = context / (one["last_first_token_ms"] / 1e3)
    rows = max(1, min(b_max, int(0.25 * budget_s * rate_one / context)))
    case = measure_case(engine, rows, context, PROBE_OUTPUT_LEN, repeats=1, seed=seed + 7, warmup=False)
    step_ms = case["decode_step_ms"] or (case["e2e_latency_ms"] - case["last_first_token_ms"]) / (PROBE_OUTPUT_LEN - 1)
    itemsize = np.dtype(engine.dtype).itemsize
    return {"concurrency": b_max, "context": context, "rows": rows, "decode_step_ms_at_rows": step_ms,
            "prefill_tok_s": rows * context / (case["last_first_token_ms"] / 1e3), "prefill_tok_s_one": rate_one,
            "step_bytes_fixed": roofline.weight_bytes(engine.model_config, itemsize),
            "step_bytes_per_row": roofline.kv_bytes_per_token(engine.model_config, itemsize) * context,
            "seconds": time.perf_counter() - t0, "case": case}


def decode_step_ms(p: dict, rows: int) -> float:
    """The probe's decode step, scaled from its row count to `rows` by the bytes each step reads."""
    fixed, per_row = p["step_bytes_fixed"], p["step_bytes_per_row"]
    return p["decode_step_ms_at_rows"] * (fixed + rows * per_row) / (fixed + p["rows"] * per_row)


def estimate_seconds(num_prompts: int, input_len: int, output_len: int, p: dict) -> float:
    """Prefill of every prompt plus `output_len - 1` decode steps per wave of the concurrency."""
    rows = min(num_prompts, p["concurrency"])
    waves = math.ceil(num_prompts / p["concurrency"])
    step_s = decode_step_ms(p, rows) / 1e3
    return ESTIMATE_MARGIN * (num_prompts * input_len / p["prefill_tok_s"] + waves * (output_len - 1) * step_s)


def choose_num_prompts(requested: int, input_len: int, output_len: int, p: dict, budget_s: float) -> int:
    """`requested` if it fits the budget, else the most whole waves of the concurrency that do, else
    the most prompts of one partial wave that do; 0 when not even one request fits."""
    def fits(n):
        return estimate_seconds(n, input_len, output_len, p) <= budget_s

    if fits(requested):
        return requested
    wave = p["concurrency"]
    if fits(wave):
        waves = 1
        while fits((waves + 1) * wave):
            waves += 1
        return min(requested, waves * wave)
    return max((n for n in range(1, min(wave, requested) + 1) if fits(n)), default=0)


@contextlib.contextmanager
def step_kinds(engine):
    """Record every call the engine queues and reads back: its kind (a single step of decodes
    only or carrying prompt tokens, or a fused call), whether it was queued ahead (while
    another call was in flight, unread), the host's time inside the dispatch that queued it
    (its inputs built and handed to the runner's launcher thread) and inside the read
    (waiting for the device). The rest of the run's time is host work: scheduling,
    recording, detokenizing."""
    runner, log, kinds = engine.runner, [], {}
    dispatch, dispatch_fused, collect = runner.dispatch, runner.dispatch_fused, runner.collect

    def queued(queue, kind, *args, **kwargs):
        ahead = bool(kinds)  # a call is in flight
        t0 = time.perf_counter()
        call = queue(*args, **kwargs)
        kinds[id(call)] = (kind, ahead, time.perf_counter() - t0)
        return call

    def dispatch_(plans, *args):
        decodes_only = max(p.num_tokens for p in plans) <= engine.config.max_num_seqs
        return queued(dispatch, "single_decode_only" if decodes_only else "single_with_prompt_tokens", plans, *args)

    def dispatch_fused_(*args, **kwargs):
        return queued(dispatch_fused, "fused", *args, **kwargs)

    def collect_(call):
        if id(call) not in kinds:  # queued before the recording began
            return collect(call)
        kind, ahead, dispatch_s = kinds.pop(id(call))
        t0 = time.perf_counter()
        out = collect(call)
        log.append({"kind": kind, "ahead": ahead, "dispatch_s": dispatch_s, "wait_s": time.perf_counter() - t0})
        return out

    runner.dispatch, runner.dispatch_fused, runner.collect = dispatch_, dispatch_fused_, collect_
    try:
        yield log
    finally:
        del runner.dispatch, runner.dispatch_fused, runner.collect  # the class's methods again


def summarize_step_kinds(log) -> dict:
    """Per kind of call: how many, how many were queued ahead, and the host's total time
    dispatching and reading them (see `step_kinds`)."""
    groups = {k: [e for e in log if e["kind"] == k] for k in ("single_decode_only", "single_with_prompt_tokens", "fused")}
    return {k: {"count": len(v), "queued_ahead": sum(e["ahead"] for e in v),
                "dispatch_s": float(sum(e["dispatch_s"] for e in v)),
                "wait_s": float(sum(e["wait_s"] for e in v))} for k, v in groups.items()}


def measure_throughput(engine, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """One timed offline run, after a small untimed one; vLLM's result keys plus output tokens/s,
    and how the engine steps divided into kinds (`step_kinds`)."""
    vocab = engine.model_config.vocab_size
    drive(engine, random_prompts(min(4, num_prompts), input_len, vocab, seed + 999), sampling_params(2))  # untimed
    with step_kinds(engine) as kinds:
        run = drive(engine, random_prompts(num_prompts, input_len, vocab, seed), sampling_params(output_len))
    outputs = [t.num_output for t in run.requests.values()]
    if any(n != output_len for n in outputs):
        raise RuntimeError(f"expected {output_len} output tokens per request, got {sorted(set(outputs))}")
    total_in, total_out = num_prompts * input_len, sum(outputs)
    elapsed = run.elapsed
    step_s = [t1 - t0 for t0, t1, _ in run.steps]
    return {
        "elapsed_time": elapsed,
        "num_requests": num_prompts,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "total_num_tokens": total_in + total_out,
        "requests_per_second": num_prompts / elapsed,
        "tokens_per_second": (total_in + total_out) / elapsed,
        "output_tokens_per_second": total_out / elapsed,
        "num_steps": len(run.steps),
        "mean_step_ms": float(np.mean(step_s)) * 1e3,
        "num_preemptions": run.num_preemptions,
        "peak_running": run.peak_running,
        "step_kinds": summarize_step_kinds(kinds),
    }


# ---- start-up time ----------------------------------------------------------------------


def warmup_probe(config, cache_dir: str | None = None) -> dict:
    """Warm-up seconds in two fresh processes sharing one persistent compilation cache (empty at first)."""
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="pagedjax-compile-cache-")
    if os.path.isdir(cache_dir) and os.listdir(cache_dir):
        raise ValueError(f"--warmup-cache-dir {cache_dir} is not empty; the cold warm-up needs an empty cache")
    flags = engine_flags(config.replace(compilation_cache_dir=cache_dir))
    runs = []
    for label in ("cold", "cached"):
        cmd = [sys.executable, "-m", "benchmarks.throughput", "--warmup-only", *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"the {label} warm-up process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
        runs.append({"label": label, **json.loads(line), "process_wall_s": wall})
        print(f"warm-up ({label}): {runs[-1]['warmup_seconds']:.1f} s compiling "
              f"(load {runs[-1]['load_seconds']:.1f} s, process {wall:.1f} s)", flush=True)
    return {"warmup_cold_s": runs[0]["warmup_seconds"], "warmup_cached_s": runs[1]["warmup_seconds"],
            "runs": runs, "model": config.model, "cache_dir": cache_dir,
            "note": "runner.warmup() seconds (every bucket compiled) in a fresh process; the first with an "
                    "empty persistent compilation cache, the second with the cache the first filled"}


def with_warmup_probe(config, args) -> tuple[object, dict | None]:
    """Run the warm-up probe if asked (before this process uses the device); this process's engine then
    starts from the cache the probe filled, unless it names its own."""
    if not args.warmup_probe:
        return config, None
    warmup = warmup_probe(config, args.warmup_cache_dir)
    cache_dir = warmup.pop("cache_dir")  # a machine's folder: kept out of the result
    if config.compilation_cache_dir is None:
        config = config.replace(compilation_cache_dir=cache_dir)
    return config, warmup


def cache_is_empty(config) -> bool:
    """Whether the engine's persistent compilation cache is empty (or there is none): a cold start."""
    cache = config.compilation_cache_dir
    return not (cache and os.path.isdir(cache) and os.listdir(cache))


def warmup_only(config, out: str | None = None) -> None:
    """Start an engine (load + warm-up) and report how long that took: one line of JSON, and `out` if given."""
    cache_empty = cache_is_empty(config)
    engine = build_engine(config)
    figures = {"warmup_seconds": engine.warmup_seconds, "load_seconds": engine.load_seconds,
               "num_step_graphs": len(engine.runner.buckets()), "compilation_cache_empty_at_start": cache_empty,
               "warmup_report": engine.runner.warmup_report}
    print(json.dumps(figures), flush=True)
    if out:
        write_json(out, {**environment(), "kind": "warmup", "model": config.model,
                         "workload": f"engine start-up: every bucket compiled "
                                     f"({figures['num_step_graphs']} step graphs)",
                         "engine": engine_info(engine), "metrics": figures, "peer": None, "roofline": None})


# ---- the command ----------------------------------------------------------------------


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-seconds", type=float, help="time budget of the timed run; N is lowered to fit it")
    p.add_argument("--warmup-probe", action="store_true", help="also time the warm-up cold and with the cache")
    p.add_argument("--warmup-cache-dir", help="empty folder for the probe's compilation cache (default: a new one)")


def run_throughput(engine, args, ceilings: dict, log=print) -> tuple[dict, dict]:
    """(metrics, roofline) of the offline run, its size chosen by the budget if one is given."""
    cfg, itemsize = engine.model_config, np.dtype(engine.dtype).itemsize
    n, budget, p = args.num_prompts, args.max_seconds, None
    if budget:
        p = probe(engine, args.input_len, args.output_len, budget, args.data_seed)
        n = choose_num_prompts(args.num_prompts, args.input_len, args.output_len, p, budget)
        log(f"throughput probe ({p['seconds']:.0f} s): decode {p['decode_step_ms_at_rows']:.2f} ms/step at "
            f"{p['rows']} rows, context {p['context']}; prefill {p['prefill_tok_s']:.0f} tok/s; "
            f"running {n} of {args.num_prompts} prompts at concurrency {p['concurrency']} "
            f"(estimate {estimate_seconds(max(n, 1), args.input_len, args.output_len, p):.0f} s, "
            f"budget {budget:.0f} s)")
        if n == 0:
            est = estimate_seconds(1, args.input_len, args.output_len, p)
            return {"skipped": f"one request alone is estimated at {est:.0f} s, over the {budget:.0f} s budget",
                    "requested_num_prompts": args.num_prompts, "input_len": args.input_len,
                    "output_len": args.output_len, "budget_s": budget, "probe": p}, {"ceilings": ceilings}
    m = measure_throughput(engine, n, args.input_len, args.output_len, args.data_seed)
    m.update(requested_num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
             concurrency=m["peak_running"], budget_s=budget,
             estimate_s=estimate_seconds(n, args.input_len, args.output_len, p) if p else None, probe=p)
    floor = roofline.offline_floor(cfg, itemsize, n, args.input_len, args.output_len, m["concurrency"], ceilings)
    log(f"throughput {n}x{args.input_len}x{args.output_len}: {m['output_tokens_per_second']:.0f} output tok/s, "
        f"{m['tokens_per_second']:.0f} total tok/s in {m['elapsed_time']:.1f} s "
        f"(floor {floor['output_tok_s']:.0f} output tok/s; {m['num_preemptions']} preemptions)")
    kinds = m["step_kinds"]
    rest = m["elapsed_time"] - sum(v["dispatch_s"] + v["wait_s"] for v in kinds.values())
    log("calls: " + ", ".join(f"{k} {v['count']} ({v['queued_ahead']} queued ahead; dispatch {v['dispatch_s']:.1f} s, "
                              f"read {v['wait_s']:.1f} s)"
                              for k, v in kinds.items()) + f"; other host time {rest:.1f} s")
    return m, {"ceilings": ceilings, "offline": floor}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    add_throughput_args(parser)
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--ceilings", help="a benchmarks.roofline JSON of this run (default: measure now)")
    parser.add_argument("--out", help="where to write the JSON result")
    parser.add_argument("--warmup-only", action="store_true",
                        help="only start the engine and report its load and warm-up seconds (the probe's child)")
    args = parser.parse_args()

    config = engine_config(args)
    if args.warmup_only:
        return warmup_only(config, args.out)
    if not args.out:
        parser.error("--out is required")
    config, warmup = with_warmup_probe(config, args)
    ceilings = roofline.load_or_measure(args.ceilings)
    engine = build_engine(config)
    env = environment()
    metrics, floors = run_throughput(engine, args, ceilings)
    if warmup:
        metrics["warmup"] = warmup
    n = metrics.get("num_requests", 0)
    write_json(args.out, {**env, "kind": "throughput", "model": config.model,
                          "workload": f"{n} prompts x {args.input_len} in x {args.output_len} out, offline",
                          "engine": engine_info(engine), "metrics": metrics, "peer": None, "roofline": floors})


if __name__ == "__main__":
    main()
