"""The device's two ceilings, measured, and the floor each workload has under them.

    python -m benchmarks.roofline --out roofline.json [--models llama-3.2-1b,llama-3.1-8b]

Ceilings, measured in the same run as the figures they bound:

* bandwidth: a large elementwise copy on the device (y = x * 2), bytes read plus bytes
  written over the time;
* matmul rate: one large bf16 (n, n) x (n, n) product through jax, 2 n^3 over the time.

Floors (a workload cannot run faster than its larger term):

* a decode step reads every weight once and the K/V of every row's context:
  (weight bytes + sum of contexts x K/V bytes per token) / bandwidth;
* a prefill computes 2 x (layer params) per token, the LM head for the sampled rows, and
  causal attention 4 x layers x heads x head_dim x sum of visible contexts:
  FLOPs / matmul rate;
* offline throughput at a concurrency B: waves of B requests, each a prefill of its
  prompts plus `out` decode steps at the wave's mean context (input + out / 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import environment, write_json

# ---- ceilings -------------------------------------------------------------------------


def _time_call(fn, inputs, inner: int, reps: int) -> float:
    """Median seconds per call: `reps` repetitions of `inner` back-to-back calls, rotating inputs."""
    for x in inputs[:2]:
        jax.block_until_ready(fn(*x))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn(*inputs[i % len(inputs)]) for i in range(inner)]
        jax.block_until_ready(outs)  # every call: a CPU backend may run independent calls concurrently
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_ceilings(copy_mib: int | None = None, matmul_n: int | None = None) -> dict:
    """Copy bandwidth (TB/s) and bf16 matmul rate (TFLOP/s) of the first device.

    Sizes default by platform: 1 GiB read + 1 GiB written and n = 8192 on an accelerator
    (far beyond any cache, long enough to fill the chip); 64 MiB and n = 1024 on a CPU.
    """
    cpu = jax.devices()[0].platform == "cpu"
    copy_mib = copy_mib or (64 if cpu else 1024)
    matmul_n = matmul_n or (1024 if cpu else 8192)
    keys = jax.random.split(jax.random.key(0), 4)

    n_elems = copy_mib * (1 << 20) // 4
    xs = [(jax.random.normal(k, (n_elems,), jnp.float32),) for k in keys[:2]]
    copy_s = _time_call(jax.jit(lambda x: x * 2), xs, inner=10, reps=7)
    copy_bytes = 2 * n_elems * 4

    n = matmul_n
    ab = [(jax.random.normal(keys[2], (n, n), jnp.bfloat16), jax.random.normal(keys[3], (n, n), jnp.bfloat16)),
          (jax.random.normal(keys[3], (n, n), jnp.bfloat16), jax.random.normal(keys[2], (n, n), jnp.bfloat16))]
    mm_s = _time_call(jax.jit(jnp.dot), ab, inner=10 if cpu else 20, reps=7)
    return {
        "copy_TBps": copy_bytes / copy_s / 1e12,
        "matmul_TFLOPs": 2 * n**3 / mm_s / 1e12,
        "copy": {"bytes_moved": copy_bytes, "median_ms": copy_s * 1e3, "op": "float32 y = x * 2, read + write"},
        "matmul": {"n": n, "dtype": "bfloat16", "median_ms": mm_s * 1e3, "flops": 2 * n**3},
        "timing": "median of 7 repetitions of back-to-back calls on two rotating inputs, after warm-up",
    }


def load_or_measure(path: str | None) -> dict:
    """Ceilings from a roofline JSON written earlier in the same run, else measured now."""
    if path:
        import json

        with open(path) as f:
            data = json.load(f)
        return data["ceilings"]
    return measure_ceilings()


# ---- bytes and FLOPs ------------------------------------------------------------------


def weight_bytes(cfg, itemsize: int) -> int:
    """Bytes of weights one step reads: all of them, except an untied embedding table (only its rows are gathered)."""
    untied_embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (cfg.num_params - untied_embed) * itemsize


def kv_bytes_per_token(cfg, itemsize: int) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def _layer_params(cfg) -> int:
    """Weights of the layers' matmuls (norm weights left out: they scale, they do not multiply-add)."""
    embed = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
    return cfg.num_params - embed - norms


def step_flops(cfg, tokens: int, sampled_rows: int, attended: int) -> float:
    """FLOPs of one step: `tokens` through the layers, LM head on `sampled_rows`, and
    `attended` = sum over tokens of the context each one sees (QK^T and PV)."""
    linear = 2 * _layer_params(cfg) * tokens + 2 * cfg.vocab_size * cfg.hidden_size * sampled_rows
    attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended
    return linear + attention


def decode_step_floor(cfg, itemsize: int, contexts: list[int] | tuple[int, int], ceilings: dict) -> dict:
    """Floor of one decode step; `contexts` is either every row's context or (rows, mean context)."""
    rows, total_ctx = (contexts[0], contexts[0] * contexts[1]) if isinstance(contexts, tuple) else (
        len(contexts), sum(contexts))
    nbytes = weight_bytes(cfg, itemsize) + kv_bytes_per_token(cfg, itemsize) * total_ctx
    flops = step_flops(cfg, rows, rows, total_ctx)
    t_mem = nbytes / (ceilings["copy_TBps"] * 1e12)
    t_fl = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return {"bytes": nbytes, "flops": flops, "memory_ms": t_mem * 1e3, "compute_ms": t_fl * 1e3,
            "floor_ms": max(t_mem, t_fl) * 1e3, "bound": "memory" if t_mem >= t_fl else "compute"}


