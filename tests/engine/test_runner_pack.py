"""The runner's packed step inputs against a row-by-row reference of the layout in engine/runner.py."""

import numpy as np

from engine.runner import Bucket, ModelRunner
from engine.scheduler import ScheduledSeq, StepPlan
from engine.sequence import PENDING


def reference_pack(plan: StepPlan, bucket: Bucket, page_size: int, prev_rows: dict[str, int]) -> np.ndarray:
    """[tokens T | positions T | slots T | token_seq T | src T | block_tables B*P | seq_lens B | qsl B+1 | logit_rows B]."""
    t, b, p = bucket.tokens, bucket.rows, bucket.pages
    tokens, positions, token_seq, src = [0] * t, [0] * t, [b - 1] * t, [-1] * t
    slots = [i % page_size for i in range(t)]  # padding writes into the trash page
    tables = [[0] * p for _ in range(b)]
    seq_lens, qsl, rows = [0] * b, [0] * (b + 1), [0] * b
    at = 0
    for i, s in enumerate(plan.seqs):
        tables[i][:len(s.page_ids)] = s.page_ids
        for j, tok in enumerate(s.token_ids):
            pos = s.start_pos + j
            tokens[at], positions[at], token_seq[at] = tok, pos, i
            if tok == PENDING:
                src[at] = prev_rows[s.seq_id]
            slots[at] = s.page_ids[pos // page_size] * page_size + pos % page_size
            at += 1
        seq_lens[i] = s.start_pos + len(s.token_ids)
        rows[i] = at - 1
        qsl[i + 1] = at
    for i in range(len(plan.seqs) + 1, b + 1):
        qsl[i] = at
    flat = [x for row in tables for x in row]
    return np.asarray(tokens + positions + slots + token_seq + src + flat + seq_lens + qsl + rows, np.int32)


def test_pack_matches_row_by_row_layout():
    rng = np.random.default_rng(0)
    runner = ModelRunner.__new__(ModelRunner)  # _pack needs only the page size
    for trial in range(200):
        runner.page_size = page_size = int(rng.choice([4, 16]))
        seqs = []
        # decodes (some of a token still on the device), prompt chunks after cached context, fresh prompts
        for i in range(int(rng.integers(0, 6))):
            n, start = int(rng.integers(1, 9)), int(rng.integers(0, 40))
            held = -(-(start + n) // page_size) + int(rng.integers(0, 2))  # sometimes a page ahead
            pages = tuple(int(x) for x in rng.choice(np.arange(1, 500), held, replace=False))
            ids = (PENDING,) if n == 1 and rng.integers(0, 2) else tuple(int(x) for x in rng.integers(0, 99, n))
            seqs.append(ScheduledSeq(f"r{i}-0", ids, start, pages, True))
        plan = StepPlan(tuple(seqs), (), ())
        prev_rows = {f"r{i}-0": int(r) for i, r in enumerate(rng.permutation(9)[:len(seqs)])}
        tokens = max(8, plan.num_tokens)
        bucket = Bucket(tokens, 7, max([len(s.page_ids) for s in seqs] + [1]) + int(rng.integers(0, 3)))
        want = reference_pack(plan, bucket, page_size, prev_rows)
        got = runner._pack(plan, bucket, prev_rows)
        assert got.dtype == np.int32 and np.array_equal(got, want), trial
        steps = np.arange(7, dtype=np.int32)  # a fused call's field
        assert np.array_equal(runner._pack(plan, bucket, prev_rows, steps), np.concatenate([want, steps]))
