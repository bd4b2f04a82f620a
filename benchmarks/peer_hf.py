"""The peer: HF transformers on the same random-weight model shape, bf16, on the same GPU.

    python -m benchmarks.peer_hf --model llama-3.1-8b --batch1 128x128 --ttft-input-len 1024 \\
        --cb 32x1024x128 --out peer.json

* `generate` at batch 1 (`--batch1 IxO`): a prompt of I random ids, exactly O new tokens
  (greedy, EOS disabled). `decode_tok_s` = (O - 1) / (time(O tokens) - time(1 token)),
  `e2e_tok_s` = O / time(O tokens); medians over `--repeats` after one untimed run.
* time to first token: `generate` of one token after a prompt of `--ttft-input-len`.
* `generate_batch` (continuous batching, `--cb NxIxO`): N prompts at once. An untimed call
  on a few of them first (with a persistent manager, so its start-up and CUDA-graph
  capture are paid there); then the timed call. Output and total tokens/s as in
  `benchmarks.throughput`.

The model is a `LlamaForCausalLM` built from a `LlamaConfig` with our preset's shape
(hidden, FFN, layers, heads, KV heads, head_dim, vocabulary, tied embeddings) and
random weights; nothing is downloaded. RoPE scaling is left out: it changes the rotation
frequencies, not the cost. This process imports torch and never jax.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import re
import statistics
import time
import traceback


from benchmarks.common import REPO, environment, random_prompts, write_json

# Preset name -> ModelConfig classmethod: the same table as engine.source.PRESETS (a test keeps them equal).
# models/config.py is loaded on its own, so the torch process does not import jax through the models package.
PRESET_METHODS = {
    "smollm2-135m-random": "smollm2_135m",
    "llama-3.2-1b": "llama32_1b",
    "llama-3.1-8b": "llama31_8b",
    "llama-3.1-70b": "llama31_70b",
    "tiny": "tiny",
}


def model_config(preset: str):
    spec = importlib.util.spec_from_file_location("_pagedjax_model_config", REPO / "models" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if preset not in PRESET_METHODS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESET_METHODS)}")
    return getattr(module.ModelConfig, PRESET_METHODS[preset])()


def build_model(cfg, device: str, dtype_name: str):
    """A random-weight `LlamaForCausalLM` of `cfg`'s shape, created directly on `device`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=8192,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    else:
        kwargs["rope_theta"] = cfg.rope_theta
    hf_config = LlamaConfig(**kwargs)
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.bos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _generate_seconds(model, prompt: list[int], new_tokens: int) -> float:
    import torch

    ids = torch.tensor([prompt], device=model.device)
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    _sync()
    elapsed = time.perf_counter() - t0
    if out.shape[1] - ids.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return elapsed


def measure_generate(model, vocab: int, input_len: int, output_len: int, repeats: int) -> dict:
    prompts = random_prompts(repeats + 1, input_len, vocab, seed=1)
    _generate_seconds(model, prompts[-1], output_len)  # warm-up, untimed
    full = [_generate_seconds(model, p, output_len) for p in prompts[:repeats]]
    first = [_generate_seconds(model, p, 1) for p in prompts[:repeats]]
    t_full, t_first = statistics.median(full), statistics.median(first)
    return {"input_len": input_len, "output_len": output_len, "repeats": repeats,
            "e2e_s": t_full, "e2e_tok_s": output_len / t_full, "ttft_ms": t_first * 1e3,
            "decode_ms_per_token": (t_full - t_first) / (output_len - 1) * 1e3,
            "decode_tok_s": (output_len - 1) / (t_full - t_first)}


def measure_ttft(model, vocab: int, input_len: int, repeats: int) -> dict:
    prompts = random_prompts(repeats + 1, input_len, vocab, seed=2)
    _generate_seconds(model, prompts[-1], 1)
    times = [_generate_seconds(model, p, 1) for p in prompts[:repeats]]
    return {"input_len": input_len, "repeats": repeats, "ttft_ms": statistics.median(times) * 1e3,
            "ttft_ms_all": [t * 1e3 for t in times]}


