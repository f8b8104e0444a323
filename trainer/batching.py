"""Arrow sample tables -> rank slices -> mini-batches -> padded micro-batches of tensors.

    pa.Table (global batch, whole groups)
      └─ split_batch(table, world_size, n)    mini-batches: n consecutive runs of groups (one
           │                                   per optimizer update, the same for any world
           │                                   size); each run split over the ranks, groups
           │                                   never split, balanced by token count
           └─ RankShare.table ─► RankBatch     response-aligned tensors (N, R): mask, engine
                │                              log-probs, token versions; rewards, group index
                └─ RankShare.minibatch_rows()  this rank's rows of each update
                     └─ plan_micro_batches     (micro_batch.py) rows, or the rows of a group
                                               behind one copy of their prompt, grouped under
                                               a token budget: padded, packed or shared-prompt

Per-token data stays response-aligned: column r of row i is response token r. A micro-batch
carries ``resp_pos_BR``, the position in its input whose logits predict that token.
MoE routing recorded by the engine (the ``routed_experts`` column: one (L x K) entry per
scored position) stays input-aligned: ``routed_experts_BTX[b, t]`` is the routing of input
position t (-1 where none was recorded: padding, the last token, rows without routing).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from slime_rl.trainer.micro_batch import MicroBatch, dummy_micro_batch, plan_micro_batches

__all__ = [
    "MicroBatch", "RankBatch", "RankShare", "dummy_micro_batch", "group_order", "minibatch_groups",
    "plan_micro_batches", "split_batch", "split_groups",
]  # fmt: skip

logger = logging.getLogger(__name__)


def _group_ids(table: pa.Table) -> list[str]:
    return table.column("group_id").to_pylist()


def group_order(table: pa.Table) -> list[str]:
    """Distinct group ids in order of first appearance."""
    seen: dict[str, None] = {}
    for g in _group_ids(table):
        seen.setdefault(g, None)
    return list(seen)


def minibatch_groups(groups: list[str], num_minibatches: int) -> list[list[str]]:
    """``groups`` cut into ``num_minibatches`` consecutive runs whose sizes differ by <= 1."""
    bounds = [round(k * len(groups) / num_minibatches) for k in range(num_minibatches + 1)]
    return [groups[bounds[k] : bounds[k + 1]] for k in range(num_minibatches)]


def _balance(groups: list[str], tokens: dict[str, int], num_ranks: int) -> dict[str, int]:
    """Owner rank of each group: largest first, to the rank with the fewest tokens so far."""
    load = [0] * num_ranks
    owner: dict[str, int] = {}
    for g in sorted(groups, key=lambda g: -tokens[g]):  # stable: ties keep first-appearance order
        rank = min(range(num_ranks), key=lambda r: (load[r], r))
        owner[g] = rank
        load[rank] += tokens[g]
    return owner


@dataclasses.dataclass(frozen=True)
class RankShare:
    """One rank's part of a global batch: its rows, mini-batch after mini-batch."""

    table: pa.Table
    minibatch_sizes: tuple[int, ...]
    """Rows of each mini-batch, in order (they sum to ``table.num_rows``)."""

    def minibatch_rows(self) -> list[list[int]]:
        """Row indices into ``table`` of each mini-batch (consecutive ranges)."""
        out, start = [], 0
        for n in self.minibatch_sizes:
            out.append(list(range(start, start + n)))
            start += n
        return out


