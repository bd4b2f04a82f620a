"""The engine's scheduler alone, driven through the offline workload on the host: how many steps it
makes, how many decode rows they carry, how many sequences it preempts, for a concurrency and a cache.

    python -m benchmarks.schedule --max-num-seqs 224,240,250,256 --cache-tokens 491520 [--num-prompts 1000
        --input-len 1024 --output-len 1024 --max-num-batched-tokens 1024] [--out schedule.json]

No model and no device: `engine.scheduler.Scheduler` plans every step, each planned step counts as
run, and every sampled token is a dummy id (the requests ignore EOS, so only their lengths matter).
The counts are exactly the engine's, one step at a time (the engine may run several decode steps in
one call; the rows and pages of each are the same). A decode step reads every weight once whatever
its rows, so at a fixed amount of work fewer steps means less time: `steps` is what a choice of
concurrency changes, `peak_pages` against `pages` is the memory it leaves.
"""

from __future__ import annotations

import argparse

from benchmarks.common import environment, write_json
from engine.allocator import PageAllocator
from engine.params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig


def simulate(max_num_seqs: int, cache_tokens: int, *, num_prompts: int = 1000, input_len: int = 1024,
             output_len: int = 1024, max_num_batched_tokens: int = 1024, page_size: int = 16) -> dict:
    """Plan the offline run of `num_prompts` x (input_len in, output_len out) to its end."""
    pages = cache_tokens // page_size
    sched = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      max_model_len=input_len + output_len),
                      PageAllocator(pages + 1, page_size), seed=0)  # page 0 is reserved
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0)
    for i in range(num_prompts):
        sched.add_request(str(i), [1] * input_len, params)
    steps = steps_with_prompt = decode_rows = peak = 0
    while sched.has_unfinished():
        plan = sched.schedule()
        if not plan.seqs:  # only released pages of finished sequences
            continue
        sched.advance(plan)
        rows = sum(1 for s in plan.seqs if len(s.token_ids) == 1)
        steps += 1
        decode_rows += rows
        steps_with_prompt += plan.num_tokens > rows
        peak = max(peak, sched.allocator.num_usable_pages - sched.allocator.num_free_pages)
        sched.update(plan, {s.seq_id: 1 for s in plan.seqs if s.sample})
    return {"max_num_seqs": max_num_seqs, "cache_tokens": cache_tokens, "pages": pages, "steps": steps,
            "steps_with_prompt": steps_with_prompt, "mean_decode_rows": decode_rows / steps,
            "preemptions": sched.num_preemptions_total, "peak_pages": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-num-seqs", required=True, help="comma-separated concurrencies")
    p.add_argument("--cache-tokens", type=int, required=True, help="tokens the KV cache holds")
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--out")
    args = p.parse_args()
    runs = []
    for seqs in (int(s) for s in args.max_num_seqs.split(",")):
        runs.append(simulate(seqs, args.cache_tokens, num_prompts=args.num_prompts, input_len=args.input_len,
                             output_len=args.output_len, max_num_batched_tokens=args.max_num_batched_tokens,
                             page_size=args.page_size))
        print(runs[-1], flush=True)
    if args.out:
        write_json(args.out, {**environment(with_jax=False), "kind": "schedule", "runs": runs})


if __name__ == "__main__":
    main()
