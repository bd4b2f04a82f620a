"""One decode step of the Llama-3.1-8B shape (layers + logits of one row, no sampler, no engine)
under variants of how the step is written or compiled, each timed beside the others.

    python -m benchmarks.step_variants OUT.json [VARIANT ...]      (default: every variant)

Cases (STEP_CASES="ROWSxBUCKETxCONTEXT,..." replaces them): 1 decode row in the 4-token bucket
(the runner's smallest) at context 256 and 1024, and 192 rows at context 1024, padded as the
runner pads them (one block-table width of 128 pages); results before 2026-12-06's 9352e51 used
the 16-token bucket for the single row. Each variant gets a fresh trace (the jit caches are cleared)
and its own compile; the step donates the cache, as the engine's does. Reported per case: the
median and minimum of 15 timings of 10 steps, the compile time, the kernel-launching
instructions of the optimized HLO by kind (`fusion(` counts nested computations too: compare it
between variants, not with a profile), a hash of that HLO, and how far the logits of one step
from a zeroed cache are from the first variant's.

STEP_PROFILE=1 adds the GPU time a step of each kernel (a jax.profiler trace of 5 steps); STEP_HLO_DIR=DIR
writes each variant's optimized HLO of each case there.

Variants change one thing against `base` (the code as it is):

- `normscale`: RMSNorm as a row scale on the product, (x * gain) @ w * rsqrt(mean(x^2) + eps),
  to let XLA take the norm into the GEMM's prologue and epilogue;
- `swiglu_exp`: SwiGLU as g * u / (1 + exp(-g)), a form XLA's GEMM prologue could take;
- `both`: the two together;
- `split1` to `split16`: decode attention with that many context splits instead of the GPU-filling
  rule; `kv16`, `kv32`, `kv128`: its context block; `warps2`, `warps8`, `stages2`, `stages4`: its
  warps and pipeline stages (the decode `KernelConfig` otherwise as it is);
- `osplit2`, `osplit4`, `dsplit2`, `dsplit4`: the o (down) projection as 2 or 4 products over slices
  of its contraction, summed in float32 with the residual add (a split-K written in jnp; on the GPU,
  XLA folds a sum of two back into one product, so `osplit2` and `dsplit2` compile to `base`'s kernels);
- `cublas`, `tritononly`, `cublaslt`, `warpspec`, `exhaustive`: XLA options of the compile (cuBLAS
  for every GEMM, Triton for every GEMM, cuBLASLt instead of cuBLAS, Triton warp specialization,
  the exhaustive Triton tiling search);
- `cudnn1`, `cudnn2`, `cudnn3`: cuDNN GEMM fusions autotuned beside Triton's, at that level;
- `heroless`, `tritonmof`, `fusionautotune`: XLA's experimental fusion options that could take
  elementwise neighbours (the residual add, the norm) into the GEMMs' Triton fusions: Triton fusions
  without a hero in priority fusion, Triton multi-output fusions, the fusion autotuner.

XLA keeps its autotuning results for the life of the process, so a variant that only changes
autotuning (`exhaustive`, `tritononly`, `cublaslt`, `cudnn*`) must run in a process of its own to mean
anything; the order of variants in one process also shows as drift of about 1%: run `base`
again at the end. Variants combine with `+` (`swiglu_exp+split8`): their changes merged, later
ones winning.
"""

import dataclasses
import functools
import hashlib
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import environment, write_json
from models import ModelConfig, random_model
from models.attention import AttentionMetadata
from models.kernels import pallas_gpu, reference
from models.kv_cache import allocate_kv_cache
from sharding import Placement, make_mesh

PAGE = 16
TABLE_WIDTH = 128  # block-table width, as the engine's at max_model_len 2048
# (rows, token bucket, context)
CASES = ((1, 4, 256), (1, 4, 1024), (192, 192, 1024))
if os.environ.get("STEP_CASES"):
    CASES = tuple(tuple(int(n) for n in case.split("x")) for case in os.environ["STEP_CASES"].split(","))
