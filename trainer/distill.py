"""On-policy distillation: the teacher's per-token signal joins the advantage.

The student (the engines) samples y ~ pi_student; a teacher scored every sampled token on the
rollout side (``rollout/teacher.py`` fills the sample column ``teacher_logprobs``). Per token,

    d_t = log p_teacher(y_t) - log p_student(y_t)        (log p_student = behaviour log-probs)

is minus the one-sample estimate of the reverse KL, KL(pi_student || pi_teacher) at that token;
maximising sum_t d_t with the policy gradient minimises the reverse KL (Agarwal et al. 2024,
"On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD);
Thinking Machines, "On-Policy Distillation", 2025; Qwen3 technical report, 2025). ``d_t`` is a
per-token advantage with discount 0 (no sum over later tokens), used with the configured
policy loss, clipping and importance weights:

    rb.teacher_NR, rb.behaviour_NR, mask_NR
        ─► distill_term: d_NR = (teacher - behaviour) * mask          (no gradient)
        ─► apply_distill: A_NR = coef * d_NR               (trainer.distill.only = true)
                          A_NR = A_reward_NR + coef * d_NR  (only = false)
        ─► micro_batch_loss (trainer/objective.py) as any other advantage

>>> import torch
>>> t, b, m = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]]), torch.tensor([[1.0, 0.0]])
>>> apply_distill(torch.zeros(1, 2), t, b, m, coef=2.0, only=True)
tensor([[1., 0.]])
"""

from __future__ import annotations

import dataclasses

import torch
from slime_rl.trainer.advantages import AdvantageOutputs
from slime_rl.trainer.batching import RankBatch
from slime_rl.trainer.distill_config import DistillConfig
from slime_rl.trainer.metrics import StepMetrics


def distill_term(teacher_NR: torch.Tensor, behaviour_NR: torch.Tensor, mask_NR: torch.Tensor) -> torch.Tensor:
    """Per-token ``log p_teacher - log p_student`` (N, R), 0 where ``mask_NR`` is 0; detached."""
    return ((teacher_NR.float() - behaviour_NR.float()) * mask_NR).detach()


def apply_distill(
    advantages_NR: torch.Tensor,
    teacher_NR: torch.Tensor,
    behaviour_NR: torch.Tensor,
    mask_NR: torch.Tensor,
    coef: float,
    only: bool,
    center: bool = False,
) -> torch.Tensor:
    """The advantages with the distillation term: ``coef * d`` alone (``only``) or added to
    ``advantages_NR`` (the reward's); with ``center`` the mean of ``d`` over the loss tokens is
    subtracted first. Masked tokens get 0 from the term."""
    d_NR = distill_term(teacher_NR, behaviour_NR, mask_NR)
    if center and mask_NR.sum() > 0:
        d_NR = (d_NR - d_NR.sum() / mask_NR.sum()) * mask_NR
    term_NR = coef * d_NR
    return term_NR if only else advantages_NR + term_NR


def check_scored(scored_N: torch.Tensor | None, mask_NR: torch.Tensor) -> None:
    """Refuse a batch where a row with loss tokens has no teacher log-probs (a rollout side that
    ran without the teacher, or data from before it was configured)."""
    has_loss_N = mask_NR.sum(dim=1) > 0
    missing_N = has_loss_N if scored_N is None else has_loss_N & ~scored_N.to(has_loss_N.device)
    if bool(missing_N.any()):
        row = int(missing_N.nonzero()[0, 0])
        raise ValueError(
            f"trainer.distill.teacher_path is set but row {row} of this rank's batch has no teacher log-probs "
            f"(column 'teacher_logprobs' is empty in {int(missing_N.sum())} row(s) with loss tokens); the rollout side "
            "scores samples with the teacher only when started with the same trainer.distill.teacher_path (groups "
            "restored from a checkpoint of a run without it have none)"
        )


def record_distill(metrics: StepMetrics, teacher_NR: torch.Tensor, behaviour_NR: torch.Tensor, mask_NR: torch.Tensor) -> None:
    """``distill/reverse_kl`` (mean over loss tokens of log p_student - log p_teacher, the sampled-token
    estimate of KL(student || teacher)), ``distill/teacher_logprob`` and ``distill/student_logprob``
    (means over loss tokens)."""
    n_tok = mask_NR.sum()
    d_NR = distill_term(teacher_NR, behaviour_NR, mask_NR)
    metrics.add_mean("distill/reverse_kl", -d_NR.sum(), n_tok)
    metrics.add_mean("distill/teacher_logprob", (teacher_NR.float() * mask_NR).sum(), n_tok)
    metrics.add_mean("distill/student_logprob", (behaviour_NR.float() * mask_NR).sum(), n_tok)


def distill_advantages(
    adv: AdvantageOutputs,
    rb: RankBatch,
    behaviour_NR: torch.Tensor,
    mask_NR: torch.Tensor,
    cfg: DistillConfig,
    metrics: StepMetrics,
) -> AdvantageOutputs:
    """One rank's advantages with the teacher term (``trainer.distill``), and its metrics.

    Raises ValueError when a row with loss tokens was not scored by the teacher."""
    check_scored(rb.teacher_scored_N, mask_NR)
    teacher_NR = rb.teacher_NR.to(behaviour_NR.device)
    record_distill(metrics, teacher_NR, behaviour_NR, mask_NR)
    advantages_NR = apply_distill(adv.advantages_NR, teacher_NR, behaviour_NR, mask_NR, cfg.coef, cfg.only, cfg.center)
    return dataclasses.replace(adv, advantages_NR=advantages_NR)
