"""MoE routing in the trainer: router metrics and rollout routing replay.

    policy (transformers MoE, e.g. GLM-4.5 / GLM-5) ─► MoERouting(policy): a forward hook on
    every router (`*TopkRouter`, layer order; each returns (logits, weights, top-k ids))
      begin(mb, mask_BR, replay, metrics) before a policy forward pass
        hook, per MoE layer:  own ids (the trainer's router)
          ├─ replay: positions the engine recorded (mb.routed_experts_BTX) use the engine's
          │   experts, weighted by the trainer's router scores for them (differentiable);
          │   positions without a record (padding, the last token) keep their own
          └─ metrics at the positions predicting loss tokens (once per layer and pass):
              router entropy, expert token counts, engine-vs-trainer routing differences
      end() after the backward pass (gradient checkpointing re-runs the hooks in backward:
        the replay stays on until then, the metrics are not counted twice)
      load_metrics(all_reduce_sum) once per step: expert load over all ranks

Rollout routing replay (R3, "Stabilizing MoE RL by Aligning Training and Inference Routers"):
the engine and the trainer compute the router in different kernels (and precisions), so near
ties pick different experts and the policy ratio compares two different sub-networks. With
`trainer.routing_replay` every policy pass (the proximal pre-pass too) uses the engine's
experts; `moe/routing_mismatch` is then 0 by construction and `moe/router_disagreement`
keeps reporting how often the trainer's own router would have chosen otherwise.

Metrics (means over (loss token, MoE layer) pairs unless said otherwise):
  moe/router_entropy            entropy (nats) of the router's distribution over experts
                                (sigmoid scores normalised to 1 for GLM's sigmoid routers,
                                softmax otherwise); at most ln(E)
  moe/routing_mismatch          the experts the trainer used differ from the engine's
  moe/routing_mismatch_tokens   ... in at least one layer, per token
  moe/router_disagreement       the trainer's own router choice differs from the engine's
  moe/router_disagreement_tokens  ... in at least one layer, per token
  moe/router_disagreement_fresh   moe/router_disagreement on tokens of staleness 0 (generated
                                with the trainer's current weights): the train/inference
                                mismatch alone, without the policy change of stale tokens
  moe/routed_frac               loss tokens that carry the engine's routing
  moe/tokens_per_expert_mean|max  (token, slot) assignments per expert and layer, whole step
  moe/load_max_over_mean        max / mean expert load, averaged over layers (1 = balanced)
  moe/load_max_over_mean_max    ... of the most imbalanced layer
  moe/experts_unused_frac       (layer, expert) pairs that got no token in the step
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from slime_rl.trainer.batching import MicroBatch
from slime_rl.trainer.metrics import StepMetrics
from torch import nn

logger = logging.getLogger(__name__)

_ROUTER_CLASS = re.compile(r"Top[kK]Router$")

Reduce = Callable[[torch.Tensor], torch.Tensor]


def routers(model: nn.Module) -> list[nn.Module]:
    """The MoE router modules of a transformers model, in layer order (empty when dense)."""
    return [m for m in model.modules() if _ROUTER_CLASS.search(type(m).__name__) and hasattr(m, "top_k")]


def _num_experts(router: nn.Module) -> int:
    return int(getattr(router, "num_experts", None) or getattr(router, "n_routed_experts", None) or router.weight.shape[0])


def _is_sigmoid(router: nn.Module) -> bool:
    """GLM-4.5 / GLM-5 / DeepSeek-V3 routers: sigmoid scores + a score-correction bias."""
    return hasattr(router, "e_score_correction_bias") and hasattr(router, "routed_scaling_factor")


def sigmoid_gate_weights(router: nn.Module, logits_NE: torch.Tensor, ids_NK: torch.Tensor) -> torch.Tensor:
    """Gating weights of experts ``ids_NK`` as the GLM / DeepSeek-V3 router computes them for
    its own choice: sigmoid scores of those experts, normalised to sum 1 (``norm_topk_prob``),
    times ``routed_scaling_factor`` -> (N, K) float32. The correction bias only chooses, it
    does not weigh."""
    w_NK = logits_NE.float().sigmoid().gather(1, ids_NK)
    if getattr(router, "norm_topk_prob", True):
        w_NK = w_NK / (w_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return w_NK * router.routed_scaling_factor


def router_distribution(router: nn.Module, logits_NE: torch.Tensor) -> torch.Tensor:
    """The router's scores over experts as a distribution (N, E): normalised sigmoid scores
    for sigmoid routers, softmax otherwise."""
    if _is_sigmoid(router):
        s_NE = logits_NE.float().sigmoid()
        return s_NE / s_NE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return logits_NE.float().softmax(dim=-1)


class MoERouting:
    """Router hooks of one policy model: routing replay and MoE metrics (see the module doc).

    >>> moe = MoERouting.attach(policy)      # None for a dense model         # doctest: +SKIP
    >>> moe.begin(mb, mask_BR, replay=True, metrics=step_metrics)           # doctest: +SKIP
    >>> loss = objective(policy(mb)); loss.backward(); moe.end()            # doctest: +SKIP
    >>> step_metrics_dict.update(moe.load_metrics(all_reduce_sum))          # doctest: +SKIP
    """

    def __init__(self, routers_: list[nn.Module]) -> None:
        if not routers_:
            raise ValueError("MoERouting needs at least one router")
        self.routers = routers_
        self.top_k = int(routers_[0].top_k)
        self.num_experts = _num_experts(routers_[0])
        self._index = {id(r): i for i, r in enumerate(routers_)}
        self._handles = [r.register_forward_hook(self._hook) for r in routers_]
        self._replay_LNK: torch.Tensor | None = None
        self._engine_LNK: torch.Tensor | None = None
        self._positions_M: torch.Tensor | None = None
        self._fresh_M: torch.Tensor | None = None
        self._metrics: StepMetrics | None = None
        self._done: set[int] = set()
        self._token_any: dict[str, torch.Tensor] = {}
        self._counts_LE: torch.Tensor | None = None

    @classmethod
    def attach(cls, model: nn.Module) -> MoERouting | None:
        """Hook the routers of ``model``; None when it has none (a dense model)."""
        found = routers(model)
        return cls(found) if found else None

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    @property
    def width(self) -> int:
        """Entries of one ``routed_experts`` position: MoE layers x top-k."""
        return self.num_layers * self.top_k

    def check_replay_supported(self) -> None:
        """Raises ValueError when replay cannot compute gating weights for these routers."""
        bad = sorted({type(r).__name__ for r in self.routers if not _is_sigmoid(r)})
        if bad:
            raise ValueError(
                f"trainer.routing_replay supports sigmoid top-k routers (GLM-4.5, GLM-5, DeepSeek-V3); the policy's "
                f"{bad} is not one; set trainer.routing_replay=false"
            )

    # -- the table ---------------------------------------------------------------------------------
    def check_table(self, table: pa.Table, replay: bool, exclude_status: list[str] | tuple[str, ...]) -> None:
        """Refuse a batch whose ``routed_experts`` do not fit this model (entries of another
        width) or, with ``replay``, lack routing for a trained response. Runs on the whole
        global batch, so every rank refuses alike, before any forward pass.

        Raises:
            ValueError: naming the column, the row and what was expected.
        """
        if "routed_experts" not in table.schema.names:
            if replay and table.num_rows:
                raise ValueError(self._missing_message(0))
            return
        col = table.column("routed_experts")
        outer = np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if outer.any():
            inner = pc.list_flatten(col)
            width = int(pc.list_value_length(inner)[0].as_py())
            if width != self.width:
                row = int(np.flatnonzero(outer)[0])
                raise ValueError(
                    f"column 'routed_experts' row {row} holds entries of {width} expert ids, but the policy has "
                    f"{self.num_layers} MoE layers x top-{self.top_k} = {self.width}: the routing was recorded on "
                    "another model"
                )
        if not replay:
            return
        resp = np.asarray(pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False))
        excluded = np.isin(np.asarray(table.column("status").to_pylist(), dtype=object), list(exclude_status))
        bad = np.flatnonzero((outer == 0) & (resp > 0) & ~excluded)
        if bad.size:
            raise ValueError(self._missing_message(int(bad[0])))

    @staticmethod
    def _missing_message(row: int) -> str:
        return (
            f"column 'routed_experts' row {row} is empty but trainer.routing_replay=true needs the experts the engine "
            "routed each token to; set rollout.record_routed_experts=true (engines hf and vllm record them), or "
            "trainer.routing_replay=false"
        )

    # -- one forward (+ backward) ----------------------------------------------------------------
    def begin(
        self,
        mb: MicroBatch,
        mask_BR: torch.Tensor | None,
        replay: bool,
        metrics: StepMetrics | None = None,
        fresh_BR: torch.Tensor | None = None,
    ) -> None:
        """Arm the hooks for the policy pass on ``mb``: replay the engine's routing (``replay``)
        and add metrics to ``metrics`` at the positions of ``mask_BR > 0`` (None: no metrics);
        ``fresh_BR`` (bool) marks the tokens of staleness 0."""
        self.end()
        B, T = mb.input_ids_BT.shape
        engine_LNK = None
        if mb.routed_experts_BTX is not None:
            X = mb.routed_experts_BTX.shape[-1]
            assert X == self.width, f"routed_experts width {X} != {self.width} (check_table lets none through)"
            engine_LNK = mb.routed_experts_BTX.view(B * T, self.num_layers, self.top_k).permute(1, 0, 2)
        self._engine_LNK = engine_LNK
        self._replay_LNK = engine_LNK if replay else None
        if metrics is not None and mask_BR is not None:
            flat_BR = mb.resp_pos_BR if mb.packed else mb.resp_pos_BR + torch.arange(B, device=mb.resp_pos_BR.device)[:, None] * T
            self._positions_M = flat_BR[mask_BR > 0]
            fresh_BR = torch.ones_like(mask_BR, dtype=torch.bool) if fresh_BR is None else fresh_BR
            self._fresh_M = fresh_BR[mask_BR > 0].cpu()
            self._metrics = metrics
            self._token_any = {}

    def end(self) -> None:
        """Disarm the hooks (after the backward pass) and flush the per-token metrics."""
        if self._metrics is not None:
            M = self._positions_M.numel() if self._positions_M is not None else 0
            has = self._token_any.get("has", torch.zeros(M, dtype=torch.bool))
            for key in ("routing_mismatch", "router_disagreement"):
                hit = self._token_any.get(key, torch.zeros(M, dtype=torch.bool))
                self._metrics.add_mean(f"moe/{key}_tokens", (hit & has).sum(), has.sum())
            self._metrics.add_mean("moe/routed_frac", has.sum(), M)
        self._replay_LNK = self._engine_LNK = self._positions_M = self._fresh_M = None
        self._metrics = None
        self._done = set()
        self._token_any = {}

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> tuple:
        layer = self._index[id(module)]
        logits_NE, weights_NK, own_NK = output
        used_NK = own_NK
        if self._replay_LNK is not None:
            forced_NK = self._replay_LNK[layer].to(own_NK.device)
            if forced_NK.shape != own_NK.shape:
                raise RuntimeError(
                    f"routing replay: layer {layer} routed {tuple(own_NK.shape)} (tokens, top-k) but the batch "
                    f"holds {tuple(forced_NK.shape)}"
                )
            has_N1 = (forced_NK >= 0).all(dim=-1, keepdim=True)
            used_NK = torch.where(has_N1, forced_NK, own_NK)
            replayed_NK = sigmoid_gate_weights(module, logits_NE, used_NK).to(weights_NK.dtype)
            output = (logits_NE, torch.where(has_N1, replayed_NK, weights_NK), used_NK)
        if self._metrics is not None and layer not in self._done:
            self._done.add(layer)
            with torch.no_grad():
                self._record(module, layer, logits_NE, own_NK, used_NK)
        return output

    def _record(self, router: nn.Module, layer: int, logits_NE: torch.Tensor, own_NK: torch.Tensor, used_NK: torch.Tensor) -> None:
        m, pos_M = self._metrics, self._positions_M
        M = pos_M.numel()
        p_ME = router_distribution(router, logits_NE[pos_M])
        m.add_mean("moe/router_entropy", -(p_ME * p_ME.clamp_min(1e-30).log()).sum().cpu(), M)
        used_MK = used_NK[pos_M]
        if self._counts_LE is None:
            self._counts_LE = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self._counts_LE[layer] += torch.bincount(used_MK.flatten().cpu(), minlength=self.num_experts)[: self.num_experts].double()
        if self._engine_LNK is None:
            eng_MK = torch.full_like(used_MK, -1)
        else:
            eng_MK = self._engine_LNK[layer].to(used_MK.device)[pos_M]
        has_M = (eng_MK >= 0).all(dim=-1).cpu()
        eng_sorted = eng_MK.sort(dim=-1).values
        differs = {
            key: (ids_NK[pos_M].sort(dim=-1).values != eng_sorted).any(dim=-1).cpu() & has_M
            for key, ids_NK in (("routing_mismatch", used_NK), ("router_disagreement", own_NK))
        }
        for key, differs_M in differs.items():
            m.add_mean(f"moe/{key}", differs_M.sum(), has_M.sum())
            self._token_any[key] = self._token_any.get(key, torch.zeros(M, dtype=torch.bool)) | differs_M
        fresh_M = has_M & self._fresh_M
        m.add_mean("moe/router_disagreement_fresh", (differs["router_disagreement"] & fresh_M).sum(), fresh_M.sum())
        self._token_any["has"] = self._token_any.get("has", torch.zeros(M, dtype=torch.bool)) | has_M

    # -- once per step -------------------------------------------------------------------------------
    def load_metrics(self, all_reduce_sum: Reduce) -> dict[str, float]:
        """Expert load of the step, summed over ranks (a collective: every rank calls it), then reset."""
        counts_LE = self._counts_LE if self._counts_LE is not None else torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64)
        self._counts_LE = None
        counts_LE = all_reduce_sum(counts_LE)
        mean_L = counts_LE.mean(dim=1)
        ratio_L = torch.where(mean_L > 0, counts_LE.max(dim=1).values / mean_L.clamp_min(1e-30), torch.zeros_like(mean_L))
        used = counts_LE.sum() > 0
        return {
            "moe/tokens_per_expert_mean": float(mean_L.mean()),
            "moe/tokens_per_expert_max": float(counts_LE.max()),
            "moe/load_max_over_mean": float(ratio_L.mean()),
            "moe/load_max_over_mean_max": float(ratio_L.max()),
            "moe/experts_unused_frac": float((counts_LE == 0).double().mean()) if used else 0.0,
        }

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def routing_pass(
    moe: MoERouting | None,
    mb: MicroBatch,
    mask_BR: torch.Tensor | None = None,
    replay: bool = False,
    metrics: StepMetrics | None = None,
    fresh_BR: torch.Tensor | None = None,
) -> Iterator[None]:
    """``moe.begin(...)`` for the block (a policy forward, and its backward when inside), then
    ``moe.end()``; nothing for a dense policy (``moe`` None)."""
    if moe is None:
        yield
        return
    moe.begin(mb, mask_BR, replay, metrics, fresh_BR)
    try:
        yield
    finally:
        moe.end()


def max_router_entropy(num_experts: int) -> float:
    """The largest ``moe/router_entropy`` possible: ln(E) nats (a uniform router)."""
    return math.log(num_experts)
