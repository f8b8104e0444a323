"""One group of hub-environment episodes, each driven through its own endpoint episode.

    RolloutManager ─► HubEpisodes.run_group(engine, prompt, group_id, n, sampling)
        open n AgentEndpoint episodes (`{group_id}.{i}`, served by `engine`, recorded)
        ─► hub.play_group(prompt, [episode base URLs], sampling)      (the hub's own code runs here:
              verifiers `env.rollout` + rubric, or an OpenEnv reset/step loop, under per-episode timeouts)
        ─► list[HubOutcome]  (reward, reward terms, error, turn rewards, messages)
        close the episodes ─► EpisodeRecorder.traj (prompt ids, generated tokens mask 1 with the
        engine's log-probs and versions, everything between calls mask 0) ─► one Sample each

The trained tokens are exactly what the engine generated: the environment sees only text over the
OpenAI API, and the recorder keeps the token ids. An environment that raises, times out or returns
something malformed fails only its own sample (`status: failed`, `metadata["env_error"]` naming the
environment and the error, `agent/env_errors`); a lost engine re-dispatches the whole group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any, Protocol

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineClient
from slime_rl.rollout.engines.base import SamplingParams
from slime_rl.rollout.episodes import Episodes, SeedFn
from slime_rl.rollout.openai_server import AgentEndpoint
from slime_rl.rollout.trajectory import TokenTrajectory

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class HubOutcome:
    """What the hub's code made of one episode (the tokens come from the endpoint's recorder)."""

    reward: float | None = None
    """The environment's reward for the episode (None: it gave none)."""
    terms: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each reward function's / metric's value (verifiers rubric), logged as its own term."""
    error: str | None = None
    """Why the environment failed this episode (the sample then fails)."""
    truncated: bool = False
    """The episode hit a turn or context limit."""
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    """Per-step rewards (OpenEnv)."""
    stop: str = ""
    """Why the episode ended, in the hub's words (verifiers `stop_condition`, `done`, `max_turns`)."""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Extra JSON-able facts kept in `metadata["hub"]`."""
    action_errors: int = 0
    """Model messages the environment could not take as an action (OpenEnv), shown to the model."""


class Hub(Protocol):
    """A loaded hub environment (`VerifiersHub`, `OpenEnvHub`)."""

    ref: str

    async def start(self) -> None:
        """Start what the episodes need (a local server); called once before the first group."""
        ...

    async def play_group(self, prompt: Prompt, urls: Sequence[str], sampling: SamplingParams,
                         seeds: Sequence[int]) -> list[HubOutcome]:
        """Run one episode per URL (`urls[i]` is episode i's OpenAI base URL); never raises for
        what the environment does (that is `HubOutcome.error`)."""
        ...

    async def close(self) -> None:
        ...


