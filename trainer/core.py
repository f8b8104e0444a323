"""One rank's training state and its train step (no Ray here; ``TrainerWorker`` wraps it).

    pa.Table (the global batch, whole groups)
      └─ checks.check_batch (schema, group count, filled log-probs) ─► split_batch: this
         rank's share, mini-batch by mini-batch ─► RankBatch
           ├─ pre-pass (no grad): reference log-probs, critic values, proximal log-probs
           │    when they cannot come from the update pass itself
           │    (MoE policies: every policy pass runs through moe.MoERouting: routing
           │    replay with trainer.routing_replay, router / expert-load metrics)
           ├─ fresh-token log-prob gap check (pre-update log-probs vs engine)
           ├─ token rewards (reward on the last loss token, minus KL penalty) ─► advantages
           │    (+ or = the teacher's per-token term with trainer.distill: trainer/distill.py)
           └─ for each mini-batch: micro-batches ─► forward ─► loss share ─► backward
                                   ─► clip grad norm ─► AdamW step ─► LR scheduler step
                                   (skipped when no rank has a loss token)
      version += 1 ─► metrics reduced across ranks (with perf/train_*_s: where the step's
                      seconds went, per phase; perf/train_positions: input positions computed)

Works alone (no process group: plain module) or as one rank of a torch.distributed group
(FSDP2 shards; each rank takes its share of the global batch with ``batching.split_batch``,
aligned by mini-batch). Loss shares are normalised by global token / sequence counts and the
backward is scaled by the world size (FSDP2 averages gradients), so M ranks compute the same
update as one.

>>> core = TrainerCore(TrainerConfig(), "path/to/hf_model")          # doctest: +SKIP
>>> metrics = core.train_step(table)   # pa.Table of SAMPLE_SCHEMA    # doctest: +SKIP
>>> metrics["train/loss"], core.version                               # doctest: +SKIP
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist
from slime_rl.trainer import model as model_lib
from slime_rl.trainer.advantages import (
    AdvantageInputs,
    AdvantageOutputs,
    compute_advantages,
    place_rewards,
)
from slime_rl.trainer.batching import (
    MicroBatch,
    RankBatch,
    dummy_micro_batch,
    plan_micro_batches,
    split_batch,
)
from slime_rl.trainer.checks import check_all_zero_behaviour, check_batch, check_fresh_gap
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.distill import distill_advantages
from slime_rl.trainer.kl import kl_estimate
from slime_rl.trainer.losses import LossNorm, aggregate, value_loss
from slime_rl.trainer.metrics import StepMetrics
from slime_rl.trainer.micro_batch import attention_weight_of
from slime_rl.trainer.moe import MoERouting, routing_pass
from slime_rl.trainer.objective import ObjectiveInputs, micro_batch_loss
from slime_rl.trainer.off_policy import record_mismatch, record_ratios
from slime_rl.trainer.optim import build_optimizer, build_scheduler, clip_grad_norm
from slime_rl.trainer.weights import WeightBucket, iter_weight_buckets

logger = logging.getLogger(__name__)


def set_torch_threads(n: int) -> None:
    """Set torch's intra-op CPU thread count of this process to ``n``.

    ``torch._C.set_num_threads``, not ``torch.set_num_threads``: once a vLLM CPU engine was
    created in a process, vLLM's worker has replaced ``torch.set_num_threads`` by a no-op there.
    """
    torch._C.set_num_threads(int(n))


class PhaseClock:
    """Seconds per phase of one train step (``perf/train_<phase>_s``). On CUDA each phase ends
    with a synchronize, so kernels are charged to the phase that launched them."""

    PHASES = ("prepare", "forward", "backward", "optimizer")

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.seconds = dict.fromkeys(self.PHASES, 0.0)
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the last lap to ``phase``."""
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] += now - self._t
        self._t = now


