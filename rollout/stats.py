"""Rollout metrics of one window (between two `RolloutManager.metrics()` calls), reduced once.

Every value is slash-namespaced with its reduction in the name or the doc:

    rollout/groups, rollout/samples                 counts in the window
    rollout/samples_per_s, rollout/gen_tokens_per_s  window throughput
    rollout/reward_mean, rollout/reward_std         over samples (also /think, /non_think)
    rollout/response_len_mean                       tokens (also per mode)
    rollout/truncated_frac, rollout/aborted_frac    over samples
    rollout/zero_std_group_frac                     over scored groups (before the filter)
    rollout/filter_pass_rate, rollout/filter/<reason>
    rollout/gen_s_mean, rollout/reward_s_mean       seconds per group: generation vs scoring
    rollout/in_flight                               groups in flight at the end of the window
    rollout/engine_idle_frac                        mean over engines of the idle time share
    rollout/weight_update_s                         last update, seconds (and /max over engines)
    rollout/truncated_frac/<mode>                   over that mode's samples
    rollout/format_violation_frac[/<mode>]          replies malformed for their mode (rollout/modes.py)
    agent/episodes, agent/turns_mean, agent/tool_calls_mean      over agent samples (rollout/agent.py)
    agent/tool_errors/<kind>                        error observations in the window, by kind
    agent/env_errors, agent/agent_errors, agent/endpoint_rebases counts in the window
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Sequence

from slime_rl.buffers.schema import Sample
from slime_rl.rollout.environments import TOOL_ERROR_KINDS
from slime_rl.rollout.modes import format_violation


class RolloutStats:
    """Accumulates per-group facts; `reduce()` returns the window's metrics and starts a new one."""

    def __init__(self) -> None:
        self._reset(time.monotonic())

    def _reset(self, now: float) -> None:
        self.start = now
        self.groups = 0
        self.samples = 0
        self.tokens = 0
        self.rewards: dict[str, list[float]] = collections.defaultdict(list)
        self.lengths: dict[str, list[int]] = collections.defaultdict(list)
        self.truncated = 0
        self.aborted = 0
        self.failed = 0
        self.zero_std = 0
        self.filter_reasons: collections.Counter[str] = collections.Counter()
        self.kept = 0
        self.gen_s: list[float] = []
        self.reward_s: list[float] = []
        self.continuations = 0
        self.requeued = 0
        self.by_mode: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.agent: collections.Counter[str] = collections.Counter()
        self.tool_errors: collections.Counter[str] = collections.Counter()

    def add_group(
        self,
        samples: Sequence[Sample],
        *,
        kept: bool,
        reason: str,
        zero_std: bool,
        gen_s: float,
        reward_s: float,
    ) -> None:
        self.groups += 1
        self.kept += int(kept)
        self.filter_reasons[reason] += 1
        self.zero_std += int(zero_std)
        self.gen_s.append(gen_s)
        self.reward_s.append(reward_s)
        for s in samples:
            n = len(s.response_ids)
            self.samples += 1
            self.tokens += n
            for key in ("all", s.mode):
                self.rewards[key].append(float(s.reward))
                self.lengths[key].append(n)
            self.truncated += s.status == "truncated"
            self.aborted += s.status == "aborted"
            self.failed += s.status == "failed"
            self.continuations += max(0, int(s.metadata.get("pieces", 1)) - 1)
            for key in ("all", s.mode):
                self.by_mode[key]["samples"] += 1
                self.by_mode[key]["truncated"] += s.status == "truncated"
                self.by_mode[key]["format_violation"] += format_violation(s)
            agent = s.metadata.get("agent")
            if isinstance(agent, dict):
                self.agent["episodes"] += 1
                for k in ("turns", "tool_calls", "env_errors", "agent_errors", "endpoint_rebases"):
                    self.agent[k] += int(agent.get(k, 0))
                self.tool_errors.update({k: int(v) for k, v in agent.get("tool_errors", {}).items()})

    def reduce(self, in_flight: int, engine_idle: Sequence[float]) -> dict[str, float]:
        """The window's metrics; `engine_idle` is each engine's idle share of the window."""
        now = time.monotonic()
        wall = max(now - self.start, 1e-9)
        out: dict[str, float] = {
            "rollout/groups": float(self.groups),
            "rollout/samples": float(self.samples),
            "rollout/samples_per_s": self.samples / wall,
            "rollout/gen_tokens_per_s": self.tokens / wall,
            "rollout/in_flight": float(in_flight),
            "rollout/requeued_groups": float(self.requeued),
            "rollout/continuations": float(self.continuations),
        }
        if engine_idle:
            out["rollout/engine_idle_frac"] = sum(engine_idle) / len(engine_idle)
        if self.samples:
            out["rollout/truncated_frac"] = self.truncated / self.samples
            out["rollout/aborted_frac"] = self.aborted / self.samples
            out["rollout/failed_frac"] = self.failed / self.samples
            for key, values in self.rewards.items():
                suffix = "" if key == "all" else f"/{key}"
                mean = math.fsum(values) / len(values)
                out[f"rollout/reward_mean{suffix}"] = mean
                out[f"rollout/reward_std{suffix}"] = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
                lengths = self.lengths[key]
                out[f"rollout/response_len_mean{suffix}"] = sum(lengths) / len(lengths)
            for key, c in self.by_mode.items():
                suffix = "" if key == "all" else f"/{key}"
                out[f"rollout/format_violation_frac{suffix}"] = c["format_violation"] / c["samples"]
                if suffix:
                    out[f"rollout/truncated_frac{suffix}"] = c["truncated"] / c["samples"]
        if self.agent["episodes"]:
            n = self.agent["episodes"]
            out["agent/episodes"] = float(n)
            out["agent/turns_mean"] = self.agent["turns"] / n
            out["agent/tool_calls_mean"] = self.agent["tool_calls"] / n
            for k in ("env_errors", "agent_errors", "endpoint_rebases"):
                out[f"agent/{k}"] = float(self.agent[k])
            for kind in dict.fromkeys([*TOOL_ERROR_KINDS, *self.tool_errors]):
                out[f"agent/tool_errors/{kind}"] = float(self.tool_errors[kind])
        if self.groups:
            out["rollout/zero_std_group_frac"] = self.zero_std / self.groups
            out["rollout/filter_pass_rate"] = self.kept / self.groups
            for reason, n in self.filter_reasons.items():
                out[f"rollout/filter/{reason}"] = float(n)
            out["rollout/gen_s_mean"] = sum(self.gen_s) / len(self.gen_s)
            out["rollout/reward_s_mean"] = sum(self.reward_s) / len(self.reward_s)
        self._reset(now)
        return out
