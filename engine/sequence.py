"""One completion stream: its tokens, how far its K/V are computed, and why it ended.

A request with `n` completions owns `n` sequences (`seq_id == f"{request_id}-{index}"`).
The scheduler moves them WAITING -> RUNNING -> FINISHED (and back to WAITING when a
running sequence is preempted); the runner reads their tokens and seeds.

NOTE: a sequence counts its tokens as soon as the call that samples them is queued.
Until the engine reads them back they are *pending*: they have positions (num_tokens
counts them) but no ids on the host, and a chunk that reaches one carries PENDING in
its place; the runner feeds it from the device (engine.runner's `src`).

    all_token_ids  [p0 p1 p2 p3 | o0 o1]   + 1 pending      num_tokens = 7
    token_ids_between(6, 7) == (PENDING,)
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from engine.params import SamplingParams

PENDING = -1  # the id of a token sampled on the device and not yet read back


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()  # holds no pages; queued for admission
    RUNNING = enum.auto()  # holds pages for its computed tokens
    FINISHED = enum.auto()  # done; its pages are released at the next schedule()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int | None = None  # this stream's sampling seed: params.seed + index if set, else this, else random
    seq_id: str = field(init=False)
    output_token_ids: list[int] = field(default_factory=list)  # read back; pending tokens follow them
    num_pending: int = 0  # output tokens sampled by calls in flight, not yet read back
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache (prefix of all_token_ids)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0

    def __post_init__(self):
        self.seq_id = f"{self.request_id}-{self.index}"
        if self.params.seed is not None:
            self.seed = self.params.seed + self.index
        elif self.seed is None:
            self.seed = random.randrange(2**31)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_between(self, start: int, end: int) -> tuple[int, ...]:
        """all_token_ids[start:end], PENDING for pending tokens, without joining the whole prompt and
        output (a decode asks every step)."""
        p, known = len(self.prompt_token_ids), len(self.prompt_token_ids) + len(self.output_token_ids)
        pending = (PENDING,) * max(0, min(end, known + self.num_pending) - max(start, known))
        if start >= p:
            return tuple(self.output_token_ids[start - p:end - p]) + pending
        return tuple(self.prompt_token_ids[start:end]) + tuple(self.output_token_ids[:max(0, end - p)]) + pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens, pending ones included."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def num_tokens(self) -> int:
        """Prompt and output tokens, pending ones included."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    def reached_length(self, max_model_len: int) -> bool:
        """Whether it has all the tokens it may have (its max_tokens, or the model length)."""
        max_tokens = self.params.max_tokens
        return (max_tokens is not None and self.num_output_tokens >= max_tokens) or self.num_tokens >= max_model_len

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
