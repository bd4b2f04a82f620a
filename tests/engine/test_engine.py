"""End-to-end engine tests on CPU: continuous batching against HF transformers' greedy outputs.

The golden files hold HF `generate(do_sample=False)` token ids (tests/golden/README.md).
Every workload is also run request-by-request, so batching, chunked prefill and
preemption are checked to change nothing.
"""

import json
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.engine import LLMEngine
from engine.config import EngineConfig
from engine.sampling import needs_full_rank
from compiles import recorded_compiles
from models.default import default_model_path

GOLDEN = Path(__file__).parent.parent / "golden"
TINY = sorted(p.name for p in (GOLDEN / "tiny").iterdir() if (p / "greedy.json").exists())

# Small pools and budgets so one workload exercises chunked prefill (prompts longer
# than the 16-token budget), several sequences per step, and preemption.
SMALL = dict(page_size=4, max_num_seqs=3, max_num_batched_tokens=16, token_buckets=(4, 16), page_buckets=(4, 16))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module", params=TINY)
def tiny_case(request):
    folder = GOLDEN / "tiny" / request.param
    golden = json.loads((folder / "greedy.json").read_text())
    return folder, golden


def _tiny_llm(folder, **overrides):
    args = {**SMALL, "num_pages": 64, "max_model_len": 64, **overrides}
    return LLM(model=str(folder), tokenizer=str(default_model_path()), dtype="float32", progress=False, **args)


