"""Synthetic sample tables for tests and benchmarks (no engine needed).

>>> table = synthetic_table(num_groups=2, group_size=2, vocab_size=50, seed=0)
>>> table.num_rows, sorted(set(table.column("group_id").to_pylist()))
(4, ['g0', 'g1'])
"""

from __future__ import annotations

import random

import pyarrow as pa
from slime_rl.buffers.schema import Sample, samples_to_batch


def synthetic_table(
    num_groups: int,
    group_size: int,
    vocab_size: int,
    seed: int = 0,
    prompt_len: tuple[int, int] = (3, 8),
    response_len: tuple[int, int] = (2, 10),
    policy_version: int = 0,
    rewards: list[float] | None = None,
    behaviour_logprob: float = -3.0,
) -> pa.Table:
    """``num_groups`` x ``group_size`` random samples of SAMPLE_SCHEMA.

    Token ids are drawn from [3, vocab_size); rewards alternate 1/0 within a group unless
    ``rewards`` (one per row) is given; engine log-probs are the constant ``behaviour_logprob``.
    """
    rng = random.Random(seed)
    samples = []
    for g in range(num_groups):
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*prompt_len))]
        for k in range(group_size):
            n = rng.randint(*response_len)
            i = len(samples)
            samples.append(
                Sample(
                    sample_id=f"g{g}-{k}",
                    group_id=f"g{g}",
                    prompt_ids=list(prompt),
                    response_ids=[rng.randrange(3, vocab_size) for _ in range(n)],
                    response_logprobs=[behaviour_logprob] * n,
                    reward=rewards[i] if rewards is not None else float(k % 2 == 0),
                    policy_version=policy_version,
                )
            )
    return pa.Table.from_batches([samples_to_batch(samples)])
