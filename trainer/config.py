"""Config section ``trainer`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error. Sub-sections:

    trainer.advantage   how rewards become per-token advantages (grpo, rloo, reinforce_pp, gae)
    trainer.loss        policy loss (ppo / gspo), clipping, aggregation, entropy, SFT, value loss
    trainer.kl          KL to a reference model (k1/k2/k3, as loss or reward penalty)
    trainer.off_policy  proximal policy and importance weights for stale samples
    trainer.optim       AdamW, LR schedule, gradient clipping
    trainer.batching    micro-batches by token budget, precision, gradient checkpointing
    trainer.distill     on-policy distillation: teacher log-probs join the advantage
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from slime_rl.trainer.distill_config import DistillConfig

logger = logging.getLogger(__name__)

SAMPLE_STATUSES = ("completed", "truncated", "aborted", "failed")
"""Values of the sample ``status`` column (buffers.schema.Status; kept in step by a test)."""


@dataclass
class AdvantageConfig:
    estimator: str = field(
        default="grpo", metadata={"choices": ("grpo", "rloo", "reinforce_pp", "gae")}
    )
    """`grpo`: group-mean baseline; `rloo`: leave-one-out baseline; `reinforce_pp`: discounted returns whitened over the global batch; `gae`: PPO with a critic."""
    norm_std: bool = True
    """grpo only: divide by the group's reward std (false = Dr.GRPO)."""
    gamma: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    """Discount over response tokens (reinforce_pp, gae)."""
    lam: float = field(default=1.0, metadata={"ge": 0, "le": 1})
    """GAE lambda."""
    whiten: bool = True
    """gae only: normalise advantages to zero mean / unit std over the global batch."""
    eps: float = field(default=1e-6, metadata={"gt": 0})
    """Added to standard deviations before dividing."""


