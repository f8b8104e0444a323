"""MoE helpers of the engines: recording routed experts (hf) and expert-weight layouts.

    transformers model ─► routers(model): the `*TopkRouter` modules, layer order
        └─ RoutingRecorder: a forward hook on each router keeps its top-k expert ids
             ─► take(B, T) ─► int16 (B, T, L, K): per row and position, K experts at each
                of the L MoE layers (what `GenerateResult.routed_experts` is made of)

    per-expert names  model.layers.1.mlp.experts.3.gate_proj.weight  (HF checkpoints on disk,
                      Megatron-style exports)
    fused names       model.layers.1.mlp.experts.gate_up_proj (E, 2I, H), .down_proj (E, H, I)
                      (transformers >= 5 in memory: what the trainer publishes)
        └─ fuse_per_expert(named, targets): per-expert -> fused, for an engine whose model
           holds fused tensors (hf); vLLM loads either layout itself.

Every transformers >= 5 MoE router (GLM-4.5, GLM-5, DeepSeek-V3, Qwen3-MoE, Mixtral) returns
`(router_logits, topk_weights, topk_indices)`; the recorder keeps `topk_indices`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

_ROUTER_CLASS = re.compile(r"Top[kK]Router$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


def routers(model: nn.Module) -> list[nn.Module]:
    """The model's MoE router modules in layer order (empty for a dense model)."""
    return [m for m in model.modules() if _ROUTER_CLASS.search(type(m).__name__) and hasattr(m, "top_k")]


class RoutingRecorder:
    """Keeps the top-k expert ids every router of ``model`` picks while ``active``.

    >>> rec = RoutingRecorder(model)                     # doctest: +SKIP
    >>> rec.active = True; model(input_ids=ids_BT)       # doctest: +SKIP
    >>> rec.take(*ids_BT.shape).shape                    # doctest: +SKIP
    (B, T, L, K)
    """

    def __init__(self, model: nn.Module) -> None:
        self.routers = routers(model)
        self.active = False
        self._ids: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook) for r in self.routers]

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if self.active:
            self._ids.append(output[2].detach())  # (B*T, K) top-k expert ids

    def clear(self) -> None:
        self._ids = []

    def take(self, batch: int, length: int) -> np.ndarray:
        """The ids of the last forward pass of a (batch, length) input: int16 (B, T, L, K).

        Raises:
            RuntimeError: the routers did not run exactly once each in that pass.
        """
        ids, self._ids = self._ids, []
        if len(ids) != len(self.routers):
            raise RuntimeError(
                f"routing recorder: {len(ids)} router calls in one forward pass, expected {len(self.routers)} (one per MoE layer)"
            )
        stacked_LNK = torch.stack(ids).to("cpu", torch.int16)
        L, _, K = stacked_LNK.shape
        return stacked_LNK.view(L, batch, length, K).permute(1, 2, 0, 3).contiguous().numpy()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def fuse_per_expert(
    named: Iterable[tuple[str, torch.Tensor]], targets: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    """Per-expert expert weights (``<p>.experts.<e>.{gate,up,down}_proj.weight``) as the fused
    tensors a transformers >= 5 model holds (``<p>.experts.gate_up_proj`` = stack of
    cat(gate_e, up_e) (E, 2I, H), ``<p>.experts.down_proj`` = stack of down_e (E, H, I)),
    for the prefixes whose fused names are in ``targets``; everything else passes unchanged.

    Raises:
        ValueError: a fused layer whose per-expert weights are incomplete (names the first
            missing one).
    """
    passthrough: list[tuple[str, torch.Tensor]] = []
    groups: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, t in named:
        m = _PER_EXPERT.match(name)
        if m and f"{m['prefix']}.gate_up_proj" in targets:
            groups.setdefault(m["prefix"], {})[(int(m["expert"]), m["proj"])] = t
        else:
            passthrough.append((name, t))
    out = passthrough
    for prefix, parts in groups.items():
        num_experts = targets[f"{prefix}.gate_up_proj"].shape[0]
        for e in range(num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if (e, proj) not in parts:
                    raise ValueError(
                        f"expert weights of {prefix} are incomplete: {prefix}.{e}.{proj}.weight is missing "
                        f"({len(parts)} of {3 * num_experts} per-expert tensors given); send all experts of every layer"
                    )
        out.append((f"{prefix}.gate_up_proj", torch.stack([torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(num_experts)])))
        out.append((f"{prefix}.down_proj", torch.stack([parts[(e, "down_proj")] for e in range(num_experts)])))
    return out


def split_fused(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """The inverse of ``fuse_per_expert``: fused expert tensors (``<p>.experts.gate_up_proj``
    (E, 2I, H), ``<p>.experts.down_proj`` (E, H, I)) as per-expert ``gate_proj``/``up_proj``/
    ``down_proj`` weights (views, no copy); other names pass unchanged."""
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in named:
        if name.endswith(".experts.gate_up_proj") and t.dim() == 3:
            prefix = name[: -len(".gate_up_proj")]
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                out += [(f"{prefix}.{e}.gate_proj.weight", gate[e]), (f"{prefix}.{e}.up_proj.weight", up[e])]
        elif name.endswith(".experts.down_proj") and t.dim() == 3:
            prefix = name[: -len(".down_proj")]
            out += [(f"{prefix}.{e}.down_proj.weight", t[e]) for e in range(t.shape[0])]
        else:
            out.append((name, t))
    return out
