"""An OpenEnv environment (server side, `openenv.core` types) that checks arithmetic answers.

Written as for any OpenEnv trainer: typed `Action` / `Observation` (pydantic), `reset` / `step`,
`state`. `reset` receives the dataset row's label (OpenEnv passes reset kwargs through to the
environment, dropping those it does not take); each model message is one `ArithAction`; a wrong
answer gets "Wrong, try again." as the next user turn, for at most `max_attempts` attempts;
reward 1 for a right answer. slime-rl runs it in-process by default
(`rollout.environment: openenv:examples/envs/openenv_arith.py:ArithEnvironment`), or behind
OpenEnv's own HTTP/WebSocket server on a local uvicorn that the run starts and stops
(`rollout.environment_kwargs: {transport: http}`).
"""

from __future__ import annotations

import re
from typing import Any
from uuid import uuid4

from openenv.core.env_server.interfaces import Environment
from openenv.core.env_server.types import Action, Observation, State
from pydantic import Field

_ANSWER = re.compile(r"answer is\s*(-?\d+)", re.IGNORECASE)


class ArithAction(Action):
    answer: str = Field(..., description="The model's reply; its last 'The answer is N' is the answer")


class ArithObservation(Observation):
    feedback: str = ""


class ArithEnvironment(Environment[ArithAction, ArithObservation, State]):
    SUPPORTS_CONCURRENT_SESSIONS = True

    def __init__(self, max_attempts: int = 2) -> None:
        super().__init__()
        self.max_attempts = max_attempts
        self._state = State(episode_id=str(uuid4()), step_count=0)
        self._label: str | None = None

    def reset(self, seed: int | None = None, episode_id: str | None = None, label: str | None = None,
              **kwargs: Any) -> ArithObservation:
        self._state = State(episode_id=episode_id or str(uuid4()), step_count=0)
        self._label = label
        return ArithObservation(feedback="", done=False, reward=0.0)  # the question is the prompt itself

    def step(self, action: ArithAction, timeout_s: float | None = None, **kwargs: Any) -> ArithObservation:
        self._state.step_count += 1
        found = _ANSWER.findall(action.answer.split("</think>")[-1])
        right = bool(found) and found[-1] == self._label
        done = right or self._state.step_count >= self.max_attempts
        return ArithObservation(feedback="Correct." if right else "Wrong, try again.", done=done, reward=float(right))

    @property
    def state(self) -> State:
        return self._state
