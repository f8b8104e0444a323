"""Typed results of scoring: one :class:`RewardOutcome` per sample, and per-step counts.

:class:`RewardStepStats` is plain data (picklable), so rollout managers can send theirs to the
driver, which merges them and applies the all-failed guard for the whole step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from slime_rl.buffers.schema import Sample, Status

logger = logging.getLogger(__name__)

FAILURE_POLICIES = ("raise", "warn")
FAILURE_KINDS = {"timeout": "timeouts", "error": "errors", "nonfinite": "nonfinite"}
"""How a term failed on a sample -> its metric, ``reward/<term>/<metric>``: past ``timeout_s``
(or blocking the reward loop), raised (or a bad return value, or no free worker), NaN/inf."""


class AllRewardsFailedError(RuntimeError):
    """A reward term failed on every sample of a step; training on defaults would be silent garbage."""


@dataclasses.dataclass(frozen=True, slots=True)
class RewardOutcome:
    """The reward of one sample.

    ``metrics`` holds ``<term>/score`` and each term's numeric extras (``<term>/<field>``);
    ``info`` holds non-numeric extras. A failed outcome carries ``default_score`` and the
    error text of every term that failed.
    """

    score: float
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    failed: bool = False
    error: str | None = None
    seconds: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def apply_to(self, sample: Sample) -> None:
        """Write the outcome onto the sample: reward, reward_seconds, status and metadata."""
        sample.reward = self.score
        sample.reward_seconds = self.seconds
        if self.metrics:
            sample.metadata["reward_metrics"] = dict(self.metrics)
        if self.info:
            sample.metadata["reward_info"] = dict(self.info)
        if self.failed:
            sample.status = Status.FAILED.value
            sample.metadata["reward_error"] = self.error


@dataclasses.dataclass
class RewardStepStats:
    """Counts of one step (since the last ``RewardRunner.end_step``), per reward term."""

    samples: int = 0
    samples_failed: int = 0
    score_sum: float = 0.0
    calls: dict[str, int] = dataclasses.field(default_factory=dict)
    """Samples each term scored."""
    failed: dict[str, int] = dataclasses.field(default_factory=dict)
    """Samples each term failed on."""
    first_error: dict[str, str] = dataclasses.field(default_factory=dict)
    refs: dict[str, str] = dataclasses.field(default_factory=dict)
    metric_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    """Sum of each per-sample metric (``<term>/<field>``) over the samples that reported it."""
    metric_counts: dict[str, int] = dataclasses.field(default_factory=dict)
    failed_kinds: dict[str, int] = dataclasses.field(default_factory=dict)
    """Failures per ``<term>/<kind>`` (kinds: :data:`FAILURE_KINDS`)."""
    abandoned_threads: int = 0
    """Reward threads running a call abandoned past its timeout, at the end of the step."""
    workers_killed: int = 0
    """Reward worker processes killed for a call past its timeout during the step."""

    def record_term(self, name: str, ref: str, error: str | None, kind: str = "error") -> None:
        self.refs.setdefault(name, ref)
        self.calls[name] = self.calls.get(name, 0) + 1
        if error is not None:
            self.failed[name] = self.failed.get(name, 0) + 1
            self.first_error.setdefault(name, error)
            key = f"{name}/{kind}"
            self.failed_kinds[key] = self.failed_kinds.get(key, 0) + 1

    def record_sample(self, outcome: RewardOutcome) -> None:
        self.samples += 1
        self.samples_failed += int(outcome.failed)
        self.score_sum += outcome.score
        for key, value in outcome.metrics.items():
            self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
            self.metric_counts[key] = self.metric_counts.get(key, 0) + 1

    def merge(self, other: RewardStepStats) -> RewardStepStats:
        """Sum of two steps' counts (e.g. from several rollout managers)."""
        out = RewardStepStats(
            samples=self.samples + other.samples,
            samples_failed=self.samples_failed + other.samples_failed,
            score_sum=self.score_sum + other.score_sum,
            calls=dict(self.calls),
            failed=dict(self.failed),
            first_error=dict(self.first_error),
            refs=dict(self.refs),
            metric_sums=dict(self.metric_sums),
            metric_counts=dict(self.metric_counts),
            failed_kinds=dict(self.failed_kinds),
            abandoned_threads=self.abandoned_threads + other.abandoned_threads,
            workers_killed=self.workers_killed + other.workers_killed,
        )
        for key, n in other.failed_kinds.items():
            out.failed_kinds[key] = out.failed_kinds.get(key, 0) + n
        for key, v in other.metric_sums.items():
            out.metric_sums[key] = out.metric_sums.get(key, 0.0) + v
            out.metric_counts[key] = out.metric_counts.get(key, 0) + other.metric_counts.get(key, 0)
        for name, n in other.calls.items():
            out.calls[name] = out.calls.get(name, 0) + n
        for name, n in other.failed.items():
            out.failed[name] = out.failed.get(name, 0) + n
        for name, err in other.first_error.items():
            out.first_error.setdefault(name, err)
        for name, ref in other.refs.items():
            out.refs.setdefault(name, ref)
        return out

    def metrics(self) -> dict[str, float]:
        """Slash-namespaced metrics: counts are sums over the step; ``*_mean`` are means
        (``reward/<term>/<field>_mean`` over the samples whose term reported the field)."""
        m: dict[str, float] = {
            "reward/samples": float(self.samples),
            "reward/failed": float(self.samples_failed),
            "reward/failed_frac": self.samples_failed / self.samples if self.samples else 0.0,
            "reward/score_mean": self.score_sum / self.samples if self.samples else 0.0,
        }
        m["reward/abandoned_threads"] = float(self.abandoned_threads)
        m["reward/workers_killed"] = float(self.workers_killed)
        for name in self.calls:
            m[f"reward/{name}/failed"] = float(self.failed.get(name, 0))
            for kind, metric in FAILURE_KINDS.items():
                m[f"reward/{name}/{metric}"] = float(self.failed_kinds.get(f"{name}/{kind}", 0))
        for key, total in self.metric_sums.items():
            m[f"reward/{key}_mean"] = total / self.metric_counts[key]
        return m

    def all_failed_terms(self) -> list[str]:
        """Terms that were called and failed on every sample of the step."""
        return [n for n, c in self.calls.items() if c > 0 and self.failed.get(n, 0) == c]

    def check(self, policy: str = "raise") -> None:
        """Apply the all-failed guard: raise (``policy="raise"``) or log (``"warn"``)."""
        if policy not in FAILURE_POLICIES:
            raise ValueError(f"reward.failure_policy={policy!r}; allowed: {FAILURE_POLICIES}")
        bad = self.all_failed_terms()
        if not bad:
            return
        lines = [
            f"reward '{n}' ({self.refs.get(n, '?')}) failed on all {self.calls[n]} samples of "
            f"this step; first error: {self.first_error.get(n)}"
            for n in bad
        ]
        msg = "; ".join(lines)
        if policy == "raise":
            raise AllRewardsFailedError(
                f"{msg}. Training on default scores would be meaningless: fix the reward "
                "(or set reward.failure_policy=warn to keep going)."
            )
        logger.warning("%s; continuing with reward.default_score (reward.failure_policy=warn)", msg)