@dataclass
class LossConfig:
    policy_loss: str = field(default="ppo", metadata={"choices": ("ppo", "gspo")})
    """`ppo`: token-level clipped surrogate; `gspo`: sequence-level ratio (geometric mean over the response)."""
    eps_low: float = field(default=0.2, metadata={"ge": 0})
    """Lower clip range: the ratio is clipped at 1 - eps_low."""
    eps_high: float = field(default=0.28, metadata={"ge": 0})
    """Upper clip range (clip-higher): the ratio is clipped at 1 + eps_high."""
    dual_clip: float | None = field(default=3.0, metadata={"gt": 1})
    """Dual-clip constant c > 1: for negative advantages the loss is capped at -c*A. None = off."""
    aggregation: str = field(
        default="token_mean",
        metadata={"choices": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")},
    )
    """How per-token losses become one number: mean over all tokens of the global batch, mean over sequences of per-sequence means, or mean over sequences of per-sequence sums."""
    entropy_coef: float = field(default=0.0, metadata={"ge": 0})
    """Weight of the entropy bonus (subtracted from the loss)."""
    sft_coef: float = field(default=0.0, metadata={"ge": 0})
    """Weight of an extra negative log-likelihood term on the response tokens."""
    sft_min_reward: float | None = None
    """The SFT term only uses samples with reward >= this (None = all samples)."""
    value_coef: float = field(default=0.5, metadata={"ge": 0})
    """gae only: weight of the critic's value loss."""
    value_clip: float | None = field(default=0.2, metadata={"gt": 0})
    """gae only: clip new values to old +- this (None = no value clipping)."""


@dataclass
class KLConfig:
    coef: float = field(default=0.0, metadata={"ge": 0})
    """KL weight; 0 = no KL and no reference model is loaded."""
    estimator: str = field(default="k3", metadata={"choices": ("k1", "k2", "k3")})
    """Per-token estimator of KL(policy || reference) from sampled tokens. As a loss (mode=loss) k1's expected gradient on-policy is 0, k2's gradient equals the gradient of the KL, k3 is an unbiased KL value but a biased KL gradient."""
    mode: str = field(default="loss", metadata={"choices": ("loss", "reward")})
    """`loss`: add coef * KL to the loss; `reward`: subtract coef * KL from per-token rewards before advantages."""
    ref_path: str | None = None
    """Reference model folder (None = the policy's initial weights, model.path)."""


@dataclass
class OffPolicyConfig:
    proximal: str = field(default="trainer", metadata={"choices": ("trainer", "engine")})
    """Anchor of the PPO ratio: `trainer` = the trainer's own pre-update log-probs (decoupled objective), `engine` = the engine's behaviour log-probs."""
    is_mode: str = field(default="truncate", metadata={"choices": ("truncate", "mask", "none")})
    """Behaviour importance weight pi_proximal/pi_engine per token (only with proximal=trainer): `truncate` = min(w, is_cap), `mask` = drop tokens with w > is_cap, `none` = no weight."""
    is_cap: float = field(default=2.0, metadata={"gt": 0})
    """Cap C of the importance weight."""


@dataclass
class OptimConfig:
    weight_decay: float = field(default=0.0, metadata={"ge": 0})
    """AdamW weight decay."""
    beta1: float = field(default=0.9, metadata={"ge": 0, "le": 1})
    """AdamW beta1."""
    beta2: float = field(default=0.999, metadata={"ge": 0, "le": 1})
    """AdamW beta2."""
    adam_eps: float = field(default=1e-8, metadata={"gt": 0})
    """AdamW epsilon."""
    warmup_steps: int = field(default=0, metadata={"ge": 0})
    """Linear LR warm-up from 0 over this many optimizer steps."""
    schedule: str = field(default="constant", metadata={"choices": ("constant", "cosine")})
    """LR after warm-up: constant, or cosine decay to `min_lr_ratio * lr` at `total_steps`."""
    total_steps: int = field(default=1000, metadata={"ge": 1})
    """Optimizer steps of the cosine schedule."""
    min_lr_ratio: float = field(default=0.0, metadata={"ge": 0, "le": 1})
    """Final LR of the cosine schedule, as a fraction of `lr`."""
    grad_clip: float | None = field(default=1.0, metadata={"gt": 0})
    """Clip the global gradient norm to this (None = no clipping; the norm is still logged)."""
    critic_lr: float = field(default=1e-5, metadata={"gt": 0})
    """gae only: learning rate of the critic."""


@dataclass
class BatchingConfig:
    max_tokens_per_micro_batch: int = field(default=8192, metadata={"ge": 1})
    """Token budget of one micro-batch (rows x padded length); gradients accumulate over micro-batches."""
    share_prompt: bool | None = None
    """Train the samples of a group that share a prompt as one sequence: the prompt once, then each response, which attends to the prompt and to itself only (a block mask; positions as if each sample stood alone); short sequences share an input row. Same log-probs and gradients as one row per sample, without computing the prompt n_samples_per_prompt times (1.7x faster train steps on the CPU demo). A group whose shared sequence would cost more than its rows alone (long responses: attention over prompt + every response, quadratic in that length) trains as separate rows: 1.7x faster steps on the long-tail config than sharing every group. None = auto: on when the trainer runs on CPU, off on GPU (there the dense T x T mask would rule out the flash-attention kernels). Needs sdpa or eager attention; not used for MoE rows with routing replay."""
    pack: bool = False
    """Concatenate samples (or shared-prompt units) into one sequence per micro-batch (positions restart per sample, no padding) instead of right-padding rows. Pays with flash-attention's variable-length kernels; with sdpa (the default) attention over the packed row is quadratic in its length (1.5x slower steps on the CPU demo), so it is off by default."""
    updates_per_batch: int = field(default=1, metadata={"ge": 1})
    """Optimizer updates per train step: the global batch is cut into this many mini-batches of whole groups."""
    precision: str = field(default="auto", metadata={"choices": ("auto", "fp32", "bf16")})
    """`auto`: bf16 autocast on GPU, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    temperature: float = field(default=1.0, metadata={"gt": 0})
    """Logits are divided by this before log-probs; must equal the rollout sampling temperature."""


LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""Attention projections of Llama/Qwen-style models: the default `trainer.lora.target_modules`."""
LORA_FORBIDDEN_TARGETS = ("embed_tokens", "lm_head", "wte", "word_embeddings")
"""Modules no adapter may target (see `LoraConfig.target_modules`)."""


@dataclass
class LoraConfig:
    rank: int = field(default=0, metadata={"ge": 0})
    """LoRA rank r; 0 = off (full fine-tuning). On: the base weights are frozen, only the adapters (lora_A, lora_B) train and sit in the optimizer, and weight syncs ship the adapter only (engines vllm and hf; other engines get merged full weights)."""
    alpha: float = field(default=16.0, metadata={"gt": 0})
    """LoRA alpha: the adapter's update is scaled by alpha / rank."""
    dropout: float = field(default=0.0, metadata={"ge": 0, "le": 0.9})
    """Dropout on the adapter's input during training (engines never apply it)."""
    publish: str = field(default="auto", metadata={"choices": ("auto", "adapter", "merged")})
    """What a weight sync ships: `adapter` = the lora_A/lora_B tensors only (the engine serves the adapter: rollout.engine vllm or hf); `merged` = full weights with the adapter merged in (any engine, full-size syncs); `auto` = adapter on vllm and hf, merged on other engines."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_DEFAULT_TARGETS))
    """Names of the linear layers that get adapters (the last part of the module name, e.g. q_proj, up_proj). Embeddings and lm_head are not allowed: vLLM serves no adapter on them, and with tied embeddings they are one weight."""

    def validate(self) -> None:
        """Rules that need no model (the root loader prefixes messages with ``trainer.lora.``; the
        module names are checked against the model when the trainer wraps it, ``trainer.lora``)."""
        if self.rank < 0:
            raise ValueError(f"rank={self.rank} must be >= 0 (0 = LoRA off; e.g. 8 or 16 to train adapters)")
        if self.rank > 0 and not self.target_modules:
            raise ValueError("target_modules is empty; name the linear layers to adapt, e.g. [q_proj, v_proj]")
        bad = [m for m in self.target_modules if m in LORA_FORBIDDEN_TARGETS]
        if self.rank > 0 and bad:
            raise ValueError(
                f"target_modules={list(self.target_modules)} names {bad}: embeddings and lm_head take no adapter "
                "(vLLM serves none there, and tied embeddings are one weight); adapt linear layers such as "
                f"{list(LORA_DEFAULT_TARGETS)} or gate_proj, up_proj, down_proj"
            )


@dataclass
class TrainerConfig:
    num_workers: int = field(default=1, metadata={"ge": 1})
    """Trainer workers (Ray actors forming one torch.distributed group)."""
    global_batch_groups: int = field(default=8, metadata={"ge": 1})
    """Groups (prompts x n_samples_per_prompt) per optimizer step."""
    lr: float = field(default=1e-5, metadata={"gt": 0})
    """Peak learning rate (AdamW)."""
    num_gpus_per_worker: float = field(default=0.0, metadata={"ge": 0})
    """GPUs per trainer worker (0 = CPU, gloo; >0 = CUDA, NCCL)."""
    num_threads: int = field(default=1, metadata={"ge": 1})
    """torch CPU threads per worker."""
    timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """Limit for every collective and remote call; beyond it the step fails naming the worker."""
    seed: int = 0
    """Seed of torch RNGs in the workers."""
    exclude_status: list[str] = field(default_factory=lambda: ["failed", "aborted"])
    """Samples with these `status` values get no loss and are left out of group baselines (GRPO/RLOO mean, std and leave-one-out); a group with fewer than 2 remaining samples gets zero advantage. Values: completed, truncated, aborted, failed."""
    max_logprob_mismatch: float = field(default=1.0, metadata={"ge": 0})
    """Refuse a batch whose behaviour log-probs (`response_logprobs`) are implausible: a mean |trainer - engine| log-prob gap above this many nats on the loss tokens of staleness 0 (measured before the update), or exactly 0.0 on every loss token (never filled). A matching engine is within ~0.1 nat. 0 disables both checks."""
    checkpoint_hf: bool = True
    """Also write an HF export of the policy (transformers / vLLM loadable) to `<checkpoint>/hf`."""
    routing_replay: bool = False
    """MoE models: every policy forward pass routes each token to the experts the engine used (the sample's `routed_experts` column, recorded with `rollout.record_routed_experts`), so the policy ratio compares the same experts (rollout routing replay); gating weights stay the trainer's. Off: the trainer routes by itself and `moe/routing_mismatch` reports how often it disagrees with the engine."""
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    """Advantage estimator."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy (and value) loss."""
    kl: KLConfig = field(default_factory=KLConfig)
    """KL regularisation to a reference model."""
    off_policy: OffPolicyConfig = field(default_factory=OffPolicyConfig)
    """Off-policy correction for stale samples."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Micro-batching and precision."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters (rank 0 = off: full fine-tuning)."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """On-policy distillation from a teacher (off while `teacher_path` is null; docs/distill.md)."""

    def validate(self) -> None:
        """Rules across fields (the root loader prefixes messages with ``trainer.``)."""
        if self.loss.eps_low >= 1:
            raise ValueError(f"loss.eps_low={self.loss.eps_low} must be < 1 (the ratio is clipped at 1 - eps_low > 0)")
        need = self.num_workers * self.batching.updates_per_batch
        if self.global_batch_groups < need:
            raise ValueError(
                f"global_batch_groups={self.global_batch_groups} is too small: each of num_workers={self.num_workers} "
                f"needs whole groups for each of batching.updates_per_batch={self.batching.updates_per_batch} updates; "
                f"use at least {need}"
            )
        bad = [s for s in self.exclude_status if s not in SAMPLE_STATUSES]
        if bad:
            raise ValueError(
                f"exclude_status has unknown value(s) {bad}; each must be one of {list(SAMPLE_STATUSES)}"
            )
        if self.kl.coef > 0 and self.kl.mode == "loss" and self.kl.estimator == "k1":
            logger.warning(
                "trainer.kl.estimator=k1 with kl.mode=loss has zero expected gradient on-policy (E[grad log pi] = 0), "
                "so it barely regularises; use estimator=k2 (its gradient is the KL's) or k3, or mode=reward"
            )
        if self.off_policy.proximal == "engine" and self.off_policy.is_mode != "none":
            logger.warning(
                "trainer.off_policy.is_mode=%s is ignored with proximal=engine (the ratio already uses the "
                "engine's log-probs); set is_mode=none to silence this", self.off_policy.is_mode
            )
        if self.loss.policy_loss == "gspo" and self.loss.aggregation != "seq_mean_token_mean":
            logger.warning(
                "trainer.loss.policy_loss=gspo with aggregation=%s weights sequences by length; GSPO's objective "
                "is aggregation=seq_mean_token_mean", self.loss.aggregation
            )
