"""Checks a global batch must pass before it trains, so bad data fails loudly instead of
training on garbage.

    pa.Table ─► validate_batch (buffers.validation: columns, types, nulls, per-token lengths,
      │          finite rewards, known status/mode; names the column and row)
      ├─► check_global_batch     exactly trainer.global_batch_groups groups
      ├─► behaviour_all_zero     response_logprobs all 0.0 (never filled, or a certain policy)
      └─ (during the step)  check_fresh_gap: mean |trainer - engine| log-prob over loss tokens
                             of staleness 0, before any update, <= trainer.max_logprob_mismatch;
                             all zero: check_all_zero_behaviour over every loss token instead

Every check runs on the whole global batch (or on all-reduced numbers) so all ranks of a
trainer group refuse the same batch together and none is left waiting in a collective.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from slime_rl.buffers.validation import validate_batch
from slime_rl.trainer.batching import group_order

_DISABLE = "set trainer.max_logprob_mismatch=0 to disable this check"


def check_batch(
    table: pa.Table, global_batch_groups: int, exclude_status: list[str] | tuple[str, ...], max_logprob_mismatch: float
) -> bool:
    """Everything that can be checked on the table alone, before any forward pass: the sample
    schema (``buffers.validation.validate_batch``) and the group count.

    Returns whether the behaviour log-probs are exactly 0.0 on every loss token
    (``behaviour_all_zero``; only looked at while ``max_logprob_mismatch`` > 0): the step then
    compares them with the trainer's own on every loss token (``check_all_zero_behaviour``).

    Raises:
        ValueError: on the first problem, naming the column (and row where it applies).
    """
    validate_batch(table)
    check_global_batch(table, global_batch_groups)
    return max_logprob_mismatch > 0 and behaviour_all_zero(table, exclude_status)


def check_global_batch(table: pa.Table, global_batch_groups: int) -> None:
    """Refuse a global batch whose number of distinct groups is not ``trainer.global_batch_groups``."""
    n = len(group_order(table))
    if n != global_batch_groups:
        raise ValueError(
            f"the global batch has {n} group(s) but trainer.global_batch_groups={global_batch_groups}; "
            "the driver must hand train_step exactly that many whole groups (or set global_batch_groups to match)"
        )


def behaviour_all_zero(table: pa.Table, exclude_status: list[str] | tuple[str, ...]) -> bool:
    """Whether the behaviour log-probs are exactly 0.0 on every loss token of the non-excluded
    samples: the ``Sample`` default (the rollout side never filled them), or a policy that has
    become certain of every token it samples (float32 log-softmax rounds to 0.0 there), which
    only the trainer's own log-probs can tell apart."""
    if exclude_status:
        table = table.filter(pc.invert(pc.is_in(table.column("status"), pa.array(list(exclude_status)))))
    if table.num_rows == 0:
        return False
    lp = np.asarray(pc.list_flatten(table.column("response_logprobs")).to_numpy(zero_copy_only=False))
    mask = np.asarray(pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False))
    on_loss = lp[mask > 0]
    return bool(on_loss.size) and not np.any(on_loss != 0.0)


CERTAIN_NATS = 0.05
"""All-zero behaviour log-probs are accepted when the trainer's log-probs of those tokens are
within this many nats of 0 on average (every sampled token near-certain)."""


def check_all_zero_behaviour(total: float, count: float) -> None:
    """Refuse all-zero behaviour log-probs (``behaviour_all_zero``) unless the trainer agrees that
    the sampled tokens are near-certain: mean |trainer log-prob| = ``total / count`` over every
    loss token of the batch, fresh or stale, must be <= ``CERTAIN_NATS``.

    Raises:
        ValueError: naming the column, the trainer's mean log-prob and what was expected.
    """
    if count <= 0:
        return
    mean = total / count
    if mean > CERTAIN_NATS:
        raise ValueError(
            f"column 'response_logprobs' is 0.0 on all {int(count)} loss tokens of the batch, while the trainer gives "
            f"those tokens {-mean:.3f} nats on average; expected the behaviour policy's log-prob of each sampled token "
            "(negative numbers reported by the rollout engine). The rollout side did not fill them, so the importance "
            f"weights would be meaningless; {_DISABLE}"
        )


def check_fresh_gap(total: float, count: float, threshold: float, temperature: float) -> None:
    """Refuse a step whose fresh tokens (generated with the trainer's current weights) have
    behaviour log-probs implausibly far from the trainer's own: mean |gap| = ``total / count``
    nats over ``count`` loss tokens must be <= ``threshold`` (0 = no check). Staleness explains
    gaps on older tokens, nothing but a bug explains a large one here.

    Raises:
        ValueError: naming the column, the measured gap and the threshold.
    """
    if threshold <= 0 or count <= 0:
        return
    mean = total / count
    if mean > threshold:
        raise ValueError(
            f"the behaviour log-probs in column 'response_logprobs' differ from the trainer's by {mean:.3f} nats "
            f"on average over {int(count)} loss tokens generated with the trainer's current weights (staleness 0); "
            f"expected at most trainer.max_logprob_mismatch={threshold} (a matching engine is within ~0.1). Check "
            "that the engine reports the log-prob of each sampled token at the rollout temperature "
            f"(trainer.batching.temperature={temperature}), that it serves the trainer's weights, and that the "
            f"token_versions are right; {_DISABLE}"
        )
