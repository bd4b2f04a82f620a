"""Latency through the engine: decode time per token at batch 1 and batch N, and time to first token.

    python -m benchmarks.latency --model llama-3.2-1b --case 1x128x256 --case 64x1024x16 \\
        --ttft-input-len 1024 --out latency.json [engine flags: --max-num-seqs ... as for pagedjax serve]

A case `BxIxO` submits B prompts of I random token ids at once, each asking for exactly
O tokens (ignore_eos, temperature 1 as in vLLM's `bench latency`), and steps the engine
until all finish. One untimed run of the same shape comes first (warm-up); then, over
`--repeats` runs (`--batch-repeats` when B > 1):

* `e2e_latency_ms`: submission to the last request's end (vLLM `bench latency`'s figure);
* `ttft_ms`: submission to each request's first token, mean over the batch;
* `decode_step_ms`: time per decode step, over the engine steps in which every request
  decoded (all prefills done, none finished yet): their total duration over the decode
  steps they made (a call that fused k decode steps counts k); `decode_tok_s` = B / step;
  at B = 1 this is the batch-1 decode speed (`1000 / decode_step_ms` tokens/s);
* `tpot_ms`: (E2EL - TTFT) / (O - 1) per request, as vLLM defines it.

The TTFT case (`--ttft-input-len L`): one prompt of L tokens on an idle engine, one output
token, the median over `--ttft-repeats` after one untimed run.

Figures are medians over repeats; each comes with its floor from the measured ceilings
(`--ceilings` reads them from a `benchmarks.roofline` result of the same run).
"""

from __future__ import annotations

import argparse
import re

import numpy as np

from benchmarks import roofline
from benchmarks.common import (add_engine_args, build_engine, drive, engine_config, engine_info, environment, median,
                               random_prompts, stats_ms, write_json)
from engine.params import SamplingParams


