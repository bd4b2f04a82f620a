"""Data parallelism on the host side: one scheduler and one page pool per data shard.

NOTE: each data shard of the mesh owns its own KV-cache pages (numbered from 0 on
that shard, page 0 its trash page) and its own batch rows. So the simplest correct
design is dp independent (Scheduler, PageAllocator) pairs: a request is placed on
the shard with the fewest unfinished sequences when it arrives and stays there
(its n completions share prompt pages, which only works inside one pool). Each
step, every shard schedules its own plan; the runner packs the dp plans side by
side into one step, and each data shard's devices run theirs in parallel.

`DataParallelScheduler` has the Scheduler's methods, so the engine drives one
object whatever dp is; `schedule()` returns one StepPlan per shard.
"""

from __future__ import annotations

from engine.allocator import PageAllocator
from engine.params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, StepPlan
from engine.sequence import Sequence


class DataParallelScheduler:
    def __init__(self, config: SchedulerConfig, num_pages: int, page_size: int, eos_token_ids: frozenset[int], dp: int,
                 seed: int | None = None):
        """`config` and `num_pages` are per shard: each shard runs up to config.max_num_seqs sequences
        and config.max_num_batched_tokens tokens a step, over its own pool of `num_pages` pages."""
        self.allocators = [PageAllocator(num_pages, page_size) for _ in range(dp)]
        self.shards = [Scheduler(config, alloc, eos_token_ids, seed=None if seed is None else seed + i)
                       for i, alloc in enumerate(self.allocators)]
        self._shard_of: dict[str, int] = {}  # request id -> its shard, until the request is released

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self.shards)

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self.shards)

    @property
    def num_preemptions_total(self) -> int:
        return sum(s.num_preemptions_total for s in self.shards)

    @property
    def usage(self) -> float:
        """Fraction of usable pages in use, over all shards."""
        return sum(a.usage for a in self.allocators) / len(self.allocators)

    def can_admit_waiting(self) -> bool:
        """Whether some shard has a waiting sequence and a free seat for it."""
        return any(s.num_waiting and s.num_seats_free > 0 for s in self.shards)

    def has_unfinished(self) -> bool:
        return any(s.has_unfinished() for s in self.shards)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> list[Sequence]:
        shard = min(range(len(self.shards)), key=lambda i: self.shards[i].num_running + self.shards[i].num_waiting)
        seqs = self.shards[shard].add_request(request_id, prompt_token_ids, params, arrival_time)
        self._shard_of[request_id] = shard
        return seqs

    def _owner(self, request_id: str) -> Scheduler | None:
        shard = self._shard_of.get(request_id)
        return None if shard is None else self.shards[shard]

    def abort_request(self, request_id: str) -> None:
        if (owner := self._owner(request_id)) is not None:
            owner.abort_request(request_id)

    def finish_sequence(self, seq_id: str, reason: str, stop_reason: int | str | None = None) -> None:
        if (owner := self._owner(seq_id.rsplit("-", 1)[0])) is not None:
            owner.finish_sequence(seq_id, reason, stop_reason)

    def get_sequences(self, request_id: str) -> list[Sequence]:
        owner = self._owner(request_id)
        if owner is None:
            raise KeyError(request_id)
        return owner.get_sequences(request_id)

    def schedule(self) -> tuple[StepPlan, ...]:
        """One plan per data shard (some may be empty)."""
        plans = tuple(s.schedule() for s in self.shards)
        for plan in plans:  # forget requests their shard has released
            for seq_id in plan.freed:
                request_id = seq_id.rsplit("-", 1)[0]
                try:
                    self.get_sequences(request_id)
                except KeyError:
                    self._shard_of.pop(request_id, None)
        return plans

    def update(self, plans: tuple[StepPlan, ...], sampled: dict[str, int]) -> list[Sequence]:
        return [seq for shard, plan in zip(self.shards, plans) for seq in shard.update(plan, sampled)]

    def advance(self, plans: tuple[StepPlan, ...], steps: dict[str, int] | None = None) -> None:
        for shard, plan in zip(self.shards, plans):
            shard.advance(plan, steps)

    def reserve_ahead(self, plans: tuple[StepPlan, ...], steps: dict[str, int]) -> tuple[StepPlan, ...] | None:
        """Scheduler.reserve_ahead on every shard; None if any shard is short of pages."""
        grown = tuple(shard.reserve_ahead(plan, steps) for shard, plan in zip(self.shards, plans))
        return None if any(g is None for g in grown) else grown
