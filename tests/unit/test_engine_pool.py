"""EnginePool: an engine that joins while a newer weight version goes out ends up holding that
version before it takes work (else its groups are one version staler than admission allowed for
and the buffer drops them as stale: the elastic-run group loss seen in CI)."""

from __future__ import annotations

import asyncio

import pytest
from slime_rl.rollout.engine_pool import EnginePool, SlotState


class _Client:
    """Records the versions it loads; a load can be held until `release` is set."""

    def __init__(self, name: str, hold_first: bool = False) -> None:
        self.name = name
        self.loaded: list[int] = []
        self.release = asyncio.Event()
        if not hold_first:
            self.release.set()

    async def update_weights(self, version: int, buckets, mode) -> int:
        if not self.loaded:
            await self.release.wait()
        self.loaded.append(version)
        return version


async def _join_during_update(per_engine: bool) -> tuple[EnginePool, _Client]:
    old = _Client("engine-0")
    pool = EnginePool([old], max_in_flight=4, weight_timeout_s=10)
    await pool.update_weights(1, ["v1"], None)
    new = _Client("engine-1", hold_first=True)
    slot = pool.add(new)
    joining = asyncio.create_task(pool.bring_up(slot))
    await asyncio.sleep(0)  # the new engine is loading version 1
    if per_engine:  # collective: nothing kept for later engines, each sender rank gets its own buckets
        await pool.update_weights(2, [], None, per_engine={"engine-0": ["v2"]})
    else:
        await pool.update_weights(2, ["v2"], None)
    new.release.set()
    await joining
    return pool, new


def test_an_engine_that_joins_during_an_update_loads_the_new_version_before_it_serves() -> None:
    pool, new = asyncio.run(_join_during_update(per_engine=False))
    slot = pool.get("engine-1")
    assert new.loaded == [1, 2]
    assert slot.state is SlotState.UP and slot.version == 2 == pool.version


def test_without_kept_weights_a_late_joiner_waits_for_the_next_update() -> None:
    async def run() -> tuple[SlotState, SlotState, list[int]]:
        pool, new = await _join_during_update(per_engine=True)
        before = pool.get("engine-1").state
        await pool.update_weights(3, [], None, per_engine={"engine-0": ["v3"], "engine-1": ["v3"]})
        return before, pool.get("engine-1").state, new.loaded

    before, after, loaded = asyncio.run(run())
    assert before is SlotState.WAITING  # it holds version 1 while the others hold 2: no work for it
    assert after is SlotState.UP and loaded == [1, 3]


def test_an_engine_that_comes_up_mid_update_is_held_back_until_it_has_the_new_version() -> None:
    async def run() -> tuple[SlotState, SlotState, int]:
        running = _Client("engine-0")
        pool = EnginePool([running], max_in_flight=4, weight_timeout_s=10)
        await pool.update_weights(1, ["v1"], None)
        gate = asyncio.Event()
        load = running.update_weights

        async def held(version, buckets, mode):  # the running engine's load of version 2 takes a while
            await gate.wait()
            return await load(version, buckets, mode)

        running.update_weights = held
        new = _Client("engine-1", hold_first=True)
        slot = pool.add(new)
        joining = asyncio.create_task(pool.bring_up(slot))
        await asyncio.sleep(0)  # loading version 1
        update = asyncio.create_task(pool.update_weights(2, [], None, per_engine={"engine-0": ["v2"]}))
        await asyncio.sleep(0)  # version 2 is going out, to engine-0 only
        new.release.set()
        await joining
        during = slot.state  # holds version 1, the latest finished update
        gate.set()
        await update
        return during, slot.state, slot.version

    during, after, version = asyncio.run(run())
    assert during is SlotState.UP
    assert version == 1 and after is SlotState.WAITING  # one version behind, nothing kept to load: no work


class _ShutDown(_Client):
    async def update_weights(self, version: int, buckets, mode) -> int:
        raise RuntimeError("hf engine is shut down; create a new one")


def test_an_engine_retired_during_an_update_does_not_fail_the_update_one_serving_does() -> None:
    async def run(retire: bool) -> dict[str, float]:
        pool = EnginePool([_Client("engine-0"), _ShutDown("engine-1")], max_in_flight=4, weight_timeout_s=10)
        if retire:  # `slime-rl scale --engines 1`: engine-1 drains and is stopped while version 1 goes out
            pool.retire("engine-1")
        return await pool.update_weights(1, ["v1"], None)

    seconds = asyncio.run(run(retire=True))
    assert seconds["engine-0"] >= 0 and seconds["engine-1"] != seconds["engine-1"]  # NaN: did not take it
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(run(retire=False))
