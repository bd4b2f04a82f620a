"""Continuous batching: which sequences compute which tokens this step, on which pages.

NOTE: there is no prefill or decode mode. Every sequence has `num_computed_tokens`
(K/V already in the cache) and `num_tokens` (prompt + output); a step computes the
next slice of the difference for each scheduled sequence, and samples a token for
those whose slice reaches the end. A prompt is one long slice (cut into chunks to
fit the token budget); a decode is a slice of one token.

    all_token_ids  [p0 p1 p2 p3 p4 p5 p6 | o0 o1 o2]
                    <-------- computed -------->       num_computed_tokens = 9
                                                [o2]   token_ids, start_pos = 9, sample

Each step (1) releases pages of finished sequences, (2) serves running sequences in
admission order, giving every decode its token before prefill chunks take the rest of
the budget, and preempting the newest running sequence when pages run out, then
(3) admits waiting sequences first come, first served while seats, budget and pages
allow. A preempted sequence drops its pages and recomputes its prompt and outputs
when it comes back; the oldest running sequence is never preempted by another, so
every request finishes.

The engine plans a step before it has read the one before (engine.LLMEngine.step):
once a step is queued, `advance()` counts its chunks as computed and its samples as
pending (engine.sequence's NOTE), and `update()` later fills in the sampled ids. So a
schedule() sees every sequence as it will be when the queued step is done; a decode
whose token is still on the device carries PENDING, and a sequence whose last token
is pending waits for update() to finish it, leaving its seat to a newcomer. A sequence
that ended on a token the host has not read yet (EOS, a stop) may run one step more;
update() drops that token.

A request with n > 1 prefills its prompt once: its other sequences wait until one of
them has computed the prompt, then take its pages that hold only prompt tokens
(keeping at least one prompt token to compute, so each gets its own logits):

    prompt (10 tokens, page_size 4)   [p0 p1 p2 p3][p4 p5 p6 p7][p8 p9]
    seq 0 pages                       [    7      ][    2      ][ 9   ]
    seq 1 pages                       [    7      ][    2      ][ 4   ]   computes p8, p9 itself
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, replace

from engine.allocator import PageAllocator
from engine.params import SamplingParams
from engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences in one step (running at once, besides those whose last token is pending)
    max_num_batched_tokens: int = 512  # tokens computed in one step, all sequences together
    max_model_len: int = 2048  # positions one sequence may use, prompt and output together

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer (got {value!r})")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), so every running sequence can decode in each step"
            )


class RequestTooLong(ValueError):
    """A request that could never run to completion: too many tokens for the model or the cache."""


@dataclass(frozen=True)
class ScheduledSeq:
    seq_id: str
    token_ids: tuple[int, ...]  # tokens to compute this step: a prompt chunk, or the last sampled token
    start_pos: int  # position of token_ids[0] == num_computed_tokens before the step
    page_ids: tuple[int, ...]  # all pages of the sequence, enough to hold start_pos + len(token_ids) tokens
    sample: bool  # this chunk reaches the end of the sequence's known tokens, so the step samples its next token


@dataclass(frozen=True)
class StepPlan:
    seqs: tuple[ScheduledSeq, ...]  # decodes first, then prefill chunks
    preempted: tuple[str, ...]  # seq ids preempted this step (pages freed, will recompute)
    freed: tuple[str, ...]  # seq ids whose pages were released this step (finished or aborted)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


_HOLD = object()  # _prefix_donor's answer for "a sibling is computing the prompt; wait for it"


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        allocator: PageAllocator,
        eos_token_ids: frozenset[int] = frozenset(),
        seed: int | None = None,  # draws the seeds of requests that set none; None: irreproducible
    ):
        self.config = config
        self.allocator = allocator
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()  # admission order: preempted at the front, new at the back
        self.running: list[Sequence] = []  # admission order: oldest first, preemption victims from the end
        self.num_preemptions_total = 0
        self._requests: dict[str, list[Sequence]] = {}  # until all of a request's sequences are released
        self._seqs: dict[str, Sequence] = {}  # seq_id -> sequence, until its pages are released
        self._finished: list[Sequence] = []  # finished since the last schedule(); pages not yet released
        self._rng = random.Random(seed)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_seats_free(self) -> int:
        """Sequences that may still join: max_num_seqs less the running ones but those finishing."""
        return self.config.max_num_seqs - sum(1 for seq in self.running if not self._finishing(seq))

    def _finishing(self, seq: Sequence) -> bool:
        """Whether `seq` has all its tokens, the last one pending: nothing is left to compute for it."""
        return seq.num_pending > 0 and seq.reached_length(self.config.max_model_len)

    def has_unfinished(self) -> bool:
        """Whether any sequence still waits or runs, or a finished one still holds pages until the next schedule()."""
        return bool(self.running or self.waiting or self._finished)

    def get_sequences(self, request_id: str) -> list[Sequence]:
        return list(self._requests[request_id])

    def get_sequence(self, seq_id: str) -> Sequence:
        """A sequence of a live request; the runner reads its params, seed and tokens."""
        return self._seqs[seq_id]

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[Sequence]:
        """Queue `params.n` sequences for one prompt; refuse what could never finish."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        num_prompt, max_tokens, max_len = len(prompt_token_ids), params.max_tokens, self.config.max_model_len
        if num_prompt + (max_tokens or 0) > max_len:
            raise RequestTooLong(
                f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: "
                f"{num_prompt} + {max_tokens or 0} > max_model_len {max_len}; shorten the prompt or lower max_tokens"
            )
        # The last sampled token is never computed, so the cache holds at most final length - 1 tokens.
        max_cached = num_prompt + max_tokens - 1 if max_tokens else max(max_len - 1, num_prompt)
        pages = -(-max_cached // self.allocator.page_size)
        if pages > self.allocator.num_usable_pages:
            raise RequestTooLong(
                f"the prompt has {num_prompt} tokens and max_tokens is {max_tokens}: a sequence may need {pages} "
                f"KV-cache pages of {self.allocator.page_size} tokens, but the cache has {self.allocator.num_usable_pages}; "
                "lower max_tokens or give the cache more memory"
            )
        arrival = time.monotonic() if arrival_time is None else arrival_time
        seqs = [
            Sequence(request_id, i, list(prompt_token_ids), params, arrival, seed=self._rng.randrange(2**31))
            for i in range(params.n)
        ]
        self._requests[request_id] = seqs
        for seq in seqs:
            self._seqs[seq.seq_id] = seq
            self.waiting.append(seq)
        return list(seqs)

    def abort_request(self, request_id: str) -> None:
        """Finish the request's sequences with "abort"; their pages go at the next schedule()."""
        for seq in self._requests.get(request_id, ()):
            if not seq.is_finished:
                self._finish(seq, "abort")

    def finish_sequence(self, seq_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish one sequence (e.g. the output side matched a stop string)."""
        seq = self._seqs.get(seq_id)
        if seq is not None and not seq.is_finished:
            self._finish(seq, reason, stop_reason)

    def schedule(self) -> StepPlan:
        cfg, alloc = self.config, self.allocator
        # 1. Release what finished since the last step.
        freed = tuple(seq.seq_id for seq in self._finished)
        for seq in self._finished:
            alloc.free(seq.seq_id)
            del self._seqs[seq.seq_id]
            if not any(s.seq_id in self._seqs for s in self._requests[seq.request_id]):
                del self._requests[seq.request_id]
        self._finished = []

        # 2. Running sequences, oldest first. A prompt is cut into a chunk only where the budget
        #    runs out, which ends admission, so only the newest running sequence can be part
        #    way through its prompt: every other one decodes, and with max_num_seqs <=
        #    max_num_batched_tokens all of them get their token before any prefill chunk.
        budget = cfg.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        chunks: list[ScheduledSeq] = []
        preempted: list[str] = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if self._finishing(seq):  # update() finishes it
                i += 1
                continue
            left = seq.num_tokens - seq.num_computed_tokens
            num = min(left, budget)
            # Out of pages: preempt the newest running sequence, perhaps this one.
            while alloc.pages_needed(seq.seq_id, seq.num_computed_tokens + num) > alloc.num_free_pages:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            (decodes if left == 1 else chunks).append(self._plan_chunk(seq, num))
            budget -= num
            i += 1

        # 3. Admit waiting sequences in order. Not after a preemption: memory is tight.
        held: list[Sequence] = []
        seats = self.num_seats_free
        while self.waiting and not preempted and seats > 0 and budget > 0:
            seq = self.waiting.popleft()
            donor = self._prefix_donor(seq)
            if donor is _HOLD:
                held.append(seq)
                continue
            num_shared = (seq.num_prompt_tokens - 1) // alloc.page_size if donor else 0
            start = num_shared * alloc.page_size
            num = min(seq.num_tokens - start, budget)
            if -(-(start + num) // alloc.page_size) - num_shared > alloc.num_free_pages:
                self.waiting.appendleft(seq)  # first come, first served: nothing overtakes it
                break
            if donor:
                alloc.share(donor.seq_id, seq.seq_id, num_shared)
            seq.num_computed_tokens = start
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            seats -= 1
            (decodes if num == seq.num_tokens - start == 1 else chunks).append(self._plan_chunk(seq, num))
            budget -= num
        self.waiting.extendleft(reversed(held))

        return StepPlan(seqs=tuple(decodes + chunks), preempted=tuple(preempted), freed=freed)

    def advance(self, plan: StepPlan, steps: dict[str, int] | None = None) -> None:
        """The plan's step is queued: its chunks count as computed and each sampling chunk's token
        as pending; in a fused call (`steps`, Scheduler.reserve_ahead) a sequence computes and
        samples steps[seq_id] tokens."""
        for sched in plan.seqs:
            seq, n = self._seqs[sched.seq_id], steps[sched.seq_id] if steps else 1
            seq.num_computed_tokens = sched.start_pos + len(sched.token_ids) + n - 1
            if sched.sample:
                seq.num_pending += n

    def update(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Record a step's sampled tokens (in place of the first pending one of each sequence) and
        who finished. A sequence that finished meanwhile drops its token; a preempted one keeps it."""
        touched, seqs, eos, max_len = [], self._seqs, self.eos_token_ids, self.config.max_model_len
        for sched in plan.seqs:  # NOTE: the hot loop of recording a step (locals, no properties)
            if not sched.sample:
                continue
            seq = seqs.get(sched.seq_id)
            if seq is None or not seq.num_pending or seq.status is SequenceStatus.FINISHED:
                continue  # finished (or aborted) since the step was planned
            token = sampled[sched.seq_id]
            seq.num_pending -= 1
            out = seq.output_token_ids
            out.append(token)
            p, n = seq.params, len(out)
            if n >= p.min_tokens and p.stop_token_ids and token in p.stop_token_ids:
                self._finish(seq, "stop", token)
            elif n >= p.min_tokens and not p.ignore_eos and token in eos:
                self._finish(seq, "stop")
            elif n == p.max_tokens or n + len(seq.prompt_token_ids) >= max_len:
                self._finish(seq, "length")  # outputs grow one at a time, so == catches max_tokens
            touched.append(seq)
        return touched

    def reserve_ahead(self, plan: StepPlan, steps: dict[str, int]) -> StepPlan | None:
        """For a plan of decodes only, make room for steps[seq_id] decode steps in one call.

        Allocates the pages each sequence needs to hold that many more tokens and returns
        the plan with the grown page lists; None (and nothing allocated) if the pool is short.
        The extra pages are the ones the next steps would take anyway.
        """
        alloc = self.allocator
        need = {s.seq_id: alloc.pages_needed(s.seq_id, s.start_pos + steps[s.seq_id]) for s in plan.seqs}
        if sum(need.values()) > alloc.num_free_pages:
            return None
        for seq_id, n in need.items():
            alloc.allocate(seq_id, n)
        return replace(plan, seqs=tuple(replace(s, page_ids=tuple(alloc.pages_of(s.seq_id))) for s in plan.seqs))

    def _plan_chunk(self, seq: Sequence, num: int) -> ScheduledSeq:
        """Allocate the pages `seq` needs to compute its next `num` tokens and describe the chunk."""
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + num
        self.allocator.allocate(seq.seq_id, self.allocator.pages_needed(seq.seq_id, end))
        return ScheduledSeq(
            seq_id=seq.seq_id,
            token_ids=seq.token_ids_between(start, end),
            start_pos=start,
            page_ids=tuple(self.allocator.pages_of(seq.seq_id)),
            sample=end == seq.num_tokens,
        )

    def _prefix_donor(self, seq: Sequence) -> Sequence | object | None:
        """A running sibling whose prompt pages `seq` can share, _HOLD to wait for one, or None."""
        shared_tokens = (seq.num_prompt_tokens - 1) // self.allocator.page_size * self.allocator.page_size
        if shared_tokens == 0:
            return None
        siblings = [s for s in self._requests[seq.request_id] if s is not seq and s.status is SequenceStatus.RUNNING]
        for s in siblings:
            if s.num_computed_tokens >= shared_tokens:
                return s
        return _HOLD if siblings else None

    def _preempt(self, seq: Sequence) -> None:
        """Drop `seq`'s pages and queue it first; its outputs are recomputed on resume."""
        self.running.remove(seq)
        self.allocator.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.num_pending = 0  # what calls in flight sample for it is dropped
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._finished.append(seq)