def split_batch(table: pa.Table, num_ranks: int, num_minibatches: int = 1) -> list[RankShare]:
    """Cut a global batch into ``num_ranks`` shares of whole groups, aligned by mini-batch.

    The global batch is first cut into ``num_minibatches`` consecutive runs of groups (the
    optimizer updates of one train step, the same runs for any ``num_ranks``); each run is then
    split over the ranks, groups largest first to the rank with the fewest tokens so far.
    So every rank holds at least one group of every mini-batch, and update k on M ranks sees
    exactly the groups that update k sees on one rank. Rows keep their original order inside
    each (rank, mini-batch).

    Raises:
        ValueError: fewer groups than ``num_ranks * num_minibatches`` (a rank without data in
            an update could not take part in its collectives).
    """
    groups = group_order(table)
    need = num_ranks * num_minibatches
    if len(groups) < need:
        raise ValueError(
            f"the batch has {len(groups)} group(s) but trainer.num_workers={num_ranks} x "
            f"trainer.batching.updates_per_batch={num_minibatches} = {need} are needed: every worker needs at least "
            "one whole group in each update; raise trainer.global_batch_groups or lower num_workers / updates_per_batch"
        )
    lengths = pc.add(
        pc.list_value_length(table.column("prompt_ids")), pc.list_value_length(table.column("response_ids"))
    ).to_pylist()
    ids = _group_ids(table)
    tokens: dict[str, int] = dict.fromkeys(groups, 0)
    rows_of: dict[str, list[int]] = {g: [] for g in groups}
    for i, (g, n) in enumerate(zip(ids, lengths, strict=True)):
        tokens[g] += n
        rows_of[g].append(i)
    rows: list[list[int]] = [[] for _ in range(num_ranks)]
    sizes: list[list[int]] = [[] for _ in range(num_ranks)]
    for mb in minibatch_groups(groups, num_minibatches):
        owner = _balance(mb, tokens, num_ranks)
        assert len(set(owner.values())) == num_ranks, "a mini-batch left a rank without groups"
        for r in range(num_ranks):
            mine = sorted(i for g in mb if owner[g] == r for i in rows_of[g])
            rows[r] += mine
            sizes[r].append(len(mine))
    return [
        RankShare(table.take(pa.array(rows[r], type=pa.int64())), tuple(sizes[r])) for r in range(num_ranks)
    ]


def split_groups(table: pa.Table, num_ranks: int) -> list[pa.Table]:
    """``split_batch`` with one mini-batch: ``num_ranks`` tables of whole groups with similar
    token counts (each rank keeps its groups in their original order)."""
    return [share.table for share in split_batch(table, num_ranks, 1)]


