"""Scheduler: continuous batching, chunked prefill, preemption, prefix sharing for n > 1.

The unit tests walk small scenarios step by step; the state machine at the end drives
random adds, steps, aborts and stop strings under a tiny page pool and checks every
plan against a fake KV cache that records which token each slot holds.
"""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.allocator import PageAllocator
from engine.params import SamplingParams
from engine.scheduler import RequestTooLong, Scheduler, SchedulerConfig, StepPlan
from engine.sequence import PENDING, SequenceStatus

EOS = 5


def make(num_pages=64, page_size=4, max_num_seqs=8, budget=64, max_model_len=64) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=max_model_len)
    return Scheduler(config, PageAllocator(num_pages, page_size), eos_token_ids=frozenset({EOS}), seed=0)


def step(sched: Scheduler, token: int = 1) -> StepPlan:
    """One engine step whose model samples `token` for every sequence."""
    plan = sched.schedule()
    sched.advance(plan)
    sched.update(plan, {s.seq_id: token for s in plan.seqs if s.sample})
    return plan


def shape(plan: StepPlan) -> list[tuple[str, int, int, bool]]:
    return [(s.seq_id, s.start_pos, len(s.token_ids), s.sample) for s in plan.seqs]


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, **kw})


# --- config and admission checks ----------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_model_len": -1}, "max_model_len"),
        ({"max_num_batched_tokens": 1.5}, "max_num_batched_tokens"),
        ({"max_num_seqs": 16, "max_num_batched_tokens": 8}, "max_num_batched_tokens"),
    ],
)
def test_config_names_the_bad_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**kw)


def test_add_request_makes_n_sequences_with_their_own_seeds():
    sched = make()
    seqs = sched.add_request("r", [1, 2, 3], params(n=3, seed=10))
    assert [s.seq_id for s in seqs] == ["r-0", "r-1", "r-2"]
    assert [s.seed for s in seqs] == [10, 11, 12]
    assert all(s.status is SequenceStatus.WAITING for s in seqs) and sched.num_waiting == 3
    assert sched.get_sequences("r") == seqs and sched.get_sequence("r-1") is seqs[1]
    unseeded = [[s.seed for s in make().add_request("u", [1], params(n=2))] for _ in range(2)]
    assert unseeded[0] == unseeded[1] and unseeded[0][0] != unseeded[0][1]  # drawn from the scheduler's seed


def test_add_request_refuses_bad_requests():
    sched = make(num_pages=3, page_size=4, max_model_len=16)  # 2 usable pages: 8 cached tokens
    with pytest.raises(ValueError, match="empty"):
        sched.add_request("r", [], params())
    with pytest.raises(RequestTooLong, match=r"10 tokens and max_tokens is 8: 10 \+ 8 > max_model_len 16"):
        sched.add_request("r", [1] * 10, params(max_tokens=8))
    with pytest.raises(RequestTooLong, match=r"17 tokens and max_tokens is None: 17 \+ 0 > max_model_len 16"):
        sched.add_request("r", [1] * 17, params(max_tokens=None))
    with pytest.raises(RequestTooLong, match="need 3 KV-cache pages of 4 tokens, but the cache has 2"):
        sched.add_request("r", [1] * 6, params(max_tokens=4))  # 9 cached tokens
    with pytest.raises(RequestTooLong, match="need 4 KV-cache pages"):
        sched.add_request("r", [1] * 6, params(max_tokens=None))  # up to 15 cached tokens
    assert not sched.has_unfinished()
    sched.add_request("r", [1] * 5, params(max_tokens=4))  # 8 cached tokens: just fits
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request("r", [1], params())


# --- batching -------------------------------------------------------------------------


