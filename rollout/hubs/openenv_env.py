"""`rollout.environment: openenv:<module:Class | file.py:Class | http://host:port>`: an OpenEnv
environment in the agent loop: the model's message is the action, the observation is the next
user turn, the environment's reward is the reward.

    per episode:  env.reset(seed, episode_id, prompt=<row text>, label=<row label>, **row.reset_kwargs)
                    (kwargs its reset does not take are dropped, as OpenEnv's own server does)
                  observation text (if any) ─► user message
                  loop (rollout.max_turns):  POST {episode URL}/chat/completions ─► assistant text
                      ─► action (the one text field of the Action, `action_field`, or a JSON object)
                      ─► env.step(action) ─► reward (summed), done ─► observation ─► user message

Where the environment runs (`environment_kwargs.transport`):
- `inprocess` (default for a class): the server-side `Environment` subclass is built in the rollout
  process, one instance per episode (`reset_async` / `step_async`, so sync envs run as written).
- `http` (a class): the run starts OpenEnv's own FastAPI app (`create_app`) for the class under a
  local uvicorn on 127.0.0.1 (`python -m slime_rl.rollout.hubs.openenv_server`), drives it with
  OpenEnv's `GenericEnvClient` over its WebSocket session, and stops the server with the run.
- a URL: a running OpenEnv server (`GenericEnvClient`); the action schema comes from `/schema`.

Adapter keys of `rollout.environment_kwargs` (the rest go to the class's constructor): `transport`,
`action_field`, `observation_field`, `max_concurrent_envs` (http), `server_start_timeout_s`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import SamplingParams
from slime_rl.rollout.hubs import HubLoadError
from slime_rl.rollout.hubs.episode import HubOutcome
from slime_rl.rollout.hubs.openenv_server import LocalServer, action_fields
from slime_rl.rollout.plugins import PluginLoadError, load_object

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("openenv-core 0.3.0",)
ADAPTER_KEYS = ("transport", "action_field", "observation_field", "max_concurrent_envs", "server_start_timeout_s")
_OBS_BASE = ("done", "reward", "metadata")


class OpenEnvHub:
    """A loaded OpenEnv environment (class or URL) and the loop that plays its episodes."""

    def __init__(self, ref: str, *, env_cls: Any = None, url: str | None = None, ctor_kwargs: dict[str, Any] | None = None,
                 transport: str = "inprocess", action_field: str | None = None, observation_field: str | None = None,
                 server: LocalServer | None = None) -> None:
        self.ref = ref
        self.env_cls = env_cls
        self.url = url
        self.ctor_kwargs = dict(ctor_kwargs or {})
        self.transport = transport
        self.action_field = action_field
        self.observation_field = observation_field
        self.server = server
        self.action_cls: Any = None
        self.fields: list[str] = []
        self.max_turns = 8
        self.episode_timeout_s = 600.0
        self.env_timeout_s = 60.0

    @classmethod
    def load(cls, ref: str, target: str, kwargs: dict[str, Any], *, base_dir: str | Path | None = None) -> OpenEnvHub:
        """Resolve `target` and check the adapter keys and constructor kwargs (one probe instance).

        Raises:
            HubLoadError: unknown class, not an OpenEnv Environment, bad kwargs or transport.
        """
        from openenv.core.env_server.interfaces import Environment

        adapter = {k: kwargs.pop(k) for k in ADAPTER_KEYS if k in kwargs}
        names = {"action_field": adapter.get("action_field"), "observation_field": adapter.get("observation_field")}
        if target.startswith(("http://", "https://")):
            if kwargs:
                raise HubLoadError(f"rollout.environment={ref!r}: a server URL takes no constructor kwargs, got {sorted(kwargs)}")
            return cls(ref, url=target.rstrip("/"), transport="url", **names)
        try:
            env_cls = load_object(target, key="rollout.environment", base_dir=base_dir)
        except PluginLoadError as e:
            raise HubLoadError(f"rollout.environment={ref!r}: {_one_line(e)}") from None
        if not (isinstance(env_cls, type) and issubclass(env_cls, Environment)):
            raise HubLoadError(f"rollout.environment={ref!r}: {target} is not an OpenEnv Environment subclass "
                               "(openenv.core.env_server.interfaces.Environment); for a running server give its URL")
        transport = adapter.get("transport", "inprocess")
        if transport not in ("inprocess", "http"):
            raise HubLoadError(f"rollout.environment_kwargs.transport={transport!r}; allowed: 'inprocess', 'http'")
        try:
            probe = env_cls(**kwargs)
        except Exception as e:
            raise HubLoadError(f"rollout.environment={ref!r}: cannot build {env_cls.__name__} with rollout.environment_kwargs="
                               f"{kwargs}: {type(e).__name__}: {_one_line(e)}") from None
        _close(probe)
        hub = cls(ref, env_cls=env_cls, ctor_kwargs=kwargs, transport=transport, **names)
        hub.action_cls, _ = action_fields(env_cls)
        if hub.action_cls is None:
            raise HubLoadError(f"rollout.environment={ref!r}: cannot tell {env_cls.__name__}'s Action class (annotate "
                               "step(self, action: MyAction) or subclass Environment[MyAction, MyObservation, State])")
        hub.fields = _fields(hub.action_cls.model_json_schema())
        hub._check_action_field()
        if transport == "http":
            if not getattr(env_cls, "SUPPORTS_CONCURRENT_SESSIONS", False):
                raise HubLoadError(f"rollout.environment={ref!r} with transport=http: {env_cls.__name__} does not set "
                                   "SUPPORTS_CONCURRENT_SESSIONS = True, so its server runs one episode at a time")
            hub.server = LocalServer(target, kwargs, base_dir=base_dir, max_concurrent_envs=int(adapter.get("max_concurrent_envs", 64)),
                                     start_timeout_s=float(adapter.get("server_start_timeout_s", 120.0)))
        return hub

    def _check_action_field(self) -> None:
        if self.action_field is not None and self.action_field not in self.fields:
            raise HubLoadError(f"rollout.environment_kwargs.action_field={self.action_field!r} is not a field of the "
                               f"action; fields: {self.fields}")

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.server is not None:
            self.url = await self.server.start()
        if self.url is not None and not self.fields:
            async with aiohttp.ClientSession() as s, s.get(f"{self.url}/schema", timeout=aiohttp.ClientTimeout(total=30)) as r:
                r.raise_for_status()
                schema = await r.json()
            self.fields = _fields(schema.get("action") or {})
            self._check_action_field()

    async def close(self) -> None:
        if self.server is not None:
            await self.server.stop()

    # ---- episodes --------------------------------------------------------------------------------
    async def play_group(self, prompt: Prompt, urls: Sequence[str], sampling: SamplingParams,
                         seeds: Sequence[int]) -> list[HubOutcome]:
        async with aiohttp.ClientSession() as http:
            return list(await asyncio.gather(*(self._episode(http, prompt, url, seed, sampling)
                                               for url, seed in zip(urls, seeds))))

    async def _episode(self, http: aiohttp.ClientSession, prompt: Prompt, url: str, seed: int, sampling: SamplingParams) -> HubOutcome:
        out = HubOutcome()
        try:
            await asyncio.wait_for(self._play(http, prompt, url, seed, sampling, out), self.episode_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            out.error = f"the episode did not finish within {self.episode_timeout_s:g} s (rollout.episode_timeout_s)"
        except _EnvFailed as e:
            out.error = str(e)
        except _ModelCallFailed as e:
            out.error = str(e)
        out.reward = None if out.error else (sum(out.turn_rewards) if out.turn_rewards else None)
        return out

    async def _play(self, http: aiohttp.ClientSession, prompt: Prompt, url: str, seed: int, sampling: SamplingParams,
                    out: HubOutcome) -> None:
        session = await self._open_session()
        try:
            messages = [dict(m) for m in prompt.messages]
            reset_kwargs = {"seed": seed, "episode_id": url.rsplit("/", 2)[-2], "prompt": _last_user(prompt), "label": prompt.label,
                            **(prompt.metadata.get("reset_kwargs") or {})}
            obs, _, done = await self._env("reset", session.reset(reset_kwargs))
            text = self._observation_text(obs)
            if text:
                messages.append({"role": "user", "content": text})
            for _ in range(self.max_turns):
                message, finish = await _chat(http, url, messages, prompt.tools, prompt.mode == "think", sampling)
                if finish == "context":  # the conversation fills the model's context
                    out.stop, out.truncated = "context", True
                    return
                messages.append(message)  # as returned, so the next call extends the recorded tokens
                reply = _message_text(message)
                action, problem = self._action(reply)
                if problem is not None:
                    out.action_errors += 1
                    messages.append({"role": "user", "content": f"Error: {problem}"})
                    continue
                try:
                    obs, reward, done = await self._env("step", session.step(action))
                except _BadAction as e:
                    out.action_errors += 1
                    messages.append({"role": "user", "content": f"Error: {e}"})
                    continue
                out.turn_rewards.append(0.0 if reward is None else float(reward))
                if finish == "length":  # the cut message was still the action; the environment decides
                    out.info["length_stops"] = out.info.get("length_stops", 0) + 1
                if done:
                    out.stop = "done"
                    return
                messages.append({"role": "user", "content": self._observation_text(obs)})
            out.stop, out.truncated = "max_turns", True
        finally:
            await session.close()

    async def _env(self, what: str, coro: Any) -> tuple[dict[str, Any], float | None, bool]:
        try:
            return await asyncio.wait_for(coro, self.env_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            raise _EnvFailed(f"{what} took longer than {self.env_timeout_s:g} s (rollout.env_timeout_s)") from None
        except (_ModelCallFailed, _BadAction):
            raise
        except Exception as e:
            raise _EnvFailed(f"{what} raised {type(e).__name__}: {_one_line(e)}") from None

    async def _open_session(self) -> Any:
        if self.url is not None:
            from openenv.core import GenericEnvClient

            client = GenericEnvClient(base_url=self.url, message_timeout_s=self.env_timeout_s)
            try:
                await client.connect()
            except Exception as e:
                raise _EnvFailed(f"cannot connect to {self.url}: {type(e).__name__}: {_one_line(e)}") from None
            return _RemoteSession(client)
        try:
            env = self.env_cls(**self.ctor_kwargs)
        except Exception as e:
            raise _EnvFailed(f"{self.env_cls.__name__}(**{self.ctor_kwargs}) raised {type(e).__name__}: {_one_line(e)}") from None
        return _LocalSession(env, self.action_cls)

    def _action(self, text: str) -> tuple[dict[str, Any] | None, str | None]:
        """The action for a model message, or why there is none (shown to the model)."""
        content = text.split("</think>")[-1].strip()
        field = self.action_field or (self.fields[0] if len(self.fields) == 1 else None)
        if field is not None:
            return {field: content}, None
        try:
            value = json.loads(content)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            return None, f"write the action as a JSON object with the fields {self.fields}"
        return value, None

    def _observation_text(self, obs: dict[str, Any]) -> str:
        if self.observation_field is not None:
            v = obs.get(self.observation_field, "")
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        rest = {k: v for k, v in obs.items() if k not in _OBS_BASE}
        if len(rest) == 1:
            v = next(iter(rest.values()))
            return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        return json.dumps(rest, ensure_ascii=False, default=str) if rest else ""


class _EnvFailed(Exception):
    """The environment's reset/step raised or timed out."""


