"""Checks a global batch must pass before it trains, so bad data fails loudly instead of
training on garbage.

    pa.Table ─► validate_batch (buffers.validation: columns, types, nulls, per-token lengths,
      │          finite rewards, known status/mode; names the column and row)
      ├─► check_global_batch     exactly trainer.global_batch_groups groups
      ├─► check_behaviour_filled response_logprobs not all 0.0 (never filled by the engine)
      └─ (during the step)  check_fresh_gap: mean |trainer - engine| log-prob over loss tokens
                             of staleness 0, before any update, <= trainer.max_logprob_mismatch

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
) -> None:
    """Everything that can be checked on the table alone, before any forward pass: the sample
    schema (``buffers.validation.validate_batch``), the group count, and (unless
    ``max_logprob_mismatch`` is 0) filled behaviour log-probs.

    Raises:
        ValueError: on the first problem, naming the column (and row where it applies).
    """
    validate_batch(table)
    check_global_batch(table, global_batch_groups)
    if max_logprob_mismatch > 0:
        check_behaviour_filled(table, exclude_status)


def check_global_batch(table: pa.Table, global_batch_groups: int) -> None:
    """Refuse a global batch whose number of distinct groups is not ``trainer.global_batch_groups``."""
    n = len(group_order(table))
    if n != global_batch_groups:
        raise ValueError(
            f"the global batch has {n} group(s) but trainer.global_batch_groups={global_batch_groups}; "
            "the driver must hand train_step exactly that many whole groups (or set global_batch_groups to match)"
        )


def check_behaviour_filled(table: pa.Table, exclude_status: list[str] | tuple[str, ...]) -> None:
    """Refuse a batch whose behaviour log-probs are exactly 0.0 on every loss token of its
    non-excluded samples (the ``Sample`` default: the rollout side never filled them). A real
    engine's log-prob of a sampled token is < 0 except for near-certain tokens, never all.

    Raises:
        ValueError: naming the column and what was expected.
    """
    if exclude_status:
        table = table.filter(pc.invert(pc.is_in(table.column("status"), pa.array(list(exclude_status)))))
    if table.num_rows == 0:
        return
    lp = np.asarray(pc.list_flatten(table.column("response_logprobs")).to_numpy(zero_copy_only=False))
    mask = np.asarray(pc.list_flatten(table.column("loss_mask")).to_numpy(zero_copy_only=False))
    on_loss = lp[mask > 0]
    if on_loss.size and not np.any(on_loss != 0.0):
        raise ValueError(
            f"column 'response_logprobs' is 0.0 on all {on_loss.size} loss tokens of the batch; expected the "
            "behaviour policy's log-prob of each sampled token (negative numbers reported by the rollout engine). "
            f"The rollout side did not fill them, so the importance weights would be meaningless; {_DISABLE}"
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
