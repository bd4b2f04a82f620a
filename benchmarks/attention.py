"""Paged attention on the GPU: check the Pallas kernels against the reference, then time both.

    PYTHONPATH=. python benchmarks/attention.py benchmarks/results/attention_h100.json [--sweep]

1. Correctness: random steps (decode, prompt chunks, mixes, padding; GQA 1/3/4; pages
   16..128) through the kernel in bf16 and through the jnp reference in float32 at
   full matmul precision; ||out - ref|| / ||ref|| must stay under 2e-2 (bf16 operands).
   The RoPE + KV-write kernel (models.kernels.pallas_write) against its reference too.
2. Timing: median over repetitions of `INNER` back-to-back calls (asynchronous
   dispatch keeps the GPU busy; block_until_ready on the last), after warm-up.
   Effective bandwidth counts the K/V bytes each token's context needs, read once
   per KV head (what a perfect kernel reads), plus q and the output.
   --sweep also times several block sizes / warps / stages of the kernel; --batches B1,B2,..
   times only the decode kernel at those batch sizes (a partial last wave of programs shows
   as a higher time a row).

Every K/V page of the cache holds random data, and block tables scatter pages at
random, so timing never runs on zeros or on a contiguous cache.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from models.attention import AttentionMetadata
from models.kernels import pallas_gpu, pallas_write, reference

INNER = 10  # calls per timed repetition
REPS = 15  # repetitions; the median is reported
WARMUP = 3


def make_step(rng, rows, *, page_size, spare_rows=1, pad_tokens=0, layout="runner", width=None):
    """Metadata for rows of (cached context, new tokens) with pages scattered at random.

    layout "runner": padding tokens follow qsl[-1] in no row's range (the runner's way);
    "rows": one token per row and qsl = arange (T == B), padding tokens in padding rows.
    """
    ctx = np.asarray([c for c, _ in rows], np.int64)
    new = np.asarray([n for _, n in rows], np.int64)
    need = -(-(ctx + new) // page_size)
    width = width or int(need.max())
    b = len(rows) + spare_rows
    pages = rng.permutation(np.arange(1, need.sum() + 1)).astype(np.int32)
    tables = np.zeros((b, width), np.int32)
    owner = np.repeat(np.arange(len(rows)), need)
    slot = np.arange(need.sum()) - np.repeat(np.cumsum(need) - need, need)
    tables[owner, slot] = pages
    seq_lens = np.zeros(b, np.int32)
    seq_lens[: len(rows)] = ctx + new
    token_seq = np.repeat(np.arange(len(rows)), new)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(ctx, new)])
    qsl = np.concatenate([[0], np.cumsum(new), np.full(spare_rows, new.sum())])
    if layout == "rows":  # each padding token in its own padding row
        assert spare_rows == pad_tokens and (new == 1).all()
        token_seq = np.concatenate([token_seq, len(rows) + np.arange(pad_tokens)])
        qsl = np.arange(b + 1)
    else:
        token_seq = np.concatenate([token_seq, np.full(pad_tokens, b - 1)])
    positions = np.concatenate([positions, np.zeros(pad_tokens, np.int64)])
    t = positions.shape[0]
    meta = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        slot_mapping=jnp.zeros(t, jnp.int32),
        token_seq=jnp.asarray(token_seq, jnp.int32),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens),
        query_start_loc=jnp.asarray(qsl, jnp.int32),
    )
    return meta, int(need.sum()) + 1


def make_inputs(seed, meta, n_pages, *, heads, kv_heads, head_dim, page_size):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    t = meta.positions.shape[0]
    q = jax.random.normal(kq, (t, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(kk, (kv_heads, n_pages, page_size, head_dim), jnp.bfloat16)
    v = jax.random.normal(kv, (kv_heads, n_pages, page_size, head_dim), jnp.bfloat16)
    return q, k, v


def traffic(meta, *, heads, kv_heads, head_dim, tile_tokens=1):
    """Bytes a perfect kernel moves (K/V of each visible context once per query block) and causal FLOPs."""
    pos = np.asarray(meta.positions)
    seq = np.asarray(meta.token_seq)
    lens = np.asarray(meta.seq_lens)
    qsl = np.asarray(meta.query_start_loc)
    live = np.arange(pos.shape[0]) < qsl[-1]
    visible = np.where(live, np.minimum(pos + 1, lens[seq]), 0)
    # K/V are read once per row (the block's last token sees the most) and KV head
    row_ctx = np.zeros(lens.shape[0], np.int64)
    np.maximum.at(row_ctx, seq[live], visible[live])
    kv_bytes = int(row_ctx.sum()) * kv_heads * head_dim * 2 * 2
    qo_bytes = pos.shape[0] * heads * head_dim * 2 * 2
    flops = 4 * int(visible.sum()) * heads * head_dim
    return kv_bytes + qo_bytes, flops


def time_call(fn, *args):
    for _ in range(WARMUP):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPS):
        start = time.perf_counter()
        for _ in range(INNER):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - start) / INNER)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times)}


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def reference_f32(q, k, v, meta, scale):
    with jax.default_matmul_precision("highest"):
        up = [x.astype(jnp.float32) for x in (q, k, v)]
        return jax.jit(functools.partial(reference.paged_attention, scale=scale))(*up, meta)


# ---------------------------------------------------------------------------- checks


CHECKS = [
    # name, rows, heads, kv_heads, head_dim, page_size, step kwargs
    ("decode T==B gqa4 p16", [(int(c), 1) for c in np.linspace(0, 700, 61).astype(int)], 32, 8, 128, 16,
     dict(spare_rows=3, pad_tokens=3, layout="rows")),
    ("decode runner gqa4 p16", [(int(c), 1) for c in np.linspace(5, 2000, 40).astype(int)], 32, 8, 128, 16,
     dict(pad_tokens=24)),
    ("decode small batch (split) gqa3 p32", [(4000, 1), (77, 1), (1234, 1)], 9, 3, 128, 32, dict(pad_tokens=1)),
    ("decode gqa1 p64", [(int(c), 1) for c in np.linspace(1, 900, 33).astype(int)], 8, 8, 64, 64, dict()),
    ("decode gqa4 p128", [(int(c), 1) for c in np.linspace(1, 3000, 20).astype(int)], 16, 4, 128, 128, dict()),
    ("prefill fresh prompts gqa4 p16", [(0, 300), (0, 77), (0, 513)], 32, 8, 128, 16, dict(pad_tokens=134)),
    ("prefill chunks + decode gqa3 p64", [(1000, 200), (5, 1), (333, 64), (0, 1), (64, 17)], 9, 3, 128, 64,
     dict(pad_tokens=13)),
    ("prefill chunk in decode-shaped step gqa4 p32", [(500, 9), (30, 1), (0, 3)], 32, 8, 128, 32,
     dict(spare_rows=20)),
]


def run_checks(rng):
    results = []
    for i, (name, rows, heads, kv_heads, head_dim, page_size, kw) in enumerate(CHECKS):
        meta, n_pages = make_step(rng, rows, page_size=page_size, **kw)
        q, k, v = make_inputs(100 + i, meta, n_pages, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size)
        scale = head_dim**-0.5
        out = jax.jit(functools.partial(pallas_gpu.paged_attention, scale=scale))(q, k, v, meta)
        out = np.asarray(out.astype(jnp.float32))
        ref = np.asarray(reference_f32(q, k, v, meta, scale))
        err = relative_error(out, ref)
        ok = bool(np.isfinite(out).all() and err < 2e-2)
        results.append({"name": name, "tokens": int(q.shape[0]), "rows": int(meta.seq_lens.shape[0]),
                        "rel_error": err, "finite": bool(np.isfinite(out).all()), "ok": ok})
        print(f"check  {name:48s} T={q.shape[0]:5d} B={meta.seq_lens.shape[0]:4d} rel_err={err:.2e} {'ok' if ok else 'FAIL'}")
    return results


WRITE_CASES = [  # name, tokens, kv_heads, group, head_dim, page_size: RoPE + KV write (models.kernels.pallas_write)
    ("write batch-1 bucket, 8B shape", 16, 8, 4, 128, 16),
    ("write mixed step, 8B shape", 1216, 8, 4, 128, 16),
    ("write odd group, tp=2 SmolLM2 shape", 37, 2, 3, 64, 16),
]


def run_write_checks(rng):
    """The fused RoPE + KV-write kernel against the jnp reference on the GPU.

    Not timed here: outside a step the pages are not donated, so every call would also copy
    them; its time inside a step comes from `profile_step`."""
    results = []
    for name, t, kv, g, d, page_size in WRITE_CASES:
        n_pages = 2 + -(-t // page_size)
        slots = jnp.asarray(rng.permutation(np.arange(page_size, n_pages * page_size))[:t], jnp.int32)
        positions = jnp.asarray(rng.integers(0, 2048, t), jnp.int32)
        key = jax.random.key(len(results))
        qkv = jax.random.normal(key, (t, kv, g + 2, d), jnp.float32).astype(jnp.bfloat16)
        pages = jax.random.normal(jax.random.fold_in(key, 1), (2, kv, n_pages, page_size, d), jnp.bfloat16)
        cos, sin = reference.rope_tables(positions, 500000.0 ** (-jnp.arange(0, d, 2) / d))
        args = (qkv, pages[0], pages[1], slots, cos, sin)
        kernel, ref = jax.jit(pallas_write.rope_and_write), jax.jit(reference.rope_and_write)
        (q, k, v), (ref_q, ref_k, ref_v) = kernel(*args), ref(*args)
        f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
        errs = [relative_error(f32(q), f32(ref_q))] + [  # pages compared past the trash page
            relative_error(f32(a)[:, 1:], f32(b)[:, 1:]) for a, b in ((k, ref_k), (v, ref_v))]
        ok = max(errs) < 1e-2
        results.append({"name": name, "tokens": t, "rel_error_q_k_v": errs, "ok": ok})
        print(f"check  {name:48s} T={t:5d} rel_err={max(errs):.2e} {'ok' if ok else 'FAIL'}")
    return results


# ---------------------------------------------------------------------------- timing


def bench_case(name, meta, n_pages, *, heads, kv_heads, head_dim, page_size, configs, seed=0, with_reference=True):
    """Time the reference and the kernel under each (label, config) on one step; also check each."""
    q, k, v = make_inputs(seed, meta, n_pages, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size)
    scale = head_dim**-0.5
    nbytes, flops = traffic(meta, heads=heads, kv_heads=kv_heads, head_dim=head_dim)
    ref = np.asarray(reference_f32(q, k, v, meta, scale))
    shape = {"tokens": int(q.shape[0]), "rows": int(meta.seq_lens.shape[0]), "heads": heads, "kv_heads": kv_heads,
             "head_dim": head_dim, "page_size": page_size, "block_table_width": int(meta.block_tables.shape[1]),
             "mean_seq_len": float(np.asarray(meta.seq_lens)[np.asarray(meta.seq_lens) > 0].mean()),
             "bytes": nbytes, "flops": flops}
    rows = []

    def record(label, fn, extra):
        try:
            t = time_call(fn, q, k, v, meta)
            err = relative_error(np.asarray(fn(q, k, v, meta).astype(jnp.float32)), ref)
        except Exception as e:  # a config the compiler rejects should not end the run
            rows.append({"case": name, "impl": label, "error": f"{type(e).__name__}: {e}"[:500], **extra})
            print(f"time   {name:34s} {label:34s} ERROR {type(e).__name__}: {str(e)[:200]}")
            return
        tbps = nbytes / (t["median_ms"] * 1e-3) / 1e12
        tflops = flops / (t["median_ms"] * 1e-3) / 1e12
        rows.append({"case": name, "impl": label, **t, "tb_per_s": tbps, "tflop_per_s": tflops, "rel_error": err, **extra})
        print(f"time   {name:34s} {label:34s} {t['median_ms']:8.3f} ms  {tbps:5.2f} TB/s  {tflops:6.1f} TFLOP/s  err {err:.1e}")

    if with_reference:
        record("xla reference", jax.jit(functools.partial(reference.paged_attention, scale=scale)), {})
    for label, config in configs:
        if config is None:
            fn = jax.jit(functools.partial(pallas_gpu.paged_attention, scale=scale))
            extra = {"config": "default"}
        else:
            fn = jax.jit(functools.partial(pallas_gpu.paged_attention_kernel, scale=scale, config=config))
            extra = {"config": dataclasses.asdict(config)}
        record(label, fn, extra)
    return {"case": name, "shape": shape, "runs": rows}


def decode_rows(rng, batch, mean_ctx, spread):
    """Decode rows whose context lengths are uniform in mean_ctx +- spread (then one new token)."""
    ctx = rng.integers(mean_ctx - spread, mean_ctx + spread + 1, size=batch) - 1
    return [(int(c), 1) for c in ctx]


def sweep_configs(kind):
    """Configurations around the defaults (run 1 in NOTES-attention.md swept 27 decode ones: 0.58 to 0.66 ms)."""
    if kind == "decode":
        shapes = [(16, 32, 2, 2), (16, 64, 2, 4), (16, 64, 4, 3), (16, 128, 4, 2), (16, 128, 8, 4)]
    else:
        shapes = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3),
                  (128, 64, 8, 2), (128, 128, 8, 2), (128, 64, 8, 3)]
    cfgs = [pallas_gpu.KernelConfig(r, k, None if kind == "decode" else 1, w, st) for r, k, w, st in shapes]
    return [(f"pallas r{c.tile_rows} k{c.block_kv} w{c.num_warps} s{c.num_stages}", c) for c in cfgs]


def run_timings(rng, sweep):
    cases = []
    main = dict(heads=32, kv_heads=8, head_dim=128)
    # 1. The target: decode, batch 256, context ~1536, page 16, 32 q / 8 kv heads, head_dim 128.
    rows = decode_rows(rng, 256, 1536, 256)
    for layout, kw in [("T==B", dict(spare_rows=0, layout="rows")), ("runner T=256 B=257", dict(spare_rows=1))]:
        meta, n_pages = make_step(rng, rows, page_size=16, **kw)
        configs = [("pallas default", None)] + (sweep_configs("decode") if sweep and layout == "T==B" else [])
        cases.append(bench_case(f"decode b256 ctx1536 p16 {layout}", meta, n_pages, page_size=16, configs=configs, **main))
    # 2. Page sizes, same rows.
    for page_size in (32, 64, 128):
        meta, n_pages = make_step(rng, rows, page_size=page_size, spare_rows=1)
        cases.append(bench_case(f"decode b256 ctx1536 p{page_size}", meta, n_pages, page_size=page_size,
                                configs=[("pallas default", None)], **main))
    # 3. Small batches with long contexts: the context split matters here.
    for batch, ctx in [(8, 8192), (32, 4096)]:
        meta, n_pages = make_step(rng, decode_rows(rng, batch, ctx, 0), page_size=16, spare_rows=1)
        configs = [("pallas default", None)] + [
            (f"pallas splits={s}", pallas_gpu.KernelConfig(16, 64, s, 4, 3)) for s in (1, 4, 8, 16)]
        cases.append(bench_case(f"decode b{batch} ctx{ctx} p16", meta, n_pages, page_size=16, configs=configs, **main))
    # 4. Prefill: fresh prompts, chunks after cached context, and a chunk mixed with decode rows.
    prefill_cases = [
        ("prefill 4 prompts x 1024 p16", [(0, 1024)] * 4, 0),
        ("prefill chunk 512 after 3584 cached x2 p16", [(3584, 512)] * 2, 0),
        ("mixed 64 decode (ctx ~1536) + chunk 448 p16", decode_rows(rng, 64, 1536, 256) + [(1024, 448)], 0),
        # the offline 8B run's usual step with prompts: 190 decodes beside two fresh prompts (2048 tokens)
        ("mixed 190 decode (ctx ~1536) + prompts 1024, 834 p16", decode_rows(rng, 190, 1536, 512) + [(0, 1024), (0, 834)], 0),
    ]
    # the prefill tiles without their short tile for few-token query blocks (as before it existed)
    long_only = ("pallas no short tile", dataclasses.replace(pallas_gpu.PREFILL, short_rows=None))
    for name, rows_, pad in prefill_cases:
        meta, n_pages = make_step(rng, rows_, page_size=16, pad_tokens=pad)
        configs = [("pallas default", None), long_only] + (sweep_configs("prefill") if sweep else [])
        cases.append(bench_case(name, meta, n_pages, page_size=16, configs=configs, **main))
    return cases


def cudnn_prompt_timing():
    """Dense causal attention of 4 x 1024 fresh prompts through cuDNN: a ceiling for the prefill kernel."""
    b, t, h, kvh, d = 4, 1024, 32, 8, 128
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(kq, (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(kk, (b, t, kvh, d), jnp.bfloat16)
    v = jax.random.normal(kv, (b, t, kvh, d), jnp.bfloat16)
    out = {"case": "cudnn dense causal 4 x 1024 (no pages)"}
    try:
        fn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        t_ = time_call(fn, q, k, v)
        flops = 4 * b * (t * (t + 1) // 2) * h * d
        out.update(t_, tflop_per_s=flops / (t_["median_ms"] * 1e-3) / 1e12)
        print(f"time   {out['case']:34s} {'cudnn':34s} {t_['median_ms']:8.3f} ms  {out['tflop_per_s']:6.1f} TFLOP/s")
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


def batch_sweep(rng, batches) -> list[dict]:
    """The decode kernel alone at these batch sizes, context 1536 (all equal, then spread +-512):
    time a row, to see whether the last partial wave of programs costs."""
    runs = []
    for spread in (0, 512):
        for batch in batches:
            meta, n_pages = make_step(rng, decode_rows(rng, batch, 1536, spread), page_size=16, spare_rows=1)
            q, k, v = make_inputs(0, meta, n_pages, heads=32, kv_heads=8, head_dim=128, page_size=16)
            t = time_call(jax.jit(functools.partial(pallas_gpu.paged_attention, scale=128**-0.5)), q, k, v, meta)
            nbytes, _ = traffic(meta, heads=32, kv_heads=8, head_dim=128)
            runs.append({"batch": batch, "spread": spread, "ms": t["median_ms"],
                         "us_per_row": t["median_ms"] * 1e3 / batch, "tb_per_s": nbytes / t["median_ms"] / 1e9})
            print(runs[-1], flush=True)
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="where to write the JSON results")
    parser.add_argument("--sweep", action="store_true", help="also time several kernel configurations")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--batches", help="only time the decode kernel at these batch sizes (comma-separated)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    print(f"device {dev.device_kind}, jax {jax.__version__}")
    result = {
        "device": dev.device_kind,
        "platform": dev.platform,
        "jax_version": jax.__version__,
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "timing": f"median of {REPS} repetitions of {INNER} back-to-back calls after {WARMUP} warm-up calls",
        "bytes": "K/V of each row's visible context once per KV head, plus q and output, bf16",
        "impls": "'pallas default' is models.kernels.pallas_gpu.paged_attention (the dispatch the model uses); "
                 "'pallas rR kK wW sS' is one launch of the kernel over all rows with tile_rows R, block_kv K, "
                 "num_warps W, num_stages S; 'xla reference' is models.kernels.reference under jit",
    }
    if args.batches:
        result["batch_sweep"] = batch_sweep(rng, [int(b) for b in args.batches.split(",")])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        return
    if not args.skip_checks:
        result["checks"] = run_checks(rng)
        result["write_checks"] = run_write_checks(rng)
    result["cases"] = run_timings(rng, args.sweep)
    result["cudnn"] = cudnn_prompt_timing()
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    failed = [c["name"] for c in result.get("checks", []) + result.get("write_checks", []) if not c["ok"]]
    print("checks failed: " + ", ".join(failed) if failed else "all checks passed")
    print("\nsummary (median ms, TB/s effective):")
    for case in result["cases"]:
        for r in case["runs"]:
            if "median_ms" in r and r["impl"] in ("xla reference", "pallas default"):
                print(f"  {case['case']:44s} {r['impl']:16s} {r['median_ms']:8.3f} ms {r['tb_per_s']:5.2f} TB/s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
