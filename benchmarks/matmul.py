"""The decode-step projections: our fused Pallas kernel against XLA's ops, on the GPU.

    python -m benchmarks.matmul --out matmul.json [--rows 16 --rows 64] [--sweep]

For each projection of the Llama-3.1-8B shape (qkv with RMSNorm before it, o with
the residual add after it, gate_up with RMSNorm, down with SwiGLU before and the add
after) it checks the kernel against `reference.fused_matmul` on fresh random inputs,
then times both inside one jit over COPIES distinct weights (so the L2 cache holds
none of them), and reports each one's bandwidth over the weight bytes. `--sweep`
also times other block shapes and pipeline depths.
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import command_line, environment, write_json
from models.kernels import pallas_matmul, reference

COPIES = 16
E, F, H, K, D = 4096, 14336, 32, 8, 128
SHAPES = {  # name: (contraction, columns, prologue, residual)
    "qkv": (E, (H + 2 * K) * D, "norm", False),
    "o": (H * D, E, None, True),
    "gate_up": (E, 2 * F, "norm", False),
    "down": (F, E, "swiglu", True),
}


def inputs(seed, rows, name):
    k, n, prologue, residual = SHAPES[name]
    keys = jax.random.split(jax.random.key(seed), COPIES + 3)
    bf = jnp.bfloat16
    ws = [jax.random.normal(kk, (k, n), bf) * np.float32(k**-0.5).astype(bf) for kk in keys[:COPIES]]
    x = jax.random.normal(keys[-1], (rows, 2, k) if prologue == "swiglu" else (rows, k), bf)
    kw = {"eps": 1e-5, "swiglu": prologue == "swiglu"}
    if prologue == "norm":
        kw["norm_weight"] = (1 + 0.1 * jax.random.normal(keys[-2], (k,))).astype(bf)
    if residual:
        kw["residual"] = jax.random.normal(keys[-3], (rows, n), bf)
    return x, ws, kw


def timed(fn, x, ws, kw, reps=30, inner=5):
    arrays = {a: v for a, v in kw.items() if isinstance(v, jax.Array)}
    static = {a: v for a, v in kw.items() if a not in arrays}  # eps, swiglu: Python values, not traced
    f = jax.jit(lambda x, ws, arrays: [fn(x, w, **arrays, **static) for w in ws])
    jax.block_until_ready(f(x, ws, arrays))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = f(x, ws, arrays)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / (inner * len(ws)))
    return 1e6 * statistics.median(times)


def relative_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def configs(sweep):
    yield {}
    if sweep:
        for block_n in (32, 64, 128):
            for block_k, stages in ((64, 4), (128, 4), (256, 3), (256, 4)):
                yield {"block_n": block_n, "block_k": block_k, "num_stages": stages, "num_warps": 4}
        yield {"block_n": 32, "block_k": 128, "num_stages": 4, "num_warps": 8}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, action="append")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    results = []
    for rows in args.rows or [16]:
        for seed, name in enumerate(SHAPES):
            k, n, prologue, residual = SHAPES[name]
            x, ws, kw = inputs(seed, rows, name)
            gbytes = k * n * 2 / 1e9
            want = reference.fused_matmul(x.astype(jnp.float32), ws[0].astype(jnp.float32),
                                          **{a: (v.astype(jnp.float32) if hasattr(v, "astype") else v) for a, v in kw.items()})
            row = {"rows": rows, "name": name, "k": k, "n": n, "prologue": prologue, "residual": residual,
                   "weight_MB": round(gbytes * 1e3, 1)}
            xla_us = timed(reference.fused_matmul, x, ws, kw)
            row["xla"] = {"us": round(xla_us, 2), "TBps": round(gbytes / xla_us * 1e3, 3),
                          "rel_err": relative_error(reference.fused_matmul(x, ws[0], **kw), want)}
            row["pallas"] = []
            for cfg in configs(args.sweep):
                if cfg and (n % cfg["block_n"] or k % cfg["block_k"] or cfg["num_stages"] * pallas_matmul.stage_bytes(
                        rows, cfg["block_k"], cfg["block_n"], prologue == "swiglu") > 200_000):
                    continue  # does not tile the weight, or its stages overflow shared memory (227 KB)
                fn = functools.partial(pallas_matmul.fused_matmul, **cfg)
                if not pallas_matmul.supports(rows, k, n):
                    continue
                try:
                    err = relative_error(fn(x, ws[0], **kw), want)
                    us = timed(fn, x, ws, kw)
                except Exception as e:  # a block shape Triton cannot compile: report it, go on
                    row["pallas"].append({**cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                row["pallas"].append({**cfg, "us": round(us, 2), "TBps": round(gbytes / us * 1e3, 3), "rel_err": err})
                print(rows, name, cfg or "default", f"{us:.2f} us", f"err {err:.2e}", flush=True)
            results.append(row)
            best = min((p for p in row["pallas"] if "us" in p), key=lambda p: p["us"], default=None)
            print(f"rows {rows} {name:8s} xla {xla_us:7.2f} us ({row['xla']['TBps']} TB/s, err {row['xla']['rel_err']:.1e})"
                  f"  pallas default {row['pallas'][0].get('us')} us  best {best}", flush=True)
            write_json(args.out, {"kind": "matmul", "model": "llama-3.1-8b", "command": command_line(),
                                  **environment(), "copies": COPIES, "results": results})  # after each shape: a
            # run cut short keeps what it measured


if __name__ == "__main__":
    main()
