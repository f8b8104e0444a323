"""A small JSON-over-HTTP client for reward services: retries with exponential back-off.

    post_json(url, payload)
      └─ attempt 1 ── ok ──► parsed JSON
         │ connection error / timeout / 429 / 5xx
         └─ sleep backoff_s·2^k (capped, jittered) ──► attempt k+1 ... ──► RuntimeError after the last
         other 4xx ──► RuntimeError at once (retrying cannot fix a bad request)

The aiohttp session is created lazily per event loop (a session cannot cross loops).
"""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from typing import Any

from slime_rl.rewards.protocol import work_started

logger = logging.getLogger(__name__)


def _aiohttp() -> Any:
    try:
        import aiohttp
    except ImportError as e:  # a core dependency, but keep the message useful
        raise ImportError("install aiohttp (a slime-rl dependency) to use HTTP rewards") from e
    return aiohttp


class HttpError(RuntimeError):
    """A request that failed for good; the message names the URL, status and body excerpt."""


class JsonClient:
    """POST JSON with a timeout per attempt, retries and a bound on concurrent requests."""

    def __init__(
        self,
        *,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        headers: dict[str, str] | None = None,
        max_concurrency: int = 16,
    ) -> None:
        if max_retries < 0 or timeout_s <= 0 or backoff_s < 0:
            raise ValueError(
                f"timeout_s={timeout_s} must be > 0, max_retries={max_retries} and backoff_s={backoff_s} >= 0"
            )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.headers = dict(headers or {})
        self.max_concurrency = max_concurrency
        self._state: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[Any, asyncio.Semaphore]] = (
            weakref.WeakKeyDictionary()
        )

    def _session(self) -> tuple[Any, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        state = self._state.get(loop)
        if state is None or state[0].closed:
            aiohttp = _aiohttp()
            session = aiohttp.ClientSession(headers=self.headers)
            state = (session, asyncio.Semaphore(self.max_concurrency))
            self._state[loop] = state
        return state

    def _delay(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)

    async def post_json(self, url: str, payload: Any) -> Any:
        """POST ``payload`` as JSON and return the decoded JSON reply."""
        aiohttp = _aiohttp()
        session, sem = self._session()
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt - 1))
            try:
                async with sem:
                    work_started()  # the runner's timeout starts now, not while queueing
                    async with session.post(url, json=payload, timeout=timeout) as resp:
                        if resp.status == 429 or resp.status >= 500:
                            last = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                            logger.debug("POST %s attempt %d: %s", url, attempt + 1, last)
                            continue
                        if resp.status >= 400:
                            raise HttpError(f"POST {url} -> HTTP {resp.status}: {(await resp.text())[:300]}")
                        return await resp.json(content_type=None)
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as e:
                last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                logger.debug("POST %s attempt %d: %s", url, attempt + 1, last)
        raise HttpError(f"POST {url} failed after {self.max_retries + 1} attempts; last error: {last}")

    async def aclose(self) -> None:
        """Close the session of the running loop (others close with their loops)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        state = self._state.pop(loop, None)
        if state is not None:
            await state[0].close()