class TrainerCore:
    """Model, optimizer and scheduler of one trainer rank, and its train step."""

    def __init__(self, cfg: TrainerConfig, model_path: str | Path, device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.model_path = str(model_path)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.device = device or torch.device("cpu")
        if self.device.type == "cpu":  # honoured wherever the trainer runs (Ray actor or in-process)
            set_torch_threads(cfg.num_threads)
        self.timeout = datetime.timedelta(seconds=cfg.timeout_s)
        torch.manual_seed(cfg.seed)
        b = cfg.batching
        policy = model_lib.load_policy(model_path, self.device, b.gradient_checkpointing, cfg.lora)
        self.moe = MoERouting.attach(policy)
        """Router hooks (replay, MoE metrics); None for a dense policy."""
        if cfg.routing_replay:
            if self.moe is None:
                raise ValueError(
                    f"trainer.routing_replay=true but the policy in {model_path} ({type(policy).__name__}) has no MoE "
                    "router; set trainer.routing_replay=false"
                )
            self.moe.check_replay_supported()
        self.policy = model_lib.shard(policy)
        self.optimizer = build_optimizer(self.policy.parameters(), cfg.lr, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim)
        self.reference = None
        if cfg.kl.coef > 0:
            self.reference = model_lib.shard(model_lib.load_reference(cfg.kl.ref_path or model_path, self.device))
        self.critic = self.critic_optimizer = self.critic_scheduler = None
        if cfg.advantage.estimator == "gae":
            self.critic = model_lib.shard(model_lib.ValueModel(model_path, self.device, b.gradient_checkpointing))
            self.critic_optimizer = build_optimizer(self.critic.parameters(), cfg.optim.critic_lr, cfg.optim)
            self.critic_scheduler = build_scheduler(self.critic_optimizer, cfg.optim)
        self.share_prompt = _share_prompt(b.share_prompt, self.device, [self.policy, self.reference, self.critic])
        """Whether micro-batches put the samples of a group behind one copy of their prompt."""
        self.attention_weight = attention_weight_of(self.policy.config) if self.share_prompt else 0.0
        """Cost of one attended (query, key) pair relative to one position: groups whose shared
        sequence would cost more than their rows alone are not shared (long responses)."""
        config = self.policy.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad_id = int(pad if isinstance(pad, int) else (pad[0] if pad else 0))
        self._clock = PhaseClock(self.device)
        self._all_zero = False
        """This step's behaviour log-probs are 0.0 on every loss token (checks.behaviour_all_zero)."""
        self.step = 0
        """Train steps completed."""
        self.version = 0
        """Policy version of the current weights (= train steps completed, plus any start offset)."""

    # -- collectives -------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM) if self.distributed else t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX) if self.distributed else t

    def _all_reduce(self, t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        out = t.clone().to(self.device if dist.get_backend() == "nccl" else "cpu")
        try:
            dist.all_reduce(out, op=op, async_op=True).wait(timeout=self.timeout)
        except RuntimeError as e:
            raise RuntimeError(
                f"trainer rank {self.rank} step {self.step + 1}: all_reduce failed or exceeded trainer.timeout_s="
                f"{self.cfg.timeout_s}s (is another trainer worker dead?): {e}"
            ) from e
        return out.to(t.device)

    def barrier(self, what: str) -> None:
        """Wait for every rank (an all-reduce with the trainer timeout); ``what`` names the caller in errors."""
        if self.distributed:
            try:
                self.all_reduce_sum(torch.zeros(1))
            except RuntimeError as e:
                raise RuntimeError(f"trainer rank {self.rank} step {self.step + 1}: barrier in {what} failed: {e}") from e

    # -- weights and checkpoints -------------------------------------------------------------
    def iter_weight_buckets(self, bucket_bytes: int, include_tied: bool = False) -> Iterator[WeightBucket]:
        """Full policy tensors in buckets tagged with the current version (collective: all ranks iterate)."""
        return iter_weight_buckets(self.policy, self.version, bucket_bytes, include_tied)

    def gradients(self) -> dict[str, torch.Tensor]:
        """Full policy gradients of the last optimizer update (after clipping), on CPU, by parameter
        name; parameters without a gradient are left out. Collective under FSDP2 (all ranks call it)."""
        out = {}
        for name, p in self.policy.named_parameters():
            if p.grad is not None:
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                out[name] = g.detach().to("cpu").clone()
        return out

    def export_hf(self, out_dir: str | Path, merged: bool = False) -> Path | None:
        """HF folder of the current policy (+ tokenizer from the model folder); rank 0 writes.
        LoRA: the PEFT adapter folder, and with ``merged`` the merged model in ``<out_dir>/merged``."""
        from slime_rl.trainer.lora import export_policy_hf

        path = export_policy_hf(self.policy, out_dir, self.model_path, write=self.rank == 0, merged=merged)
        self.barrier("export_hf")
        return path

    def save_checkpoint(self, path: str | Path, hf: bool | None = None) -> Path:
        """Model, optimizer, scheduler, step, version, RNG, and an HF export in ``<path>/hf`` when
        ``hf`` (default ``trainer.checkpoint_hf``); written atomically (all ranks call it)."""
        from slime_rl.trainer.checkpoint import save_checkpoint

        return save_checkpoint(self, path, hf)

    def load_checkpoint(self, path: str | Path) -> dict[str, int]:
        """Restore what ``save_checkpoint`` wrote; returns ``{"step", "version"}``."""
        from slime_rl.trainer.checkpoint import load_checkpoint

        return load_checkpoint(self, path)

    def _synced_micro_batches(self, rb: RankBatch, rows: list[int]) -> list[MicroBatch]:
        """Micro-batches of ``rows``, padded with zero-weight stand-ins to the largest count on any rank."""
        b = self.cfg.batching
        mbs = plan_micro_batches(rb, rows, b.max_tokens_per_micro_batch, self.pad_id, b.pack, self.share_prompt,
                                 self.attention_weight)
        target = int(self.all_reduce_max(torch.tensor([len(mbs)], dtype=torch.long)).item())
        mbs += [dummy_micro_batch(rb, self.pad_id) for _ in range(target - len(mbs))]
        return [mb.to(self.device) for mb in mbs]

    def _set_grad_sync(self, on: bool) -> None:
        for m in (self.policy, self.critic):
            if m is not None and hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(on)

    # -- the step ----------------------------------------------------------------------------
    def _tag(self) -> str:
        return f"trainer rank {self.rank} step {self.step + 1}"

    def train_step(self, table: pa.Table) -> dict[str, float]:
        """One train step on the *global* batch ``table`` (pa.Table of SAMPLE_SCHEMA, exactly
        ``trainer.global_batch_groups`` whole groups): ``updates_per_batch`` optimizer updates on
        this rank's share (``split_batch(table, world_size, updates_per_batch)[rank]``).

        Returns slash-namespaced metrics reduced over ranks. Raises ValueError (prefixed with
        rank and step) for a batch that fails ``checks.check_batch`` or whose fresh behaviour
        log-probs are implausible (``trainer.max_logprob_mismatch``); nothing was updated then.
        """
        cfg = self.cfg
        try:
            self._all_zero = check_batch(table, cfg.global_batch_groups, cfg.exclude_status, cfg.max_logprob_mismatch)
            if self.moe is not None:
                self.moe.check_table(table, cfg.routing_replay, cfg.exclude_status)
            share = split_batch(table, self.world_size, cfg.batching.updates_per_batch)[self.rank]
        except ValueError as e:
            raise ValueError(f"{self._tag()}: {e}") from e
        start = time.perf_counter()
        clock = self._clock = PhaseClock(self.device)
        rb = RankBatch.from_table(share.table, cfg.exclude_status)
        dev = self.device
        keep_N = rb.kept_N.to(dev)
        mask_NR = rb.mask_NR.to(dev) * keep_N[:, None]  # excluded statuses carry no loss
        behaviour_NR = rb.behaviour_NR.to(dev)
        staleness_NR = (self.version - rb.token_versions_NR).to(dev)
        metrics = StepMetrics()
        pre = self._pre_pass(rb)
        check_gap = cfg.max_logprob_mismatch > 0
        if check_gap and "proximal" in pre:  # the pre-update log-probs of every row are at hand
            self._check_fresh_gap(_fresh_gap(pre["proximal"], behaviour_NR, self._gap_staleness(staleness_NR), mask_NR))

        # Rewards -> advantages (the KL-in-reward penalty uses the pre-update policy).
        rewards_N = rb.rewards_N.to(dev)
        token_rewards_NR = place_rewards(rewards_N, mask_NR)
        if self.reference is not None and cfg.kl.mode == "reward":
            policy_NR = pre.get("proximal", behaviour_NR)
            kl_NR = kl_estimate(cfg.kl.estimator, policy_NR, pre["ref"]) * mask_NR
            token_rewards_NR = token_rewards_NR - cfg.kl.coef * kl_NR
            rewards_N = rewards_N - cfg.kl.coef * kl_NR.sum(dim=1)
            metrics.add_mean("train/kl_reward_penalty", kl_NR.sum(), mask_NR.sum())
        adv = compute_advantages(
            cfg.advantage.estimator,
            AdvantageInputs(token_rewards_NR, mask_NR, rb.group_index_N.to(dev), rewards_N, pre.get("values"), keep_N),
            cfg.advantage,
            self.all_reduce_sum,
        )
        if cfg.distill.enabled:  # on-policy distillation: the teacher's per-token term (trainer/distill.py)
            try:
                adv = distill_advantages(adv, rb, behaviour_NR, mask_NR, cfg.distill, metrics)
            except ValueError as e:
                raise ValueError(f"{self._tag()}: {e}") from e
        kept = keep_N.float()
        per_rank = 1.0 / self.world_size  # count of a metric summed over ranks
        metrics.add_mean("train/excluded_samples", rb.num_rows - kept.sum(), per_rank)
        metrics.add_mean("train/empty_samples", sum(not r for r in rb.response_ids), per_rank)
        metrics.add_mean("train/reward_mean", (rb.rewards_N.to(dev) * kept).sum(), kept.sum())
        metrics.add_mean("train/advantage_mean", (adv.advantages_NR * mask_NR).sum(), mask_NR.sum())
        metrics.add_mean("train/response_len", sum(len(r) for r in rb.response_ids), rb.num_rows)
        metrics.add_mean("train/loss_tokens", mask_NR.sum(), per_rank)
        all_tokens = sum(len(p) + len(r) for p, r in zip(rb.prompt_ids, rb.response_ids, strict=True))
        metrics.add_mean("train/tokens", all_tokens, per_rank)

        sft_ok_N = torch.ones(rb.num_rows, device=dev)
        if cfg.loss.sft_min_reward is not None:
            sft_ok_N = (rb.rewards_N >= cfg.loss.sft_min_reward).float().to(dev)

        lrs: list[float] = []
        grad_norms: list[float] = []
        skipped = real_micro_batches = positions = 0
        clock.lap("prepare")  # tensors, pre-pass, advantages
        for k, rows in enumerate(share.minibatch_rows()):
            local = torch.tensor([mask_NR[rows].sum().item(), (mask_NR[rows].sum(1) > 0).sum().item()], dtype=torch.float64)
            n_tok, n_seq = self.all_reduce_sum(local).tolist()
            norm = LossNorm(n_tok, n_seq)
            mbs = self._synced_micro_batches(rb, rows)
            real_micro_batches += sum(not mb.dummy for mb in mbs)
            positions += sum(mb.num_tokens for mb in mbs if not mb.dummy)
            clock.lap("prepare")
            self.optimizer.zero_grad(set_to_none=True)
            if self.critic_optimizer is not None:
                self.critic_optimizer.zero_grad(set_to_none=True)
            # Without a pre-pass, the first update's own forward is the pre-update policy.
            gap = torch.zeros(2, dtype=torch.float64) if check_gap and k == 0 and "proximal" not in pre else None
            loss_share = 0.0
            for j, mb in enumerate(mbs):
                self._set_grad_sync(j == len(mbs) - 1)
                loss_share += self._micro_step(mb, pre, adv, mask_NR, behaviour_NR, staleness_NR, sft_ok_N, norm, metrics, gap)
            if gap is not None:
                self._check_fresh_gap(gap)
            metrics.add_mean("train/loss", loss_share, per_rank)
            clock.lap("prepare")
            if n_tok == 0:
                # No loss token on any rank (all responses empty or excluded): an optimizer step
                # would still move the weights by Adam's momentum. Skip it (on every rank alike).
                skipped += 1
                continue
            grad_norms.append(clip_grad_norm(self.policy.parameters(), cfg.optim.grad_clip))
            lrs.append(float(self.optimizer.param_groups[0]["lr"]))  # what this update uses
            self.optimizer.step()
            self.scheduler.step()
            if self.critic_optimizer is not None:
                metrics.add_max("train/critic_grad_norm", clip_grad_norm(self.critic.parameters(), cfg.optim.grad_clip))
                self.critic_optimizer.step()
                self.critic_scheduler.step()
            clock.lap("optimizer")
        metrics.add_mean("train/micro_batches", real_micro_batches, per_rank)  # summed over ranks and updates
        metrics.add_mean("perf/train_positions", positions, per_rank)  # summed over ranks
        for phase, secs in clock.seconds.items():  # the slowest rank's
            metrics.add_max(f"perf/train_{phase}_s", secs)
        self.step += 1
        self.version += 1
        out = metrics.reduce(self.all_reduce_sum, self.all_reduce_max)
        if self.moe is not None:
            out.update(self.moe.load_metrics(self.all_reduce_sum))
        seconds = time.perf_counter() - start
        out.update(
            {
                # Same on every rank: FSDP's clip returns the global norm; LR schedules step alike.
                "train/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else 0.0,
                "train/grad_norm_max": max(grad_norms, default=0.0),
                "train/lr": sum(lrs) / len(lrs) if lrs else float(self.optimizer.param_groups[0]["lr"]),
                "train/skipped_updates": float(skipped),
                "train/step": float(self.step),
                "train/version": float(self.version),
                "train/step_seconds": seconds,
                "train/tokens_per_s": out["train/tokens"] / max(seconds, 1e-9),
            }
        )
        return dict(sorted(out.items()))

    def _gap_staleness(self, staleness: torch.Tensor) -> torch.Tensor:
        """The staleness the gap check sees: all zero (every loss token compared) when the batch's
        behaviour log-probs are all 0.0, so only a certain policy passes."""
        return torch.zeros_like(staleness) if self._all_zero else staleness

    def _check_fresh_gap(self, gap: torch.Tensor) -> None:
        """All-reduce this rank's (sum |gap|, count) over fresh loss tokens and refuse an
        implausible mean (every rank raises alike)."""
        total, count = self.all_reduce_sum(gap.double().cpu()).tolist()
        try:
            if self._all_zero:
                check_all_zero_behaviour(total, count)
                return
            check_fresh_gap(total, count, self.cfg.max_logprob_mismatch, self.cfg.batching.temperature)
        except ValueError as e:
            raise ValueError(f"{self._tag()}: {e}") from e

    def _pre_pass(self, rb: RankBatch) -> dict[str, torch.Tensor]:
        """No-grad forward passes over the rank's rows: ``ref``, ``values``, ``proximal`` (N, R)."""
        cfg = self.cfg
        want_prox = cfg.off_policy.proximal == "trainer" and (
            cfg.batching.updates_per_batch > 1 or (self.reference is not None and cfg.kl.mode == "reward")
        )
        wanted = {
            "ref": self.reference is not None,
            "values": self.critic is not None,
            "proximal": want_prox,
        }
        out = {k: torch.zeros_like(rb.behaviour_NR, device=self.device) for k, on in wanted.items() if on}
        if not out:
            return out
        with torch.no_grad(), model_lib.autocast(self.device, cfg.batching.precision):
            for mb in self._synced_micro_batches(rb, list(range(rb.num_rows))):
                parts = {}
                if "ref" in out:
                    parts["ref"] = model_lib.response_logprobs(self.reference, mb, cfg.batching.temperature)[0]
                if "values" in out:
                    parts["values"] = model_lib.response_values(self.critic, mb)
                if "proximal" in out:
                    with routing_pass(self.moe, mb, replay=cfg.routing_replay):
                        parts["proximal"] = model_lib.response_logprobs(self.policy, mb, cfg.batching.temperature)[0]
                if mb.dummy:
                    continue
                for k, v_BR in parts.items():
                    out[k][mb.rows.to(self.device), : mb.width] = v_BR.float()
        return out

    def _micro_step(
        self,
        mb: MicroBatch,
        pre: dict[str, torch.Tensor],
        adv: AdvantageOutputs,
        mask_NR: torch.Tensor,
        behaviour_NR: torch.Tensor,
        staleness_NR: torch.Tensor,
        sft_ok_N: torch.Tensor,
        norm: LossNorm,
        metrics: StepMetrics,
        fresh_gap: torch.Tensor | None = None,
    ) -> float:
        """Forward + backward of one micro-batch; returns its share of the loss. ``fresh_gap``
        (float64 CPU [sum, count]) accumulates |anchor - behaviour| over fresh loss tokens."""
        cfg = self.cfg
        rows = mb.rows.to(self.device)
        take = lambda x_NR: x_NR[rows, : mb.width]  # noqa: E731
        mask_BR = take(mask_NR) * (0.0 if mb.dummy else 1.0)
        # MoE: replay / metrics on through backward (gradient checkpointing re-runs the routers there).
        with routing_pass(self.moe, mb, mask_BR, cfg.routing_replay, metrics, take(staleness_NR) == 0):
            return self._forward_backward(mb, pre, adv, mask_BR, take, behaviour_NR, staleness_NR, sft_ok_N, norm, metrics, fresh_gap)

    def _forward_backward(
        self,
        mb: MicroBatch,
        pre: dict[str, torch.Tensor],
        adv: AdvantageOutputs,
        mask_BR: torch.Tensor,
        take: Callable[[torch.Tensor], torch.Tensor],
        behaviour_NR: torch.Tensor,
        staleness_NR: torch.Tensor,
        sft_ok_N: torch.Tensor,
        norm: LossNorm,
        metrics: StepMetrics,
        fresh_gap: torch.Tensor | None,
    ) -> float:
        """The body of ``_micro_step``: forward, objective, metrics, backward (policy, then critic)."""
        cfg, lc = self.cfg, self.cfg.loss
        rows = mb.rows.to(self.device)
        with model_lib.autocast(self.device, cfg.batching.precision):
            logprobs_BR, entropy_BR = model_lib.response_logprobs(
                self.policy, mb, cfg.batching.temperature, with_entropy=True, entropy_grad=lc.entropy_coef > 0
            )
        inp = ObjectiveInputs(
            logprobs_BR=logprobs_BR,
            proximal_BR=take(pre["proximal"]) if "proximal" in pre else None,
            behaviour_BR=take(behaviour_NR),
            advantages_BR=take(adv.advantages_NR),
            mask_BR=mask_BR,
            sft_mask_BR=mask_BR * sft_ok_N[rows][:, None],
            entropy_BR=entropy_BR,
            ref_BR=take(pre["ref"]) if "ref" in pre else None,
        )
        obj = micro_batch_loss(inp, lc, cfg.off_policy, cfg.kl, norm)
        loss = obj.loss
        mismatch_BR = logprobs_BR.detach() if cfg.off_policy.proximal == "engine" else obj.anchor_BR
        record_mismatch(metrics, mismatch_BR, inp.behaviour_BR, take(staleness_NR), mask_BR)
        if fresh_gap is not None:
            fresh_gap += _fresh_gap(mismatch_BR, inp.behaviour_BR, self._gap_staleness(take(staleness_NR)), mask_BR)
        record_ratios(metrics, obj.pg.ratio_BR, obj.weight_BR, obj.pg.clipped_BR, obj.pg.dual_clipped_BR, mask_BR)
        n_tok = mask_BR.sum()
        metrics.add_mean("train/pg_loss", (obj.pg.loss_BR * obj.weight_BR * mask_BR).sum().detach(), n_tok)
        metrics.add_mean("train/entropy", (entropy_BR.detach() * mask_BR).sum(), n_tok)
        if obj.kl_BR is not None:
            metrics.add_mean("train/kl", (obj.kl_BR.detach() * mask_BR).sum(), n_tok)
        metrics.add_mean("train/logprob_mean", (logprobs_BR.detach() * mask_BR).sum(), n_tok)
        self._clock.lap("forward")
        (loss * self.world_size).backward()
        self._clock.lap("backward")
        if self.critic is not None:
            with model_lib.autocast(self.device, cfg.batching.precision):
                values_BR = model_lib.response_values(self.critic, mb)
            vl_BR, vclip_BR = value_loss(values_BR, take(pre["values"]), take(adv.returns_NR), lc.value_clip)
            vloss = lc.value_coef * aggregate(vl_BR, mask_BR, lc.aggregation, norm)
            self._clock.lap("forward")
            (vloss * self.world_size).backward()
            self._clock.lap("backward")
            metrics.add_mean("train/value_loss", (vl_BR.detach() * mask_BR).sum(), n_tok)
            metrics.add_mean("train/value_clip_frac", (vclip_BR & (mask_BR > 0)).sum(), n_tok)
        return float(loss.detach())


def _share_prompt(setting: bool | None, device: torch.device, models: list[torch.nn.Module | None]) -> bool:
    """``trainer.batching.share_prompt`` resolved: None (auto) = on CPU when the attention takes a
    block mask; true needs it."""
    want = setting if setting is not None else device.type == "cpu"
    unsupported = [type(m).__name__ for m in models if m is not None and not model_lib.supports_block_mask(m)]
    if want and unsupported:
        if setting:
            raise ValueError(
                f"trainer.batching.share_prompt=true needs sdpa or eager attention; {unsupported} use another "
                "attn_implementation; set share_prompt=null (auto) or false"
            )
        logger.info("trainer.batching.share_prompt=null (auto): off, %s attention takes no 4D block mask", unsupported)
        return False
    return want


def _fresh_gap(
    trainer_BR: torch.Tensor, behaviour_BR: torch.Tensor, staleness_BR: torch.Tensor, mask_BR: torch.Tensor
) -> torch.Tensor:
    """[sum of |trainer - behaviour| log-prob, count] over loss tokens of staleness 0, float64 on CPU."""
    with torch.no_grad():
        fresh_BR = (mask_BR > 0) & (staleness_BR == 0)
        total = (trainer_BR.float() - behaviour_BR.float()).abs()[fresh_BR].sum()
        return torch.stack([total.double(), fresh_BR.sum().double()]).cpu()
