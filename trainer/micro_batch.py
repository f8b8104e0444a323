"""Micro-batches: some rows of a RankBatch laid out as model inputs.

    rows of one mini-batch ─► units (a unit = samples that run as one sequence)
      │   share_prompt: the rows of a group with the same prompt_ids form one unit
      │   [prompt | response 1 | response 2 | ...]; otherwise one row per unit
      └─► plan_micro_batches: units longest first, under a token budget, into input rows

    layout                    model inputs                                    resp_pos
    padded (no sharing)       (B, T) ids + (B, T) padding mask                 per row
    pack (no sharing)         (1, L) ids + position_ids restarting per row     flat
    share_prompt              (U, T) ids + position_ids + (U, 1, T, T) block   flat
                              mask; rows as long as the longest unit, shorter
                              units first-fit side by side (one row with pack)

The block mask lets a position see earlier positions of its own unit that are prompt or in
its own response, never a sibling response or another unit; positions continue from the
prompt as if each sample stood alone. So every layout gives each response token the same
logits as its sample alone, up to float rounding (tested). Sharing computes a group's prompt
once instead of n_samples_per_prompt times, and first-fit rows leave little padding.

Per-token data stays response-aligned: column r of row b is response token r of sample
``rows[b]``; ``resp_pos_BR`` gives the input position whose logits predict it: an index into
the flattened input (U * T) when ``packed`` (pack or share_prompt), else into the row.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from slime_rl.trainer.batching import RankBatch

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
    """Inputs of some rows of a RankBatch (see the module docstring for the layouts)."""

    rows: torch.Tensor  # (B,) indices into the RankBatch
    input_ids_BT: torch.Tensor  # (U, T) long: U = B padded; 1 packed; units when sharing prompts
    attention_mask_BT: torch.Tensor | None  # (B, T) long, padded layout only
    resp_pos_BR: torch.Tensor  # (B, R) long, logits position predicting response token r (flat index when ``flat``)
    response_ids_BR: torch.Tensor  # (B, R) long (0 on padding)
    dummy: bool = False
    """A stand-in that only keeps collectives in step on a rank with fewer micro-batches: its loss weight is 0."""
    position_ids_BT: torch.Tensor | None = None
    """Packed and shared-prompt layouts: each sample's positions as if it stood alone."""
    routed_experts_BTX: torch.Tensor | None = None
    """(B, T, X) long, engine routing of each input position (X = MoE layers x top-k), -1 where
    none was recorded; None when no row of the micro-batch has routing."""
    block_mask_B1TT: torch.Tensor | None = None
    """(U, 1, T, T) bool, shared-prompt layout only: True where query position t may attend to
    key position s. Passed to the model as its (4D) attention mask."""

    @property
    def packed(self) -> bool:
        """Whether ``resp_pos_BR`` indexes the flattened input (packed or shared-prompt layout)."""
        return self.position_ids_BT is not None

    @property
    def width(self) -> int:
        return self.resp_pos_BR.shape[1]

    @property
    def num_tokens(self) -> int:
        """Input positions the model computes (padding included)."""
        return self.input_ids_BT.numel()

    def take(self, x_NR: torch.Tensor) -> torch.Tensor:
        """This micro-batch's rows of a response-aligned (N, R...) tensor, cut to its width."""
        out = x_NR[self.rows]
        return out[:, : self.width] if out.dim() > 1 else out

    def to(self, device: torch.device | str) -> MicroBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            input_ids_BT=self.input_ids_BT.to(device),
            attention_mask_BT=move(self.attention_mask_BT),
            resp_pos_BR=self.resp_pos_BR.to(device),
            response_ids_BR=self.response_ids_BR.to(device),
            position_ids_BT=move(self.position_ids_BT),
            routed_experts_BTX=move(self.routed_experts_BTX),
            block_mask_B1TT=move(self.block_mask_B1TT),
        )