def test_long_prompt_is_chunked_and_only_the_last_chunk_samples():
    sched = make(budget=4, max_num_seqs=4)
    (seq,) = sched.add_request("r", list(range(10)), params())
    plans = [step(sched, token=42) for _ in range(4)]
    assert [shape(p) for p in plans] == [
        [("r-0", 0, 4, False)],
        [("r-0", 4, 4, False)],
        [("r-0", 8, 2, True)],
        [("r-0", 10, 1, True)],
    ]
    assert [p.seqs[0].token_ids for p in plans] == [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9), (42,)]
    assert [len(p.seqs[0].page_ids) for p in plans] == [1, 2, 3, 3]
    assert seq.output_token_ids == [42, 42] and seq.num_computed_tokens == 11


def test_decodes_go_first_and_a_long_prompt_gets_the_rest_of_the_budget():
    sched = make(budget=8, max_num_seqs=4)
    sched.add_request("a", [1, 2, 3], params())
    assert shape(step(sched)) == [("a-0", 0, 3, True)]
    sched.add_request("b", list(range(20)), params())
    assert shape(step(sched)) == [("a-0", 3, 1, True), ("b-0", 0, 7, False)]
    assert shape(step(sched)) == [("a-0", 4, 1, True), ("b-0", 7, 7, False)]
    assert shape(step(sched)) == [("a-0", 5, 1, True), ("b-0", 14, 6, True)]
    assert shape(step(sched)) == [("a-0", 6, 1, True), ("b-0", 20, 1, True)]


def test_admission_stops_at_max_num_seqs():
    sched = make(max_num_seqs=2, budget=16)
    for r in "abcd":
        sched.add_request(r, [1, 2, 3], params())
    plan = step(sched)
    assert [s.seq_id for s in plan.seqs] == ["a-0", "b-0"]
    assert (sched.num_running, sched.num_waiting) == (2, 2)


def test_admission_stops_at_the_token_budget_and_chunks_the_last_prompt():
    sched = make(max_num_seqs=4, budget=8)
    for r in "abc":
        sched.add_request(r, [1] * 5, params())
    plan = step(sched)
    assert shape(plan) == [("a-0", 0, 5, True), ("b-0", 0, 3, False)]
    assert plan.num_tokens == 8 and sched.num_waiting == 1


def test_admission_is_first_come_first_served_when_pages_run_short():
    sched = make(num_pages=4, page_size=4)  # 3 usable pages
    sched.add_request("a", [1] * 5, params(max_tokens=4))  # 2 pages
    sched.add_request("b", [1] * 9, params(max_tokens=1))  # 3 pages: must wait for a
    sched.add_request("c", [1], params(max_tokens=1))  # 1 page would fit, but b came first
    plan = step(sched)
    assert [s.seq_id for s in plan.seqs] == ["a-0"]
    assert [s.seq_id for s in sched.waiting] == ["b-0", "c-0"]


# --- preemption -----------------------------------------------------------------------


def test_preemption_takes_the_newest_and_resumes_with_the_same_outputs():
    sched = make(num_pages=7, page_size=1)  # 6 usable pages, one token each
    for r in "abc":
        sched.add_request(r, [1, 2], params(max_tokens=4))
    a, b, c = (sched.get_sequences(r)[0] for r in "abc")
    step(sched, token=10)  # 3 x 2 prompt tokens: the pool is full
    plan = step(sched, token=11)  # a needs a page: c (newest) goes; b takes the page c freed
    assert plan.preempted == ("c-0",) and [s.seq_id for s in plan.seqs] == ["a-0", "b-0"]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.output_token_ids == [10]
    plan = step(sched, token=12)  # a needs a page again: b is now the newest
    assert plan.preempted == ("b-0",) and [s.seq_id for s in plan.seqs] == ["a-0"]
    assert list(sched.waiting) == [b, c]  # the preempted go to the front, the older first
    assert (b.num_preemptions, c.num_preemptions, sched.num_preemptions_total) == (1, 1, 2)

    step(sched, token=13)  # a: 4 outputs, finished
    assert a.finish_reason == "length"
    plan = step(sched, token=14)  # a's pages released: b recomputes prompt + outputs; c waits its turn
    assert plan.freed == ("a-0",) and shape(plan) == [("b-0", 0, 4, True)]
    assert plan.seqs[0].token_ids == (1, 2, 10, 11) and b.output_token_ids == [10, 11, 14]
    while sched.has_unfinished():
        step(sched, token=15)
    assert b.output_token_ids == [10, 11, 14, 15] and c.output_token_ids == [10, 15, 15, 15]


