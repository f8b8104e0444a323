"""An OpenAI-compatible endpoint on the rollout side, so agents written against the `openai` SDK
generate (and are trained) through the engines unchanged.

    agent (openai SDK) ──POST {base}/episodes/<id>/v1/chat/completions──► AgentEndpoint (aiohttp, 127.0.0.1)
        messages + tools ─► chat template (mode: the episode's, or chat_template_kwargs.enable_thinking)
        ─► EpisodeRecorder: join onto the episode's token sequence ─► TurnClient ─► engine
        ◄── {"choices": [{"message": {"content", "tool_calls"}, "finish_reason"}], "usage"}
    episode end ─► EpisodeRecorder.trajectory: prompt ids, generated tokens (mask 1, log-probs,
                   versions), everything between calls (mask 0) ─► one Sample

Routes: `POST /episodes/<id>/v1/chat/completions`, `POST /episodes/<id>/v1/completions`,
`GET /episodes/<id>/v1/models`, `GET /episodes/<id>/v1/episode` (the task), and the same three
`/v1/...` routes outside any episode (served by the least-loaded engine, not recorded).

Joining calls. Each call's rendered prompt is compared, as text, with the episode's sequence so
far (previous prompt + generated text + glue): when it extends it (the agent sent the
conversation back with the assistant messages as returned, the template renders them as they
were generated), only the new text is tokenised and appended with loss mask 0, and the previous
generated tokens stay exactly as generated. When it does not (the agent rewrote history), the
sequence restarts from this call's prompt (`agent/endpoint_rebases`): earlier generated tokens
are then context, not trained on. Calls of one episode are served one at a time, in order.

Sampling of recorded calls is the run's (`rollout.temperature`, `top_p`, `top_k`): the trainer's
importance ratio needs the behaviour log-probs at that temperature, so a request's own
`temperature`/`top_p` are ignored there; `max_tokens` / `max_completion_tokens` (capped at
`rollout.max_new_tokens`), `stop` and `logprobs` are honoured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from aiohttp import web
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineLostError, EnginePool
from slime_rl.rollout.engines.base import FinishReason, SamplingParams
from slime_rl.rollout.samples import MergedResult, decode
from slime_rl.rollout.tool_calls import parse_tool_calls
from slime_rl.rollout.trajectory import TokenTrajectory, TurnClient

logger = logging.getLogger(__name__)


class EndpointError(Exception):
    """A request the endpoint refuses (turned into an OpenAI-style error response)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class EpisodeRecorder:
    """The token sequence of one episode, extended call by call (see the module docstring)."""

    def __init__(self, episode_id: str, client: TurnClient, tokenizer: Any, prompt: Prompt | None,
                 sampling: SamplingParams, max_model_len: int = 0) -> None:
        self.episode_id = episode_id
        self.client = client
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.sampling = sampling
        self.max_model_len = max_model_len
        self.traj: TokenTrajectory | None = None
        self.text = ""
        self.prompt_text = ""
        self.calls = 0
        self.rebases = 0
        self.tool_calls: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.final_text = ""
        self.engine_lost: EngineLostError | None = None
        self.closed = False
        self.lock = asyncio.Lock()

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _join(self, prompt_text: str) -> None:
        if self.traj is None:
            self.traj = TokenTrajectory(self._encode(prompt_text))
            self.prompt_text = prompt_text
        elif prompt_text.startswith(self.text):
            self.traj.add_context(self._encode(prompt_text[len(self.text) :]))
        else:
            self.rebases += 1
            logger.debug("episode %s: call %d does not extend the conversation; restarting its sequence", self.episode_id, self.calls)
            old = self.traj
            if prompt_text.startswith(self.prompt_text):
                self.traj = TokenTrajectory(list(old.prompt_ids), policy_version=old.policy_version, pieces=old.pieces)
                self.traj.add_context(self._encode(prompt_text[len(self.prompt_text) :]))
            else:
                self.traj = TokenTrajectory(self._encode(prompt_text), policy_version=old.policy_version, pieces=old.pieces)
                self.prompt_text = prompt_text
        self.text = prompt_text

    async def complete(self, prompt_text: str, sampling: SamplingParams) -> MergedResult:
        """Join `prompt_text` onto the sequence, generate, append the response (mask 1).

        Raises:
            EndpointError: the episode is closed or its context is full.
            EngineLostError: the engine is gone (also remembered: the manager re-dispatches).
        """
        async with self.lock:
            if self.closed:
                raise EndpointError(404, f"episode {self.episode_id!r} is over")
            self._join(prompt_text)
            assert self.traj is not None
            room = sampling.max_new_tokens
            if self.max_model_len:
                room = min(room, self.max_model_len - len(self.traj.prompt_ids) - len(self.traj))
            if room < 1:
                raise EndpointError(400, f"the conversation ({len(self.traj.prompt_ids) + len(self.traj)} tokens) fills the model's context of {self.max_model_len} tokens")
            try:
                result = await self.client.generate(self.traj.all_ids(), dataclasses.replace(sampling, max_new_tokens=room))
            except EngineLostError as e:
                self.engine_lost = e
                raise
            self.traj.add_generated(result)
            self.calls += 1
            self.text += self.tokenizer.decode(list(result.token_ids), skip_special_tokens=False)
            return result