def measure_generate_batch(model, vocab: int, num_prompts: int, input_len: int, output_len: int) -> dict:
    """Continuous batching: an untimed call on a few prompts (persistent manager), then the timed call.

    The manager is sized for N requests at once from the start (`max_requests_per_batch`);
    left to itself it would size for the few prompts of the untimed call.
    """
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    accepted = inspect.signature(model.generate_batch).parameters
    kwargs = {k: v for k, v in dict(progress_bar=False, persistent_manager=True, record_timestamps=True).items()
              if k in accepted}
    try:
        from transformers.generation import ContinuousBatchingConfig

        if "continuous_batching_config" in accepted:
            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(max_requests_per_batch=num_prompts)
    except (ImportError, TypeError):
        pass
    reuse = "persistent_manager" in kwargs and "continuous_batching_config" in kwargs
    prompts = random_prompts(num_prompts, input_len, vocab, seed=3)

    warmup_s = None
    if reuse:
        t0 = time.perf_counter()
        model.generate_batch(inputs=random_prompts(min(4, num_prompts), input_len, vocab, seed=4),
                             generation_config=gen, **kwargs)
        _sync()
        warmup_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    outputs = model.generate_batch(inputs=prompts, generation_config=gen, **kwargs)
    _sync()
    elapsed = time.perf_counter() - t0
    if "persistent_manager" in kwargs and hasattr(model, "destroy_cached_continuous_batching_manager"):
        model.destroy_cached_continuous_batching_manager()
    outs = list(outputs.values())
    lens = [len(o.generated_tokens) for o in outs]
    total_in, total_out = num_prompts * input_len, sum(lens)
    span = None  # first request created -> last token, when the outputs carry timestamps
    if all(getattr(o, "timestamps", None) for o in outs) and all(hasattr(o, "created_time") for o in outs):
        span = max(o.timestamps[-1] for o in outs) - min(o.created_time for o in outs)
    return {
        "num_requests": num_prompts, "input_len": input_len, "output_len": output_len,
        "elapsed_time": elapsed, "untimed_first_call_s": warmup_s,
        "manager_reused": reuse,  # False: the timed call also paid the manager's start-up
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "requests_per_second": num_prompts / elapsed,
        "tokens_per_second": (total_in + total_out) / elapsed,
        "output_tokens_per_second": total_out / elapsed,
        "generation_span_s": span,
        "output_tokens_per_second_in_span": total_out / span if span else None,
        "output_lens": sorted(set(lens)),
    }


def _pair(text: str, n: int):
    parts = re.fullmatch(r"x".join([r"(\d+)"] * n), text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected {n} numbers joined by 'x', got {text!r}")
    return tuple(int(g) for g in parts.groups())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help=f"preset shape: {', '.join(PRESET_METHODS)}")
    p.add_argument("--batch1", type=lambda s: _pair(s, 2), default=(128, 128), help="INPUTxOUTPUT of the batch-1 case")
    p.add_argument("--ttft-input-len", type=int, default=1024, help="0: skip")
    p.add_argument("--cb", type=lambda s: _pair(s, 3), default=(32, 1024, 128),
                   help="NxINPUTxOUTPUT for generate_batch")
    p.add_argument("--skip-cb", action="store_true", help="leave generate_batch out")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(args.model)
    env = environment(with_jax=False)
    env["device"] = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    env.update(torch_version=torch.__version__, transformers_version=transformers.__version__)

    t0 = time.perf_counter()
    model = build_model(cfg, device, args.dtype)
    _sync()
    metrics: dict = {"model_build_s": time.perf_counter() - t0, "errors": {}}
    print(f"peer {args.model}: model built in {metrics['model_build_s']:.1f} s "
          f"({sum(x.numel() for x in model.parameters()) / 1e9:.2f} B params, {args.dtype}, {device})", flush=True)

    def attempt(name, fn, *a):
        try:
            metrics[name] = fn(*a)
            print(f"peer {args.model}: {name}: " + ", ".join(
                f"{k} {v:.2f}" for k, v in metrics[name].items() if isinstance(v, float)), flush=True)
        except Exception as e:  # a peer that fails is recorded, and the other measurements still run
            metrics["errors"][name] = f"{type(e).__name__}: {e}"[:1000]
            print(f"peer {args.model}: {name} failed:\n{traceback.format_exc()[-2000:]}", flush=True)

    attempt("generate_batch1", measure_generate, model, cfg.vocab_size, *args.batch1, args.repeats)
    if args.ttft_input_len:
        attempt("generate_ttft", measure_ttft, model, cfg.vocab_size, args.ttft_input_len, args.repeats)
    if not args.skip_cb:
        attempt("generate_batch", measure_generate_batch, model, cfg.vocab_size, *args.cb)
    workload = {"batch1": "{}x{}".format(*args.batch1), "ttft_input_len": args.ttft_input_len or None,
                "generate_batch": None if args.skip_cb else "{}x{}x{}".format(*args.cb)}
    write_json(args.out, {**env, "kind": "peer_hf", "model": args.model, "workload": workload, "metrics": metrics,
                          "peer": "HF transformers generate / generate_batch", "roofline": None,
                          "notes": "random weights at the preset's shape; greedy; EOS disabled; RoPE scaling omitted"})


if __name__ == "__main__":
    main()