def test_tiny_batched_equals_hf_and_alone(tiny_case):
    """Together (with chunked prefill and preemption from a small pool), alone, and HF: all equal."""
    folder, golden = tiny_case
    cases = golden["cases"]
    n = golden["max_new_tokens"]
    prompts = [c["prompt_ids"] for c in cases]
    # 15 usable pages of 4 tokens cannot hold three sequences of up to ~54 tokens at once.
    llm = _tiny_llm(folder, num_pages=16)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy(n), use_tqdm=False)]
    assert llm.engine.scheduler.num_preemptions_total > 0
    alone = [llm.generate(p, greedy(n), use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert together == alone
    assert together == [c["new_ids"] for c in cases]
    llm.engine.step()  # finished sequences release their pages at the next step
    llm.engine.allocator.check_invariant([])
    assert llm.engine.allocator.num_free_pages == llm.engine.allocator.num_usable_pages


def test_staggered_arrivals_and_abort():
    folder = GOLDEN / "tiny" / TINY[0]
    golden = json.loads((folder / "greedy.json").read_text())
    cases, n = golden["cases"], golden["max_new_tokens"]
    engine = LLMEngine(EngineConfig(model=str(folder), tokenizer=str(default_model_path()), dtype="float32",
                                    num_pages=64, max_model_len=64, **SMALL), progress=False)
    finished = {}
    step = 0
    pending = list(enumerate(cases))
    engine.add_request("victim", cases[0]["prompt_ids"], greedy(n))
    while pending or engine.has_unfinished_requests():
        if pending and step % 3 == 0:  # a new request every third step
            i, c = pending.pop(0)
            engine.add_request(f"r{i}", c["prompt_ids"], greedy(n))
        if step == 2:
            engine.abort_request("victim")
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
        step += 1
    engine.step()
    assert finished["victim"].outputs[0].finish_reason == "abort"
    for i, c in enumerate(cases):
        assert finished[f"r{i}"].outputs[0].token_ids == c["new_ids"]
        assert finished[f"r{i}"].outputs[0].finish_reason == "length"
    engine.allocator.check_invariant([])
    assert engine.allocator.num_free_pages == engine.allocator.num_usable_pages


def test_nothing_compiles_after_warmup():
    folder = GOLDEN / "tiny" / TINY[0]
    llm = _tiny_llm(folder)
    with recorded_compiles() as compiles:
        mixed = [
            SamplingParams(temperature=0.0, max_tokens=9),
            SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1, max_tokens=7, logprobs=5),
            SamplingParams(temperature=1.0, min_p=0.1, presence_penalty=0.5, repetition_penalty=1.2, max_tokens=11),
            SamplingParams(temperature=0.7, n=2, seed=3, max_tokens=5, min_tokens=3),
        ]
        llm.generate([[5, 6, 7], list(range(1, 40)), [9] * 20, [3, 4]], mixed, use_tqdm=False)
    assert compiles == []


def test_refuses_too_long_prompt():
    folder = GOLDEN / "tiny" / TINY[0]
    llm = _tiny_llm(folder)
    with pytest.raises(ValueError, match="64"):
        llm.generate([1] * 60, SamplingParams(max_tokens=10), use_tqdm=False)


@pytest.mark.slow
def test_smollm2_greedy_matches_hf():
    golden = json.loads((GOLDEN / "smollm2" / "greedy.json").read_text())
    llm = LLM(dtype="float32", max_model_len=256, num_pages=160, max_num_seqs=4, max_num_batched_tokens=64,
              token_buckets=(4, 16, 64), page_buckets=(16,), progress=False)
    cases = golden["cases"]
    outs = llm.generate([c["prompt_ids"] for c in cases],
                        SamplingParams(temperature=0.0, max_tokens=golden["max_new_tokens"]), use_tqdm=False)
    for case, out in zip(cases, outs):
        assert out.outputs[0].token_ids == case["new_ids"], case.get("text")
    france = next(o for c, o in zip(cases, outs) if "France" in c.get("prompt_text", "") or "France" in str(c))
    assert "Paris" in france.outputs[0].text


def test_fused_decode_matches_hf_and_compiles_nothing():
    """Several decode steps per call (when nothing waits) give HF's tokens, and all is compiled up front."""
    folder = GOLDEN / "tiny" / "llama3"
    golden = json.loads((folder / "greedy.json").read_text())
    cases, n = golden["cases"], golden["max_new_tokens"]
    llm = _tiny_llm(folder, decode_steps=4)
    calls = []
    dispatch_fused = llm.engine.runner.dispatch_fused
    llm.engine.runner.dispatch_fused = lambda *a, **kw: calls.append(1) or dispatch_fused(*a, **kw)
    # a nucleus without top-k may reach past the sampler's candidates: those calls take the full sampler
    nucleus = SamplingParams(temperature=5.0, top_p=0.99, seed=6, max_tokens=n)  # flat: wider than 256 tokens
    assert needs_full_rank(nucleus, llm.engine.model_config.vocab_size)
    sampled = [SamplingParams(temperature=1.0, seed=5, max_tokens=n), nucleus]
    with recorded_compiles() as compiles:
        outs = llm.generate([c["prompt_ids"] for c in cases], greedy(n), use_tqdm=False)
        seeded = [[llm.generate([c["prompt_ids"] for c in cases], p, use_tqdm=False) for p in sampled] for _ in range(2)]
    assert calls, "no step was fused"
    assert [o.outputs[0].token_ids for o in outs] == [c["new_ids"] for c in cases]
    assert compiles == []
    single = _tiny_llm(folder)  # decode_steps 1 on CPU
    again = [single.generate([c["prompt_ids"] for c in cases], p, use_tqdm=False) for p in sampled]
    for run in seeded:
        assert [[x.outputs[0].token_ids for x in o] for o in run] == [[x.outputs[0].token_ids for x in o] for o in again]


def test_pipelined_decode_matches_single_steps():
    """Fused decode calls queued behind one another (call N+1 dispatched before N's tokens are
    read) give the tokens of plain single steps, when sequences end inside a call (stop tokens
    at different positions), one is aborted mid-run and one samples with a seed; no pages are
    lost and nothing compiles."""
    folder = GOLDEN / "tiny" / "llama3"
    cases = json.loads((folder / "greedy.json").read_text())["cases"]
    stops = [cases[0]["new_ids"][5], cases[1]["new_ids"][10], cases[2]["new_ids"][15]]  # first occurrences
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[t], ignore_eos=True) for t in stops]
    params.append(SamplingParams(temperature=1.0, seed=7, max_tokens=22, ignore_eos=True))  # ends inside a call

    def run(decode_steps: int):
        engine = LLMEngine(EngineConfig(model=str(folder), tokenizer=str(default_model_path()), dtype="float32",
                                        num_pages=64, max_model_len=64, decode_steps=decode_steps,
                                        **{**SMALL, "max_num_seqs": 5}), progress=False)
        queued = []
        dispatch = engine.runner.dispatch_fused
        engine.runner.dispatch_fused = lambda plans, seqs, steps, after=None: queued.append(  # (rows before, rows now)
            (after and len(after.scheduled), sum(len(p.seqs) for p in plans))) or dispatch(plans, seqs, steps, after)
        for i, (c, p) in enumerate(zip(cases, params)):
            engine.add_request(f"r{i}", c["prompt_ids"], p)
        engine.add_request("victim", cases[0]["prompt_ids"], greedy(24))
        finished, step = {}, 0
        with recorded_compiles() as compiles:
            while engine.has_unfinished_requests():
                if step == 9:
                    engine.abort_request("victim")
                finished |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
                step += 1
        engine.step()
        engine.allocator.check_invariant([])
        assert engine.allocator.num_free_pages == engine.allocator.num_usable_pages
        assert compiles == []
        return finished, queued

    pipelined, queued = run(decode_steps=2)
    single, _ = run(decode_steps=1)
    assert sum(1 for before, _ in queued if before) >= 3, f"too few calls were queued behind another: {queued}"
    assert any(before and now < before for before, now in queued), "no queued call dropped a finished sequence"
    assert pipelined["victim"].finish_reason == "abort"
    for i in range(4):
        got, want = pipelined[f"r{i}"], single[f"r{i}"]
        assert (got.token_ids, got.finish_reason, got.stop_reason) == (want.token_ids, want.finish_reason, want.stop_reason)
    assert [len(single[f"r{i}"].token_ids) for i in range(4)] == [6, 11, 16, 22]


def test_a_request_arriving_during_fused_decode_joins_the_next_call():
    """While a fused decode call runs, what the server hands over (before_schedule) stops the
    chain of fused calls: the next call queued is a plain step that carries the newcomer."""
    folder = GOLDEN / "tiny" / "llama3"
    cases = json.loads((folder / "greedy.json").read_text())["cases"]
    engine = LLMEngine(EngineConfig(model=str(folder), tokenizer=str(default_model_path()), dtype="float32",
                                    num_pages=64, max_model_len=64, decode_steps=2, **{**SMALL, "max_num_seqs": 3}),
                       progress=False)
    engine.add_request("a", cases[0]["prompt_ids"], greedy(20))
    engine.add_request("b", cases[1]["prompt_ids"], greedy(20))
    while not (engine._inflight and engine._inflight[1].fused):
        engine.step()
    engine.step()  # a fused call reads the one before it; the chain goes on without newcomers
    assert engine._inflight[1].fused
    arrivals = [("late", cases[2]["prompt_ids"], greedy(2))]
    engine.step(before_schedule=lambda: arrivals and engine.add_request(*arrivals.pop()))
    _, call = engine._inflight
    assert not call.fused and "late-0" in {s.seq_id for _, s in call.scheduled}