def test_a_sequence_that_is_the_newest_preempts_itself():
    sched = make(num_pages=4, page_size=2)  # 3 usable pages
    sched.add_request("a", [1, 2, 3], params(max_tokens=3))
    sched.add_request("b", [1, 2], params(max_tokens=3))
    step(sched)  # a: 2 pages, b: 1 page
    plan = step(sched)  # a's next token fits its page; b's needs a new one and b is newest
    assert plan.preempted == ("b-0",) and shape(plan) == [("a-0", 3, 1, True)]


# --- n > 1: the prompt is prefilled once ------------------------------------------------


def test_siblings_share_the_prompt_pages_and_compute_the_rest_themselves():
    sched = make(page_size=4)
    s0, s1, s2 = sched.add_request("r", list(range(10)), params(n=3))
    assert shape(step(sched, token=7)) == [("r-0", 0, 10, True)]  # siblings wait
    plan = step(sched, token=8)
    assert shape(plan) == [("r-0", 10, 1, True), ("r-1", 8, 2, True), ("r-2", 8, 2, True)]
    pages = {s.seq_id: s.page_ids for s in plan.seqs}
    assert pages["r-1"][:2] == pages["r-2"][:2] == pages["r-0"][:2]
    assert len({pages[sid][2] for sid in pages}) == 3  # the page with p8, p9 is each one's own
    alloc = sched.allocator
    assert [alloc.refcount(p) for p in pages["r-0"]] == [3, 3, 1]
    assert (s0.output_token_ids, s1.output_token_ids, s2.output_token_ids) == ([7, 8], [8], [8])

    free_before = alloc.num_free_pages
    sched.abort_request("r")
    assert step(sched).freed == ("r-0", "r-1", "r-2")
    assert alloc.num_free_pages == free_before + 5
    alloc.check_invariant([])


def test_a_prompt_filling_whole_pages_leaves_its_last_page_to_each_sibling():
    sched = make(page_size=4)
    sched.add_request("r", list(range(8)), params(n=2))
    step(sched)
    assert shape(step(sched)) == [("r-0", 8, 1, True), ("r-1", 4, 4, True)]


def test_a_prompt_within_one_page_is_not_shared():
    sched = make(page_size=4)
    sched.add_request("r", [1, 2, 3], params(n=2))
    assert shape(step(sched)) == [("r-0", 0, 3, True), ("r-1", 0, 3, True)]


# --- finishing ------------------------------------------------------------------------


def run_tokens(sched: Scheduler, tokens: list[int]) -> None:
    for t in tokens:
        step(sched, token=t)


@pytest.mark.parametrize(
    ("kw", "tokens", "outputs", "reason", "stop_reason"),
    [
        ({"max_tokens": 3}, [1, 1, 1], 3, "length", None),
        ({}, [1, EOS], 2, "stop", None),
        ({"min_tokens": 2}, [EOS, EOS], 2, "stop", None),
        ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], 3, "length", None),
        ({"stop_token_ids": [9]}, [1, 9], 2, "stop", 9),
        ({"stop_token_ids": [9], "ignore_eos": True}, [EOS, 9], 2, "stop", 9),
        ({"stop_token_ids": [9], "min_tokens": 3}, [9, 9, 9], 3, "stop", 9),
        ({"max_tokens": None}, [1] * 13, 13, "length", None),  # up to max_model_len 16
    ],
)
def test_finish_conditions(kw, tokens, outputs, reason, stop_reason):
    sched = make(max_model_len=16)
    (seq,) = sched.add_request("r", [1, 2, 3], params(**kw))
    run_tokens(sched, tokens)
    assert (seq.num_output_tokens, seq.finish_reason, seq.stop_reason) == (outputs, reason, stop_reason)
    assert not sched.running and not sched.waiting


