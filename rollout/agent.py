"""The multi-turn agent loop: generate, parse tool calls, run them, append the results, repeat.

    Prompt ──env.reset──► prompt ids (row tools + environment tools rendered in)
      loop (at most rollout.max_turns, within rollout.max_episode_tokens):
        TurnClient.generate(all ids so far) ─► generated tokens (mask 1) ─► parse_tool_calls
          no call, or env done ───────────────────────────────────────────► stop
          calls ─► malformed / over the per-turn cap: error observations
                ─► env.step(well-formed calls) (concurrent, per-call timeouts) ─► observations
                ─► ChatGlue: end of turn + tool messages + generation prompt (mask 0)
      env.final_reward(trajectory) ─► metadata["episode_reward"]; TokenTrajectory ─► Sample

Nothing a tool or the model does raises out of an episode: malformed calls, unknown tools, bad
arguments, tool exceptions and timeouts become error observations (`Error: ...`) the model sees
in its next turn, counted in `metadata["agent"]["tool_errors"]` (reduced to
`agent/tool_errors/<kind>` by `rollout/stats.py`). An environment whose own `reset`/`step`/
`final_reward` raises ends that episode as `failed` (`agent/env_errors`). Only a lost engine
(`EngineLostError`, the manager re-dispatches the group) and engine failures propagate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineLostError
from slime_rl.rollout.engines.base import FinishReason, SamplingParams
from slime_rl.rollout.environments import Environment, Observation, StepResult, Trajectory
from slime_rl.rollout.modes import turn_format_problem
from slime_rl.rollout.samples import decode
from slime_rl.rollout.tool_calls import ParsedTurn, parse_tool_calls
from slime_rl.rollout.trajectory import ChatGlue, TokenTrajectory, TurnClient, assistant_message

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    """Limits of one episode (from `rollout.*`)."""

    max_turns: int = 8
    """Most assistant turns."""
    max_episode_tokens: int = 0
    """Most response tokens (generated + tool results + glue); 0 = the context limit only."""
    max_model_len: int = 0
    """The engine's context (prompt + response); 0 = unknown."""
    max_tool_calls_per_turn: int = 8
    """Calls beyond this in one turn get a `too_many_calls` error observation."""
    env_timeout_s: float = 60.0
    """Longest one `reset` / `step` / `final_reward` of the environment may take."""


def _merge_tools(row: Sequence[dict[str, Any]] | None, env: Sequence[dict[str, Any]]) -> list[dict[str, Any]] | None:
    def name(t: dict[str, Any]) -> Any:
        return t.get("function", t).get("name")

    out = list(row or [])
    have = {name(t) for t in out}
    out += [t for t in env if name(t) not in have]
    return out or None


def _tool_message(obs: Observation) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": obs.call_id, "name": obs.name, "content": obs.content}


