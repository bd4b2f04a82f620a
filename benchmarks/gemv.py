"""The 8B projections at decode sizes: XLA's product with the weight stored (K, N) or (N, K), and a
Pallas GEMV (Triton back end) over an (N, K) weight, on the GPU.

    python -m benchmarks.gemv OUT.json

Question: would the weight stored transposed, so that a program reading a narrow block of output
columns reads whole rows of K contiguous bytes, let a product of a few rows read its weight faster
than XLA does? For each shape (qkv, o, gate_up, down, the logits) at 16 and 224 rows it times XLA's
product in both layouts, and at 16 rows the Pallas kernel over a sweep of column block, contraction
block, pipeline depth and split-K (in two, summed by XLA), each checked against XLA's float32
product. Timing as `benchmarks/matmul.py`: one jit over COPIES distinct weights (so the L2 cache
holds none of them), the median of 20 timings of 5 calls, in us a product. Rows are also appended
to OUT.jsonl as they come.
"""

import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from benchmarks.common import environment, write_json

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096),
          "logits": (4096, 128256)}  # name: (contraction K, columns N)


def _gemv_kernel(x_ref, w_ref, o_ref, *, bn, bk, ksplit):
    """Columns [pid * bn, +bn) of x @ w.T over this program's share of the contraction."""
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * bn, bn), bn)
    s = pl.program_id(1)
    steps = w_ref.shape[1] // bk // ksplit

    def body(j, acc):
        ks = pl.ds(pl.multiple_of((s * steps + j) * bk, bk), bk)
        return acc + lax.dot_general(x_ref[:, ks], w_ref[cols, ks], (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((x_ref.shape[0], bn), jnp.float32))
    if ksplit == 1:
        o_ref[:, cols] = acc.astype(o_ref.dtype)
    else:
        o_ref[s, :, cols] = acc


def gemv(x, w, bn, bk, warps, stages, ksplit=1, interpret=False):
    """x (M, K) @ w.T for w (N, K); with ksplit > 1, float32 parts summed by XLA."""
    n, _ = w.shape
    m = x.shape[0]
    shape = (m, n) if ksplit == 1 else (ksplit, m, n)
    out = pl.pallas_call(
        functools.partial(_gemv_kernel, bn=bn, bk=bk, ksplit=ksplit), grid=(n // bn, ksplit),
        out_shape=jax.ShapeDtypeStruct(shape, x.dtype if ksplit == 1 else jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages), name=f"gemv_n{bn}_k{bk}_s{ksplit}",
        interpret=interpret,
    )(x, w)
    return out if ksplit == 1 else out.sum(0).astype(x.dtype)


def timed(f, x, ws, reps=20, inner=5):
    g = jax.jit(lambda x, ws: [f(x, w) for w in ws])
    jax.block_until_ready(g(x, ws))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = g(x, ws)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / inner / len(ws))
    return 1e6 * statistics.median(times)


def kernel_configs(name, k, n, m):
    for bn in (16, 32, 64):
        for bk in (128, 256, 512):
            for stages in (3, 4):
                for ksplit in (1, 2) if name in ("qkv", "o", "down") else (1,):
                    if (n // bn > 2048 and bn < 32) or (k // bk) % ksplit or 2 * stages * bk * (bn + m) > 200_000:
                        continue
                    yield dict(bn=bn, bk=bk, warps=4, stages=stages, ksplit=ksplit)


def main(out_path):
    results = []
    bf = jnp.bfloat16
    for name, (k, n) in SHAPES.items():
        copies = 4 if name == "logits" else 16
        keys = jax.random.split(jax.random.key(0), copies + 1)
        w_kn = [jax.random.normal(key, (k, n), bf) for key in keys[:copies]]
        w_nk = [w.T.copy() for w in w_kn]
        mb = k * n * 2 / 1e6
        for m in (16, 224):
            x = jax.random.normal(keys[-1], (m, k), bf)
            ref = np.asarray(jnp.dot(x, w_kn[0], preferred_element_type=jnp.float32))

            def record(variant, us):
                row = dict(shape=name, rows=m, variant=variant, us=round(us, 2), TBps=round(mb / us, 3))
                print(json.dumps(row), flush=True)
                results.append(row)
                with open(out_path + "l", "a") as f:
                    f.write(json.dumps(row) + "\n")

            record("xla_kn", timed(lambda x, w: jnp.dot(x, w), x, w_kn))
            record("xla_nk", timed(lambda x, w: lax.dot_general(x, w, (((1,), (1,)), ((), ()))), x, w_nk))
            if m > 64:
                continue
            for c in kernel_configs(name, k, n, m):
                f = functools.partial(gemv, **c)
                label = f"pallas_n{c['bn']}_k{c['bk']}_w{c['warps']}_s{c['stages']}_ks{c['ksplit']}"
                try:
                    out = np.asarray(jax.jit(f)(x, w_nk[0]), np.float32)
                    err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                    assert err < 1e-2, err
                    record(label, timed(f, x, w_nk))
                except Exception as e:  # a configuration that fails to compile or to match: reported, skipped
                    print("FAIL", name, label, repr(e)[:300], flush=True)
        del w_kn, w_nk
    write_json(out_path, {**environment(), "results": results})


if __name__ == "__main__":
    main(sys.argv[1])