class _BadAction(Exception):
    """The model's message is not a valid action (shown to the model as an error observation)."""


class _ModelCallFailed(Exception):
    """The endpoint refused a call (the engine is gone, or the context is full)."""


class _LocalSession:
    """One in-process environment instance."""

    def __init__(self, env: Any, action_cls: Any) -> None:
        self.env, self.action_cls = env, action_cls

    async def reset(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], float | None, bool]:
        return _obs(await _call(self.env, "reset", kwargs))

    async def step(self, action: dict[str, Any]) -> tuple[dict[str, Any], float | None, bool]:
        import pydantic

        try:
            typed = self.action_cls(**action)
        except pydantic.ValidationError as e:
            raise _BadAction(f"not a valid {self.action_cls.__name__}: {_one_line(e)}") from None
        return _obs(await _call(self.env, "step", {}, typed))

    async def close(self) -> None:
        _close(self.env)


class _RemoteSession:
    """One WebSocket session of `GenericEnvClient` (the server builds one environment for it)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def reset(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], float | None, bool]:
        r = await self.client.reset(**{k: v for k, v in kwargs.items() if v is not None})
        return dict(r.observation or {}), r.reward, bool(r.done)

    async def step(self, action: dict[str, Any]) -> tuple[dict[str, Any], float | None, bool]:
        r = await self.client.step(action)
        return dict(r.observation or {}), r.reward, bool(r.done)

    async def close(self) -> None:
        try:
            await self.client.close()
        except Exception as e:  # the episode is over
            logger.debug("closing an OpenEnv session failed: %s", e)


async def _call(env: Any, name: str, kwargs: dict[str, Any], *args: Any) -> Any:
    """The env's own `<name>_async` if it overrides the base one, else its sync `<name>` in a thread
    (a blocking environment never stalls the rollout loop); kwargs it does not take are dropped."""
    from openenv.core.env_server.interfaces import Environment

    if getattr(type(env), f"{name}_async") is not getattr(Environment, f"{name}_async"):
        fn = getattr(env, f"{name}_async")
        return await fn(*args, **_accepted(fn, kwargs))
    fn = getattr(env, name)
    return await asyncio.to_thread(fn, *args, **_accepted(fn, kwargs))


def _accepted(fn: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _obs(obs: Any) -> tuple[dict[str, Any], float | None, bool]:
    data = obs.model_dump() if hasattr(obs, "model_dump") else dict(obs)
    reward = data.get("reward")
    if reward is not None and (not isinstance(reward, (int, float)) or not math.isfinite(float(reward))):
        raise _EnvFailed(f"the observation's reward is {reward!r}, not a finite number")
    return data, reward, bool(data.get("done"))


async def _chat(http: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]], tools: Any, think: bool,
                sampling: SamplingParams) -> tuple[dict[str, Any], str]:
    body: dict[str, Any] = {"model": "slime-rl", "messages": messages, "max_tokens": sampling.max_new_tokens,
                            "chat_template_kwargs": {"enable_thinking": think}}
    if tools:  # the row's tools (data.tools_key) are rendered into the prompt, as for any episode
        body["tools"] = list(tools)
    async with http.post(f"{url}/chat/completions", json=body) as r:
        data = await r.json(content_type=None)
        if r.status == 400 and "fills the model's context" in str(data):
            return {}, "context"
        if r.status != 200:
            raise _ModelCallFailed(f"the model call failed ({r.status}): {(data.get('error') or {}).get('message', data)}")
    choice = data["choices"][0]
    return {k: v for k, v in choice["message"].items() if v is not None}, choice.get("finish_reason") or "stop"


def _message_text(message: dict[str, Any]) -> str:
    """The model's message as the action's text: its content, and any tool-call blocks the
    endpoint parsed out of it, written back as JSON."""
    calls = [json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")})
             for c in message.get("tool_calls") or []]
    return "\n".join([message.get("content") or "", *calls]).strip()


def _fields(schema: dict[str, Any]) -> list[str]:
    return [k for k in (schema.get("properties") or {}) if k != "metadata"]


def _last_user(prompt: Prompt) -> str:
    return next((str(m.get("content", "")) for m in reversed(prompt.messages) if m.get("role") == "user"), "")


def _close(env: Any) -> None:
    try:
        env.close()
    except Exception as e:  # closing is best effort
        logger.debug("closing an OpenEnv environment failed: %s", e)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())[:500]


__all__ = ["ADAPTER_KEYS", "OpenEnvHub", "TESTED_VERSIONS"]
