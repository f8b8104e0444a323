"""`rollout.environment: verifiers:<name>` / `verifiers:path/to/env.py`: a `verifiers` environment
(SingleTurnEnv, MultiTurnEnv, ToolEnv, ... of the classic API) trained as written.

    load: verifiers.load_environment(name, **environment_kwargs)   (an installed environment module)
          or path/to/env.py's load_environment(**environment_kwargs)
    per group: n x env.rollout(row, OpenAIChatCompletionsClient(episode URL), model, sampling_args)
               (concurrently, each under rollout.episode_timeout_s)
               ─► env.rubric.score_group(states)  (group reward functions included; under env_timeout_s)
               ─► HubOutcome: state["reward"], state["metrics"] (one term per function), errors

The row handed to the environment is the dataset row: `prompt` (the rendered messages), `answer`
(the row's label), `info`, `example_id`, `task` and any other column of the row. Without
`data.train_path`, `export_dataset` writes the environment's own dataset to JSONL (prompt,
label = answer, info, ...) before the run starts (`slime_rl/preflight.py`). Sampling args carry
the row's mode as `chat_template_kwargs.enable_thinking`; the endpoint samples at the run's
temperature whatever the environment asks (the trainer's importance ratio needs that).
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import SamplingParams
from slime_rl.rollout.hubs import HubLoadError
from slime_rl.rollout.hubs.episode import HubOutcome

logger = logging.getLogger(__name__)

TESTED_VERSIONS = ("0.1.14",)
"""verifiers releases this adapter was tested with (docs/agents.md)."""
_MODEL_FAULTS = ("InvalidModelResponseError", "EmptyModelResponseError", "OverlongPromptError", "ToolError",
                 "ToolParseError", "ToolCallError")
"""verifiers errors caused by what the model wrote: the rollout is kept and scored, not failed."""
_CONTEXT_FULL = "fills the model's context"
"""How the endpoint's refusal of a call whose conversation fills the context reads."""