def test_a_prompt_of_max_model_len_gets_one_token():
    sched = make(max_model_len=8)
    (seq,) = sched.add_request("r", list(range(8)), params(max_tokens=None))
    plan = step(sched)
    assert shape(plan) == [("r-0", 0, 8, True)]
    assert (seq.num_output_tokens, seq.finish_reason) == (1, "length")


def test_update_returns_the_sequences_that_got_a_token_or_finished():
    sched = make(budget=8)
    sched.add_request("a", [1] * 3, params(max_tokens=1))
    sched.add_request("b", [1] * 10, params())
    plan = sched.schedule()
    sched.advance(plan)
    touched = sched.update(plan, {"a-0": 4})
    assert [s.seq_id for s in touched] == ["a-0"] and touched[0].finish_reason == "length"


def test_finish_sequence_and_abort_release_pages_at_the_next_step():
    sched = make()
    sched.add_request("a", [1, 2, 3], params())
    sched.add_request("b", [1, 2, 3], params())
    step(sched)
    sched.finish_sequence("a-0", "stop", stop_reason="###")
    sched.abort_request("b")
    sched.abort_request("b")  # twice, and unknown ids, are fine
    sched.abort_request("nobody")
    a, b = sched.get_sequences("a")[0], sched.get_sequences("b")[0]
    assert (a.finish_reason, a.stop_reason, b.finish_reason) == ("stop", "###", "abort")
    assert sched.allocator.num_free_pages == 61  # still held
    plan = sched.schedule()
    assert plan.freed == ("a-0", "b-0") and plan.seqs == ()
    assert sched.allocator.num_free_pages == 63
    with pytest.raises(KeyError):
        sched.get_sequences("a")
    sched.add_request("a", [1], params())  # a released id may come back


def test_abort_of_a_waiting_request_and_between_schedule_and_update():
    sched = make(max_num_seqs=1, budget=4)
    sched.add_request("a", [1, 2], params())
    sched.add_request("b", [1, 2], params())
    plan = sched.schedule()
    sched.advance(plan)
    sched.abort_request("b")  # waiting
    sched.abort_request("a")  # in flight: its result is dropped
    assert sched.update(plan, {"a-0": 3}) == []
    assert sched.get_sequences("a")[0].output_token_ids == []
    assert sched.has_unfinished()  # their pages are still to be released
    assert sched.schedule().freed == ("b-0", "a-0") and not sched.has_unfinished()
    sched.allocator.check_invariant([])


def test_a_step_planned_before_the_last_is_read_carries_its_token_as_pending():
    sched = make()
    (a,) = sched.add_request("a", [1, 2, 3], params())
    (b,) = sched.add_request("b", [1, 2, 3], params(max_tokens=2))
    first = sched.schedule()
    sched.advance(first)
    second = sched.schedule()  # before the first step's tokens are read
    assert shape(second) == [("a-0", 3, 1, True), ("b-0", 3, 1, True)]
    assert [s.token_ids for s in second.seqs] == [(PENDING,), (PENDING,)]
    sched.advance(second)
    assert (a.num_pending, a.num_output_tokens, a.output_token_ids) == (2, 2, [])
    sched.update(first, {"a-0": EOS, "b-0": 7})  # a ended on a token the second step did not know
    assert (a.finish_reason, a.output_token_ids, a.num_pending) == ("stop", [EOS], 0)
    third = sched.schedule()  # b's last token is on the device: nothing more to compute for it
    assert third.seqs == () and third.freed == ("a-0",) and b.status is SequenceStatus.RUNNING
    sched.advance(third)
    assert [s.seq_id for s in sched.update(second, {"a-0": 9, "b-0": 8})] == ["b-0"]  # a's token is dropped
    assert (a.output_token_ids, b.output_token_ids, b.finish_reason) == ([EOS], [7, 8], "length")


