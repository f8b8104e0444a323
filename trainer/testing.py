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


def policy_logprobs(core, table: pa.Table, offset: float = 0.0) -> list[list[float]]:
    """Per row of ``table``: the log-prob (temperature 1, + ``offset`` nats) that ``core``'s
    policy (a ``TrainerCore``) gives each response token; lists of length R_i."""
    import torch
    from slime_rl.trainer.batching import RankBatch, plan_micro_batches
    from slime_rl.trainer.model import response_logprobs

    rb = RankBatch.from_table(table)
    out: list[list[float]] = [[] for _ in range(rb.num_rows)]
    with torch.no_grad():
        for mb in plan_micro_batches(rb, list(range(rb.num_rows)), 10_000, core.pad_id):
            lp_BR, _ = response_logprobs(core.policy, mb, 1.0)
            for b, i in enumerate(mb.rows.tolist()):
                out[i] = [v + offset for v in lp_BR[b, : len(rb.response_ids[i])].tolist()]
    return out


def on_policy(core, table: pa.Table, offset: float = 0.0) -> pa.Table:
    """``table`` with ``response_logprobs`` = ``policy_logprobs(core, table, offset)``: behaviour
    log-probs as an engine serving the core's weights would report them (passes the trainer's
    mismatch check when ``offset`` is 0)."""
    i = table.schema.get_field_index("response_logprobs")
    values = pa.array(policy_logprobs(core, table, offset), type=pa.list_(pa.float32()))
    return table.set_column(i, table.schema.field(i), values)