class HubEpisodes(Episodes):
    """`rollout.environment: verifiers:...` / `openenv:...`: the hub's code drives each sample
    through the OpenAI-compatible endpoint; samples are built from the recorded token trajectory."""

    def __init__(self, hub: Hub, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint) -> None:
        super().__init__(tokenizer, seed_fn, endpoint)
        self.hub = hub
        self._started = False
        self._start_lock = asyncio.Lock()

    async def _ensure_started(self) -> None:
        async with self._start_lock:
            if not self._started:
                await self.hub.start()
                self._started = True

    async def run_group(self, engine: EngineClient, prompt: Prompt, group_id: str, n: int,
                        sampling: SamplingParams, extra_metadata: dict[str, Any] | None = None) -> list[Sample]:
        """`n` episodes of one prompt, run and scored together.

        Raises:
            EngineLostError: the engine went away (re-dispatch the group).
        """
        assert self.endpoint is not None
        await self._ensure_started()
        extra = dict(extra_metadata or {})
        eids = [f"{group_id}.{i}" for i in range(n)]
        recs = [self.endpoint.open_episode(eid, self.client(engine, f"{group_id}/{i}"), prompt, sampling)
                for i, eid in enumerate(eids)]
        seeds = [self.seed_fn(f"{group_id}/{i}/env") for i in range(n)]
        t0 = time.monotonic()
        try:
            outcomes = await self.hub.play_group(prompt, [self.endpoint.url_for(e) for e in eids], sampling, seeds)
        finally:
            for eid in eids:
                self.endpoint.close_episode(eid)
        for rec in recs:
            async with rec.lock:  # a call still in flight finishes first
                pass
            if rec.engine_lost is not None:
                raise rec.engine_lost
        if len(outcomes) != n:  # an internal contract of the hub adapters, not the user's environment
            raise RuntimeError(f"{self.hub.ref}: {len(outcomes)} outcomes for {n} episodes")
        seconds = time.monotonic() - t0
        return [self._sample(rec, out, prompt, group_id, i, sampling, extra, seconds)
                for i, (rec, out) in enumerate(zip(recs, outcomes))]

    def _sample(self, rec: Any, out: HubOutcome, prompt: Prompt, group_id: str, index: int,
                sampling: SamplingParams, extra: dict[str, Any], seconds: float) -> Sample:
        traj = rec.traj or TokenTrajectory(list(prompt.prompt_ids))
        error = out.error
        if error is None and rec.calls == 0:
            error = "the environment made no call to the model"
        if error is None and out.reward is not None and not math.isfinite(out.reward):
            error = f"the environment's reward is {out.reward}"
        agent = {"turns": rec.calls, "tool_calls": len(rec.tool_calls), "endpoint_rebases": rec.rebases,
                 "env_errors": int(error is not None),
                 "tool_errors": {"bad_arguments": out.action_errors} if out.action_errors else {}}
        meta: dict[str, Any] = {"agent": agent, "final_text": rec.final_text, "environment": self.hub.ref,
                                "hub": {"stop": out.stop, **out.info}, **extra}
        if out.reward is not None and error is None:
            meta["episode_reward"] = float(out.reward)
        if out.terms:
            meta["reward_terms"] = {k: float(v) for k, v in out.terms.items()}
        if out.turn_rewards:
            meta["turn_rewards"] = [float(x) for x in out.turn_rewards]
        status: Status | None = None
        if error is not None:
            meta["env_error"] = f"{self.hub.ref}: {error}"
            logger.warning("environment %s failed in %s/%d: %s", self.hub.ref, group_id, index, error)
            status = Status.FAILED
        elif out.truncated:
            status = Status.TRUNCATED
        return traj.to_sample(prompt, tokenizer=self.tokenizer, group_id=group_id, index=index, status=status,
                              temperature=sampling.temperature, gen_seconds=seconds, metadata=meta,
                              messages=rec.messages or [dict(m) for m in prompt.messages], tool_calls=rec.tool_calls)

    async def close(self) -> None:
        try:
            await self.hub.close()
        finally:
            await super().close()


def hub_episodes(r: Any, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint, *, base_dir: Any = None,
                 model_name: str = "slime-rl") -> HubEpisodes:
    """The episode runner of `rollout.environment: verifiers:...` / `openenv:...` (`r`: the rollout config).

    Raises:
        HubLoadError: missing package, unknown environment or bad `rollout.environment_kwargs`.
    """
    from slime_rl.rollout.hubs import load_hub

    hub = load_hub(r.environment, dict(r.environment_kwargs), base_dir=base_dir)
    hub.max_turns = r.max_turns
    hub.episode_timeout_s = r.episode_timeout_s
    hub.env_timeout_s = r.env_timeout_s
    hub.model_name = model_name
    return HubEpisodes(hub, tokenizer, seed_fn, endpoint)


def env_reward(sample: Sample, *, missing: float | None = None) -> dict[str, Any]:
    """The hub environment's own reward (`metadata["episode_reward"]`: the verifiers rubric's
    weighted sum, or the sum of OpenEnv step rewards) as `score`, and each rubric function's value
    as its own field (`reward/env_reward/<function>_mean`).

    Raises:
        ValueError: no reward: the environment failed (its error is named) or gave none and
            `missing` is None.
    """
    meta = sample.metadata
    value = meta.get("episode_reward")
    if value is None:
        if meta.get("env_error"):
            raise ValueError(f"sample {sample.sample_id} has no reward: the environment failed ({meta['env_error']})")
        if missing is None:
            raise ValueError(f"sample {sample.sample_id}: the environment gave no reward; set reward.kwargs.missing "
                             "to score such samples")
        value = missing
    out: dict[str, Any] = {"score": float(value)}
    for name, v in (meta.get("reward_terms") or {}).items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[name if name != "score" else "score_term"] = float(v)
    return out


__all__ = ["Hub", "HubEpisodes", "HubOutcome", "env_reward", "hub_episodes"]
