"""A reward model served over HTTP, called in batches.

Request (POST ``url``)::

    {"inputs": [{"prompt": str, "response": str, "label": str | null, "mode": str,
                 "messages": [...], "tool_calls": [...], "metadata": {...}}, ...]}

Reply: ``{"scores": [...]}`` (or ``{"rewards": [...]}``, or a bare list), one item per input,
each a number or a dict with ``score`` and extra metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.builtin.http_client import HttpError, JsonClient
from slime_rl.rewards.protocol import batched, queued


def sample_payload(sample: Sample) -> dict[str, Any]:
    """What a remote scorer sees of one sample."""
    return {
        "prompt": sample.prompt,
        "response": sample.response,
        "label": sample.label,
        "mode": sample.mode,
        "messages": sample.messages,
        "tool_calls": sample.tool_calls,
        "metadata": sample.metadata,
    }


@queued
@batched
class RemoteRewardModel:
    """Score a group by POSTing it to ``url`` in chunks of ``batch_size`` (sent concurrently).

    Keep ``timeout_s * (max_retries + 1)`` plus back-off below ``reward.timeout_s``, or the
    runner's timeout fires first.
    """

    def __init__(
        self,
        *,
        url: str,
        batch_size: int = 16,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        headers: dict[str, str] | None = None,
        max_concurrency: int = 8,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"remote_reward_model url={url!r} must start with http:// or https://")
        if batch_size < 1:
            raise ValueError(f"remote_reward_model batch_size={batch_size} must be >= 1")
        self.url = url
        self.batch_size = batch_size
        self.client = JsonClient(
            timeout_s=timeout_s, max_retries=max_retries, backoff_s=backoff_s,
            max_backoff_s=max_backoff_s, headers=headers, max_concurrency=max_concurrency,
        )

    @property
    def call_time_limit_s(self) -> float:
        """One request attempt; the runner checks ``reward.timeout_s`` is at least this."""
        return self.client.timeout_s

    async def _chunk(self, samples: Sequence[Sample]) -> list[Any]:
        reply = await self.client.post_json(self.url, {"inputs": [sample_payload(s) for s in samples]})
        scores = reply.get("scores", reply.get("rewards")) if isinstance(reply, dict) else reply
        if not isinstance(scores, list) or len(scores) != len(samples):
            got = len(scores) if isinstance(scores, list) else repr(reply)[:200]
            raise HttpError(f"{self.url} returned {got} scores for {len(samples)} inputs; expected {{'scores': [...]}}")
        return scores

    async def __call__(self, samples: Sequence[Sample]) -> list[Any]:
        chunks = [samples[i : i + self.batch_size] for i in range(0, len(samples), self.batch_size)]
        parts = await asyncio.gather(*(self._chunk(c) for c in chunks))
        return [score for part in parts for score in part]

    async def aclose(self) -> None:
        await self.client.aclose()
