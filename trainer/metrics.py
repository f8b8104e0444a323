"""Step metrics with an explicit reduction, reduced once across ranks.

Each rank adds partial sums (``mean``) and maxima (``max``) while it walks its
micro-batches; ``reduce`` packs them into two tensors, all-reduces (sum / max) across the
trainer group and returns plain floats under slash-namespaced keys (``train/clip_frac``).
Every rank must add the same keys in any order: keys are sorted before packing.

>>> m = StepMetrics()
>>> m.add_mean("train/loss", 3.0, 2)
>>> m.add_max("train/ratio_max", 1.5)
>>> m.reduce()
{'train/loss': 1.5, 'train/ratio_max': 1.5}
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _detach(x: float | torch.Tensor) -> float | torch.Tensor:
    return x.detach() if isinstance(x, torch.Tensor) else x


class StepMetrics:
    """Partial sums and maxima of one train step on one rank."""

    def __init__(self) -> None:
        # Values may stay device tensors until reduce(): no host sync per micro-batch.
        self._sums: dict[str, list[float | torch.Tensor]] = {}
        self._maxes: dict[str, list[float | torch.Tensor]] = {}
        self._omit_empty: set[str] = set()

    def add_mean(
        self, key: str, total: float | torch.Tensor, count: float | torch.Tensor, omit_if_empty: bool = False
    ) -> None:
        """Add ``total`` over ``count`` items to the mean of ``key``. With ``omit_if_empty`` the key
        is left out of the step's metrics when no item was counted (over all ranks): a mean of
        nothing is not 0 (e.g. the fresh-token log-prob gap of a step with no fresh token)."""
        if omit_if_empty:
            self._omit_empty.add(key)
        acc = self._sums.setdefault(key, [0.0, 0.0])
        acc[0] = acc[0] + _detach(total)
        acc[1] = acc[1] + _detach(count)

    def add_max(self, key: str, value: float | torch.Tensor) -> None:
        """Raise the maximum of ``key`` to ``value``."""
        self._maxes.setdefault(key, []).append(_detach(value))

    def reduce(self, all_reduce_sum: Reduce = _identity, all_reduce_max: Reduce = _identity) -> dict[str, float]:
        """Global values: means = sum of totals / sum of counts (0 when no item), maxima."""
        out: dict[str, float] = {}
        mean_keys = sorted(self._sums)
        if mean_keys:
            packed = torch.tensor([[float(v) for v in self._sums[k]] for k in mean_keys], dtype=torch.float64)
            packed = all_reduce_sum(packed)
            for k, (total, count) in zip(mean_keys, packed.tolist(), strict=True):
                if count > 0 or k not in self._omit_empty:
                    out[k] = total / count if count > 0 else 0.0
        max_keys = sorted(self._maxes)
        if max_keys:
            local = [max(float(v) for v in self._maxes[k]) for k in max_keys]
            packed = all_reduce_max(torch.tensor(local, dtype=torch.float64))
            for k, v in zip(max_keys, packed.tolist(), strict=True):
                out[k] = v if v != float("-inf") else 0.0
        return dict(sorted(out.items()))