def _sampling_for_request(body: dict[str, Any], base: SamplingParams, recorded: bool) -> SamplingParams:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    n = base.max_new_tokens if max_tokens is None else min(int(max_tokens), base.max_new_tokens)
    if n < 1:
        raise EndpointError(400, f"max_tokens={max_tokens} must be >= 1")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    kwargs: dict[str, Any] = {"max_new_tokens": n, "stop": tuple(base.stop) + stop}
    if not recorded:  # outside an episode the request's own sampling applies
        for key, field in (("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed")):
            if body.get(key) is not None:
                kwargs[field] = body[key]
    return dataclasses.replace(base, **kwargs)


def _finish(result: MergedResult, has_calls: bool) -> str:
    if result.finish_reason is FinishReason.LENGTH:
        return "length"
    return "tool_calls" if has_calls else "stop"


class AgentEndpoint:
    """The aiohttp server; `open_episode` / `close_episode` scope recorded calls.

    Example:
        >>> ep = AgentEndpoint(pool, tokenizer, sampling, seed_fn=seed_fn)           # doctest: +SKIP
        >>> await ep.start()                                                          # doctest: +SKIP
        >>> rec = ep.open_episode("g0.1", TurnClient(slot.client, "g0.1"), prompt)    # doctest: +SKIP
        >>> OpenAI(base_url=ep.url_for("g0.1"), api_key="-").chat.completions.create(...)  # doctest: +SKIP
    """

    def __init__(
        self,
        pool: EnginePool,
        tokenizer: Any,
        sampling: SamplingParams,
        *,
        seed_fn: Callable[[str], int] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_model_len: int = 0,
        model_name: str = "slime-rl",
    ) -> None:
        self.pool = pool
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.seed_fn = seed_fn
        self.host, self.port = host, port
        self.max_model_len = max_model_len
        self.model_name = model_name
        self.episodes: dict[str, EpisodeRecorder] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> str:
        """Bind and serve; returns the base URL (`http://127.0.0.1:<port>`)."""
        app = web.Application(client_max_size=64 << 20)
        for prefix in ("/v1", "/episodes/{episode}/v1"):
            app.router.add_post(prefix + "/chat/completions", self._chat)
            app.router.add_post(prefix + "/completions", self._completions)
            app.router.add_get(prefix + "/models", self._models)
        app.router.add_get("/episodes/{episode}/v1/episode", self._episode_info)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"
        logger.info("OpenAI-compatible endpoint serving at %s/v1 (episodes under %s/episodes/<id>/v1)", self.base_url, self.base_url)
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def url_for(self, episode_id: str) -> str:
        """The OpenAI `base_url` of one episode."""
        return f"{self.base_url}/episodes/{quote(episode_id, safe='')}/v1"

    def open_episode(self, episode_id: str, client: TurnClient, prompt: Prompt | None, sampling: SamplingParams | None = None) -> EpisodeRecorder:
        if episode_id in self.episodes:
            raise ValueError(f"episode {episode_id!r} is already open")
        rec = EpisodeRecorder(episode_id, client, self.tokenizer, prompt, sampling or self.sampling, self.max_model_len)
        self.episodes[episode_id] = rec
        return rec

    def close_episode(self, episode_id: str) -> EpisodeRecorder | None:
        rec = self.episodes.pop(episode_id, None)
        if rec is not None:
            rec.closed = True
        return rec

    # ---- handlers --------------------------------------------------------------------------------
    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as e:
            raise EndpointError(400, f"the request body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise EndpointError(400, "the request body must be a JSON object")
        if body.get("stream"):
            raise EndpointError(400, "stream=true is not supported by the slime-rl endpoint")
        if int(body.get("n") or 1) != 1:
            raise EndpointError(400, "only n=1 is supported (call again for more samples)")
        return body

    def _recorder(self, request: web.Request, body: dict[str, Any]) -> tuple[EpisodeRecorder, bool]:
        eid = request.match_info.get("episode")
        if eid is not None:
            rec = self.episodes.get(eid)
            if rec is None:
                raise EndpointError(404, f"no open episode {eid!r}")
            return rec, True
        slot = self.pool.pick(1) or next((s for s in self.pool.slots if s.up), None)
        if slot is None:
            raise EndpointError(503, "no rollout engine is up")
        key = f"endpoint-{uuid.uuid4().hex[:12]}"
        return EpisodeRecorder(key, TurnClient(slot.client, key, None), self.tokenizer, None, self.sampling, self.max_model_len), False

    async def _serve(self, request: web.Request, make: Callable[[dict[str, Any], EpisodeRecorder, bool], Any]) -> web.Response:
        try:
            body = await self._body(request)
            rec, recorded = self._recorder(request, body)
            return web.json_response(await make(body, rec, recorded))
        except EndpointError as e:
            return _error(e.status, str(e))
        except EngineLostError as e:
            return _error(503, f"the engine is gone: {e}")
        except ValueError as e:
            return _error(400, str(e))
        except Exception as e:  # an unexpected failure is the caller's 500, never the server's end
            logger.exception("endpoint request failed")
            return _error(500, f"{type(e).__name__}: {e}")

    async def _chat(self, request: web.Request) -> web.Response:
        return await self._serve(request, self._chat_completion)

    async def _completions(self, request: web.Request) -> web.Response:
        return await self._serve(request, self._text_completion)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model", "owned_by": "slime-rl"}]})

    async def _episode_info(self, request: web.Request) -> web.Response:
        rec = self.episodes.get(request.match_info["episode"])
        if rec is None or rec.prompt is None:
            return _error(404, f"no open episode {request.match_info['episode']!r}")
        return web.json_response(task_of(rec.prompt))

    async def _chat_completion(self, body: dict[str, Any], rec: EpisodeRecorder, recorded: bool) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise EndpointError(400, "'messages' must be a non-empty list")
        kwargs = body.get("chat_template_kwargs") or {}
        think = kwargs.get("enable_thinking", rec.prompt.mode == "think" if rec.prompt else False)
        tools = body.get("tools") or None
        if body.get("tool_choice") == "none":
            tools = None
        try:
            prompt_text = self.tokenizer.apply_chat_template(
                [_clean(m) for m in messages], tools=tools, tokenize=False, add_generation_prompt=True, enable_thinking=bool(think)
            )
        except Exception as e:
            raise EndpointError(400, f"the chat template could not render the messages: {type(e).__name__}: {e}") from None
        sampling = _sampling_for_request(body, rec.sampling, recorded)
        result = await rec.complete(prompt_text, sampling)
        text = decode(self.tokenizer, result.token_ids, getattr(self.tokenizer, "eos_token", None))
        parsed = parse_tool_calls(text, id_prefix=f"call_{rec.calls}_{uuid.uuid4().hex[:6]}")
        calls = [c.to_openai() for c in parsed.calls]
        rec.tool_calls += calls
        rec.final_text = parsed.content
        rec.messages = [*messages, {"role": "assistant", "content": parsed.content, **({"tool_calls": calls} if calls else {})}]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content if (parsed.content or not calls) else None}
        if calls:
            message["tool_calls"] = calls
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": _finish(result, bool(calls)), "logprobs": None}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": self._logprobs(result)}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model") or self.model_name, "choices": [choice], "usage": _usage(rec, result),
        }

    async def _text_completion(self, body: dict[str, Any], rec: EpisodeRecorder, recorded: bool) -> dict[str, Any]:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = self.tokenizer.decode(prompt, skip_special_tokens=False)
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise EndpointError(400, "'prompt' must be one non-empty string (or one list of token ids)")
        sampling = _sampling_for_request(body, rec.sampling, recorded)
        result = await rec.complete(prompt, sampling)
        text = decode(self.tokenizer, result.token_ids, getattr(self.tokenizer, "eos_token", None))
        rec.final_text = text
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": _finish(result, False), "logprobs": None}
        if body.get("logprobs") is not None:
            tokens = [self.tokenizer.decode([t], skip_special_tokens=False) for t in result.token_ids]
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": list(result.logprobs), "top_logprobs": None, "text_offset": None}
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model") or self.model_name, "choices": [choice], "usage": _usage(rec, result),
        }

    def _logprobs(self, result: MergedResult) -> list[dict[str, Any]]:
        out = []
        for t, lp in zip(result.token_ids, result.logprobs):
            tok = self.tokenizer.decode([t], skip_special_tokens=False)
            out.append({"token": tok, "logprob": float(lp), "bytes": list(tok.encode()), "top_logprobs": []})
        return out


