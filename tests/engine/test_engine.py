"""End-to-end engine tests on CPU: continuous batching against HF transformers' greedy outputs.

The golden files hold HF `generate(do_sample=False)` token ids (tests/golden/README.md).
Every workload is also run request-by-request, so batching, chunked prefill and
preemption are checked to change nothing.
"""

import json
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from engine.engine import LLMEngine, check_scratch_fits
from engine.config import EngineConfig, EngineConfigError
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


def test_start_up_refuses_a_cache_that_leaves_the_steps_no_scratch():
    llm = _tiny_llm(GOLDEN / "tiny" / TINY[0])
    need = llm.engine.runner.warmup_report["scratch_bytes"]
    assert need > 0  # the logits of the largest bucket, at least
    gib = 1 << 30
    check_scratch_fits({"bytes_limit": 8 * gib, "bytes_in_use": 8 * gib - need}, need, 0.9)  # just fits
    with pytest.raises(EngineConfigError, match=r"lower memory_utilization \(now 0.9\)"):
        check_scratch_fits({"bytes_limit": 8 * gib, "bytes_in_use": 8 * gib - need + 1}, need, 0.9)
    check_scratch_fits({}, need, 0.9)  # no pool (CPU): nothing to check


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
    calls = []  # the sampler variant of each fused call

    class Recorded(dict):
        def __getitem__(self, key):
            calls.append(key[1])
            return super().__getitem__(key)

    llm.engine.runner._fused = Recorded(llm.engine.runner._fused)
    # a nucleus without top-k may reach past the sampler's candidates: those calls take the full sampler;
    # greedy and plain temperature sampling rank nothing (the "plain" sampler)
    nucleus = SamplingParams(temperature=5.0, top_p=0.99, seed=6, max_tokens=n)  # flat: wider than 256 tokens
    assert needs_full_rank(nucleus, llm.engine.model_config.vocab_size)
    top_k = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=n)  # ranks the candidates
    sampled = [SamplingParams(temperature=1.0, seed=5, max_tokens=n), top_k, nucleus]
    with recorded_compiles() as compiles:
        outs = llm.generate([c["prompt_ids"] for c in cases], greedy(n), use_tqdm=False)
        seeded = [[llm.generate([c["prompt_ids"] for c in cases], p, use_tqdm=False) for p in sampled] for _ in range(2)]
    assert set(calls) == {"plain", "ranked", "full"}, calls
    assert [o.outputs[0].token_ids for o in outs] == [c["new_ids"] for c in cases]
    assert compiles == []
    single = _tiny_llm(folder)  # decode_steps 1 on CPU
    again = [single.generate([c["prompt_ids"] for c in cases], p, use_tqdm=False) for p in sampled]
    for run in seeded:
        assert [[x.outputs[0].token_ids for x in o] for o in run] == [[x.outputs[0].token_ids for x in o] for o in again]


def _sequential(engine: LLMEngine) -> None:
    """Make `engine` read every call before it plans the next (what a penalty request forces)."""
    dispatch = engine._dispatch
    engine._dispatch = lambda touched: (got := dispatch(touched)) and (*got[:2], False)


@pytest.mark.parametrize("num_pages", [64, 20])  # 20: a pool so small that sequences are preempted
def test_calls_planned_ahead_give_the_tokens_of_calls_read_one_by_one(num_pages):
    """Calls queued before the call in flight is read (plain steps with prompts and decodes, and
    fused decode calls) give the tokens of an engine that reads each call before planning the
    next, and HF's: sequences end inside a call on stop tokens at different positions and on a
    stop string, one is aborted mid-run, one samples with a seed, and a small pool preempts
    sequences with tokens in flight. No pages are lost and nothing compiles."""
    folder = GOLDEN / "tiny" / "llama3"
    cases = json.loads((folder / "greedy.json").read_text())["cases"]
    stops = [cases[0]["new_ids"][5], cases[1]["new_ids"][10], cases[2]["new_ids"][15]]  # first occurrences
    params = [SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[t], ignore_eos=True) for t in stops]
    params.append(SamplingParams(temperature=1.0, seed=7, max_tokens=22, ignore_eos=True))  # ends inside a call
    stop_text = None

    def run(decode_steps: int, ahead: bool):
        nonlocal stop_text
        engine = LLMEngine(EngineConfig(model=str(folder), tokenizer=str(default_model_path()), dtype="float32",
                                        num_pages=num_pages, max_model_len=64, decode_steps=decode_steps,
                                        **{**SMALL, "max_num_seqs": 5}), progress=False)
        if not ahead:
            _sequential(engine)
        calls, events = {}, []  # per call queued: whether another was in flight, unread, at the time
        for name in ("dispatch", "dispatch_fused"):
            queue = getattr(engine.runner, name)

            def queued(*args, queue=queue, name=name):
                call = queue(*args)
                calls[id(call)] = call
                events.append((name, len(calls) > 1))
                return call
            setattr(engine.runner, name, queued)
        collect = engine.runner.collect
        engine.runner.collect = lambda call: calls.pop(id(call)) and collect(call)
        for i, (c, p) in enumerate(zip(cases, params)):
            engine.add_request(f"r{i}", c["prompt_ids"], p)
        stop_text = engine.tokenizer.decode(cases[3]["new_ids"][12:14])
        engine.add_request("text", cases[3]["prompt_ids"], greedy(24).replace(stop=[stop_text]))
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
        return finished, events, engine.scheduler.num_preemptions_total

    want, events, _ = run(decode_steps=1, ahead=False)
    assert not any(ahead for _, ahead in events)
    got, events, preemptions = run(decode_steps=2, ahead=True)
    assert (preemptions > 0) == (num_pages == 20)
    assert {kind for kind, ahead in events if ahead} == {"dispatch", "dispatch_fused"}, events
    assert sum(a for _, a in events) >= len(events) // 2, f"too few calls were queued ahead: {events}"
    assert got["victim"].finish_reason == "abort"
    for rid, out in want.items():
        if rid != "victim":
            assert (got[rid].token_ids, got[rid].finish_reason, got[rid].stop_reason, got[rid].text) == (
                out.token_ids, out.finish_reason, out.stop_reason, out.text), rid
    assert [len(want[f"r{i}"].token_ids) for i in range(4)] == [6, 11, 16, 22]
    for i in range(3):  # greedy: HF's tokens up to the stop token
        assert want[f"r{i}"].token_ids == cases[i]["new_ids"][:len(want[f"r{i}"].token_ids)]
    assert want["text"].finish_reason == "stop" and want["text"].stop_reason == stop_text
    assert len(want["text"].token_ids) < 24


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
    _, call, _ = engine._inflight
    assert not call.fused and "late-0" in {s.seq_id for _, s in call.scheduled}
