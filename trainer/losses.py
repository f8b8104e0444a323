"""Policy-gradient and value losses as per-token tensors, plus aggregation.

Every function returns a ``(B, L)`` per-token loss; ``aggregate`` turns it into this
micro-batch's share of the global loss. The normalisers (token and sequence counts) are
those of the whole global mini-batch across all ranks, so summing the shares of every
micro-batch on every rank gives exactly the loss of the global batch: gradient accumulation
and data parallelism change nothing but floating-point order.

    logprobs, proximal, advantages ─► policy_loss ─► (B, L) ─┐
    entropy, NLL (model.response_logprobs) ─────────────────►├─► aggregate(mask, norm) ─► scalar
    values, returns ─► value_loss ──────────────────────────►┘

PPO clipped surrogate (per token, ratio = pi/pi_prox):
    loss = max(-A ratio, -A clip(ratio, 1 - eps_low, 1 + eps_high))
    dual clip (A < 0 only): loss = min(loss, -c A)
GSPO replaces the token ratio by the sequence ratio exp(mean_t log(pi/pi_prox)).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from slime_rl.trainer.config import LossConfig
from slime_rl.trainer.kl import exp_log_ratio


@dataclasses.dataclass(frozen=True)
class LossNorm:
    """Global normalisers: loss tokens and sequences (with >= 1 loss token) of the mini-batch."""

    num_tokens: float
    num_seqs: float


@dataclasses.dataclass(frozen=True)
class PolicyLossOut:
    loss_BL: torch.Tensor
    ratio_BL: torch.Tensor
    clipped_BL: torch.Tensor
    dual_clipped_BL: torch.Tensor


def _token_mean(masked_BL: torch.Tensor, m_BL: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return masked_BL.sum() / max(norm.num_tokens, 1.0)


def _seq_mean_token_mean(masked_BL: torch.Tensor, m_BL: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    per_seq_B = masked_BL.sum(dim=1) / m_BL.sum(dim=1).clamp(min=1.0)
    return per_seq_B.sum() / max(norm.num_seqs, 1.0)


def _seq_mean_token_sum(masked_BL: torch.Tensor, m_BL: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return masked_BL.sum() / max(norm.num_seqs, 1.0)


AggregateFn = Callable[[torch.Tensor, torch.Tensor, LossNorm], torch.Tensor]
AGGREGATIONS: dict[str, AggregateFn] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
}


def aggregate(loss_BL: torch.Tensor, mask_BL: torch.Tensor, mode: str, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's share of the global aggregate (sum the shares over micro-batches and ranks).

    token_mean:          sum over tokens / global token count
    seq_mean_token_mean: sum over sequences of (per-sequence token mean) / global sequence count
    seq_mean_token_sum:  sum over sequences of (per-sequence token sum) / global sequence count
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"trainer.loss.aggregation={mode!r} is unknown; choose one of {sorted(AGGREGATIONS)}")
    m_BL = mask_BL.to(loss_BL.dtype)
    return AGGREGATIONS[mode](loss_BL * m_BL, m_BL, norm)


def _clipped_surrogate(
    ratio_BL: torch.Tensor, advantages_BL: torch.Tensor, cfg: LossConfig
) -> PolicyLossOut:
    """PPO's clipped surrogate of a per-token (PPO) or per-sequence (GSPO) ``ratio_BL``."""
    adv_BL = advantages_BL.to(ratio_BL.dtype)
    unclipped_BL = -adv_BL * ratio_BL
    clipped_BL = -adv_BL * ratio_BL.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss_BL = torch.maximum(unclipped_BL, clipped_BL)
    is_clipped_BL = clipped_BL > unclipped_BL
    is_dual_BL = torch.zeros_like(is_clipped_BL)
    if cfg.dual_clip is not None:
        cap_BL = -adv_BL * cfg.dual_clip
        negative_BL = adv_BL < 0
        is_dual_BL = negative_BL & (loss_BL > cap_BL)
        loss_BL = torch.where(negative_BL, torch.minimum(loss_BL, cap_BL), loss_BL)
    return PolicyLossOut(loss_BL, ratio_BL, is_clipped_BL, is_dual_BL)


def ppo_loss(
    logprobs_BL: torch.Tensor,
    proximal_BL: torch.Tensor,
    advantages_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Token-level clipped surrogate with clip-higher and dual-clip."""
    ratio_BL = exp_log_ratio(logprobs_BL - proximal_BL)
    return _clipped_surrogate(ratio_BL, advantages_BL, cfg)


def gspo_loss(
    logprobs_BL: torch.Tensor,
    proximal_BL: torch.Tensor,
    advantages_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Sequence-level ratio s_i = exp(mean over loss tokens of log(pi/pi_prox)), clipped like PPO.
    Every token of a sequence carries the same loss value; with seq_mean_token_mean this is
    exactly GSPO's per-sequence objective."""
    m_BL = mask_BL.to(logprobs_BL.dtype)
    log_ratio_BL = (logprobs_BL - proximal_BL) * m_BL
    seq_log_ratio_B = log_ratio_BL.sum(dim=1) / m_BL.sum(dim=1).clamp(min=1.0)
    ratio_BL = exp_log_ratio(seq_log_ratio_B)[:, None].expand_as(logprobs_BL)
    return _clipped_surrogate(ratio_BL, advantages_BL, cfg)


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossConfig], PolicyLossOut]
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo": ppo_loss, "gspo": gspo_loss}


def policy_loss(
    name: str,
    logprobs_BL: torch.Tensor,
    proximal_BL: torch.Tensor,
    advantages_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Dispatch to ``POLICY_LOSSES[name]``."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"trainer.loss.policy_loss={name!r} is unknown; choose one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](logprobs_BL, proximal_BL, advantages_BL, mask_BL, cfg)


def value_loss(
    values_BL: torch.Tensor,
    old_values_BL: torch.Tensor,
    returns_BL: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) per token, and where the clip won."""
    err_BL = (values_BL - returns_BL) ** 2
    if clip is None:
        return 0.5 * err_BL, torch.zeros_like(err_BL, dtype=torch.bool)
    v_clip_BL = old_values_BL + (values_BL - old_values_BL).clamp(-clip, clip)
    err_clip_BL = (v_clip_BL - returns_BL) ** 2
    return 0.5 * torch.maximum(err_BL, err_clip_BL), err_clip_BL > err_BL