def test_a_sequence_whose_last_token_is_pending_leaves_its_seat():
    sched = make(max_num_seqs=1)
    (a,) = sched.add_request("a", [1, 2, 3], params(max_tokens=2))
    sched.add_request("b", [4, 5], params())
    for _ in range(2):  # a's prompt, then its decode: both of its tokens are pending
        sched.advance(sched.schedule())
    assert a.num_pending == 2 and a.status is SequenceStatus.RUNNING
    assert shape(sched.schedule()) == [("b-0", 0, 2, True)]  # b joins before a's tokens are read


def test_a_sequence_preempted_with_a_token_in_flight_keeps_it():
    sched = make(num_pages=4, page_size=2)  # 3 usable pages
    (a,) = sched.add_request("a", [1, 2, 3], params(max_tokens=3))
    (b,) = sched.add_request("b", [1, 2], params(max_tokens=3))
    first = sched.schedule()  # a: 2 pages, b: 1 page
    sched.advance(first)
    second = sched.schedule()  # b's next token needs a page and b is newest
    assert second.preempted == ("b-0",) and shape(second) == [("a-0", 3, 1, True)]
    sched.advance(second)
    sched.update(first, {"a-0": 4, "b-0": 6})
    assert (b.status, b.output_token_ids, b.num_pending, b.num_computed_tokens) == (SequenceStatus.WAITING, [6], 0, 0)


# --- random workloads -------------------------------------------------------------------