PROFILE = bool(os.environ.get("STEP_PROFILE"))  # also the GPU time per kernel of each case (a jax.profiler trace)
SMOKE = bool(os.environ.get("BENCH_SMOKE"))  # the tiny preset on the CPU: checks the script only
FUSED_MATMUL = reference.fused_matmul  # the projections' op as written (the "xla" backend runs it)


def norm_scale(x, w, *, norm_weight=None, eps=1e-6, swiglu=False, bias=None, residual=None):
    """`reference.fused_matmul` with the RMSNorm as a row scale on the product."""
    if norm_weight is None:
        return FUSED_MATMUL(x, w, eps=eps, swiglu=swiglu, bias=bias, residual=residual)
    x32 = x.astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)  # (T, 1)
    out = jnp.tensordot(x * norm_weight, w, axes=1, preferred_element_type=jnp.float32)
    out = (out * r.reshape(r.shape + (1,) * (out.ndim - 2))).astype(x.dtype)
    out = out if bias is None else out + bias
    return out if residual is None else residual + out


def split_k(x, w, *, norm_weight=None, eps=1e-6, swiglu=False, bias=None, residual=None, o=1, down=1,
            inner=FUSED_MATMUL):
    """`inner`, with the o projection (x of shape (T, H, D)) or down (`swiglu`) as `o` / `down` products
    over slices of the contraction (a batched product, `n` times the output tiles), summed in float32
    before the rounding and the residual add."""
    n = down if swiglu else o if x.ndim == 3 else 1
    if n == 1 or residual is None:
        return inner(x, w, norm_weight=norm_weight, eps=eps, swiglu=swiglu, bias=bias, residual=residual)
    if swiglu:
        x = jax.nn.silu(x[:, 0]) * x[:, 1]
    t, e = x.shape[0], w.shape[-1]
    parts = jnp.einsum("tsk,ske->ste", x.reshape(t, n, -1), w.reshape(n, -1, e), preferred_element_type=jnp.float32)
    out = parts.sum(axis=0).astype(x.dtype)
    out = out if bias is None else out + bias
    return residual + out


def swiglu_exp(x, w, *, norm_weight=None, eps=1e-6, swiglu=False, bias=None, residual=None,
               inner=FUSED_MATMUL):
    """`inner` with SwiGLU written with exp only."""
    if not swiglu:
        return inner(x, w, norm_weight=norm_weight, eps=eps, bias=bias, residual=residual)
    g, u = x[:, 0].astype(jnp.float32), x[:, 1].astype(jnp.float32)
    h = (g * u / (1.0 + jnp.exp(-g))).astype(x.dtype)
    return FUSED_MATMUL(h, w, bias=bias, residual=residual)


VARIANTS = {
    "base": {},
    "normscale": {"matmul": norm_scale},
    "swiglu_exp": {"matmul": swiglu_exp},
    "both": {"matmul": functools.partial(swiglu_exp, inner=norm_scale)},
    **{f"split{n}": {"decode": {"num_splits": n}} for n in (1, 2, 4, 6, 8, 16)},
    **{f"kv{n}": {"decode": {"block_kv": n}} for n in (16, 32, 128)},
    **{f"osplit{n}": {"split": {"o": n}} for n in (2, 4)},
    **{f"dsplit{n}": {"split": {"down": n}} for n in (2, 4)},
    "warps2": {"decode": {"num_warps": 2}},
    "warps8": {"decode": {"num_warps": 8}},
    "stages2": {"decode": {"num_stages": 2}},
    "stages4": {"decode": {"num_stages": 4}},
    "cublas": {"options": {"xla_gpu_enable_triton_gemm": False}},
    "tritononly": {"options": {"xla_gpu_cublas_fallback": False}},
    "cublaslt": {"options": {"xla_gpu_enable_cublaslt": True}},
    "warpspec": {"options": {"xla_gpu_experimental_enable_triton_warp_specialization": True}},
    "exhaustive": {"options": {"xla_gpu_exhaustive_tiling_search": True}},
    **{f"cudnn{n}": {"options": {"xla_gpu_cudnn_gemm_fusion_level": n}} for n in (1, 2, 3)},
    "heroless": {"options": {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True}},
    "tritonmof": {"options": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True}},
    "fusionautotune": {"options": {"xla_gpu_experimental_enable_fusion_autotuner": True}},
}