@dataclasses.dataclass(frozen=True)
class RankBatch:
    """One rank's samples in response-aligned layout (N rows, R = longest response)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    mask_NR: torch.Tensor  # (N, R) float, loss_mask (0 on padding)
    behaviour_NR: torch.Tensor  # (N, R) float, engine log-probs
    token_versions_NR: torch.Tensor  # (N, R) long, policy version of each token
    rewards_N: torch.Tensor  # (N,) float
    group_index_N: torch.Tensor  # (N,) long, 0..G-1 in order of first appearance
    policy_version_N: torch.Tensor  # (N,) long
    keep_N: torch.Tensor | None = None  # (N,) bool: status not excluded (None = all kept)
    routed_experts: list[np.ndarray | None] | None = None
    """Per row: int16 (P + R - 1, X) engine routing (X = MoE layers x top-k), None where not
    recorded; None for the whole batch when no row has any (dense models)."""
    teacher_NR: torch.Tensor | None = None
    """(N, R) float: teacher log-probs of the sampled tokens (``teacher_logprobs``, on-policy
    distillation); None when the column is absent or empty in every row."""
    teacher_scored_N: torch.Tensor | None = None
    """(N,) bool: the row has teacher log-probs (set with ``teacher_NR``)."""

    @property
    def kept_N(self) -> torch.Tensor:
        return torch.ones(self.num_rows, dtype=torch.bool) if self.keep_N is None else self.keep_N

    @property
    def num_rows(self) -> int:
        return len(self.response_ids)

    @classmethod
    def from_table(cls, table: pa.Table, exclude_status: tuple[str, ...] | list[str] = ()) -> RankBatch:
        """Dense tensors of ``table``; rows whose ``status`` is in ``exclude_status`` get keep_N False."""
        cols = table.select(["prompt_ids", "response_ids", "reward", "group_id", "policy_version"]).to_pydict()
        n = table.num_rows
        lens_N = np.array([len(r) for r in cols["response_ids"]], dtype=np.int64)
        # At least one column: a batch whose responses are all empty still gets (N, 1) tensors
        # (mask 0), the width of the micro-batches built from it.
        width = max(int(lens_N.max()) if n else 0, 1)
        # Scatter the flat per-token values into (N, R): row i, column j < len_i.
        rows = np.repeat(np.arange(n), lens_N)
        starts = np.repeat(np.cumsum(lens_N) - lens_N, lens_N)
        cols_idx = np.arange(int(lens_N.sum())) - starts

        def dense(name: str, dtype: torch.dtype) -> torch.Tensor:
            flat = pc.list_flatten(table.column(name)).to_numpy(zero_copy_only=False)
            out = torch.zeros(n, width, dtype=dtype)
            out[torch.from_numpy(rows), torch.from_numpy(cols_idx)] = torch.tensor(flat, dtype=dtype)
            return out

        mask_NR = dense("loss_mask", torch.float32)
        behaviour_NR = dense("response_logprobs", torch.float32)
        token_versions_NR = dense("token_versions", torch.long)
        teacher_NR = teacher_scored_N = None
        if "teacher_logprobs" in table.schema.names:
            t_lens_N = np.asarray(pc.list_value_length(table.column("teacher_logprobs")).to_numpy(zero_copy_only=False))
            if t_lens_N.any():  # validation: each row is empty or one entry per response token
                teacher_scored_N = torch.from_numpy(t_lens_N == lens_N) & torch.from_numpy(lens_N > 0)
                teacher_NR = torch.zeros(n, width, dtype=torch.float32)
                flat = torch.tensor(pc.list_flatten(table.column("teacher_logprobs")).to_numpy(zero_copy_only=False),
                                    dtype=torch.float32)
                t_rows = np.repeat(np.arange(n), t_lens_N)
                t_cols = np.arange(int(t_lens_N.sum())) - np.repeat(np.cumsum(t_lens_N) - t_lens_N, t_lens_N)
                teacher_NR[torch.from_numpy(t_rows), torch.from_numpy(t_cols)] = flat
        index = {g: j for j, g in enumerate(dict.fromkeys(cols["group_id"]))}
        keep_N = None
        if exclude_status:
            excluded = set(exclude_status)
            keep_N = torch.tensor([s not in excluded for s in table.column("status").to_pylist()], dtype=torch.bool)
        return cls(
            routed_experts=_routing_rows(table),
            prompt_ids=cols["prompt_ids"],
            response_ids=cols["response_ids"],
            mask_NR=mask_NR,
            behaviour_NR=behaviour_NR,
            token_versions_NR=token_versions_NR,
            rewards_N=torch.tensor(cols["reward"], dtype=torch.float32),
            group_index_N=torch.tensor([index[g] for g in cols["group_id"]], dtype=torch.long),
            policy_version_N=torch.tensor(cols["policy_version"], dtype=torch.long),
            keep_N=keep_N,
            teacher_NR=teacher_NR,
            teacher_scored_N=teacher_scored_N,
        )


def _routing_rows(table: pa.Table) -> list[np.ndarray | None] | None:
    """The ``routed_experts`` column as one (positions, X) array per row (None where empty), read
    from the flat Arrow buffers; None when the column is absent or empty in every row."""
    if "routed_experts" not in table.schema.names:
        return None
    col = table.column("routed_experts")
    outer = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))
    if not outer.any():
        return None
    inner = pc.list_flatten(col)
    width = int(pc.list_value_length(inner)[0].as_py())
    flat = np.asarray(pc.list_flatten(inner).to_numpy(zero_copy_only=False)).reshape(-1, width)
    offsets = np.concatenate([[0], np.cumsum(outer)])
    return [flat[offsets[i] : offsets[i + 1]] if outer[i] else None for i in range(len(outer))]