def parse_case(text: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", text)
    if not m or min(map(int, m.groups())) < 1:
        raise argparse.ArgumentTypeError(
            f"a case is BATCHxINPUTxOUTPUT with positive numbers, e.g. 1x128x256 (got {text!r})")
    return tuple(int(g) for g in m.groups())


def sampling_params(output_len: int):
    """Exactly `output_len` tokens, sampled at temperature 1 (as vLLM's latency and throughput benchmarks)."""
    return SamplingParams(temperature=1.0, top_p=1.0, max_tokens=output_len, ignore_eos=True)


def _decode_steps(run) -> list[tuple[float, int]]:
    """(duration, decode steps made) of the engine steps where every request of the run decoded
    the same number of tokens (1, or k for a call that fused k decode steps)."""
    reqs = run.requests.values()
    all_started = max(r.first for r in reqs)
    first_done = min(r.finish for r in reqs)
    n_req = len(run.requests)
    return [(t1 - t0, n // n_req) for t0, t1, n in run.steps
            if t0 >= all_started and t1 <= first_done and n and n % n_req == 0]


def measure_case(engine, batch: int, input_len: int, output_len: int, repeats: int, seed: int = 0,
                 warmup: bool = True) -> dict:
    """Time `repeats` runs of `batch` prompts x (input_len in, output_len out), after one untimed run."""
    vocab = engine.model_config.vocab_size
    params = sampling_params(output_len)
    if warmup:
        drive(engine, random_prompts(batch, input_len, vocab, seed + 999), params)
    e2e, ttft, ttft_last, steps, tpots, preemptions = [], [], [], [], [], 0
    for r in range(repeats):
        run = drive(engine, random_prompts(batch, input_len, vocab, seed + r), params)
        reqs = list(run.requests.values())
        if any(t.num_output != output_len for t in reqs):
            raise RuntimeError(f"expected {output_len} output tokens per request, got "
                               f"{sorted({t.num_output for t in reqs})}")
        e2e.append(max(t.finish for t in reqs) - run.start)
        ttft.append(float(np.mean([t.first - t.added for t in reqs])))
        ttft_last.append(max(t.first for t in reqs) - run.start)
        steps += _decode_steps(run)
        if output_len > 1:
            tpots += [(t.finish - t.first) / (output_len - 1) for t in reqs]
        preemptions += run.num_preemptions
    step_ms = sum(d for d, _ in steps) / sum(k for _, k in steps) * 1e3 if steps else None
    return {
        "batch": batch, "input_len": input_len, "output_len": output_len, "repeats": repeats,
        "e2e_latency_ms": median(e2e) * 1e3, "e2e_latency_ms_all": [x * 1e3 for x in e2e],
        "ttft_ms": median(ttft) * 1e3,
        "last_first_token_ms": median(ttft_last) * 1e3,  # when the whole batch had been prefilled
        "decode_step_ms": step_ms, "decode_steps_timed": len(steps),
        "decode_step_ms_stats": stats_ms([d / k for d, k in steps]),  # per decode step, by engine step
        "decode_tok_s": batch * 1e3 / step_ms if step_ms else None,
        "tpot_ms": stats_ms(tpots),
        "num_preemptions": preemptions,
    }


def measure_ttft(engine, input_len: int, repeats: int, seed: int = 0) -> dict:
    """One prompt of `input_len` tokens on an idle engine, one output token; median over repeats."""
    vocab = engine.model_config.vocab_size
    drive(engine, random_prompts(1, input_len, vocab, seed + 999), sampling_params(1))  # warm-up, untimed
    times = []
    for r in range(repeats):
        run = drive(engine, random_prompts(1, input_len, vocab, seed + 100 + r), sampling_params(1))
        t = next(iter(run.requests.values()))
        times.append(t.first - t.added)
    return {"input_len": input_len, "repeats": repeats, "ttft_ms": median(times) * 1e3,
            "ttft_ms_stats": stats_ms(times)}


def run_latency(engine, cases, *, ttft_input_len: int | None, repeats: int, batch_repeats: int, ttft_repeats: int,
                ceilings: dict, seed: int = 0, log=print) -> tuple[dict, dict]:
    """(metrics, roofline) for the cases and the TTFT case on one engine."""
    cfg, itemsize = engine.model_config, np.dtype(engine.dtype).itemsize
    metrics, floors = {"cases": []}, {"cases": []}
    for batch, inp, out in cases:
        m = measure_case(engine, batch, inp, out, repeats if batch == 1 else batch_repeats, seed)
        floor = roofline.decode_step_floor(cfg, itemsize, (batch, inp + out // 2), ceilings)
        m["decode_step_floor_ms"] = floor["floor_ms"]
        metrics["cases"].append(m)
        floors["cases"].append({"case": f"{batch}x{inp}x{out}", "decode_step": floor,
                                "decode_tok_s": batch * 1e3 / floor["floor_ms"]})
        log(f"latency {batch}x{inp}x{out}: decode {_fmt(m['decode_step_ms'])} ms/step "
            f"({_fmt(m['decode_tok_s'])} tok/s; floor {floor['floor_ms']:.2f} ms), "
            f"TTFT {m['ttft_ms']:.1f} ms, e2e {m['e2e_latency_ms']:.0f} ms")
    if ttft_input_len:
        t = measure_ttft(engine, ttft_input_len, ttft_repeats, seed)
        floor = roofline.prefill_floor(cfg, itemsize, ttft_input_len, 1, ceilings)
        t["ttft_floor_ms"] = floor["floor_ms"]
        metrics["ttft"] = t
        floors["ttft"] = floor
        log(f"latency TTFT@{ttft_input_len}: {t['ttft_ms']:.1f} ms (floor {floor['floor_ms']:.1f} ms)")
    return metrics, {"ceilings": ceilings, **floors}


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", dest="cases", action="append", type=parse_case,
                   help="BATCHxINPUTxOUTPUT, repeatable (default: 1x128x256)")
    p.add_argument("--ttft-input-len", type=int, default=1024, help="prompt length of the TTFT case (0: skip it)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each batch-1 case")
    p.add_argument("--batch-repeats", type=int, default=1, help="timed runs of each case with batch > 1")
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument("--data-seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--ceilings", help="a benchmarks.roofline JSON of this run (default: measure now)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    add_latency_args(parser)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    args = parser.parse_args()
    cases = args.cases or [(1, 128, 256)]

    config = engine_config(args)
    ceilings = roofline.load_or_measure(args.ceilings)
    engine = build_engine(config)
    env = environment()
    metrics, floors = run_latency(engine, cases, ttft_input_len=args.ttft_input_len, repeats=args.repeats,
                                  batch_repeats=args.batch_repeats, ttft_repeats=args.ttft_repeats,
                                  ceilings=ceilings, seed=args.data_seed)
    workload = ", ".join(f"{b}x{i}x{o}" for b, i, o in cases) + (
        f"; TTFT at {args.ttft_input_len}" if args.ttft_input_len else "")
    write_json(args.out, {**env, "kind": "latency", "model": config.model, "workload": workload,
                          "engine": engine_info(engine), "metrics": metrics, "peer": None, "roofline": floors})


if __name__ == "__main__":
    main()
