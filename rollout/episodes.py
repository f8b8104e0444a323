"""Where a group's samples come from when plain single-turn generation is not enough.

    RolloutManager._run_group ──(episodes configured)──► Episodes.run_group(client, prompt, group, n, sampling)
        rollout.environment   ─► AgentLoop.run_episode × n        (multi-turn tool use)
        rollout.environment: verifiers:/openenv: ─► rollout/hubs/ (the hub's own code, via the endpoint)
        rollout.generate_fn   ─► your function × n                 (custom per-sample generation)
        rollout.agent_fn      ─► your openai-SDK agent × n ─► AgentEndpoint records every call
    ─► list[Sample] ─► (manager, unchanged) reward scoring ─► filter ─► buffer

`build_episodes` reads the `rollout.*` keys, loads the plug-ins (errors name the key and the
reference), starts the OpenAI-compatible endpoint when `rollout.agent_endpoint` is on, and
returns None when nothing is configured (the manager then generates as usual).

`rollout.generate_fn` is called as `fn(client, tokenizer, prompt, sampling)` (sync or async)
and returns a `Sample`: `client` is a `TurnClient` (`await client.generate(prompt_ids,
sampling)` -> `MergedResult`, continuations after weight-update aborts included; the raw engine
client is `client.engine`), `prompt` the dataset row (`slime_rl.rollout.data.Prompt`),
`sampling` the run's `SamplingParams` for the row's mode. `TokenTrajectory` builds the sample.
The runner sets `sample_id` / `group_id` and checks the per-token lists.

`rollout.agent_fn` is called as `fn(base_url, episode_id)` or `fn(base_url, episode_id, task)`
(sync functions run in a thread) with `base_url` the episode's OpenAI base URL and `task`
`{"messages", "tools", "label", "mode", "metadata", "uid"}` (also at `GET {base_url}/episode`);
it returns the reward (a number, a dict with `"reward"`, or None to leave scoring to `reward.fn`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.agent import AgentLoop, AgentSettings
from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineClient, EngineLostError, EnginePool
from slime_rl.rollout.engines.base import SamplingParams
from slime_rl.rollout.environments import load_environment
from slime_rl.rollout.hubs import hub_kind
from slime_rl.rollout.openai_server import AgentEndpoint, task_of
from slime_rl.rollout.plugins import PluginLoadError, load_object
from slime_rl.rollout.trajectory import TokenTrajectory, TurnClient

logger = logging.getLogger(__name__)

SeedFn = Callable[[str], int]
AGENT_THREADS = 128
"""Threads for plain (blocking) `rollout.agent_fn` agents: episodes of one rollout side at once."""


class Episodes:
    """Base: what the manager calls. `replaces_generation` False = endpoint only (no agent_fn)."""

    replaces_generation = True

    def __init__(self, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint | None = None) -> None:
        self.tokenizer = tokenizer
        self.seed_fn = seed_fn
        self.endpoint = endpoint
        self.stopping = False

    def client(self, engine: EngineClient, key: str) -> TurnClient:
        return TurnClient(engine, key, self.seed_fn, stopping=lambda: self.stopping)

    async def run_one(self, engine: EngineClient, prompt: Prompt, group_id: str, index: int,
                      sampling: SamplingParams, extra: dict[str, Any]) -> Sample:
        raise NotImplementedError

    async def run_group(self, engine: EngineClient, prompt: Prompt, group_id: str, n: int,
                        sampling: SamplingParams, extra_metadata: dict[str, Any] | None = None) -> list[Sample]:
        """`n` samples of one prompt, run concurrently.

        Raises:
            EngineLostError: the engine went away (re-dispatch the group).
        """
        extra = dict(extra_metadata or {})
        tasks = [asyncio.ensure_future(self.run_one(engine, prompt, group_id, i, sampling, extra)) for i in range(n)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            return [t.result() for t in tasks]
        finally:  # one episode failed (or the group was cancelled): stop its siblings
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        self.stopping = True
        if self.endpoint is not None:
            await self.endpoint.stop()


class AgentLoopEpisodes(Episodes):
    """`rollout.environment`: the built-in multi-turn tool loop."""

    def __init__(self, loop: AgentLoop, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint | None = None) -> None:
        super().__init__(tokenizer, seed_fn, endpoint)
        self.loop = loop

    async def run_one(self, engine, prompt, group_id, index, sampling, extra):  # type: ignore[override]
        client = self.client(engine, f"{group_id}/{index}")
        return await self.loop.run_episode(client, prompt, sampling, group_id=group_id, index=index, extra_metadata=extra)


class GenerateFnEpisodes(Episodes):
    """`rollout.generate_fn`: a user function makes each sample."""

    def __init__(self, fn: Callable[..., Any], ref: str, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint | None = None) -> None:
        super().__init__(tokenizer, seed_fn, endpoint)
        self.fn, self.ref = fn, ref
        self._warned = False

    async def run_one(self, engine, prompt, group_id, index, sampling, extra):  # type: ignore[override]
        client = self.client(engine, f"{group_id}/{index}")
        t0 = time.monotonic()
        try:
            out = self.fn(client, self.tokenizer, prompt, sampling)
            if inspect.isawaitable(out):
                out = await out
        except EngineLostError:
            raise
        except Exception as e:
            if not self._warned:
                self._warned = True
                logger.warning("rollout.generate_fn=%s raised on %s/%d (its sample fails): %s: %s", self.ref, group_id, index,
                               type(e).__name__, e, exc_info=True)
            sample = TokenTrajectory(list(prompt.prompt_ids)).to_sample(
                prompt, tokenizer=self.tokenizer, group_id=group_id, index=index, status=Status.FAILED,
                temperature=sampling.temperature, metadata={**extra, "generate_fn_error": f"{type(e).__name__}: {e}"})
            return sample
        return _checked(out, self.ref, prompt, group_id, index, extra, time.monotonic() - t0)


def _checked(sample: Any, ref: str, prompt: Prompt, group_id: str, index: int, extra: dict[str, Any], seconds: float) -> Sample:
    """The returned sample with ids and run metadata set; a contract violation raises."""
    if not isinstance(sample, Sample):
        raise TypeError(f"rollout.generate_fn={ref!r} returned {type(sample).__name__}, expected slime_rl.buffers.schema.Sample")
    n = len(sample.response_ids)
    for name in ("response_logprobs", "loss_mask", "token_versions"):
        got = len(getattr(sample, name))
        if got != n:
            raise ValueError(f"rollout.generate_fn={ref!r}: sample.{name} has {got} entries but response_ids has {n}; per-token lists need one entry per response token")
    sample.sample_id, sample.group_id = f"{group_id}/{index}", group_id
    sample.metadata = {"prompt_uid": prompt.uid, **sample.metadata, **extra}
    if not sample.gen_seconds:
        sample.gen_seconds = seconds
    return sample


class AgentFnEpisodes(Episodes):
    """`rollout.agent_fn`: an openai-SDK agent drives each episode through the endpoint."""

    def __init__(self, fn: Callable[..., Any], ref: str, tokenizer: Any, seed_fn: SeedFn, endpoint: AgentEndpoint,
                 timeout_s: float) -> None:
        super().__init__(tokenizer, seed_fn, endpoint)
        self.fn, self.ref, self.timeout_s = fn, ref, timeout_s
        params = [p for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.pass_task = len(params) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(fn).parameters.values())
        # Agents mostly wait on HTTP: many threads, not asyncio's default pool (a few per core),
        # whose queue would eat into each agent's timeout.
        self._threads = concurrent.futures.ThreadPoolExecutor(max_workers=AGENT_THREADS, thread_name_prefix="agent_fn")

    async def _call(self, base_url: str, eid: str, prompt: Prompt) -> Any:
        args = (base_url, eid, task_of(prompt)) if self.pass_task else (base_url, eid)
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._threads, lambda: self.fn(*args))

    async def close(self) -> None:
        await super().close()
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def run_one(self, engine, prompt, group_id, index, sampling, extra):  # type: ignore[override]
        assert self.endpoint is not None
        eid = f"{group_id}.{index}"
        rec = self.endpoint.open_episode(eid, self.client(engine, f"{group_id}/{index}"), prompt, sampling)
        t0 = time.monotonic()
        error: str | None = None
        out: Any = None
        try:
            out = await asyncio.wait_for(self._call(self.endpoint.url_for(eid), eid, prompt), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            error = f"the agent did not finish within {self.timeout_s:g} s (rollout.agent_fn_timeout_s)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            self.endpoint.close_episode(eid)
        async with rec.lock:  # a call still in flight finishes first
            pass
        if rec.engine_lost is not None:
            raise rec.engine_lost
        reward, info = _agent_output(out)
        traj = rec.traj or TokenTrajectory(list(prompt.prompt_ids))
        if error is None and rec.calls == 0:
            error = "the agent made no call to its base_url"
        meta: dict[str, Any] = {"agent": {"turns": rec.calls, "tool_calls": len(rec.tool_calls), "tool_errors": {},
                                          "endpoint_rebases": rec.rebases}, "final_text": rec.final_text, **extra}
        if reward is not None:
            meta["episode_reward"] = reward
        if info:
            meta["agent_info"] = info
        status = None
        if error is not None:
            logger.warning("rollout.agent_fn=%s failed on %s: %s", self.ref, eid, error)
            meta["agent_error"] = error
            meta["agent"]["agent_errors"] = 1
            status = Status.FAILED
        messages = rec.messages or [dict(m) for m in prompt.messages]
        return traj.to_sample(prompt, tokenizer=self.tokenizer, group_id=group_id, index=index, status=status,
                              temperature=sampling.temperature, gen_seconds=time.monotonic() - t0, metadata=meta,
                              messages=messages, tool_calls=rec.tool_calls)


def _agent_output(out: Any) -> tuple[float | None, dict[str, Any]]:
    if out is None:
        return None, {}
    if isinstance(out, dict):
        info = {k: v for k, v in out.items() if k != "reward"}
        r = out.get("reward")
        return (None if r is None else float(r)), info
    return float(out), {}


class EndpointOnly(Episodes):
    """`rollout.agent_endpoint` without `agent_fn`: serve, generate groups as usual."""

    replaces_generation = False


async def build_episodes(
    r: RolloutConfig,
    tokenizer: Any,
    pool: EnginePool,
    sampling: SamplingParams,
    *,
    seed_fn: SeedFn,
    max_model_len: int = 0,
    base_dir: str | Path | None = None,
    model_name: str = "slime-rl",
) -> Episodes | None:
    """The configured episode runner (and endpoint), or None for plain generation.

    Raises:
        PluginLoadError: a reference that does not load or has the wrong signature.
        ValueError: settings that exclude each other (named).
    """
    chosen = [k for k in ("environment", "generate_fn", "agent_fn") if getattr(r, k, None)]
    if len(chosen) > 1:
        raise ValueError(f"rollout.{chosen[0]} and rollout.{chosen[1]} exclude each other: set one")
    if r.agent_fn and not r.agent_endpoint:
        raise ValueError("rollout.agent_fn needs rollout.agent_endpoint=true (the agent talks to the engines through it)")
    endpoint = None
    hub = hub_kind(r.environment)  # verifiers:/openenv: environments run through the endpoint (rollout/hubs/)
    if r.agent_endpoint or hub:
        endpoint = AgentEndpoint(pool, tokenizer, sampling, seed_fn=seed_fn, port=r.agent_endpoint_port,
                                 max_model_len=max_model_len, model_name=model_name)
        await endpoint.start()
    try:
        if hub:
            from slime_rl.rollout.hubs.episode import hub_episodes

            assert endpoint is not None
            return hub_episodes(r, tokenizer, seed_fn, endpoint, base_dir=base_dir, model_name=model_name)
        if r.environment:
            settings = AgentSettings(max_turns=r.max_turns, max_episode_tokens=r.max_episode_tokens, max_model_len=max_model_len,
                                     max_tool_calls_per_turn=r.max_tool_calls_per_turn, env_timeout_s=r.env_timeout_s)
            factory = load_environment(r.environment, dict(r.environment_kwargs), base_dir=base_dir, tool_timeout_s=r.tool_timeout_s)
            return AgentLoopEpisodes(AgentLoop(tokenizer, factory, settings), tokenizer, seed_fn, endpoint)
        if r.generate_fn:
            fn = load_object(r.generate_fn, key="rollout.generate_fn", base_dir=base_dir, callable_with=4)
            return GenerateFnEpisodes(fn, r.generate_fn, tokenizer, seed_fn, endpoint)
        if r.agent_fn:
            fn = load_object(r.agent_fn, key="rollout.agent_fn", base_dir=base_dir)
            if not callable(fn):
                raise PluginLoadError(f"rollout.agent_fn={r.agent_fn!r} is not callable")
            sig = inspect.signature(fn)
            try:
                sig.bind(None, None)
            except TypeError:
                try:
                    sig.bind(None, None, None)
                except TypeError as e:
                    raise PluginLoadError(f"rollout.agent_fn={r.agent_fn!r}: {sig} must take (base_url, episode_id[, task]): {e}") from None
            assert endpoint is not None
            return AgentFnEpisodes(fn, r.agent_fn, tokenizer, seed_fn, endpoint, r.agent_fn_timeout_s)
        if endpoint is not None:
            return EndpointOnly(tokenizer, seed_fn, endpoint)
        return None
    except BaseException:
        if endpoint is not None:
            await endpoint.stop()
        raise


async def episodes_for_eval(
    episodes: Episodes, pool: EnginePool, prompts: Sequence[Prompt], sampling: SamplingParams, name: str
) -> list[Sample]:
    """One episode per prompt, spread over the engines that are up (an engine lost mid-way: its
    prompts are retried on the others). Used by `evaluate_prompts`."""
    results: dict[int, Sample] = {}
    todo = list(range(len(prompts)))
    for _ in range(len(pool.slots) + 1):
        slots = [s for s in pool.slots if s.up]
        if not slots or not todo:
            break

        async def one(i: int, slot: Any) -> None:
            (s,) = await episodes.run_group(slot.client, prompts[i], f"{name}-{i}", 1, sampling)
            results[i] = s

        outs = await asyncio.gather(*(one(i, slots[k % len(slots)]) for k, i in enumerate(todo)), return_exceptions=True)
        lost = any(isinstance(o, EngineLostError) for o in outs)
        for o in outs:
            if isinstance(o, BaseException) and not isinstance(o, EngineLostError):
                raise o
        if lost:
            for s in slots:
                try:
                    await s.client.version()
                except Exception:
                    pool.mark_down(s)
        todo = [i for i in todo if i not in results]
    if todo:
        raise RuntimeError("evaluation: no rollout engine is up")
    return [results[i] for i in range(len(prompts))]


__all__ = [
    "AgentFnEpisodes", "AgentLoopEpisodes", "EndpointOnly", "Episodes", "GenerateFnEpisodes", "build_episodes",
    "episodes_for_eval",
]
