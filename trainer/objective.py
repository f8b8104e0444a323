"""One micro-batch's training objective: policy loss with off-policy correction, entropy,
KL-as-loss and SFT terms, as a pure function of per-token tensors (no model here).

    logprobs (grad) ─┬─ proximal anchor: trainer pre-update log-probs | engine log-probs
                     ├─ policy_loss(ratio = pi / pi_anchor, PPO/GSPO clip) x behaviour weight
                     ├─ - entropy_coef * entropy
                     ├─ + kl.coef * KL(pi || pi_ref)           (kl.mode=loss, ref given)
                     └─ + sft_coef * NLL on sft-eligible tokens
                       each term aggregated with the global normalisers ─► scalar share

With ``off_policy.proximal=trainer`` (decoupled PPO) the ratio is pi_theta / pi_prox and each
token is weighted by w = pi_prox / pi_engine (``is_mode``: truncate at ``is_cap``, mask
above it, or none). When the update pass is itself the pre-update policy
(``updates_per_batch=1``), pi_prox = logprobs.detach(). With ``proximal=engine`` the ratio
is pi_theta / pi_engine and w = 1.

>>> import torch
>>> from slime_rl.trainer.config import KLConfig, LossConfig, OffPolicyConfig
>>> from slime_rl.trainer.losses import LossNorm
>>> lp = torch.tensor([[-1.0]], requires_grad=True)
>>> inp = ObjectiveInputs(lp, None, torch.tensor([[-2.0]]), torch.ones(1, 1), torch.ones(1, 1))
>>> out = micro_batch_loss(inp, LossConfig(), OffPolicyConfig(is_cap=2.0), KLConfig(), LossNorm(1, 1))
>>> round(out.loss.item(), 4)  # -A * min(e^1, 2) * ratio 1
-2.0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from slime_rl.trainer.config import KLConfig, LossConfig, OffPolicyConfig
from slime_rl.trainer.kl import kl_estimate
from slime_rl.trainer.losses import LossNorm, PolicyLossOut, aggregate, policy_loss
from slime_rl.trainer.off_policy import behaviour_weight


@dataclasses.dataclass(frozen=True)
class ObjectiveInputs:
    """Per-token (B, R) tensors of one micro-batch."""

    logprobs_BR: torch.Tensor
    """Current policy log-probs of the sampled tokens (with gradient)."""
    proximal_BR: torch.Tensor | None
    """Trainer's pre-update log-probs from a pre-pass; None = this pass is the pre-update policy."""
    behaviour_BR: torch.Tensor
    """Engine (behaviour) log-probs."""
    advantages_BR: torch.Tensor
    mask_BR: torch.Tensor
    """Loss mask (0 = no loss, no gradient)."""
    sft_mask_BR: torch.Tensor | None = None
    """Tokens of the SFT term (default: mask_BR)."""
    entropy_BR: torch.Tensor | None = None
    """Entropy per position (with gradient when entropy_coef > 0)."""
    ref_BR: torch.Tensor | None = None
    """Reference log-probs (KL as a loss term only when given and kl.mode=loss)."""


@dataclasses.dataclass(frozen=True)
class ObjectiveOut:
    loss: torch.Tensor
    """This micro-batch's share of the global loss (scalar, differentiable)."""
    pg: PolicyLossOut
    weight_BR: torch.Tensor
    """Behaviour importance weight applied to each token's policy loss."""
    anchor_BR: torch.Tensor
    """Log-probs the ratio is taken against (detached)."""
    kl_BR: torch.Tensor | None


AnchorFn = Callable[[ObjectiveInputs, OffPolicyConfig], tuple[torch.Tensor, torch.Tensor]]


def _trainer_anchor(inp: ObjectiveInputs, cfg: OffPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    prox_BR = inp.proximal_BR if inp.proximal_BR is not None else inp.logprobs_BR.detach()
    return prox_BR, behaviour_weight(prox_BR, inp.behaviour_BR, cfg.is_mode, cfg.is_cap)


def _engine_anchor(inp: ObjectiveInputs, cfg: OffPolicyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    return inp.behaviour_BR, torch.ones_like(inp.behaviour_BR)


PROXIMAL: dict[str, AnchorFn] = {"trainer": _trainer_anchor, "engine": _engine_anchor}
"""``off_policy.proximal`` -> (ratio anchor log-probs, behaviour weight)."""


def micro_batch_loss(
    inp: ObjectiveInputs, lc: LossConfig, oc: OffPolicyConfig, kc: KLConfig, norm: LossNorm
) -> ObjectiveOut:
    """The full per-micro-batch loss share (see the module docstring)."""
    if oc.proximal not in PROXIMAL:
        raise ValueError(f"trainer.off_policy.proximal={oc.proximal!r} is unknown; choose one of {sorted(PROXIMAL)}")
    anchor_BR, weight_BR = PROXIMAL[oc.proximal](inp, oc)
    mask_BR = inp.mask_BR
    pg = policy_loss(lc.policy_loss, inp.logprobs_BR, anchor_BR, inp.advantages_BR, mask_BR, lc)
    loss = aggregate(pg.loss_BR * weight_BR, mask_BR, lc.aggregation, norm)
    if lc.entropy_coef > 0:
        if inp.entropy_BR is None:
            raise ValueError("trainer.loss.entropy_coef > 0 needs the entropy of every position; none was computed")
        loss = loss - lc.entropy_coef * aggregate(inp.entropy_BR, mask_BR, lc.aggregation, norm)
    kl_BR = None
    if inp.ref_BR is not None:
        kl_BR = kl_estimate(kc.estimator, inp.logprobs_BR, inp.ref_BR)
        if kc.mode == "loss":
            loss = loss + kc.coef * aggregate(kl_BR, mask_BR, lc.aggregation, norm)
    if lc.sft_coef > 0:
        sft_mask_BR = mask_BR if inp.sft_mask_BR is None else inp.sft_mask_BR
        loss = loss + lc.sft_coef * aggregate(-inp.logprobs_BR, sft_mask_BR, lc.aggregation, norm)
    return ObjectiveOut(loss, pg, weight_BR, anchor_BR.detach(), kl_BR)
