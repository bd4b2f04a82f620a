"""Sequence bookkeeping: slices of its tokens."""

from engine.params import SamplingParams
from engine.sequence import Sequence


def test_token_ids_between_equals_slicing_all_tokens():
    seq = Sequence("r", 0, [1, 2, 3, 4, 5], SamplingParams(), arrival_time=0.0)
    seq.output_token_ids += [6, 7, 8]
    every = seq.all_token_ids
    for start in range(len(every) + 1):
        for end in range(start, len(every) + 2):
            assert seq.token_ids_between(start, end) == tuple(every[start:end]), (start, end)
