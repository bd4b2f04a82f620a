"""Latency and offline throughput of one model shape on one engine: one start-up, one result file.

    python -m benchmarks.model_suite --model llama-3.1-8b --case 1x128x256 --ttft-input-len 1024 \\
        --num-prompts 1000 --input-len 1024 --output-len 1024 --max-seconds 90 --warmup-probe \\
        --ceilings roofline.json --out llama-3.1-8b.json [engine flags]

The same measurements as `benchmarks.latency` and `benchmarks.throughput` (see their
docstrings), sharing one engine so the warm-up is paid once. Order: the warm-up probe's
two fresh processes (if asked), then this process's engine, the latency cases, the TTFT
case, and the offline run (its N fitted to `--max-seconds`). The throughput probe, B
prompts at the run's mean context, is also the batch-N decode latency case.
"""

from __future__ import annotations

import argparse

from benchmarks import roofline
from benchmarks.common import add_engine_args, build_engine, engine_config, engine_info, environment, write_json
from benchmarks.latency import add_latency_args, run_latency
from benchmarks.throughput import add_throughput_args, cache_is_empty, run_throughput, with_warmup_probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    add_latency_args(parser)
    add_throughput_args(parser)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    cases = args.cases or [(1, 128, 256)]

    config = engine_config(args)
    config, warmup = with_warmup_probe(config, args)
    ceilings = roofline.load_or_measure(args.ceilings)
    cache_empty = cache_is_empty(config)
    engine = build_engine(config)
    env = environment()
    info = engine_info(engine) | {"compilation_cache_empty_at_start": cache_empty}
    print(f"{config.model}: engine ready (load {info['load_seconds']:.1f} s, warm-up {info['warmup_seconds']:.1f} s, "
          f"{info['num_step_graphs']} step graphs, {info['num_pages']} pages, attention {info['attention_backend']})",
          flush=True)

    def log(line: str) -> None:
        print(f"{config.model}: {line}", flush=True)

    def save(latency, lat_floors, throughput=None, thr_floors=None) -> None:
        """Written after each part, so a run stopped during the offline part keeps its latency figures."""
        n = throughput.get("num_requests") if throughput else None
        workload = {
            "latency": ", ".join(f"{b}x{i}x{o}" for b, i, o in cases),
            "ttft_input_len": args.ttft_input_len or None,
            "offline": f"{n}x{args.input_len}x{args.output_len}" if n else None,
            "offline_requested": f"{args.num_prompts}x{args.input_len}x{args.output_len}",
        }
        write_json(args.out, {
            **env, "kind": "model_suite", "model": config.model, "workload": workload, "engine": info,
            "metrics": {"latency": latency, "throughput": throughput, "warmup": warmup},
            "peer": None,
            "roofline": {"ceilings": ceilings, "latency": {k: v for k, v in lat_floors.items() if k != "ceilings"},
                         "offline": (thr_floors or {}).get("offline")},
        })

    latency, lat_floors = run_latency(engine, cases, ttft_input_len=args.ttft_input_len, repeats=args.repeats,
                                      batch_repeats=args.batch_repeats, ttft_repeats=args.ttft_repeats,
                                      ceilings=ceilings, seed=args.data_seed, log=log)
    save(latency, lat_floors)
    throughput, thr_floors = run_throughput(engine, args, ceilings, log=log)
    save(latency, lat_floors, throughput, thr_floors)


if __name__ == "__main__":
    main()
