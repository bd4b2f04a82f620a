"""The continuous-batching workload the mesh tests run, on any engine.

Requests arrive over several steps, prompts are short and long (chunked prefill
over a 16-token budget), one asks for two completions (shared prompt pages), and
the page pool is small enough that a single shard preempts. Greedy decoding, so
every mesh must give exactly the tokens one device gives.
"""

from engine import SamplingParams

# Small buckets and pools: one compiled step, quick on two CPU cores.
SMALL = dict(page_size=4, max_num_seqs=3, max_num_batched_tokens=16, token_buckets=(16,), page_buckets=(16,),
             num_pages=12, max_model_len=64)

PROMPTS = [[(7 * i + 3 * j) % 500 + 1 for j in range(n)] for i, n in enumerate((3, 21, 9, 30, 5, 14))]


def run_workload(engine, prompts=PROMPTS, max_tokens: int = 8) -> list[list[list[int]]]:
    """Token ids of every completion of every prompt; a new request joins every second step."""
    params = [SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, n=2 if i == 2 else 1)
              for i in range(len(prompts))]
    finished = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, prompt = pending.pop(0)
            engine.add_request(f"r{i}", prompt, params[i])
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = [c.token_ids for c in out.outputs]
        step += 1
    return [finished[f"r{i}"] for i in range(len(prompts))]