def _routing_tensor(rb: RankBatch, rows: list[int], B: int, T: int, starts: list[int]) -> torch.Tensor | None:
    """(B, T, X) long: row ``rows[k]``'s routing at input positions ``starts[k]..`` of batch row
    ``k`` (padded; B = len(rows)) or ``0`` (packed; B = 1), -1 elsewhere; None when none of
    ``rows`` has routing."""
    if rb.routed_experts is None or all(rb.routed_experts[i] is None for i in rows):
        return None
    width = next(r.shape[1] for r in rb.routed_experts if r is not None)
    out_BTX = torch.full((B, T, width), -1, dtype=torch.long)
    for k, i in enumerate(rows):
        r = rb.routed_experts[i]
        if r is not None:
            out_BTX[0 if B == 1 else k, starts[k] : starts[k] + len(r)] = torch.from_numpy(r.astype(np.int64))
    return out_BTX


def _check_prompt(rb: RankBatch, i: int) -> None:
    if not rb.prompt_ids[i]:
        raise ValueError(f"sample row {i} has an empty prompt_ids; the first response token needs a context")


def _response_tensors(rb: RankBatch, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    R = max(max(len(rb.response_ids[i]) for i in rows), 1)
    resp_pos_BR = torch.zeros(len(rows), R, dtype=torch.long)
    response_ids_BR = torch.zeros(len(rows), R, dtype=torch.long)
    for b, i in enumerate(rows):
        r = rb.response_ids[i]
        if r:
            response_ids_BR[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return resp_pos_BR, response_ids_BR


def _build(rb: RankBatch, rows: list[int], pad_id: int, dummy: bool = False) -> MicroBatch:
    """Padded layout: one row per sample, right-padded."""
    seq_lens = [len(rb.prompt_ids[i]) + len(rb.response_ids[i]) for i in rows]
    T, B = max(seq_lens), len(rows)
    input_ids_BT = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask_BT = torch.zeros(B, T, dtype=torch.long)
    resp_pos_BR, response_ids_BR = _response_tensors(rb, rows)
    for b, i in enumerate(rows):
        _check_prompt(rb, i)
        p, r = rb.prompt_ids[i], rb.response_ids[i]
        input_ids_BT[b, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attention_mask_BT[b, : len(p) + len(r)] = 1
        resp_pos_BR[b, : len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
    return MicroBatch(
        torch.tensor(rows, dtype=torch.long), input_ids_BT, attention_mask_BT, resp_pos_BR, response_ids_BR, dummy,
        routed_experts_BTX=_routing_tensor(rb, rows, B, T, [0] * B),
    )


def _build_packed(rb: RankBatch, rows: list[int]) -> MicroBatch:
    """Packed layout: all ``rows`` concatenated into one sequence; positions restart per sample."""
    ids: list[int] = []
    positions: list[int] = []
    starts: list[int] = []
    resp_pos_BR, response_ids_BR = _response_tensors(rb, rows)
    for b, i in enumerate(rows):
        _check_prompt(rb, i)
        p, r = rb.prompt_ids[i], rb.response_ids[i]
        offset = len(ids)
        starts.append(offset)
        ids += p + r
        positions += list(range(len(p) + len(r)))
        resp_pos_BR[b, : len(r)] = torch.arange(offset + len(p) - 1, offset + len(p) - 1 + len(r))
    return MicroBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        input_ids_BT=torch.tensor([ids], dtype=torch.long),
        attention_mask_BT=None,
        resp_pos_BR=resp_pos_BR,
        response_ids_BR=response_ids_BR,
        position_ids_BT=torch.tensor([positions], dtype=torch.long),
        routed_experts_BTX=_routing_tensor(rb, rows, 1, len(ids), starts),
    )


def _build_shared(rb: RankBatch, bins: list[list[list[int]]], pad_id: int) -> MicroBatch:
    """Shared-prompt layout: each unit is [prompt | response of each of its rows]; ``bins`` are
    the input rows, each holding one or more units side by side (the block mask keeps units
    apart), right-padded to the longest."""
    rows = [i for units in bins for u in units for i in u]
    resp_pos_BR, response_ids_BR = _response_tensors(rb, rows)
    T = max(sum(_unit_len(rb, u) for u in units) for units in bins)
    input_ids_BT = torch.full((len(bins), T), pad_id, dtype=torch.long)
    position_ids_BT = torch.zeros(len(bins), T, dtype=torch.long)
    seg_BT = torch.full((len(bins), T), -1, dtype=torch.long)  # 0 = prompt, k = k-th response of its unit
    unit_BT = torch.full((len(bins), T), -1, dtype=torch.long)
    b = 0
    for row, units in enumerate(bins):
        ids: list[int] = []
        pos: list[int] = []
        seg: list[int] = []
        unit: list[int] = []
        for n, u in enumerate(units):
            _check_prompt(rb, u[0])
            p = rb.prompt_ids[u[0]]
            start = row * T + len(ids)  # flat index of the unit's first position
            ids += p
            pos += range(len(p))
            seg += [0] * len(p)
            for k, i in enumerate(u, start=1):
                r = rb.response_ids[i]
                # token 0 is predicted at the prompt's last position, token j at response token j - 1
                here = [start + len(p) - 1] + [row * T + len(ids) + j for j in range(len(r) - 1)]
                resp_pos_BR[b, : len(r)] = torch.tensor(here[: len(r)], dtype=torch.long)
                ids += r
                pos += range(len(p), len(p) + len(r))
                seg += [k] * len(r)
                b += 1
            unit += [n] * (len(ids) - len(unit))
        input_ids_BT[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        position_ids_BT[row, : len(ids)] = torch.tensor(pos, dtype=torch.long)
        seg_BT[row, : len(ids)] = torch.tensor(seg, dtype=torch.long)
        unit_BT[row, : len(ids)] = torch.tensor(unit, dtype=torch.long)
    return MicroBatch(
        rows=torch.tensor(rows, dtype=torch.long),
        input_ids_BT=input_ids_BT,
        attention_mask_BT=None,
        resp_pos_BR=resp_pos_BR,
        response_ids_BR=response_ids_BR,
        position_ids_BT=position_ids_BT,
        block_mask_B1TT=block_mask(seg_BT, unit_BT),
    )


def _unit_len(rb: RankBatch, unit: list[int]) -> int:
    """Input positions of a unit: its prompt once plus every response."""
    return len(rb.prompt_ids[unit[0]]) + sum(len(rb.response_ids[i]) for i in unit)


def block_mask(seg_BT: torch.Tensor, unit_BT: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: query t sees key s <= t of its own unit that is a prompt position (segment
    0) or in t's own segment. Padding (segment -1) sees only itself, so no softmax row is empty."""
    T = seg_BT.shape[1]
    q_seg, k_seg = seg_BT[:, :, None], seg_BT[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same_unit = unit_BT[:, :, None] == unit_BT[:, None, :]
    visible = causal & same_unit & ((k_seg == 0) | (k_seg == q_seg)) & (q_seg >= 0)
    pad_self = (seg_BT < 0)[:, :, None] & torch.eye(T, dtype=torch.bool)
    return (visible | pad_self)[:, None]


def prompt_units(rb: RankBatch, rows: list[int], share_prompt: bool, attention_weight: float = 0.0) -> list[list[int]]:
    """``rows`` cut into units: with ``share_prompt`` the rows of one group with identical
    prompt_ids (in row order), else one row each.

    A shared unit computes the prompt once but attends over its whole length (the dense block
    mask): with ``attention_weight`` w > 0 a group is shared only where that is cheaper, by the
    cost ``L + w * L**2`` of a sequence of L positions (w: one query-key pair's compute relative
    to one position's dense layers, `attention_weight_of` below). Long responses (hundreds of tokens
    x n samples) then train as separate rows, short ones behind one prompt.
    """
    if not share_prompt:
        return [[i] for i in rows]
    groups: dict[tuple[int, tuple[int, ...]], list[int]] = {}
    for i in rows:
        groups.setdefault((int(rb.group_index_N[i]), tuple(rb.prompt_ids[i])), []).append(i)
    units: list[list[int]] = []
    for unit in groups.values():
        if attention_weight > 0 and len(unit) > 1:
            alone = [len(rb.prompt_ids[i]) + len(rb.response_ids[i]) for i in unit]
            shared = _unit_len(rb, unit)
            if shared + attention_weight * shared**2 >= sum(n + attention_weight * n**2 for n in alone):
                units.extend([i] for i in unit)
                continue
        units.append(unit)
    return units


def attention_weight_of(config) -> float:
    """Forward FLOPs of attending over one (query, key) pair relative to those of one position
    through the dense layers, for an HF decoder config: ``4 * layers * heads * head_dim`` (scores
    and the weighted sum) over ``2 * (non-embedding parameters + the output projection)``.
    0.0 when the config lacks the sizes (every group is then shared)."""
    try:
        layers, hidden, vocab = int(config.num_hidden_layers), int(config.hidden_size), int(config.vocab_size)
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
        inter = int(getattr(config, "intermediate_size", 4 * hidden))
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
    except (AttributeError, TypeError, ValueError):
        return 0.0
    per_layer = hidden * heads * head_dim * 2 + hidden * kv * head_dim * 2 + 3 * hidden * inter
    return 4 * layers * heads * head_dim / (2 * (layers * per_layer + hidden * vocab))


def plan_micro_batches(
    rb: RankBatch, rows: list[int], max_tokens: int, pad_id: int, pack: bool = False, share_prompt: bool = False,
    attention_weight: float = 0.0,
) -> list[MicroBatch]:
    """Group ``rows`` into micro-batches within a token budget, longest first.

    Without ``share_prompt``: padded (default), rows x longest row <= max_tokens; packed, the
    rows' summed length <= max_tokens, in one sequence. With ``share_prompt`` the units (the rows
    of a group that share their prompt: the prompt once plus every response) go into input rows
    first-fit, each row as long as the longest unit (one row when ``pack``), under the same
    budget. A single row or unit longer than the budget gets a micro-batch of its own (and a
    warning). ``attention_weight`` > 0: a group shares its prompt only where that costs less
    (`prompt_units`).
    """
    share_prompt = share_prompt and rb.routed_experts is None  # routing is per sample, prompt included
    units = prompt_units(rb, rows, share_prompt, attention_weight)
    lens = [_unit_len(rb, u) for u in units]
    order = sorted(range(len(units)), key=lambda k: (-lens[k], units[k][0]))
    plans: list[list[list[int]]] = []  # micro-batch -> input rows -> units (indices into `units`)
    current: list[list[int]] = []
    for k in order:
        if current and _cost(current, k, lens, pack, share_prompt) > max_tokens:
            plans.append(current)
            current = []
        if not current and lens[k] > max_tokens:
            logger.warning(
                "sample row(s) %s have %d tokens, more than trainer.batching.max_tokens_per_micro_batch=%d; "
                "they get a micro-batch of their own", units[k], lens[k], max_tokens
            )
        _place(current, k, lens, pack, share_prompt)
    if current:
        plans.append(current)
    if share_prompt:
        return [_build_shared(rb, [[units[k] for k in row] for row in plan], pad_id) for plan in plans]
    flat = [[units[k][0] for row in plan for k in row] for plan in plans]
    return [_build_packed(rb, p) if pack else _build(rb, p, pad_id) for p in flat]


def _place(plan: list[list[int]], k: int, lens: list[int], pack: bool, share_prompt: bool) -> None:
    """Put unit ``k`` into the micro-batch ``plan`` (a list of input rows): packed, into its one
    row; sharing prompts, into the first row with room (rows as long as the first, longest unit);
    else into a new row."""
    if plan and pack:
        plan[0].append(k)
        return
    if plan and share_prompt:
        width = lens[plan[0][0]]
        for row in plan:
            if sum(lens[j] for j in row) + lens[k] <= width:
                row.append(k)
                return
    plan.append([k])


def _cost(plan: list[list[int]], k: int, lens: list[int], pack: bool, share_prompt: bool) -> int:
    """Input positions of ``plan`` once unit ``k`` is placed (padding included)."""
    trial = [list(row) for row in plan]
    _place(trial, k, lens, pack, share_prompt)
    return len(trial) * max(sum(lens[j] for j in row) for row in trial)


def dummy_micro_batch(rb: RankBatch, pad_id: int) -> MicroBatch:
    """A one-row micro-batch with zero loss weight, to match another rank's micro-batch count."""
    shortest = min(range(rb.num_rows), key=lambda i: len(rb.prompt_ids[i]) + len(rb.response_ids[i]))
    return _build(rb, [shortest], pad_id, dummy=True)
