"""Sequence bookkeeping: slices of its tokens."""

from engine.params import SamplingParams
from engine.sequence import PENDING, Sequence


def test_token_ids_between_equals_slicing_all_tokens():
    seq = Sequence("r", 0, [1, 2, 3, 4, 5], SamplingParams(), arrival_time=0.0)
    seq.output_token_ids += [6, 7, 8]
    every = seq.all_token_ids
    for start in range(len(every) + 1):
        for end in range(start, len(every) + 2):
            assert seq.token_ids_between(start, end) == tuple(every[start:end]), (start, end)


def test_pending_tokens_count_and_read_as_pending():
    seq = Sequence("r", 0, [1, 2, 3], SamplingParams(max_tokens=4), arrival_time=0.0)
    seq.output_token_ids += [6]
    seq.num_pending = 2  # sampled by calls in flight
    every = [1, 2, 3, 6, PENDING, PENDING]
    assert (seq.num_tokens, seq.num_output_tokens, seq.all_token_ids) == (6, 3, [1, 2, 3, 6])
    for start in range(len(every) + 1):
        for end in range(start, len(every) + 2):
            assert seq.token_ids_between(start, end) == tuple(every[start:end]), (start, end)
    assert not seq.reached_length(max_model_len=7) and seq.reached_length(max_model_len=6)
    seq.num_pending = 3
    assert seq.reached_length(max_model_len=100)  # max_tokens 4
