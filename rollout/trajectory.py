"""Token-level trajectories of multi-turn episodes: what the agent loop, the OpenAI endpoint and
custom generate functions build samples from.

    prompt ids ─► [generated turn 1: mask 1, engine log-probs, per-token versions]
               ─► [glue: end of turn + tool messages + next generation prompt: mask 0]
               ─► [generated turn 2: mask 1] ─► ... ─► TokenTrajectory.to_sample() ─► Sample

Generated tokens are appended exactly as the engine returned them (never decoded and encoded
again); only the text the chat template adds between turns is tokenised (`ChatGlue`), so the
sequence is what the template would render for the conversation wherever the model's output
is in the template's own form, and is kept as generated wherever it is not.

`TurnClient` is one engine seen by an episode: a call is one request whose response, if a
weight update aborts it (`rollout.weight_update_mode: abort`), is continued where it stopped,
as the manager does for single-turn samples.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineClient
from slime_rl.rollout.engines.base import FinishReason, GenerateRequest, SamplingParams
from slime_rl.rollout.samples import MergedResult, decode, merge_results

MAX_PIECES = 64
"""Most continuations of one turn (each weight update in abort mode adds one)."""


class TurnClient:
    """One engine as an episode uses it: `generate(prompt_ids, sampling)` -> `MergedResult`.

    Request ids are `f"{key}/{call}/{piece}"` (unique per episode key); each request carries the
    seed `seed_fn(request_id)`, so a run repeats. A response aborted by a weight update is
    continued (up to `MAX_PIECES` pieces) unless `stopping()` says the rollout side is stopping.

    Example (a custom `rollout.generate_fn`):
        >>> async def generate(client, tokenizer, prompt, sampling):              # doctest: +SKIP
        ...     traj = TokenTrajectory(list(prompt.prompt_ids))
        ...     traj.add_generated(await client.generate(traj.all_ids(), sampling))
        ...     return traj.to_sample(prompt, tokenizer=tokenizer)
    """

    def __init__(
        self,
        engine: EngineClient,
        key: str,
        seed_fn: Callable[[str], int] | None = None,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self.engine = engine
        """The raw `EngineClient` (`generate_group`, `info`, ...)."""
        self.key = key
        self.seed_fn = seed_fn
        self.stopping = stopping
        self.calls = 0
        self.engine_seconds = 0.0

    @property
    def name(self) -> str:
        return self.engine.name

    async def generate(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> MergedResult:
        """Generate one response to `prompt_ids` (continuing it after aborts).

        Raises:
            EngineLostError: the engine is gone (the manager re-dispatches the group).
        """
        call = self.calls
        self.calls += 1
        pieces = []
        done: list[int] = []
        t0 = time.monotonic()
        for piece in range(MAX_PIECES):
            rid = f"{self.key}/{call}/{piece}"
            params = dataclasses.replace(
                sampling,
                max_new_tokens=sampling.max_new_tokens - len(done),
                seed=self.seed_fn(rid) if self.seed_fn is not None else sampling.seed,
            )
            (res,) = await self.engine.generate_group([GenerateRequest(rid, [*prompt_ids, *done], params)])
            pieces.append(res)
            done += res.token_ids
            if not (res.finish_reason is FinishReason.ABORT and len(done) < sampling.max_new_tokens) or self.stopping():
                break
        self.engine_seconds += time.monotonic() - t0
        return merge_results(pieces)


@dataclasses.dataclass
class TokenTrajectory:
    """A prompt and a response made of generated pieces (mask 1) and context pieces (mask 0).

    Context tokens get log-prob 0.0 and, as their version, that of the generated token before
    them (the trainer takes no loss on them; the schema wants every version within the sample's
    range).
    """

    prompt_ids: list[int]
    response_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    loss_mask: list[int] = dataclasses.field(default_factory=list)
    token_versions: list[int | None] = dataclasses.field(default_factory=list)
    policy_version: int | None = None
    """Engine version when the first request was admitted (used when nothing was generated)."""
    policy_version_end: int = 0
    pieces: int = 0
    last_finish: FinishReason | None = None
    errors: list[str] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.response_ids)

    def all_ids(self) -> list[int]:
        """Prompt + response tokens: the next turn's prompt."""
        return [*self.prompt_ids, *self.response_ids]

    def add_generated(self, result: MergedResult) -> None:
        """Append an engine response (its tokens, log-probs and versions), loss mask 1."""
        if self.policy_version is None:
            self.policy_version = result.policy_version
        self.response_ids += result.token_ids
        self.logprobs += [float(x) for x in result.logprobs]
        self.loss_mask += [1] * len(result.token_ids)
        self.token_versions += list(result.token_versions)
        self.policy_version_end = max([self.policy_version_end, result.policy_version_end, *result.token_versions])
        self.pieces += result.pieces
        self.last_finish = result.finish_reason
        if result.error:
            self.errors.append(result.error)

    def add_context(self, ids: Sequence[int]) -> None:
        """Append tokens the model did not generate (tool results, template glue), loss mask 0."""
        self.response_ids += [int(t) for t in ids]
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)
        self.token_versions += [None] * len(ids)

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)

    def _filled_versions(self) -> tuple[list[int], int, int]:
        generated = [v for v in self.token_versions if v is not None]
        start = generated[0] if generated else (self.policy_version or 0)
        end = max([self.policy_version_end, start, *generated])
        out, last = [], start
        for v in self.token_versions:
            last = v if v is not None else last
            out.append(last)
        return out, start, end

    def status(self) -> Status:
        """`failed` after an engine error, `aborted`/`truncated`/`completed` from the last turn."""
        if self.last_finish is FinishReason.ERROR or self.errors:
            return Status.FAILED
        if self.last_finish is FinishReason.ABORT:
            return Status.ABORTED
        if self.last_finish is FinishReason.LENGTH:
            return Status.TRUNCATED
        return Status.COMPLETED

    def to_sample(
        self,
        prompt: Prompt,
        *,
        tokenizer: Any,
        group_id: str = "",
        index: int = 0,
        status: Status | str | None = None,
        temperature: float = 1.0,
        gen_seconds: float = 0.0,
        metadata: dict[str, Any] | None = None,
        messages: list[dict[str, Any]] | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> Sample:
        """The `Sample` (reward not set). `status` defaults to `self.status()`."""
        versions, start, end = self._filled_versions()
        meta: dict[str, Any] = dict(prompt.metadata)
        meta.update(prompt_uid=prompt.uid, temperature=temperature, pieces=self.pieces,
                    finish_reason=self.last_finish.value if self.last_finish else None)
        if prompt.data_source is not None:
            meta["data_source"] = prompt.data_source
        if self.errors:
            meta["engine_error"] = self.errors[-1]
        meta.update(metadata or {})
        st = status if status is not None else self.status()
        return Sample(
            sample_id=f"{group_id}/{index}",
            group_id=group_id,
            prompt_ids=list(self.prompt_ids),
            response_ids=list(self.response_ids),
            response_logprobs=list(self.logprobs),
            loss_mask=list(self.loss_mask),
            token_versions=versions,
            status=st.value if isinstance(st, Status) else str(st),
            policy_version=start,
            policy_version_end=end,
            mode=prompt.mode,
            label=prompt.label,
            metadata=meta,
            created_at=time.time(),
            gen_seconds=float(gen_seconds),
            prompt=tokenizer.decode(list(self.prompt_ids), skip_special_tokens=False),
            response=decode(tokenizer, self.response_ids, getattr(tokenizer, "eos_token", None)),
            messages=[dict(m) for m in (messages if messages is not None else prompt.messages)],
            tool_calls=list(tool_calls or []),
        )


_SENTINEL = "\x00slime-rl-assistant-content\x00"


class ChatGlue:
    """The template text between two assistant turns, from the tokenizer's own chat template.

    `turn_end` is what the template writes after an assistant message's content (`<|im_end|>\\n`
    for Qwen-style templates); `after_turn(ids)` is the part of it the model did not generate
    (the `\\n` after an EOS it did generate); `between(conversation, new_messages)` is what the
    template adds to render `new_messages` (tool results) and the next generation prompt
    (`<|im_start|>user\\n<tool_response>...</tool_response><|im_end|>\\n<|im_start|>assistant\\n`).

    Raises:
        ValueError: (at construction) a template that does not render a tool message as an
            extension of the conversation, so no glue can be cut from it.
    """

    def __init__(self, tokenizer: Any, tools: Sequence[dict[str, Any]] | None, enable_thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        self.enable_thinking = enable_thinking
        probe = self.render([{"role": "user", "content": "q"}, {"role": "assistant", "content": _SENTINEL}])
        self.turn_end = probe[probe.rindex(_SENTINEL) + len(_SENTINEL) :]
        eos = getattr(tokenizer, "eos_token", None)
        ids = tokenizer.convert_tokens_to_ids(eos) if eos else None
        self.eos_id: int | None = ids if isinstance(ids, int) else None
        self.eos_text = eos or ""
        self._fallback_base = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
        base = self.render(self._fallback_base)
        full = self.render([*self._fallback_base, {"role": "tool", "tool_call_id": "call_0", "name": "t", "content": "r"}], add_generation_prompt=True)
        if not full.startswith(base):
            name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
            raise ValueError(
                f"the chat template of {name!r} does not render a tool message as an extension of the conversation "
                "(rendering [user, assistant] is not a prefix of rendering [user, assistant, tool]); the agent loop "
                "cannot append tool results to the generated tokens. Use a template that renders turns incrementally"
            )

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), tools=self.tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            enable_thinking=self.enable_thinking,
        )

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def after_turn(self, generated_ids: Sequence[int]) -> str:
        """The rest of `turn_end` after a turn that ended with these tokens."""
        if self.eos_id is not None and generated_ids and generated_ids[-1] == self.eos_id and self.turn_end.startswith(self.eos_text):
            return self.turn_end[len(self.eos_text) :]
        return self.turn_end

    def between(self, conversation: Sequence[dict[str, Any]], new_messages: Sequence[dict[str, Any]]) -> str:
        """Text from the end of the last assistant turn (its `turn_end` included) to the next
        generation prompt, with `new_messages` rendered in between."""
        base = self.render(conversation)
        full = self.render([*conversation, *new_messages], add_generation_prompt=True)
        if full.startswith(base):
            return full[len(base) :]
        # The template renders the conversation differently once it goes on (e.g. drops earlier
        # reasoning); the tool part itself does not depend on it.
        base = self.render(self._fallback_base)
        full = self.render([*self._fallback_base, *new_messages], add_generation_prompt=True)
        return full[len(base) :]

    def generation_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.render(messages, add_generation_prompt=True)


def assistant_message(content: str, tool_calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """An assistant message as the agent loop records it (OpenAI format)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        msg["tool_calls"] = [dict(c) for c in tool_calls]
    return msg
