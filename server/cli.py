"""The `pagedjax` command: `generate` (one prompt, offline), `serve` (the HTTP server), `convert` (to Orbax)
and `bench` (the latency, throughput and serve benchmarks of `benchmarks/`).

In a multi-host run (`--num-processes N`), every process runs the same command with
its own `--process-id`; process 0 does the work and the others execute its steps.
"""

import argparse
import os
import runpy
import sys
import typing
from dataclasses import fields

from engine.config import EngineConfig

POOL_FRACTION = 0.95  # of each GPU's memory, for jax's pool, unless the environment sets it


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """One flag per engine config field, named like the field (--max-num-seqs ...)."""
    p.add_argument("--model", help="HF folder, .gguf file or preset name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--config", help="TOML file of engine settings (see configs/)")
    for f in fields(EngineConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name.endswith("_buckets"):
            p.add_argument(flag, type=lambda s: tuple(int(x) for x in s.split(",")), help="comma-separated sizes")
        else:
            base = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
            p.add_argument(flag, type=base, help=f"engine setting {f.name} (default: {f.default})")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = {f.name: getattr(args, f.name) for f in fields(EngineConfig) if getattr(args, f.name, None) is not None}
    if args.config:
        return EngineConfig.from_toml(args.config, **values)
    return EngineConfig(**values)


def cmd_generate(args) -> int:
    from engine import LLM, SamplingParams

    cfg = engine_config(args)
    llm = LLM(model=cfg.model, **{f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "model"})
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            top_p=args.top_p, top_k=args.top_k)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)[0]
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)[0]
    print(out.outputs[0].text)
    return 0


def cmd_convert(args) -> int:
    from engine.source import convert

    out = convert(args.model, args.out, dtype=args.dtype, tokenizer=args.tokenizer, tp=args.tp)
    print(f"wrote {out}; serve it with --model {out}")
    return 0


def cmd_follow(args) -> int:
    """Processes other than 0 of a multi-host run: build the same engine, then run process 0's steps."""
    from engine.engine import LLMEngine

    LLMEngine(engine_config(args), progress=False).follow()
    return 0


BENCHMARKS = ("latency", "throughput", "serve")  # benchmarks/<name>.py, vLLM's `bench` semantics


def cmd_bench(args) -> int:
    """`pagedjax bench NAME ARGS` runs `python -m benchmarks.NAME ARGS` in this process."""
    module = f"benchmarks.{args.benchmark}"
    argv, sys.argv = sys.argv, [module, *args.args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("benchmarks", "engine", "models", "server", "sharding"):
            raise
        print(f"pagedjax: error: `pagedjax bench {args.benchmark}` needs {e.name}: pip install 'pagedjax[bench]'",
              file=sys.stderr)
        return 2
    finally:
        sys.argv = argv
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pagedjax", description="A JAX/XLA serving engine for LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    add_engine_args(g)
    g.add_argument("prompt")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")

    c = sub.add_parser("convert", help="write a checkpoint as an Orbax folder that loads onto any mesh")
    c.add_argument("--model", help="HF folder, .gguf file or preset name (default: SmolLM2-135M-Instruct)")
    c.add_argument("--out", required=True, help="folder to write (served later with --model OUT)")
    c.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="weights dtype (default: auto, bfloat16 on accelerators, float32 on CPU)")
    c.add_argument("--tokenizer", help="tokenizer to store beside the weights (default: the model's own)")
    c.add_argument("--tp", type=int, default=1, help="devices to spread the weights over while converting")

    b = sub.add_parser("bench", help="benchmark: latency, throughput (offline) or serve (HTTP), as vLLM's bench")
    b.add_argument("benchmark", choices=BENCHMARKS)
    b.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's flags (pagedjax bench NAME --help)")

    try:
        from server import serve_cli
    except ImportError:
        serve_cli = None
    if serve_cli is not None:
        serve_cli.add_parser(sub, add_engine_args)

    args = parser.parse_args(argv)
    # jax's GPU memory pool is 75% of the device unless told otherwise. The command owns its device,
    # so its pool is 95% of it, and --memory-utilization is a share of nearly the whole GPU.
    if not {"XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"} & os.environ.keys():
        os.environ["XLA_CLIENT_MEM_FRACTION"] = str(POOL_FRACTION)
    try:
        if args.command == "convert":
            return cmd_convert(args)
        if args.command == "bench":
            return cmd_bench(args)
        if (getattr(args, "process_id", None) or 0) > 0:
            return cmd_follow(args)
        if args.command == "generate":
            return cmd_generate(args)
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pagedjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
