"""Reward fault injection (config ``faults.reward``): make a deterministic fraction of samples'
reward calls hang, raise or return NaN, to see what a run does when its reward misbehaves.

    RewardRunner.from_config(cfg.reward, faults=cfg.faults.reward)
      └─ RewardFaults(hang_frac, raise_frac, nan_frac, seed, terms).wrap(component), per term:
           sample_id ──hash(seed, sample_id)──► u in [0, 1)
             u < hang_frac                       ──► the call never returns (until the runner closes)
             u < hang_frac + raise_frac          ──► raises InjectedRewardFault
             u < hang_frac + raise_frac + nan_frac ──► returns NaN
             otherwise                           ──► the real reward

The same samples are picked for every term and on every run with the same seed, so a test can
name them in advance (:meth:`RewardFaults.pick`). The faults go through the runner's ordinary
paths: a hang is a timeout (`reward/<term>/timeouts`; a thread abandoned, or a worker process
killed), a raise an error (`reward/<term>/errors`), NaN a non-finite score
(`reward/<term>/nonfinite`); each fails its sample only. A batched term (one call per group)
hangs or raises for the whole group when any of its samples is picked; NaN replaces the picked
samples' results. With ``reward.executor: process`` the wrapper is rebuilt in each worker
process from its reference (:data:`FAULTY_REF`), so the hang happens (and is killed) there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from slime_rl.rewards.loader import RewardComponent, load_reward
from slime_rl.rewards.protocol import work_started

FAULTY_REF = "slime_rl.rewards.faults:FaultyReward"
"""The reference a worker process loads a wrapped term from."""

KINDS = ("hang", "raise", "nan")


class InjectedRewardFault(RuntimeError):
    """Raised by a reward call picked by ``faults.reward.raise_frac``."""


@dataclasses.dataclass(frozen=True)
class RewardFaults:
    """Which samples' reward calls fail, and how (see the module doc).

    >>> f = RewardFaults(raise_frac=0.5, seed=1)
    >>> sorted({f.pick(f"g0-{i}") for i in range(64)}, key=str)
    ['raise', None]
    """

    hang_frac: float = 0.0
    raise_frac: float = 0.0
    nan_frac: float = 0.0
    seed: int = 0
    terms: tuple[str, ...] = ()
    """Names of the terms to wrap; empty: every term."""

    def __post_init__(self) -> None:
        for key in ("hang_frac", "raise_frac", "nan_frac"):
            value = getattr(self, key)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"faults.reward.{key}={value}: must be in [0, 1]")
        total = self.hang_frac + self.raise_frac + self.nan_frac
        if total > 1.0 + 1e-9:
            raise ValueError(
                f"faults.reward.hang_frac + raise_frac + nan_frac = {total:g}: the fractions of "
                "samples picked for each fault must add up to at most 1"
            )
        object.__setattr__(self, "terms", tuple(self.terms))

    @classmethod
    def from_config(cls, cfg: Any) -> RewardFaults:
        """From a ``RewardFaultsConfig`` (or anything with its fields)."""
        return cls(
            hang_frac=float(cfg.hang_frac), raise_frac=float(cfg.raise_frac), nan_frac=float(cfg.nan_frac),
            seed=int(cfg.seed), terms=tuple(cfg.terms or ()),
        )

    @property
    def active(self) -> bool:
        return self.hang_frac + self.raise_frac + self.nan_frac > 0

    def pick(self, sample_id: str) -> str | None:
        """The fault for this sample (``"hang"``, ``"raise"``, ``"nan"``) or None."""
        digest = hashlib.blake2b(f"{self.seed}:{sample_id}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2.0**64
        for kind, edge in zip(KINDS, (self.hang_frac, self.hang_frac + self.raise_frac,
                                      self.hang_frac + self.raise_frac + self.nan_frac)):
            if u < edge:
                return kind
        return None

    def wrap_all(self, components: Sequence[RewardComponent]) -> list[RewardComponent]:
        """Wrap the chosen terms (all when ``terms`` is empty); raises naming unknown terms."""
        names = [c.name for c in components]
        unknown = sorted(set(self.terms) - set(names))
        if unknown:
            raise ValueError(f"faults.reward.terms: no reward term named {unknown}; terms: {names}")
        if not self.active:
            return list(components)
        return [self.wrap(c) if not self.terms or c.name in self.terms else c for c in components]

    def wrap(self, comp: RewardComponent) -> RewardComponent:
        """A component that calls ``comp`` unless the sample is picked for a fault."""
        load_kwargs = {
            "ref": comp.ref, "kwargs": dict(comp.load_kwargs or comp.kwargs), "hang_frac": self.hang_frac,
            "raise_frac": self.raise_frac, "nan_frac": self.nan_frac, "seed": self.seed,
        }
        cls = AsyncFaultyReward if comp.is_async else FaultyReward
        return dataclasses.replace(comp, ref=FAULTY_REF, fn=cls(_inner=comp, **load_kwargs), kwargs={},
                                   load_kwargs=load_kwargs)


class FaultyReward:
    """A blocking reward term with injected faults; ``FaultyReward(ref, kwargs, ...)`` loads the
    real term (as a worker process does); the runner passes the loaded one as ``_inner``."""

    def __init__(self, ref: str, kwargs: Mapping[str, Any] | None = None, hang_frac: float = 0.0,
                 raise_frac: float = 0.0, nan_frac: float = 0.0, seed: int = 0,
                 _inner: RewardComponent | None = None) -> None:
        self.inner = _inner if _inner is not None else load_reward(ref, kwargs)
        self.faults = RewardFaults(hang_frac, raise_frac, nan_frac, seed)
        self.inner_ref = ref
        self._released = threading.Event()

    def _faults_of(self, arg: Any) -> tuple[list[str | None], str | None]:
        """Per-sample faults and the one for the call (hang or raise wins for a whole group)."""
        samples = list(arg) if self.inner.is_batched else [arg]
        picks = [self.faults.pick(str(s.sample_id)) for s in samples]
        for kind in ("hang", "raise"):
            if kind in picks:
                return picks, kind
        return picks, None

    @staticmethod
    def _error(arg: Any, picks: list[str | None]) -> InjectedRewardFault:
        samples = list(arg) if isinstance(arg, (list, tuple)) else [arg]
        ids = [s.sample_id for s, k in zip(samples, picks) if k == "raise"]
        return InjectedRewardFault(f"injected by faults.reward.raise_frac (sample {', '.join(map(str, ids))})")

    @staticmethod
    def _with_nans(result: Any, picks: list[str | None], batched: bool) -> Any:
        if not batched:
            return float("nan") if picks[0] == "nan" else result
        if not isinstance(result, Sequence) or len(result) != len(picks):
            return result  # the runner reports the bad length
        return [float("nan") if k == "nan" else r for r, k in zip(result, picks)]

    def __call__(self, arg: Any) -> Any:
        picks, whole = self._faults_of(arg)
        if whole == "hang":
            self._released.wait()  # a thread cannot be stopped: the runner's close ends this
            raise InjectedRewardFault("injected hang released by the runner's close")
        if whole == "raise":
            raise self._error(arg, picks)
        if not self.inner.is_batched and picks[0] == "nan":
            return float("nan")
        return self._with_nans(self.inner.fn(arg, **self.inner.kwargs), picks, self.inner.is_batched)

    def release(self) -> None:
        """End the injected hangs running now (at the runner's close; later calls hang anew)."""
        released, self._released = self._released, threading.Event()
        released.set()

    async def aclose(self) -> None:
        self.release()
        if inspect.isfunction(self.inner.fn) or inspect.ismethod(self.inner.fn):
            return
        closer = getattr(self.inner.fn, "aclose", None)
        if closer is not None:
            await closer()
        elif getattr(self.inner.fn, "close", None) is not None:
            self.inner.fn.close()


class AsyncFaultyReward(FaultyReward):
    """The async form: an injected hang awaits forever (the runner's timeout cancels it)."""

    async def __call__(self, arg: Any) -> Any:  # type: ignore[override]
        picks, whole = self._faults_of(arg)
        if whole == "hang":
            work_started()  # a @queued term's timeout starts here, as for real work
            while True:
                await asyncio.sleep(3600)
        if whole == "raise":
            raise self._error(arg, picks)
        if not self.inner.is_batched and picks[0] == "nan":
            return float("nan")
        return self._with_nans(await self.inner.fn(arg, **self.inner.kwargs), picks, self.inner.is_batched)