class VerifiersHub:
    """A loaded verifiers environment and how to run one group of its rollouts."""

    def __init__(self, ref: str, env: Any, *, episode_timeout_s: float = 600.0, env_timeout_s: float = 60.0,
                 model_name: str = "slime-rl") -> None:
        self.ref = ref
        self.env = env
        self.episode_timeout_s = episode_timeout_s
        """Longest one `env.rollout` may take, model calls included."""
        self.env_timeout_s = env_timeout_s
        """Longest the rubric may take to score a group."""
        self.model_name = model_name

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, ref: str, target: str, kwargs: dict[str, Any], *, base_dir: str | Path | None = None) -> VerifiersHub:
        """Load `target` (an installed environment's id, or a `.py` file) with `kwargs`.

        Raises:
            HubLoadError: unknown environment, kwargs its `load_environment` does not take, a
                loader that raises, or a result that is not a verifiers Environment.
        """
        import verifiers as vf

        if not hasattr(vf, "Environment"):
            raise HubLoadError(f"rollout.environment={ref!r}: verifiers {getattr(vf, '__version__', '?')} has no classic API "
                               f"(vf.Environment, load_environment); tested: {', '.join(TESTED_VERSIONS)} (pip install 'slime-rl[envs]')")
        _keep_signals()
        fn, where = _loader(ref, target, base_dir)
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as e:
            raise HubLoadError(f"rollout.environment={ref!r}: rollout.environment_kwargs={kwargs} do not fit "
                               f"{where}.load_environment{inspect.signature(fn)}: {e}") from None
        try:
            env = fn(**kwargs)
        except Exception as e:
            raise HubLoadError(f"rollout.environment={ref!r}: {where}.load_environment(**{kwargs}) raised "
                               f"{type(e).__name__}: {_one_line(e)}") from None
        if not isinstance(env, vf.Environment):
            raise HubLoadError(f"rollout.environment={ref!r}: {where}.load_environment returned {type(env).__name__}, "
                               "not a verifiers Environment (SingleTurnEnv, MultiTurnEnv, ToolEnv, ...)")
        env.env_id = getattr(env, "env_id", None) or target
        env.env_args = getattr(env, "env_args", None) or kwargs
        return cls(ref, env)

    def dataset_rows(self, split: str = "train") -> list[dict[str, Any]]:
        """The environment's own dataset as prompt rows for slime-rl (`prompt`, `label`, `info`, ...).

        Raises:
            HubLoadError: the environment has no dataset of that split.
        """
        try:
            ds = self.env.get_dataset() if split == "train" else self.env.get_eval_dataset()
        except Exception as e:
            raise HubLoadError(f"rollout.environment={self.ref!r} has no {split} dataset ({type(e).__name__}: "
                               f"{_one_line(e)}); set data.{split}_path") from None
        rows = []
        for rec in ds:
            row = {k: _jsonable(v) for k, v in dict(rec).items() if v is not None}
            prompt = row.pop("prompt", None)
            if prompt is None and "question" in row:
                prompt = [{"role": "user", "content": row["question"]}]
            out: dict[str, Any] = {"prompt": [_message(m) for m in prompt] if isinstance(prompt, list) else prompt}
            out["label"] = str(row.pop("answer", "") or "")
            out.update(row)
            rows.append(out)
        return rows

    # ---- episodes --------------------------------------------------------------------------------
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        teardown = getattr(self.env, "_teardown", None)
        if teardown is not None:
            try:
                await teardown()
            except Exception as e:  # best effort: the run is over
                logger.debug("verifiers teardown of %s failed: %s", self.ref, e)

    def rollout_input(self, prompt: Prompt, index: int) -> dict[str, Any]:
        """The verifiers `RolloutInput` of a dataset row."""
        row = dict(prompt.metadata)  # every other column of the dataset row (info, task, example_id, ...)
        messages = [dict(m) for m in prompt.messages]
        system = getattr(self.env, "system_prompt", None)
        if system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        row["prompt"] = messages
        row["answer"] = prompt.label if prompt.label is not None else ""
        if isinstance(row.get("info"), str):
            try:
                row["info"] = json.loads(row["info"])
            except ValueError:
                row["info"] = {"text": row["info"]}
        row.setdefault("info", {})
        row.setdefault("example_id", prompt.row)
        return row

    def sampling_args(self, prompt: Prompt, sampling: SamplingParams) -> dict[str, Any]:
        own = dict(getattr(self.env, "sampling_args", None) or {})
        extra = dict(own.pop("extra_body", None) or {})
        own.pop("n", None)
        extra["chat_template_kwargs"] = {**(extra.get("chat_template_kwargs") or {}), "enable_thinking": prompt.mode == "think"}
        args = {**own, "temperature": sampling.temperature, "logprobs": True, "extra_body": extra}
        args["max_tokens"] = min(int(own.get("max_tokens") or sampling.max_new_tokens), sampling.max_new_tokens)
        return args

    async def play_group(self, prompt: Prompt, urls: Sequence[str], sampling: SamplingParams,
                         seeds: Sequence[int]) -> list[HubOutcome]:
        args = self.sampling_args(prompt, sampling)
        results = await asyncio.gather(*(self._rollout(prompt, url, i, args) for i, url in enumerate(urls)))
        states = [s for s, _ in results if s is not None]
        outcomes = [out for _, out in results]
        if states:
            await self._score(states, [out for s, out in results if s is not None])
        return outcomes

    async def _rollout(self, prompt: Prompt, url: str, index: int, args: dict[str, Any]) -> tuple[Any, HubOutcome]:
        import verifiers as vf
        from openai import AsyncOpenAI

        oai = AsyncOpenAI(base_url=url, api_key="slime-rl", max_retries=0, timeout=self.episode_timeout_s)
        client = vf.OpenAIChatCompletionsClient(oai)
        try:
            state = await asyncio.wait_for(
                self.env.rollout(self.rollout_input(prompt, index), client, self.model_name, dict(args)), self.episode_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return None, HubOutcome(error=f"the rollout did not finish within {self.episode_timeout_s:g} s (rollout.episode_timeout_s)")
        except Exception as e:
            return None, HubOutcome(error=f"env.rollout raised {type(e).__name__}: {_one_line(e)}")
        finally:
            await oai.close()
        problem = _malformed(state)
        if problem:
            return None, HubOutcome(error=f"env.rollout returned a malformed state: {problem}")
        out = HubOutcome(stop=str(state.get("stop_condition") or ""), truncated=bool(state.get("is_truncated")))
        err = state.get("error")
        if err is not None:
            names = {c.__name__ for c in type(err).__mro__}
            if _CONTEXT_FULL in str(getattr(err, "__cause__", "") or ""):  # the endpoint's 400 for a full context
                names.add("OverlongPromptError")
                out.truncated = True
            if names.isdisjoint(_MODEL_FAULTS):
                out.error = f"the rollout stopped with {type(err).__name__}: {_one_line(err)}"
                return None, out
            out.info["model_error"] = f"{type(err).__name__}: {_one_line(err)}"
        return state, out

    async def _score(self, states: list[Any], outcomes: list[HubOutcome]) -> None:
        try:
            await asyncio.wait_for(self.env.rubric.score_group(states), self.env_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            for out in outcomes:
                out.error = f"the rubric did not score within {self.env_timeout_s:g} s (rollout.env_timeout_s)"
            return
        except Exception as e:
            for out in outcomes:
                out.error = f"the rubric raised {type(e).__name__}: {_one_line(e)}"
            return
        for state, out in zip(states, outcomes):
            reward = state.get("reward")
            if not isinstance(reward, (int, float)) or not math.isfinite(float(reward)):
                out.error = f"the rubric gave reward {reward!r}, not a finite number"
                continue
            out.reward = float(reward)
            out.terms = {str(k): float(v) for k, v in (state.get("metrics") or {}).items()
                         if isinstance(v, (int, float)) and math.isfinite(float(v))}
            try:
                await self.env.rubric.cleanup(state)
            except Exception as e:  # cleanup handlers are the environment's; the score stands
                logger.debug("rubric cleanup of %s failed: %s", self.ref, e)


class _NoSignalHandlers:
    """Stands in for `signal` inside verifiers' environment module: a verifiers Environment installs
    SIGINT/SIGTERM handlers when built, which fails off the main thread (the rollout actor builds it
    there) and would take the process's shutdown from Ray; slime-rl tears the environment down itself."""

    SIGINT, SIGTERM = signal.SIGINT, signal.SIGTERM
    default_int_handler = staticmethod(signal.default_int_handler)

    @staticmethod
    def signal(signalnum: int, handler: Any) -> Any:
        return None


def _keep_signals() -> None:
    import verifiers.envs.environment as environment_module

    if getattr(environment_module, "signal", None) is signal:
        environment_module.signal = _NoSignalHandlers  # type: ignore[attr-defined]


def _loader(ref: str, target: str, base_dir: str | Path | None) -> tuple[Any, str]:
    """`load_environment` of an environment file or an installed environment module."""
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise HubLoadError(f"rollout.environment={ref!r}: no file {str(path)!r}")
        name = f"slime_rl_verifiers_env_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise HubLoadError(f"rollout.environment={ref!r}: importing {str(path)!r} raised {type(e).__name__}: {_one_line(e)}") from None
        where = str(path)
    else:
        module_name = target.replace("-", "_").split("/")[-1]
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise HubLoadError(f"rollout.environment={ref!r}: no installed verifiers environment {target!r} (no module "
                               f"{module_name!r}); install its package (pip install / prime env install) or give a file: verifiers:path/to/env.py")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise HubLoadError(f"rollout.environment={ref!r}: importing {module_name!r} raised {type(e).__name__}: {_one_line(e)}") from None
        where = module_name
    fn = getattr(module, "load_environment", None)
    if not callable(fn):
        raise HubLoadError(f"rollout.environment={ref!r}: {where} has no load_environment() function")
    return fn, where


def _malformed(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a verifiers State"
    if "trajectory" not in state:
        return "no 'trajectory'"
    if not isinstance(state["trajectory"], list):
        return f"'trajectory' is a {type(state['trajectory']).__name__}, not a list"
    return None


def _message(m: Any) -> dict[str, Any]:
    m = m.model_dump(exclude_none=True) if hasattr(m, "model_dump") else dict(m)
    return {k: v for k, v in m.items() if v is not None}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "model_dump"):
        return _jsonable(v.model_dump(exclude_none=True))
    return str(v)


def _one_line(e: Any) -> str:
    return " ".join(str(e).split())[:500]


__all__ = ["TESTED_VERSIONS", "VerifiersHub"]