def prefill_floor(cfg, itemsize: int, prompt_len: int, num_prompts: int, ceilings: dict) -> dict:
    """Floor of prefilling `num_prompts` fresh prompts of `prompt_len` tokens (causal)."""
    attended = num_prompts * prompt_len * (prompt_len + 1) // 2
    flops = step_flops(cfg, num_prompts * prompt_len, num_prompts, attended)
    nbytes = weight_bytes(cfg, itemsize) + kv_bytes_per_token(cfg, itemsize) * num_prompts * prompt_len
    t_mem = nbytes / (ceilings["copy_TBps"] * 1e12)
    t_fl = flops / (ceilings["matmul_TFLOPs"] * 1e12)
    return {"bytes": nbytes, "flops": flops, "memory_ms": t_mem * 1e3, "compute_ms": t_fl * 1e3,
            "floor_ms": max(t_mem, t_fl) * 1e3, "bound": "memory" if t_mem >= t_fl else "compute"}


def offline_floor(cfg, itemsize: int, num_prompts: int, input_len: int, output_len: int, concurrency: int,
                  ceilings: dict) -> dict:
    """Floor of an offline run of `num_prompts` x (input_len in, output_len out) at `concurrency` rows."""
    total_s, left = 0.0, num_prompts
    while left > 0:
        b = min(left, concurrency)
        total_s += prefill_floor(cfg, itemsize, input_len, b, ceilings)["floor_ms"] / 1e3
        step = decode_step_floor(cfg, itemsize, (b, input_len + output_len // 2), ceilings)
        total_s += (output_len - 1) * step["floor_ms"] / 1e3
        left -= b
    out_tokens = num_prompts * output_len
    return {"floor_s": total_s, "output_tok_s": out_tokens / total_s,
            "total_tok_s": num_prompts * (input_len + output_len) / total_s, "concurrency": concurrency,
            "note": f"waves of {concurrency} requests: prefill, then {output_len - 1} decode steps at the "
                    f"mean context {input_len + output_len // 2}"}


def workload_floors(cfg, itemsize: int, ceilings: dict, *, batch1_context: int = 256, ttft_len: int = 1024,
                    offline=(1000, 1024, 1024), concurrency: int = 256) -> dict:
    """The floors of the headline workloads for one model shape."""
    d1 = decode_step_floor(cfg, itemsize, [batch1_context], ceilings)
    return {
        "weight_bytes": weight_bytes(cfg, itemsize),
        "kv_bytes_per_token": kv_bytes_per_token(cfg, itemsize),
        "batch1_decode": {**d1, "context": batch1_context, "tok_s": 1e3 / d1["floor_ms"]},
        f"ttft_{ttft_len}": prefill_floor(cfg, itemsize, ttft_len, 1, ceilings),
        "offline": {"num_prompts": offline[0], "input_len": offline[1], "output_len": offline[2],
                    **offline_floor(cfg, itemsize, *offline, concurrency, ceilings)},
    }


def decode_attention_floor(ceilings: dict, batch=256, context=1536, kv_heads=8, head_dim=128, itemsize=2) -> dict:
    """The issue's decode-attention shape: K and V of every row's context read once."""
    nbytes = 2 * batch * context * kv_heads * head_dim * itemsize
    return {"bytes": nbytes, "floor_ms": nbytes / (ceilings["copy_TBps"] * 1e12) * 1e3,
            "shape": f"batch {batch}, context {context}, {kv_heads} KV heads, head_dim {head_dim}, bf16"}


def main() -> None:
    from engine.source import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--models", default="llama-3.2-1b,llama-3.1-8b", help="comma-separated presets")
    parser.add_argument("--copy-mib", type=int, help="size of the copied array (default by platform)")
    parser.add_argument("--matmul-n", type=int, help="matmul size (default by platform)")
    args = parser.parse_args()

    env = environment()
    ceilings = measure_ceilings(args.copy_mib, args.matmul_n)
    print(f"{env['device']}: copy {ceilings['copy_TBps']:.3g} TB/s, "
          f"bf16 matmul {ceilings['matmul_TFLOPs']:.0f} TFLOP/s", flush=True)
    floors = {}
    for name in args.models.split(","):
        cfg = PRESETS[name]()
        floors[name] = workload_floors(cfg, 2, ceilings)
        f = floors[name]
        print(f"{name}: batch-1 decode floor {f['batch1_decode']['tok_s']:.0f} tok/s, "
              f"TTFT@1024 floor {f['ttft_1024']['floor_ms']:.1f} ms, "
              f"offline 1000x1024x1024 floor {f['offline']['output_tok_s']:.0f} out tok/s", flush=True)
    write_json(args.out, {**env, "kind": "roofline", "workload": "device ceilings and workload floors",
                          "metrics": ceilings, "ceilings": ceilings, "floors": floors,
                          "decode_attention": decode_attention_floor(ceilings), "peer": None,
                          "roofline": {"ceilings": ceilings}})


if __name__ == "__main__":
    main()
