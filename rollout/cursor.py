"""The seeded order in which the rollout side walks a prompt dataset, epoch after epoch.

It is its own module because its state is part of every checkpoint: a resumed run must hand
out exactly the prompts the killed one had not, in the same order, whatever changes in how
datasets are read (``rollout/data.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def seed64(seed: int) -> int:
    """numpy seeds must be non-negative; a negative run seed maps to its 64-bit pattern."""
    return seed & 0xFFFF_FFFF_FFFF_FFFF


class DatasetCursor:
    """Walks indices ``0..size-1`` epoch after epoch, each epoch in the order
    ``numpy.random.default_rng((seed, epoch)).permutation(size)`` (or in file order when
    ``shuffle`` is off). Its state is part of the run's checkpoint, so a resumed run continues
    the same order; a state saved at the end of an epoch resumes at the next one.

    Example::

        cur = DatasetCursor(3, seed=0, shuffle=True)
        [cur.next() for _ in range(4)]   # [(i0, 0), (i1, 0), (i2, 0), (j0, 1)]
        state = cur.state_dict()         # {"epoch": 1, "position": 1, "seed": 0, ...}
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool = True) -> None:
        if size < 1:
            raise ValueError(
                f"DatasetCursor needs a dataset with at least one prompt, got size={size}"
            )
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch = 0
        """Epoch of the next index (before a pending roll-over)."""
        self.position = 0
        """Indices already taken in ``epoch`` (``size`` = epoch done, next() rolls over)."""
        self._order: np.ndarray | None = None

    def _epoch_order(self) -> np.ndarray:
        if self._order is None:
            if self.shuffle:
                self._order = np.random.default_rng((seed64(self.seed), self.epoch)).permutation(
                    self.size
                )
            else:
                self._order = np.arange(self.size)
        return self._order

    def next(self) -> tuple[int, int]:
        """The next dataset index and the epoch it belongs to."""
        if self.position >= self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        index = int(self._epoch_order()[self.position])
        self.position += 1
        return index, self.epoch

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "size": self.size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved position. Raises ValueError if the state is incomplete or was saved
        for another dataset size, seed or shuffle setting (naming which)."""
        missing = [k for k in ("epoch", "position", "seed", "shuffle", "size") if k not in state]
        if missing:
            raise ValueError(f"dataset cursor state lacks {', '.join(missing)}: {state}")
        mismatched = [
            f"{key} (saved {state[key]!r}, now {getattr(self, key)!r})"
            for key in ("size", "seed", "shuffle")
            if state[key] != getattr(self, key)
        ]
        if mismatched:
            raise ValueError(
                "dataset cursor state does not match this run: "
                + "; ".join(mismatched)
                + " — the data order would change; resume with the same dataset, run.seed and data.shuffle"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.size:
            raise ValueError(
                f"dataset cursor state out of range: epoch={epoch}, position={position}, size={self.size}"
            )
        self.epoch, self.position, self._order = epoch, position, None
