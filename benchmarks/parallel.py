"""Tensor and data parallelism on several GPUs: latency, throughput, and load times.

    PYTHONPATH=. python benchmarks/parallel.py benchmarks/results/parallel_h200x2.json [--suite 8b,70b,load] [--only NAME,...]
    PYTHONPATH=. python benchmarks/parallel.py /tmp/smoke.json --smoke     # the same code paths, tiny, on CPU

Every measurement runs in its own process (so each starts with empty GPUs) and
prints one JSON line; this script collects them into the results file with the
device, the jax version and the command. An existing results file is added to
(a run of the same name replaced), so the suites can run as separate commands.
Run names: serve-tp1-dp1, serve-tp2-dp1, serve-tp4-dp1, serve-tp1-dp2, batch1-tp2-dp1, write, load-safetensors-tp1, ...

Suites (random weights at the real shapes, bf16):

* `8b`: the Llama-3.1-8B shape at tp = 1, 2, 4 (those the GPUs allow) and dp = 2:
    - batch 1: one 512-token prompt, 256 output tokens; ms/token is the median time
      of a decode step (from one sampled token to the next, ids back on the host);
    - offline throughput: 256 prompts of 512 in / 256 out, ignore_eos, all submitted
      at once; output and total tokens/s over the whole run.
  Goals (issue 5): tp=2 batch-1 ms/token <= 0.6 x tp=1; dp=2 throughput >= 1.9 x dp=1.
* `70b`: the Llama-3.1-70B shape at tp = 2, batch 1 (a 128-token prompt, 128 out),
  against its roofline: the weights one GPU reads per step / its measured bandwidth.
* `load`: the 8B shape written once as an HF safetensors folder and once as an Orbax
  folder (`pagedjax convert`), then each loaded at tp = 1 and tp = 2 (seconds until
  every shard sits on its GPU).

Each figure comes with its floor: batch-1 decode reads every weight once per token,
so the floor is (weight bytes per GPU) / (bandwidth measured here by a 4 GiB copy).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

PAGE_SIZE = 16
# The offline workload (batch 1 uses its lengths too); sequences and token buckets are per data shard.
SERVE = dict(prompt=512, output=256, num_prompts=256, seqs=128, buckets=(16, 128, 512, 2048))
BIG_BATCH1 = dict(prompt=128, output=128, seqs=1, buckets=(16, 128))
SMOKE = dict(prompt=24, output=8, num_prompts=8, seqs=4, buckets=(16, 32))


def run_name(cfg: dict) -> str:
    if cfg["kind"] in ("serve", "batch1"):
        return f"{cfg['kind']}-tp{cfg['tp']}-dp{cfg['dp']}"
    return cfg["kind"] if cfg["kind"] == "write" else f"load-{cfg['source']}-tp{cfg['tp']}"


def configs(suites: list[str], num_gpus: int, smoke: bool = False) -> list[dict]:
    small, big = ("tiny", "tiny") if smoke else ("llama-3.1-8b", "llama-3.1-70b")
    serve, batch1 = (SMOKE, SMOKE) if smoke else (SERVE, BIG_BATCH1)
    out = []
    if "8b" in suites:
        for tp in (1, 2, 4):
            if tp <= num_gpus:
                out.append(dict(kind="serve", preset=small, tp=tp, dp=1, **serve))
        if num_gpus >= 2:
            out.append(dict(kind="serve", preset=small, tp=1, dp=2, **serve))
    if "70b" in suites and num_gpus >= 2:
        out.append(dict(kind="batch1", preset=big, tp=2, dp=1, **batch1))
    if "load" in suites:
        out.append(dict(kind="write", preset=small))
        for tp in (1, 2):
            if tp <= num_gpus:
                out += [dict(kind="load", source="safetensors", tp=tp), dict(kind="load", source="orbax", tp=tp)]
    return out


# ---- measurements (each in its own process) ---------------------------------------------


def _engine(cfg: dict, tokenizer: str):
    from engine.config import EngineConfig
    from engine.engine import LLMEngine

    max_len = cfg["prompt"] + cfg["output"]
    config = EngineConfig(model=cfg["preset"], tokenizer=tokenizer, dtype="bfloat16", tp=cfg["tp"], dp=cfg["dp"],
                          max_model_len=max_len, page_size=PAGE_SIZE, max_num_seqs=cfg["seqs"],
                          max_num_batched_tokens=max(cfg["seqs"], max(cfg["buckets"])),
                          token_buckets=tuple(cfg["buckets"]), page_buckets=(-(-max_len // PAGE_SIZE),))
    return LLMEngine(config, progress=False)


def _weights_bytes_per_gpu(engine) -> int:
    """Bytes of weights the first GPU holds (its shards, and the replicated norms)."""
    import jax

    first = engine.mesh.devices.flat[0]
    return sum(s.data.nbytes for x in jax.tree.leaves(engine.runner.params) for s in x.addressable_shards
               if s.device == first)


def _serve(cfg: dict) -> dict:
    """Batch-1 decode (and, for kind "serve", the offline run) on one engine, with the batch-1 floor."""
    import numpy as np

    from benchmarks import roofline
    from benchmarks.common import synthetic_tokenizer
    from benchmarks.latency import measure_case
    from benchmarks.throughput import measure_throughput
    from engine.source import PRESETS

    ceilings = roofline.measure_ceilings()  # before the KV cache takes the memory
    model_cfg = PRESETS[cfg["preset"]]()
    engine = _engine(cfg, synthetic_tokenizer(model_cfg.vocab_size))
    res = {"load_s": engine.load_seconds, "warmup_s": engine.warmup_seconds, "ceilings": ceilings,
           "weights_bytes_per_gpu": _weights_bytes_per_gpu(engine),
           "batch1": measure_case(engine, 1, cfg["prompt"], cfg["output"], repeats=2)}
    # One GPU's floor, split over the model axis: each GPU reads its 1/tp of the weights and KV.
    one_gpu = roofline.decode_step_floor(model_cfg, np.dtype(engine.dtype).itemsize,
                                         (1, cfg["prompt"] + cfg["output"] // 2), ceilings)
    res["batch1_floor_ms"] = one_gpu["memory_ms"] / cfg["tp"]
    res["batch1_tok_s"] = 1e3 / res["batch1"]["decode_step_ms"]
    res["batch1_floor_tok_s"] = 1e3 / res["batch1_floor_ms"]
    if cfg["kind"] == "serve":
        res["throughput"] = measure_throughput(engine, cfg["num_prompts"], cfg["prompt"], cfg["output"])
    return res


def measure(cfg: dict, workdir: str) -> dict:
    kind = cfg["kind"]
    if kind in ("serve", "batch1"):
        return _serve(cfg)
    if kind == "write":
        return _write_checkpoints(cfg["preset"], workdir)
    if kind == "load":
        import jax
        from flax import nnx

        from engine.config import EngineConfig
        from engine.source import load_model_and_tokenizer
        from sharding import make_mesh

        path = os.path.join(workdir, cfg["source"])
        config = EngineConfig(model=path, dtype="bfloat16", tp=cfg["tp"], tokenizer=os.path.join(workdir, "orbax"))
        t0 = time.perf_counter()
        model = load_model_and_tokenizer(config, make_mesh(1, cfg["tp"]))[0]
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        return {"load_s": time.perf_counter() - t0}
    raise ValueError(f"unknown measurement {kind!r}")


def _write_checkpoints(preset: str, workdir: str) -> dict:
    """The preset's random weights as an HF safetensors folder and as an Orbax folder."""
    import jax
    import numpy as np
    from flax import nnx
    from safetensors.numpy import save_file

    from benchmarks.common import synthetic_tokenizer
    from engine.source import PRESETS, convert

    tokenizer = synthetic_tokenizer(PRESETS[preset]().vocab_size)
    t0 = time.perf_counter()
    orbax_dir = convert(preset, os.path.join(workdir, "orbax"), dtype="bfloat16", tokenizer=tokenizer)
    convert_s = time.perf_counter() - t0

    from models import load_model

    model, cfg = load_model(orbax_dir, "bfloat16")
    ours = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    e = cfg.hidden_size
    folder = os.path.join(workdir, "safetensors")
    os.makedirs(folder, exist_ok=True)
    shard, shard_bytes, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, shard_bytes, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(folder, name))
            index.update({k: name for k in shard})
            shard, shard_bytes, n = {}, 0, n + 1

    for hf_name, spec in type(model).hf_param_map(cfg).items():
        w = np.asarray(jax.device_get(ours[spec.path]))
        if spec.part is not None:  # q of the fused qkv, gate of gate_up, ...
            w = np.take(w, np.arange(spec.part.start, spec.part.stop), axis=spec.axis)
        if hf_name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            w = w.reshape(e, -1).T  # ours (E, ..., N) -> torch Linear (N..., E)
        elif hf_name.endswith("o_proj.weight"):
            w = w.reshape(-1, e).T  # ours (H, D, E) -> (E, H*D)
        elif hf_name.endswith(("_proj.weight",)) or hf_name == "lm_head.weight":
            w = w.T
        elif hf_name.endswith("_proj.bias"):
            w = w.reshape(-1)
        shard[hf_name] = np.ascontiguousarray(w)
        shard_bytes += w.nbytes
        if shard_bytes > 4 << 30:
            flush()
    flush()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": index}, f)
    rope = cfg.rope_scaling
    hf = {"architectures": [cfg.architecture], "vocab_size": cfg.vocab_size, "hidden_size": e,
          "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
          "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
          "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
          "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
          "rope_scaling": None if rope is None else {
              "rope_type": rope.kind, "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
              "high_freq_factor": rope.high_freq_factor,
              "original_max_position_embeddings": rope.original_max_position_embeddings}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)
    sizes = {k: sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(os.path.join(workdir, k)) for x in fs)
             for k in ("orbax", "safetensors")}
    return {"convert_s": convert_s, "bytes": sizes}