def combined(name: str) -> dict:
    """The variant `name`, or the variants of `a+b+...` merged (decode-config and XLA options key by key)."""
    merged = {}
    for part in name.split("+"):
        for key, value in VARIANTS[part].items():
            merged[key] = {**merged[key], **value} if isinstance(value, dict) and key in merged else value
    return merged


def metadata(rows: int, bucket: int, ctx: int) -> dict:
    """`rows` decode rows at context `ctx` in a `bucket`-token step, padded as the runner pads."""
    b = bucket + 1
    per = -(-ctx // PAGE)
    tables = np.zeros((b, TABLE_WIDTH), np.int32)
    tables[:rows, :per] = 1 + np.arange(rows * per, dtype=np.int32).reshape(rows, per)
    pos = np.zeros(bucket, np.int32)
    pos[:rows] = ctx - 1
    slots = np.arange(bucket, dtype=np.int32) % PAGE  # padding writes the trash page
    slots[:rows] = tables[np.arange(rows), (ctx - 1) // PAGE] * PAGE + (ctx - 1) % PAGE
    token_seq = np.full(bucket, b - 1, np.int32)
    token_seq[:rows] = np.arange(rows)
    lens = np.zeros(b, np.int32)
    lens[:rows] = ctx
    qsl = np.full(b + 1, rows, np.int32)
    qsl[: rows + 1] = np.arange(rows + 1)
    fields = dict(positions=pos, slot_mapping=slots, token_seq=token_seq, block_tables=tables, seq_lens=lens,
                  query_start_loc=qsl)
    return {k: jnp.asarray(v) for k, v in fields.items()}


def hlo_kernels(text: str) -> dict:
    """Kernel-launching instructions of an optimized HLO module, and fusions by kind."""
    counts = {}
    for m in re.finditer(r"= \S+ (fusion|custom-call|copy|all-reduce|while|conditional)\(", text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    for m in re.finditer(r" fusion\(.*?kind=(k\w+)", text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def kernel_profile(compiled, state, tokens, cache, fields, steps: int = 5) -> dict:
    """GPU time a step per kernel (us, the 25 longest, with their launches a step), from a trace of
    `steps` steps; the cache the steps return comes back under "cache"."""
    from benchmarks.profile_step import device_kernels, read_trace

    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                logits, cache = compiled(state, tokens, cache, fields)
            jax.block_until_ready(logits)
        kernels = device_kernels(read_trace(trace_dir))
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])[:25]
    return {"cache": cache, **{n[:100]: [round(t["ms"] * 1e3 / steps, 2), t["count"] / steps] for n, t in top}}


def main() -> None:
    out_path, names = sys.argv[1], sys.argv[2:] or list(VARIANTS)
    cfg = ModelConfig.tiny() if SMOKE else ModelConfig.llama31_8b()
    mesh = make_mesh(1, 1)
    model = random_model(cfg, jnp.bfloat16, seed=0, place=Placement(mesh, None))
    model.attention_backend = "reference" if SMOKE else "pallas"
    num_pages = max(1 + rows * -(-ctx // PAGE) for rows, _, ctx in CASES)

    def zeroed_cache():  # placed as the step returns it, so every variant compiles for the same input
        return allocate_kv_cache(cfg, num_pages, PAGE, jnp.bfloat16, NamedSharding(mesh, P()))

    cache = zeroed_cache()
    graphdef, state = nnx.split(model)
    result = {**environment(), "cases": [list(c) for c in CASES], "variants": {}}

    def step(state, tokens, cache, fields):
        m = nnx.merge(graphdef, state)
        hidden, cache = m(tokens, cache, AttentionMetadata(**fields))
        return m.logits(hidden[:1]), cache

    first_logits = {}  # case -> the first variant's logits of one step from a zeroed cache

    def run(variant: dict, res: dict) -> None:
        nonlocal cache
        for rows, bucket, ctx in CASES:
            fields, tokens = metadata(rows, bucket, ctx), jnp.zeros(bucket, jnp.int32)
            start = time.perf_counter()
            lowered = jax.jit(step, donate_argnums=(2,)).lower(state, tokens, cache, fields)
            compiled = lowered.compile(None if SMOKE else variant.get("options"))
            compile_s = time.perf_counter() - start
            key = f"rows{rows}_bucket{bucket}_ctx{ctx}"
            cache = None  # freed before the zeroed one is made: two caches of the 192-row case do not fit
            cache = zeroed_cache()
            logits, cache = compiled(state, tokens, cache, fields)
            logits = np.asarray(logits, np.float32)
            first_logits.setdefault(key, logits)
            diff = float(np.max(np.abs(logits - first_logits[key])))
            for _ in range(3):
                logits, cache = compiled(state, tokens, cache, fields)
            jax.block_until_ready(logits)
            times, (reps, inner) = [], (2, 2) if SMOKE else (15, 10)
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    logits, cache = compiled(state, tokens, cache, fields)
                jax.block_until_ready(logits)
                times.append((time.perf_counter() - t0) / inner * 1e3)
            if PROFILE:
                res_kernels = kernel_profile(compiled, state, tokens, cache, fields)
                cache = res_kernels.pop("cache")
            hlo = compiled.as_text()
            hlo = re.sub(r", metadata=\{[^}]*\}", "", hlo[hlo.index("HloModule"):])  # without source locations
            if os.environ.get("STEP_HLO_DIR"):  # the optimized HLO of each variant and case, to read
                with open(os.path.join(os.environ["STEP_HLO_DIR"], f"{name}_{key}.hlo.txt"), "w") as f:
                    f.write(hlo)
            res[key] = {"ms": statistics.median(times), "min_ms": min(times), "compile_s": compile_s,
                        "kernels": hlo_kernels(hlo), "hlo_sha1": hashlib.sha1(hlo.encode()).hexdigest()[:12],
                        "max_abs_logit_diff_vs_first": diff,
                        "max_abs_logit": float(np.max(np.abs(logits)))}
            if PROFILE:
                res[key]["kernels_us_per_step"] = res_kernels
            print(name, key, res[key], flush=True)

    default_decode = pallas_gpu.DECODE
    for i, name in enumerate(names):
        jax.clear_caches()
        variant = combined(name)
        matmul = variant.get("matmul", FUSED_MATMUL)
        if "split" in variant:
            matmul = functools.partial(split_k, **variant["split"], inner=matmul)
        reference.fused_matmul = matmul  # what models.projection calls
        pallas_gpu.DECODE = dataclasses.replace(default_decode, **variant.get("decode", {}))
        res = {}
        try:
            run(variant, res)
        except Exception as e:  # an option this XLA lacks, an out-of-memory: recorded, the next one runs
            res["error"] = repr(e)[:500]
            print(name, "failed:", res["error"], flush=True)
            cache = zeroed_cache()
        reference.fused_matmul, pallas_gpu.DECODE = FUSED_MATMUL, default_decode
        result["variants"][name if name not in result["variants"] else f"{name} ({i + 1})"] = res  # a rerun keeps both
        write_json(out_path, result)


if __name__ == "__main__":
    main()
