"""An LLM judge on any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, SGLang, OpenAI).

    sample ──prompt_template──► messages ──POST base_url/chat/completions──► reply text
           ──score_regex (last match)──► raw score ──/ max_score──► reward in [0, 1]
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.builtin.http_client import HttpError, JsonClient
from slime_rl.rewards.builtin.text import final_text
from slime_rl.rewards.protocol import queued

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATE = (
    "Grade the response to the question on a scale from 0 to {max_score:g}.\n\n"
    "Question:\n{prompt}\n\nReference answer:\n{label}\n\nResponse:\n{response}\n\n"
    "Reply with a short justification, then a last line of the form `Score: <number>`."
)
DEFAULT_SCORE_REGEX = r"score\s*[:=]?\s*\**\s*(-?\d+(?:\.\d+)?)"
_FIELDS = ("prompt", "response", "label", "max_score", "mode")


def _prompt_text(sample: Sample) -> str:
    if sample.prompt:
        return sample.prompt
    return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in sample.messages)


@queued
class LLMJudge:
    """Reward = the judge's score / ``max_score`` (clamped to [0, 1]).

    Template fields: ``{prompt} {response} {label} {max_score} {mode}``; the response is the
    part after any reasoning block. The API key comes from the environment variable
    ``api_key_env`` (preferred: a key written in the config is saved with the run's
    ``config.yaml``), or from ``api_key``, which logs a warning. An unparseable reply fails
    the sample (the error shows the reply).
    """

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        prompt_template: str = DEFAULT_TEMPLATE,
        system_prompt: str | None = None,
        max_score: float = 10.0,
        score_regex: str = DEFAULT_SCORE_REGEX,
        temperature: float = 0.0,
        max_tokens: int = 512,
        timeout_s: float = 30.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_concurrency: int = 16,
        keep_reply: bool = True,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"llm_judge base_url={base_url!r} must start with http:// or https://")
        if max_score <= 0:
            raise ValueError(f"llm_judge max_score={max_score} must be > 0")
        try:
            prompt_template.format(**{f: "x" if f != "max_score" else 1.0 for f in _FIELDS})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"llm_judge prompt_template has an unknown field {e}; allowed: {_FIELDS}") from e
        try:
            self.score_re = re.compile(score_regex, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"llm_judge score_regex={score_regex!r} is not a valid regex: {e}") from e
        if self.score_re.groups < 1:
            raise ValueError(f"llm_judge score_regex={score_regex!r} needs one capture group for the number")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.template = prompt_template
        self.system_prompt = system_prompt
        self.max_score = float(max_score)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.keep_reply = keep_reply
        if api_key:
            logger.warning(
                "llm_judge: api_key is given literally; it is saved with the run's config. Put "
                "it in an environment variable and set api_key_env (default OPENAI_API_KEY) instead"
            )
        key = api_key or os.environ.get(api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = JsonClient(
            timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
            headers=headers, max_concurrency=max_concurrency,
        )

    @property
    def call_time_limit_s(self) -> float:
        """One request attempt; the runner checks ``reward.timeout_s`` is at least this."""
        return self.client.timeout_s

    def __repr__(self) -> str:  # never show the Authorization header
        return f"LLMJudge(url={self.url!r}, model={self.model!r})"

    def messages(self, sample: Sample) -> list[dict[str, str]]:
        """The chat messages sent to the judge for ``sample``."""
        user = self.template.format(
            prompt=_prompt_text(sample), response=final_text(sample.response).strip(),
            label=sample.label if sample.label is not None else "(none)",
            max_score=self.max_score, mode=sample.mode,
        )
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*msgs, {"role": "user", "content": user}]

    def parse_score(self, reply: str) -> float:
        """The last number matching ``score_regex`` in the reply, or a reply that is only a number."""
        matches = self.score_re.findall(reply)
        if matches:
            last = matches[-1]
            return float(last[0] if isinstance(last, tuple) else last)
        try:
            return float(reply.strip())
        except ValueError:
            raise ValueError(f"judge reply has no score matching {self.score_re.pattern!r}: {reply[:300]!r}") from None

    async def __call__(self, sample: Sample) -> dict[str, Any]:
        payload = {
            "model": self.model,
            "messages": self.messages(sample),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        reply = await self.client.post_json(self.url, payload)
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise HttpError(f"{self.url} returned no choices[0].message.content: {str(reply)[:300]}") from None
        raw = self.parse_score(text)
        out: dict[str, Any] = {"score": min(1.0, max(0.0, raw / self.max_score)), "raw_score": raw}
        if self.keep_reply:
            out["judge_reply"] = text[:1000]
        return out

    async def aclose(self) -> None:
        await self.client.aclose()