def task_of(prompt: Prompt) -> dict[str, Any]:
    """What an agent function learns about its task (JSON-able)."""
    return {
        "messages": [dict(m) for m in prompt.messages], "tools": list(prompt.tools) if prompt.tools else None,
        "label": prompt.label, "mode": prompt.mode, "metadata": prompt.metadata, "uid": prompt.uid,
    }


def _clean(message: Any) -> dict[str, Any]:
    """An SDK message as a plain dict without null fields (templates test `is defined`)."""
    if not isinstance(message, dict):
        raise EndpointError(400, f"each message must be an object, got {type(message).__name__}")
    out = {k: v for k, v in message.items() if v is not None}
    if isinstance(out.get("content"), list):  # OpenAI content parts: keep the text parts
        out["content"] = "".join(p.get("text", "") for p in out["content"] if isinstance(p, dict))
    return out


def _usage(rec: EpisodeRecorder, result: MergedResult) -> dict[str, int]:
    total = len(rec.traj.prompt_ids) + len(rec.traj) if rec.traj else 0
    n = len(result.token_ids)
    return {"prompt_tokens": total - n, "completion_tokens": n, "total_tokens": total}


def _error(status: int, message: str) -> web.Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "code": status}}, status=status,
                             dumps=lambda o: json.dumps(o, ensure_ascii=False))
