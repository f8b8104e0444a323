"""StallWatch: a group far slower than the median is warned about once, naming group, prompt,
engine, age and tokens; an engine whose token count stops moving (or that stops answering) for
engine_stall_s is killed as lost, one that keeps producing tokens is not."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from slime_rl.rollout.admission import GroupState
from slime_rl.rollout.watchdog import StallWatch


@dataclass
class _Work:
    group_id: str
    engine: str
    started: float
    request_ids: list[str]
    prompt: object = field(default_factory=lambda: SimpleNamespace(uid="p7"))
    state: GroupState = GroupState.RUNNING


class _Client:
    def __init__(self, name: str) -> None:
        self.name = name
        self.tokens: dict[str, int] = {}
        self.answers = True

    async def progress(self, request_ids: list[str]) -> dict[str, int]:
        if not self.answers:
            await asyncio.sleep(60)  # a stopped process never answers
        return {r: self.tokens.get(r, 0) for r in request_ids}


class _Pool:
    def __init__(self, *clients: _Client) -> None:
        self.slots = [SimpleNamespace(name=c.name, client=c, in_flight=0, updating=False) for c in clients]

    def get(self, name: str):
        return next((s for s in self.slots if s.name == name), None)


def _watch(works, pool, killed, **kw) -> StallWatch:
    opts = {"stall_factor": 3.0, "stall_min_s": 0.0, "engine_stall_s": 0.2} | kw
    return StallWatch(works, pool, kill=killed.append, **opts)


def test_a_slow_group_is_warned_about_once_with_its_tokens(caplog) -> None:
    a = _Client("engine-0")
    a.tokens = {"r1": 17}
    pool = _Pool(a)
    pool.slots[0].in_flight = 1
    now = time.monotonic()
    works = [_Work("g-slow", "engine-0", now - 10.0, ["r1"]), _Work("g-new", "engine-0", now, ["r2"])]
    killed: list = []
    watch = _watch(works, pool, killed, engine_stall_s=100)
    for s in (1.0, 1.2, 0.8):
        watch.finished(s)
    assert watch.stall_age() == 3.0
    with caplog.at_level(logging.WARNING, logger="slime_rl.rollout.watchdog"):
        asyncio.run(watch.check())
        asyncio.run(watch.check())
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "g-slow" in lines[0] and "prompt p7" in lines[0] and "engine-0" in lines[0] and "17 tokens" in lines[0]
    assert watch.metrics() == {"rollout/stalled_groups": 1.0, "rollout/stall_warnings": 1.0,
                               "rollout/engines_killed_stalled": 0.0}
    assert not killed


def test_an_engine_without_new_tokens_is_killed_one_that_progresses_is_not() -> None:
    stuck, busy = _Client("engine-0"), _Client("engine-1")
    pool = _Pool(stuck, busy)
    for s in pool.slots:
        s.in_flight = 1
    now = time.monotonic()
    works = [_Work("g0", "engine-0", now, ["a"]), _Work("g1", "engine-1", now, ["b"])]
    stuck.tokens = {"a": 5}
    killed: list = []
    watch = _watch(works, pool, killed, stall_min_s=1000)

    async def go() -> None:
        for i in range(6):
            busy.tokens = {"b": 3 + i}  # a slow engine that still decodes is alive
            await watch.check()
            await asyncio.sleep(0.1)

    asyncio.run(go())
    assert killed == [stuck]
    assert watch.metrics()["rollout/engines_killed_stalled"] == 1.0


def test_an_engine_that_does_not_answer_counts_as_stalled(monkeypatch) -> None:
    import slime_rl.rollout.watchdog as wd

    monkeypatch.setattr(wd, "PROBE_TIMEOUT_S", 0.05)
    frozen = _Client("engine-0")
    frozen.answers = False
    pool = _Pool(frozen)
    pool.slots[0].in_flight = 2
    killed: list = []
    watch = _watch([_Work("g0", "engine-0", time.monotonic(), ["a"])], pool, killed, stall_min_s=1000, engine_stall_s=0.1)

    async def go() -> None:
        for _ in range(4):
            await watch.check()
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert killed == [frozen]


def test_idle_engines_are_never_killed() -> None:
    idle = _Client("engine-0")
    pool = _Pool(idle)  # in_flight 0
    killed: list = []
    watch = _watch([], pool, killed, engine_stall_s=0.0)
    for _ in range(3):
        asyncio.run(watch.check())
    assert not killed


def test_an_engine_stopped_during_a_weight_update_is_killed_a_slow_loader_that_answers_is_not(monkeypatch) -> None:
    """Nothing in flight, a weight update pending: only the engine that stops answering is lost
    (a SIGSTOP after a step otherwise holds the sync until weight_update_timeout_s)."""
    import slime_rl.rollout.watchdog as wd

    monkeypatch.setattr(wd, "PROBE_TIMEOUT_S", 0.05)
    frozen, loading = _Client("engine-0"), _Client("engine-1")
    frozen.answers = False
    pool = _Pool(frozen, loading)
    for s in pool.slots:
        s.updating = True
    killed: list = []
    watch = _watch([], pool, killed, stall_min_s=1000, engine_stall_s=0.1)

    async def go() -> None:
        for _ in range(5):
            await watch.check()
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert killed == [frozen]
    assert watch.metrics()["rollout/engines_killed_stalled"] == 1.0