VOCAB = 6  # token ids 0..5; EOS is 5


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps (random tokens, EOS included), aborts and stop strings, with each step
    recorded before the next is planned or, as the engine runs them, after it (`pipelined`).

    `owners` are the sequences holding pages: they change only in schedule(), where
    they become exactly the running sequences. `cache` is a fake KV cache,
    (page, slot) -> token id, written by each step as it is queued and read back through
    page_ids. The fake device samples a step's tokens when the step is queued
    (`in_flight`); a PENDING token of the next step must stand for exactly that token.
    """

    @initialize(
        page_size=st.integers(1, 4),
        num_pages=st.integers(2, 10),
        max_num_seqs=st.integers(1, 4),
        extra_budget=st.integers(0, 8),
        max_model_len=st.integers(2, 24),
    )
    def setup(self, page_size, num_pages, max_num_seqs, extra_budget, max_model_len):
        self.config = SchedulerConfig(max_num_seqs, max_num_seqs + extra_budget, max_model_len)
        self.alloc = PageAllocator(num_pages, page_size)
        self.sched = Scheduler(self.config, self.alloc, eos_token_ids=frozenset({EOS}), seed=0)
        self.seqs = {}  # every accepted sequence, by id
        self.owners: set[str] = set()
        self.cache: dict[tuple[int, int], int] = {}
        self.num_requests = 0
        self.in_flight = None  # (plan, its sampled tokens) queued and not yet recorded

    @rule(
        prompt=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24),
        max_tokens=st.none() | st.integers(1, 12),
        n=st.integers(1, 3),
        min_tokens=st.integers(0, 3),
        ignore_eos=st.booleans(),
        stop_token_ids=st.none() | st.lists(st.integers(0, VOCAB - 1), max_size=2),
    )
    def add(self, prompt, max_tokens, n, min_tokens, ignore_eos, stop_token_ids):
        p = SamplingParams(
            n=n,
            max_tokens=max_tokens,
            min_tokens=min(min_tokens, max_tokens or min_tokens),
            ignore_eos=ignore_eos,
            stop_token_ids=stop_token_ids,
        )
        num, max_len, ps = len(prompt), self.config.max_model_len, self.alloc.page_size
        cached = num + max_tokens - 1 if max_tokens else max(max_len - 1, num)
        refuse = num + (max_tokens or 0) > max_len or -(-cached // ps) > self.alloc.num_pages - 1
        rid = f"r{self.num_requests}"
        self.num_requests += 1
        try:
            seqs = self.sched.add_request(rid, prompt, p)
        except RequestTooLong:
            assert refuse
            return
        assert not refuse
        self.seqs.update((s.seq_id, s) for s in seqs)

    @rule(data=st.data())
    def step(self, data):
        draw = lambda: data.draw(st.integers(0, VOCAB - 1))  # noqa: E731
        abort = data.draw(st.sampled_from(sorted(self.live_requests()) or [None]))
        self.run_step(draw, abort_in_flight=abort if data.draw(st.booleans()) else None,
                      pipelined=data.draw(st.booleans()))

    @rule(data=st.data())
    def abort(self, data):
        live = sorted(self.live_requests())
        if live:
            self.sched.abort_request(data.draw(st.sampled_from(live)))

    @rule(data=st.data())
    def stop_string(self, data):
        live = sorted(sid for sid, s in self.seqs.items() if not s.is_finished)
        if live:
            self.sched.finish_sequence(data.draw(st.sampled_from(live)), "stop", "STOP")

    def live_requests(self) -> set[str]:
        return {s.request_id for s in self.seqs.values() if not s.is_finished}

    def run_step(self, draw, abort_in_flight=None, pipelined=False):
        """Queue a step and record one: the one before it when `pipelined`, else itself."""
        if not pipelined and self.in_flight:
            self.record(*self.in_flight)
            self.in_flight = None
        queued = self.queue(draw)
        if abort_in_flight is not None:
            self.sched.abort_request(abort_in_flight)
        if self.in_flight:
            self.record(*self.in_flight)
        self.in_flight = queued if queued[0].seqs else None
        if not pipelined:
            self.record(*queued)
            self.in_flight = None

    def device_tokens(self, seq) -> list[int]:
        """Its tokens as the device holds them: the pending one is what the step in flight sampled."""
        pending = [self.in_flight[1][seq.seq_id]] if seq.num_pending else []
        assert seq.num_pending <= 1 and (not pending or self.in_flight[0] is not None)
        return seq.all_token_ids + pending

    def queue(self, draw):
        """Schedule a step, check its plan, write its tokens into the cache, advance; (plan, sampled)."""
        sched, alloc, ps = self.sched, self.alloc, self.alloc.page_size
        was_running = [s.seq_id for s in sched.running]
        plan = sched.schedule()
        self.owners = {s.seq_id for s in sched.running}
        k = len(plan.preempted)  # the newest go first, and queue first, the older in front
        assert list(plan.preempted) == was_running[::-1][:k]
        assert [s.seq_id for s in list(sched.waiting)[:k]] == was_running[len(was_running) - k :]
        ids = [s.seq_id for s in plan.seqs]
        assert len(ids) == len(set(ids)) <= self.config.max_num_seqs
        assert plan.num_tokens <= self.config.max_num_batched_tokens
        decode = [len(s.token_ids) == 1 and s.sample for s in plan.seqs]
        assert decode == sorted(decode, reverse=True), "decodes come first"
        at_length = {s.seq_id for s in sched.running if s.num_pending and s.reached_length(self.config.max_model_len)}
        assert {s.seq_id for s in sched.running} - at_length == set(ids), "a running sequence was left out"

        for s in plan.seqs:  # what each scheduled sequence computes, and where
            seq = self.seqs[s.seq_id]
            end = s.start_pos + len(s.token_ids)
            tokens = self.device_tokens(seq)
            assert seq.status is SequenceStatus.RUNNING and s.start_pos == seq.num_computed_tokens
            assert s.token_ids == tuple(seq.token_ids_between(s.start_pos, end))
            assert PENDING not in s.token_ids[:-1] and (PENDING not in s.token_ids or s.token_ids == (PENDING,))
            assert s.token_ids and len(tokens) >= end
            assert s.sample == (end == seq.num_tokens == len(tokens)) and end <= self.config.max_model_len
            assert list(s.page_ids) == alloc.pages_of(s.seq_id) and 0 not in s.page_ids
            assert len(s.page_ids) * ps >= end
            for pos in range(s.start_pos, end):
                page = s.page_ids[pos // ps]
                assert alloc.refcount(page) == 1, "a step writes into a shared page"
                self.cache[page, pos % ps] = tokens[pos]
        for s in plan.seqs:  # every scheduled token sees its whole context through page_ids
            seq, end = self.seqs[s.seq_id], s.start_pos + len(s.token_ids)
            assert [self.cache.get((s.page_ids[q // ps], q % ps)) for q in range(end)] == self.device_tokens(seq)[:end]
        sched.advance(plan)
        return plan, {s.seq_id: draw() for s in plan.seqs if s.sample}

    def record(self, plan, sampled):
        """update() with the tokens the fake device sampled, and check what it did with them."""
        before = {sid: (len(self.seqs[sid].output_token_ids), self.seqs[sid].is_finished) for sid in sampled}
        touched = self.sched.update(plan, sampled)
        assert {s.seq_id for s in touched} == {sid for sid in sampled if not before[sid][1]}
        for sid, token in sampled.items():
            seq = self.seqs[sid]
            if before[sid][1]:
                assert len(seq.output_token_ids) == before[sid][0]
                continue
            assert seq.output_token_ids[-1] == token and len(seq.output_token_ids) == before[sid][0] + 1
            assert (seq.finish_reason, seq.stop_reason) == self.expected_finish(seq, token)

    def expected_finish(self, seq, token):
        p, n = seq.params, len(seq.output_token_ids)
        if n >= p.min_tokens and token in (p.stop_token_ids or []):
            return "stop", token
        if n >= p.min_tokens and token == EOS and not p.ignore_eos:
            return "stop", None
        if n == p.max_tokens or len(seq.all_token_ids) >= self.config.max_model_len:
            return "length", None
        return None, None

    @invariant()
    def bookkeeping_is_consistent(self):
        sched = self.sched
        self.alloc.check_invariant(self.owners)
        running, waiting = list(sched.running), list(sched.waiting)
        listed = [s.seq_id for s in running + waiting]
        assert len(listed) == len(set(listed)), "a sequence is queued twice"
        assert sched.num_running == len(running) and sched.num_seats_free >= 0
        assert all(s.num_tokens - s.num_computed_tokens == 1 for s in running[:-1]), "only the newest is in prefill"
        places = {SequenceStatus.RUNNING: (1, 0), SequenceStatus.WAITING: (0, 1), SequenceStatus.FINISHED: (0, 0)}
        for seq in self.seqs.values():  # each sequence is in exactly one place, the one its status says
            assert (running.count(seq), waiting.count(seq)) == places[seq.status]
            if seq.status is SequenceStatus.WAITING:
                assert not self.alloc.pages_of(seq.seq_id) and seq.num_computed_tokens == 0
            if not seq.is_finished:
                assert seq.num_computed_tokens < seq.num_tokens
            assert seq.num_output_tokens <= (seq.params.max_tokens or self.config.max_model_len)

    def teardown(self):
        if not hasattr(self, "sched"):
            return
        # With no new requests, everything finishes: the oldest running sequence always progresses.
        tokens = iter(range(10**6))
        limit = 10 + 4 * sum(s.num_tokens + (s.params.max_tokens or self.config.max_model_len) for s in self.seqs.values())
        for _ in range(limit):
            if not self.sched.has_unfinished() and not self.in_flight:
                break
            self.run_step(lambda: next(tokens) % EOS, pipelined=True)  # never EOS: stop by length or stop tokens
            self.bookkeeping_is_consistent()
        assert not self.sched.has_unfinished(), "requests did not finish"
        plan = self.sched.schedule()
        assert plan.seqs == () and self.alloc.num_free_pages == self.alloc.num_pages - 1
        self.alloc.check_invariant([])


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_random_workloads = SchedulerMachine.TestCase
