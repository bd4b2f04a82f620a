"""The step's sampler alone: `engine.sampling.sample` on (rows, vocabulary) logits, as a step calls it.

    python -m benchmarks.sampler --rows 1 --rows 224 [--vocab 128256] [--profile] --out sampler.json

Times each sampler variant (engine.sampling.SAMPLERS, without the full sort's branch) on random
bf16 logits, every row sampling at temperature 1 with its own seed: the median and minimum of 10
timings of 50 calls. With --profile, also the GPU time a call of each kernel (a jax.profiler
trace of 20 calls). To compare two versions of the sampler, run this script twice in one
device call, once with the other version's `engine/` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks.common import environment, write_json
from engine.params import SamplingParams
from engine.sampling import RowParams, SamplingTensors, sample


def kernel_profile(fn, calls: int = 20) -> dict:
    """GPU time a call of each kernel of `fn()` (us, with launches a call), from a trace."""
    from benchmarks.profile_step import device_kernels, read_trace

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
        kernels = device_kernels(read_trace(trace_dir))
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:15]
    return {name[:100]: [round(k["ms"] * 1e3 / calls, 2), k["count"] / calls] for name, k in top}


def measure(rows: int, vocab: int, variant: str, profile: bool, reps: int = 10, inner: int = 50) -> dict:
    logits = jax.random.normal(jax.random.key(rows), (rows, vocab), jnp.float32).astype(jnp.bfloat16) * 3
    params = [RowParams(SamplingParams(temperature=1.0), seed=i, step=0) for i in range(rows)]
    tensors = SamplingTensors.build(params, rows)
    fn = jax.jit(functools.partial(sample, full_rank=False, rank=variant != "plain"))
    out = fn(logits, tensors)
    for _ in range(5):
        out = fn(logits, tensors)
    jax.block_until_ready(out)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(logits, tensors)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner * 1e6)
    res = {"us": statistics.median(times), "min_us": min(times)}
    if profile:
        res["kernels_us_per_call"] = kernel_profile(lambda: fn(logits, tensors))
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="batch rows (repeatable); default 1 and 224")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--variant", action="append", choices=("plain", "ranked"), help="default: both")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = {**environment(), "kind": "sampler", "vocab": args.vocab, "cases": {}}
    for rows in args.rows or [1, 224]:
        for variant in args.variant or ["plain", "ranked"]:
            key = f"{variant}_rows{rows}"
            result["cases"][key] = measure(rows, args.vocab, variant, args.profile)
            print(key, result["cases"][key], flush=True)
            write_json(args.out, result)


if __name__ == "__main__":
    main()
