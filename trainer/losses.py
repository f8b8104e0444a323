"""Policy-gradient and value losses as per-token tensors, plus aggregation.

Every function returns a ``(B, R)`` per-token loss; ``aggregate`` turns it into this
micro-batch's share of the global loss. The normalisers (token and sequence counts) are
those of the whole global mini-batch across all ranks, so summing the shares of every
micro-batch on every rank gives exactly the loss of the global batch: gradient accumulation
and data parallelism change nothing but floating-point order.

    logprobs, proximal, advantages ─► policy_loss ─► (B, R) ─┐
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
    loss_BR: torch.Tensor
    ratio_BR: torch.Tensor
    clipped_BR: torch.Tensor
    dual_clipped_BR: torch.Tensor


def _token_mean(masked_BR: torch.Tensor, m_BR: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return masked_BR.sum() / max(norm.num_tokens, 1.0)


def _seq_mean_token_mean(masked_BR: torch.Tensor, m_BR: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    per_seq_B = masked_BR.sum(dim=1) / m_BR.sum(dim=1).clamp(min=1.0)
    return per_seq_B.sum() / max(norm.num_seqs, 1.0)


def _seq_mean_token_sum(masked_BR: torch.Tensor, m_BR: torch.Tensor, norm: LossNorm) -> torch.Tensor:
    return masked_BR.sum() / max(norm.num_seqs, 1.0)


AggregateFn = Callable[[torch.Tensor, torch.Tensor, LossNorm], torch.Tensor]
AGGREGATIONS: dict[str, AggregateFn] = {
    "token_mean": _token_mean,
    "seq_mean_token_mean": _seq_mean_token_mean,
    "seq_mean_token_sum": _seq_mean_token_sum,
}


def aggregate(loss_BR: torch.Tensor, mask_BR: torch.Tensor, mode: str, norm: LossNorm) -> torch.Tensor:
    """This micro-batch's share of the global aggregate (sum the shares over micro-batches and ranks).

    token_mean:          sum over tokens / global token count
    seq_mean_token_mean: sum over sequences of (per-sequence token mean) / global sequence count
    seq_mean_token_sum:  sum over sequences of (per-sequence token sum) / global sequence count
    """
    if mode not in AGGREGATIONS:
        raise ValueError(f"trainer.loss.aggregation={mode!r} is unknown; choose one of {sorted(AGGREGATIONS)}")
    m_BR = mask_BR.to(loss_BR.dtype)
    return AGGREGATIONS[mode](loss_BR * m_BR, m_BR, norm)


def _clipped_surrogate(
    ratio_BR: torch.Tensor, advantages_BR: torch.Tensor, cfg: LossConfig
) -> PolicyLossOut:
    """PPO's clipped surrogate of a per-token (PPO) or per-sequence (GSPO) ``ratio_BR``."""
    adv_BR = advantages_BR.to(ratio_BR.dtype)
    unclipped_BR = -adv_BR * ratio_BR
    clipped_BR = -adv_BR * ratio_BR.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    loss_BR = torch.maximum(unclipped_BR, clipped_BR)
    is_clipped_BR = clipped_BR > unclipped_BR
    is_dual_BR = torch.zeros_like(is_clipped_BR)
    if cfg.dual_clip is not None:
        cap_BR = -adv_BR * cfg.dual_clip
        negative_BR = adv_BR < 0
        is_dual_BR = negative_BR & (loss_BR > cap_BR)
        loss_BR = torch.where(negative_BR, torch.minimum(loss_BR, cap_BR), loss_BR)
    return PolicyLossOut(loss_BR, ratio_BR, is_clipped_BR, is_dual_BR)


def ppo_loss(
    logprobs_BR: torch.Tensor,
    proximal_BR: torch.Tensor,
    advantages_BR: torch.Tensor,
    mask_BR: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Token-level clipped surrogate with clip-higher and dual-clip."""
    ratio_BR = exp_log_ratio(logprobs_BR - proximal_BR)
    return _clipped_surrogate(ratio_BR, advantages_BR, cfg)


def gspo_loss(
    logprobs_BR: torch.Tensor,
    proximal_BR: torch.Tensor,
    advantages_BR: torch.Tensor,
    mask_BR: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Sequence-level ratio s_i = exp(mean over loss tokens of log(pi/pi_prox)), clipped like PPO.
    Every token of a sequence carries the same loss value; with seq_mean_token_mean this is
    exactly GSPO's per-sequence objective."""
    m_BR = mask_BR.to(logprobs_BR.dtype)
    log_ratio_BR = (logprobs_BR - proximal_BR) * m_BR
    seq_log_ratio_B = log_ratio_BR.sum(dim=1) / m_BR.sum(dim=1).clamp(min=1.0)
    ratio_BR = exp_log_ratio(seq_log_ratio_B)[:, None].expand_as(logprobs_BR)
    return _clipped_surrogate(ratio_BR, advantages_BR, cfg)


PolicyLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, LossConfig], PolicyLossOut]
POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo": ppo_loss, "gspo": gspo_loss}


def policy_loss(
    name: str,
    logprobs_BR: torch.Tensor,
    proximal_BR: torch.Tensor,
    advantages_BR: torch.Tensor,
    mask_BR: torch.Tensor,
    cfg: LossConfig,
) -> PolicyLossOut:
    """Dispatch to ``POLICY_LOSSES[name]``."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"trainer.loss.policy_loss={name!r} is unknown; choose one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name](logprobs_BR, proximal_BR, advantages_BR, mask_BR, cfg)


def value_loss(
    values_BR: torch.Tensor,
    old_values_BR: torch.Tensor,
    returns_BR: torch.Tensor,
    clip: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2) per token, and where the clip won."""
    err_BR = (values_BR - returns_BR) ** 2
    if clip is None:
        return 0.5 * err_BR, torch.zeros_like(err_BR, dtype=torch.bool)
    v_clip_BR = old_values_BR + (values_BR - old_values_BR).clamp(-clip, clip)
    err_clip_BR = (v_clip_BR - returns_BR) ** 2
    return 0.5 * torch.maximum(err_BR, err_clip_BR), err_clip_BR > err_BR