# ---- driver ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", help="results JSON to write")
    parser.add_argument("--suite", default="8b,70b,load", help="comma-separated: 8b, 70b, load")
    parser.add_argument("--only", help="comma-separated run names to keep (see above)")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset and a small workload (CPU check)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single measurement, run by the driver
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(json.loads(args.one), args.workdir)), flush=True)
        return 0
    if not args.out:
        parser.error("the results file is required")

    from benchmarks.common import environment

    # This process leaves the GPUs alone (jax would take most of their memory): a child counts them.
    probe = "import jax; print(jax.device_count(), jax.devices()[0].device_kind)"
    count, kind = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                 check=True).stdout.split(maxsplit=1)
    device = f"{count} x {kind.strip()}"
    env = environment(with_jax=False)
    results = {"device": device, "page_size": PAGE_SIZE, "runs": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
        if results["device"] != device:
            parser.error(f"{args.out} holds results of {results['device']}, not of this {device}")
    todo = configs(args.suite.split(","), int(count), args.smoke)
    if args.only:
        keep = set(args.only.split(","))
        if any(name.startswith("load-") for name in keep):
            keep.add("write")  # the loads read the folders it writes (in this command's scratch folder)
        todo = [c for c in todo if run_name(c) in keep]
    workdir = tempfile.mkdtemp(prefix="pagedjax-bench-")
    try:
        for cfg in todo:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg), "--workdir", workdir],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            run = {"name": run_name(cfg), "config": cfg, **env, "wall_s": time.perf_counter() - t0}
            if proc.returncode == 0 and line:
                run["result"] = json.loads(line[len("RESULT "):])
            else:
                run["error"] = (proc.stderr or proc.stdout)[-4000:]
            results["runs"] = [r for r in results["runs"] if r["name"] != run["name"]] + [run]
            print(json.dumps(run), flush=True)
            with open(args.out, "w") as f:  # written after every run, so a cut-off call keeps what it has
                json.dump(results | {"summary": summarize(results["runs"])}, f, indent=2)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def summarize(runs: list[dict]) -> dict:
    """The issue's ratios, from whichever runs succeeded."""
    by = {r["name"]: r["result"] for r in runs if "result" in r}
    out = {}
    tp1, tp2, dp2 = by.get("serve-tp1-dp1"), by.get("serve-tp2-dp1"), by.get("serve-tp1-dp2")
    for name, r in (("8b_tp1", tp1), ("8b_tp2", tp2), ("8b_tp4", by.get("serve-tp4-dp1")), ("8b_dp2", dp2)):
        if r:
            out[f"{name}_batch1_ms_per_token"] = r["batch1"]["decode_step_ms"]
            out[f"{name}_output_tok_s"] = r["throughput"]["output_tokens_per_second"]
    if tp1 and tp2:
        out["8b_tp2_over_tp1_batch1_ms"] = tp2["batch1"]["decode_step_ms"] / tp1["batch1"]["decode_step_ms"]  # <= 0.6
    if tp1 and dp2:
        out["8b_dp2_over_dp1_throughput"] = (dp2["throughput"]["output_tokens_per_second"]
                                             / tp1["throughput"]["output_tokens_per_second"])  # goal >= 1.9
    if (big := by.get("batch1-tp2-dp1")) is not None:
        out["70b_tp2_batch1_tok_s"] = big["batch1_tok_s"]
        out["70b_tp2_batch1_floor_tok_s"] = big["batch1_floor_tok_s"]
    loads = {(r["config"]["source"], r["config"]["tp"]): r["result"]["load_s"]
             for r in runs if "result" in r and r["config"]["kind"] == "load"}
    if loads:
        out["8b_load_s"] = {f"{src}_tp{tp}": s for (src, tp), s in sorted(loads.items())}
    return out


if __name__ == "__main__":
    sys.exit(main())