class AgentLoop:
    """Runs episodes of one environment class on the tiny or any chat model.

    Example (in-process):
        >>> loop = AgentLoop(tokenizer, load_environment("calculator"), AgentSettings(max_turns=4))  # doctest: +SKIP
        >>> sample = await loop.run_episode(TurnClient(engine_client, "g0/0"), prompt, sampling)  # doctest: +SKIP
        >>> sample.loss_mask   # 1 on generated tokens, 0 on tool results and template glue   # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, env_factory: Callable[[], Environment], settings: AgentSettings) -> None:
        self.tokenizer = tokenizer
        self.env_factory = env_factory
        self.settings = settings
        self._glue: dict[tuple[str, bool], ChatGlue] = {}

    def _glue_for(self, tools: list[dict[str, Any]] | None, think: bool) -> ChatGlue:
        key = (repr(tools), think)
        if key not in self._glue:
            self._glue[key] = ChatGlue(self.tokenizer, tools, think)
        return self._glue[key]

    async def run_episode(
        self,
        client: TurnClient,
        prompt: Prompt,
        sampling: SamplingParams,
        *,
        group_id: str = "",
        index: int = 0,
        extra_metadata: dict[str, Any] | None = None,
    ) -> Sample:
        """One episode -> one `Sample` (reward not set; `metadata["episode_reward"]` from the
        environment). Raises only `EngineLostError` and engine failures."""
        t0 = time.monotonic()
        env = self.env_factory()
        ep = _Episode(prompt)
        try:
            await self._play(env, ep, client, sampling)
        except EngineLostError:
            raise
        except _EnvError as e:
            logger.warning("environment %s failed in %s/%d: %s", type(env).__name__, group_id, index, e)
            ep.status = Status.FAILED
            ep.stats["env_errors"] = 1
            ep.env_error = str(e)
        finally:
            await _close(env)
        meta: dict[str, Any] = {"agent": ep.stats, "final_text": ep.final_text}
        if ep.turn_rewards:
            meta["turn_rewards"] = ep.turn_rewards
        if ep.reward is not None:
            meta["episode_reward"] = float(ep.reward)
        if ep.env_error:
            meta["env_error"] = ep.env_error
        meta.update(extra_metadata or {})
        return ep.traj.to_sample(
            prompt, tokenizer=self.tokenizer, group_id=group_id, index=index, status=ep.status,
            temperature=sampling.temperature, gen_seconds=time.monotonic() - t0, metadata=meta,
            messages=ep.messages, tool_calls=ep.calls,
        )

    async def _env(self, what: str, coro: Any) -> Any:
        try:
            return await asyncio.wait_for(coro, self.settings.env_timeout_s)
        except EngineLostError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            raise _EnvError(f"{what} took longer than {self.settings.env_timeout_s:g} s") from None
        except Exception as e:
            raise _EnvError(f"{what}: {type(e).__name__}: {e}") from e

    async def _play(self, env: Environment, ep: _Episode, client: TurnClient, sampling: SamplingParams) -> None:
        s, prompt = self.settings, ep.prompt
        first = await self._env("reset", env.reset(prompt))
        tools = _merge_tools(prompt.tools, getattr(env, "tools", None) or [])
        glue = self._glue_for(tools, prompt.mode == "think")
        if first:
            ep.messages.append({"role": "user", "content": str(first)})
        if first or tools != (list(prompt.tools) if prompt.tools else None):
            ep.traj = TokenTrajectory(glue.encode(glue.generation_prompt(ep.messages)))
        budget = s.max_episode_tokens or 10**9
        if s.max_model_len:
            budget = min(budget, s.max_model_len - len(ep.traj.prompt_ids))
        for turn in range(s.max_turns):
            room = budget - len(ep.traj)
            if room <= 0:
                ep.stop("token_budget")
                break
            params = dataclasses.replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room))
            result = await client.generate(ep.traj.all_ids(), params)
            ep.traj.add_generated(result)
            ep.stats["turns"] += 1
            text = decode(self.tokenizer, result.token_ids, getattr(self.tokenizer, "eos_token", None))
            parsed = parse_tool_calls(text, id_prefix=f"call_{turn}")
            ep.final_text = parsed.content
            if turn_format_problem(prompt.mode, text) is not None:
                ep.stats["format_violations"] += 1
            calls = [c.to_openai() for c in parsed.calls]
            ep.messages.append(assistant_message(parsed.content, calls))
            ep.calls += calls
            if result.finish_reason is not FinishReason.STOP:
                ep.stats["stop"] = result.finish_reason.value  # length / abort / error: status from the turn
                break
            if not parsed.has_calls:
                break
            ep.stats["tool_calls"] += len(parsed.calls) + len(parsed.errors)
            if turn == s.max_turns - 1:  # no turn left to read the results
                ep.stop("max_turns")
                break
            step = await self._step(env, parsed, ep.stats)
            if step.reward is not None:
                ep.turn_rewards.append(float(step.reward))
            tool_msgs = [_tool_message(o) for o in step.observations]
            ids = glue.encode(glue.after_turn(result.token_ids) + glue.between(ep.messages, tool_msgs))
            ep.messages += tool_msgs
            if step.done:
                ep.stats["stop"] = "env_done"
                break
            if len(ep.traj) + len(ids) >= budget:
                ep.stop("token_budget")
                break
            ep.traj.add_context(ids)
        else:
            ep.stop("max_turns")
        status = ep.status or ep.traj.status()
        trajectory = Trajectory(prompt, ep.messages, ep.final_text, ep.stats["turns"], ep.stats["tool_calls"], status.value)
        ep.reward = await self._env("final_reward", env.final_reward(trajectory))

    async def _step(self, env: Environment, parsed: ParsedTurn, stats: dict[str, Any]) -> StepResult:
        """Error observations for malformed/excess calls; the rest through `env.step`, in block order."""
        cap = self.settings.max_tool_calls_per_turn
        run, excess = parsed.calls[:cap], parsed.calls[cap:]
        by_id: dict[str, Observation] = {}
        for err in parsed.errors:
            by_id[err.id] = Observation(err.id, "", f"Error: malformed tool call: {err.message}", err.kind)
        for c in excess:
            by_id[c.id] = Observation(c.id, c.name, f"Error: more than {cap} tool calls in one turn; this one was not run", "too_many_calls")
        result = StepResult([])
        if run:
            result = await self._env("step", env.step(run))
            if len(result.observations) != len(run):
                raise _EnvError(f"step returned {len(result.observations)} observations for {len(run)} calls")
            for c, o in zip(run, result.observations):
                by_id[c.id] = o
        observations = [by_id[i] for i in parsed.order]
        for o in observations:
            if o.error:
                stats["tool_errors"][o.error] = stats["tool_errors"].get(o.error, 0) + 1
        return StepResult(observations, result.done, result.reward)


class _EnvError(Exception):
    """The environment itself (reset/step/final_reward) failed or timed out."""


class _Episode:
    """Mutable state of one episode."""

    def __init__(self, prompt: Prompt) -> None:
        self.prompt = prompt
        self.traj = TokenTrajectory(list(prompt.prompt_ids))
        self.messages = [dict(m) for m in prompt.messages]
        self.calls: list[dict[str, Any]] = []
        self.final_text = ""
        self.status: Status | None = None
        self.reward: float | None = None
        self.turn_rewards: list[float] = []
        self.env_error: str | None = None
        self.stats: dict[str, Any] = {"turns": 0, "tool_calls": 0, "tool_errors": {}, "format_violations": 0, "stop": "answer"}

    def stop(self, reason: str) -> None:
        self.stats["stop"] = reason
        self.status = Status.TRUNCATED


async def _close(env: Any) -> None:
    close = getattr(env, "close", None)
    if close is None:
        return
    try:
        out = close()
        if asyncio.iscoroutine(out):
            await out
    except Exception as e:  # closing is best effort; the episode is over
        logger.debug("environment close failed: %s", e)
