"""The rollout manager: prompts -> admitted groups -> engines -> scored samples -> buffer.

    dataset cursor ─► _admit_loop ──(slot free? Admission; engine with room? EnginePool)──┐
          ▲  requeue (engine lost, resumed run)                                                  │
          │                                                                                      ▼
          │      GroupRunner.run (rollout/group_runner.py): generate ─► score ─► filter
          │                  ─┬─ drop: slot freed     └─ keep: FINISHED
          │      _put_loop: all groups finished since the last put ─► ONE buffer.put ─► accepted
    driver ─► update_weights(v, buckets): every engine loads v (mode keep|wait|abort), then slots
              for v open; evaluate(): greedy eval pinned to one weight version; metrics();
              snapshot(folder) / restore(state): consistent checkpoint state; check(); stop()

One asyncio loop owns everything (a Ray async actor in a run, `RolloutManagerActor`; or any event
loop with local clients). Many groups are in flight per engine at once; each engine batches its
requests continuously. Reward scoring runs in the runner's workers, never on this loop.
Any unexpected error stops the manager; `check()` re-raises it for the driver with the group
and engine named. The whole async design (every loop, what wakes it): docs/design.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from slime_rl.buffers.schema import samples_to_batch
from slime_rl.rewards.config import RewardConfig
from slime_rl.rewards.runner import RewardRunner
from slime_rl.rollout.admission import Admission, GroupWork
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.rollout.cursor import DatasetCursor
from slime_rl.rollout.data import PromptDataset
from slime_rl.rollout.engine_pool import EngineClient, EnginePool, EngineSlot
from slime_rl.rollout.engines.base import (
    sampling_from_config,
)
from slime_rl.rollout.evaluation import evaluate_prompts
from slime_rl.rollout.filters import GroupFilter
from slime_rl.rollout.fleet import EngineFleet
from slime_rl.rollout.group_runner import GroupRunner, request_seed
from slime_rl.rollout.launcher import EngineLaunchSpec, RayLauncher
from slime_rl.rollout.stats import RolloutStats
from slime_rl.rollout.watchdog import StallWatch

from slime_rl.tracing import Tracer

logger = logging.getLogger(__name__)

class RolloutError(RuntimeError):
    """The rollout side stopped; the message names what failed (group, engine, cause)."""


@dataclasses.dataclass
class ManagerSpec:
    """What the rollout manager needs from the run config (no more)."""

    rollout: RolloutConfig
    data: DataConfig
    reward: RewardConfig
    eval: EvalConfig
    model_path: str
    tokenizer_path: str | None = None
    global_batch_groups: int = 8
    """B: groups per trainer step."""
    max_staleness: int = 1
    """S: `buffer.max_staleness` (0 in sync mode)."""
    seed: int = 0
    base_dir: str | None = None
    """Folder that relative plug-in paths (`rollout.filter`) are resolved against."""
    launch: EngineLaunchSpec | None = None
    """How to start engines (a run): the manager then owns its engines (rollout/fleet.py) and can
    scale; None: only the engines passed in (in-process use, tests)."""
    engine_prefix: str = "engine"
    """Engine actor names are `<engine_prefix>-<k>` (a run: `<run>-engine`)."""
    trace: bool = True
    """Record the timeline (`logging.trace`; the driver drains it once per step)."""
    reward_faults: Any = None
    """`faults.reward` (a `RewardFaultsConfig`): reward terms that hang / raise / return NaN."""
    corrupt_rows: list[int] = dataclasses.field(default_factory=list)
    """`faults.corrupt_rows`: train rows made unparsable when loaded."""
    delay_weight_sync_s: float = 0.0
    """`faults.delay_weight_sync_s` at version `delay_weight_sync_at_step` (0 = every version)."""
    delay_weight_sync_at_step: int = 0
    teacher: Any = None
    """`TeacherSpec` of on-policy distillation (`trainer.distill`; rollout/teacher.py), None = off."""


class RolloutManager:
    """Fills the buffer with scored groups under the staleness bound; see the module docstring.

    Example (in-process, no Ray):
        >>> engine = create_engine("hf", model_dir)                               # doctest: +SKIP
        >>> m = RolloutManager(spec, [LocalEngineClient(engine)], LocalBufferClient(buf))  # doctest: +SKIP
        >>> await m.setup(); await m.start()                                      # doctest: +SKIP
        >>> await m.update_weights(1, buckets)   # slots for version 1 open        # doctest: +SKIP
    """

    def __init__(self, spec: ManagerSpec, engines: Sequence[EngineClient], buffer: Any) -> None:
        self.spec = spec
        r = spec.rollout
        self.buffer = buffer
        self.pool = EnginePool(
            engines, max_in_flight=r.max_in_flight_per_engine or 2 * r.max_batch_size, weight_timeout_s=r.weight_update_timeout_s,
        )
        launcher = RayLauncher(spec.launch) if spec.launch is not None else None
        self.fleet = EngineFleet(
            self.pool, launcher, name_prefix=spec.engine_prefix, target=r.num_engines if launcher else len(engines),
            max_failures=r.engine_max_restarts, on_lost=self._engine_lost,
        )
        self.admission = Admission(spec.global_batch_groups, spec.max_staleness)
        self.filter = GroupFilter(r.filter, base_dir=spec.base_dir)
        self.stats = RolloutStats()
        self.sampling = sampling_from_config(r)
        self.tracer = Tracer("rollout-manager", enabled=spec.trace)
        self.watch = StallWatch(self.admission, self.pool, stall_factor=r.stall_factor, stall_min_s=r.stall_min_s,
                                engine_stall_s=r.engine_stall_s, kill=_kill_engine)
        self.groups: GroupRunner | None = None
        """Runs each admitted group (built in `setup`, once the tokenizer and rewards are loaded)."""
        self.tokenizer: Any = None
        self.train_data: PromptDataset | None = None
        self.eval_data: PromptDataset | None = None
        self.cursor: DatasetCursor | None = None
        self.runner: RewardRunner | None = None
        self.eval_runner: RewardRunner | None = None
        self._finished_event = asyncio.Event()
        self._left_ledger = asyncio.Event()
        """Set whenever a group was accepted, released or requeued (`wait_due` wakes on it)."""
        self._wake = asyncio.Event()
        self._put_lock = asyncio.Lock()
        self._version_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._loops: list[asyncio.Task] = []
        self._error: BaseException | None = None
        self._stopping = False
        self._busy_mark: dict[str, float] = {}
        self._window_start = time.monotonic()
        self._last_update: dict[str, float] = {}
        self.max_prompt_tokens = 0
        self.episodes: Any = None
        """Agent loop / `rollout.generate_fn` / `rollout.agent_fn` runner (rollout/episodes.py), if configured."""
        self.teacher: Any = None
        """`TeacherClient` (on-policy distillation), started in `setup` when `spec.teacher` is set."""

    # ---- lifecycle ---------------------------------------------------------------------------
    async def setup(self) -> dict[str, Any]:
        """Load the tokenizer, the datasets (bad rows per `data.on_error`) and the reward runners.

        Raises:
            DataError, RewardLoadError: bad data or reward, with file/row or reference named.
        """
        from transformers import AutoTokenizer

        spec, r = self.spec, self.spec.rollout
        self.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer_path or spec.model_path)
        if spec.teacher is not None:  # before the engines: a wrong teacher fails the start-up at once
            from slime_rl.rollout.teacher import check_same_tokenizer, start_teacher

            check_same_tokenizer(spec.teacher.path, spec.tokenizer_path or spec.model_path)
            self.teacher = start_teacher(spec.teacher, name=f"{spec.engine_prefix.removesuffix('-engine')}-teacher"
                                         if spec.launch is not None else None, use_ray=spec.launch is not None)
            await self.teacher.load()
        await self.fleet.start(wait=True, timeout_s=r.engine_start_timeout_s)
        limit = await self._model_len()
        self.max_prompt_tokens = r.max_prompt_tokens or max(0, limit - r.max_new_tokens) if limit else r.max_prompt_tokens
        train_path = spec.data.train_path
        if spec.corrupt_rows:
            import tempfile

            from slime_rl.rollout.faults import corrupt_jsonl

            train_path = corrupt_jsonl(train_path, spec.corrupt_rows, tempfile.mkdtemp(prefix="slime-faults-"))
        self.train_data = PromptDataset.load(
            train_path, spec.data, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens, seed=spec.seed, name="train"
        )
        if spec.data.eval_path:
            self.eval_data = PromptDataset.load(
                spec.data.eval_path, spec.data, self.tokenizer, max_prompt_tokens=self.max_prompt_tokens, seed=spec.seed, name="eval"
            )
        self.cursor = DatasetCursor(len(self.train_data), seed=spec.seed, shuffle=spec.data.shuffle)
        self.runner = RewardRunner.from_config(spec.reward, base_dir=spec.base_dir, faults=spec.reward_faults)
        self.eval_runner = RewardRunner.from_config(spec.reward, base_dir=spec.base_dir)
        from slime_rl.rollout.episodes import build_episodes

        self.episodes = await build_episodes(
            r, self.tokenizer, self.pool, self.sampling, seed_fn=lambda key: request_seed(spec.seed, key),
            max_model_len=limit, base_dir=spec.base_dir, model_name=Path(spec.model_path).name,
        )
        self.groups = GroupRunner(
            r, spec.seed, self.pool, self.admission, self.runner, self.filter, self.stats, self.tokenizer, self.sampling,
            self.tracer, self.episodes, on_kept=self._finished_event.set, on_slot_free=self._ledger_changed,
            on_generated=self.watch.finished,
            stopping=lambda: self._stopping, teacher=self.teacher,
        )
        return {
            "train_prompts": len(self.train_data),
            "eval_prompts": len(self.eval_data) if self.eval_data else 0,
            "skipped_rows": dict(self.train_data.skipped),
            "max_prompt_tokens": self.max_prompt_tokens,
        }

    async def _model_len(self) -> int:
        """The engines' context limit (prompt + response), from an engine, else the config."""
        if self.pool.slots:
            return int((await self.pool.slots[0].client.info()).get("max_model_len") or 0)
        if self.spec.rollout.max_model_len:
            return self.spec.rollout.max_model_len
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(self.spec.model_path), "max_position_embeddings", 0) or 0)

    async def start(self) -> None:
        """Start admitting and generating (returns at once)."""
        if self._loops:
            return
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._admit_loop()), loop.create_task(self._put_loop()),
                       loop.create_task(self.watch.run())]
        for t in self._loops:
            t.add_done_callback(self._loop_done)

    def _loop_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            logger.error("rollout manager stopped: %s: %s", type(error).__name__, error)
            self._error = error
        self._stopping = True
        self._wake.set()

    async def check(self) -> dict[str, int]:
        """Raise the error that stopped the rollout side, if any; else a liveness summary
        (`engines_up` may be 0 for a while: lost engines are replaced as capacity allows)."""
        try:
            self.fleet.check()
        except Exception as e:
            self._fail(e)
        if self._error is not None:
            raise RolloutError(f"rollout side failed: {type(self._error).__name__}: {self._error}") from self._error
        return {"in_flight": self.admission.in_flight, "engines_up": self.pool.num_serving,
                "engines_target": self.fleet.target, "engines_need_weights": len(self.pool.needs_weights()),
                "engines_lost": self.fleet.lost, "fleet_changes": self.fleet.changes,
                "groups_generated": self.groups.generated if self.groups else 0,
                "groups_kept": self.groups.kept if self.groups else 0}

    def _engine_lost(self, slot: EngineSlot, record: Any) -> None:
        """An engine's actor is gone (called before any of its groups is requeued: each requeues
        itself, at the front of the queue, as its call fails)."""
        groups = [w.group_id for w in self.admission if w.engine == slot.name and w.state.value == "running"]
        where = f"node {record.node_ip} ({(record.node_id or '?')[:12]})" if record is not None else "an unknown node"
        logger.warning(
            "rollout engine %s lost on %s: %d group(s) go back to the queue%s; %d engine(s) serving, target %d",
            slot.name, where, len(groups), f" ({', '.join(groups[:4])}{'…' if len(groups) > 4 else ''})" if groups else "",
            self.pool.num_serving, self.fleet.target,
        )
        self._wake.set()

    def scale(self, num_engines: int) -> dict[str, Any]:
        """Change the number of engines of the running rollout side (new ones load the current
        weights before they take work; removed ones finish their groups first)."""
        self.fleet.set_target(num_engines)
        return self.fleet.info()

    def fleet_info(self) -> dict[str, Any]:
        return self.fleet.info()

    def sync_members(self) -> list[str]:
        """Engines a weight update must reach (serving, waiting for weights, or draining)."""
        return [s.name for s in self.pool.slots if s.state.value in ("up", "waiting", "draining")]

    async def stop(self) -> None:
        """Stop admitting, drop work in flight (it is not trained), shut the engines this side
        started down, close the reward runners."""
        self._stopping = True
        self._wake.set()
        for t in [*self._loops, *self._tasks]:
            t.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        await self.fleet.stop(graceful=True)
        if self.episodes is not None:
            await self.episodes.close()
        if self.teacher is not None:
            await self.teacher.close()
        for runner in (self.runner, self.eval_runner):
            if runner is not None:
                await runner.aclose()

    # ---- admission -----------------------------------------------------------------------------
    def _next_work(self) -> GroupWork | None:
        """The first queued group (requeued ones keep their slot and go first), else a new
        group from the dataset if a slot is free, else None."""
        queued = self.admission.next_queued()
        if queued is not None:
            return queued
        if self.admission.free_slots == 0:
            return None
        idx, epoch = self.cursor.next()
        prompt = self.train_data[idx]
        return self.admission.admit(f"{prompt.uid}-e{epoch}", idx, epoch, prompt)

    async def _admit_loop(self) -> None:
        n = self.spec.rollout.n_samples_per_prompt
        while not self._stopping:
            slot = self.pool.pick(n)
            work = self._next_work() if slot is not None else None
            if work is None:
                self._wake.clear()
                self.pool.changed.clear()
                waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(self.pool.changed.wait())]
                try:
                    await asyncio.wait(waiters, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                continue
            self.admission.start(work, slot.name)
            self.tracer.instant("admit", group_id=work.group_id, prompt=work.prompt.uid, engine=slot.name,
                                attempt=work.attempts)
            self.tracer.counter("groups_in_flight", self.admission.in_flight)
            slot.add(n)
            task = asyncio.get_running_loop().create_task(self.groups.run(work, slot))
            self._tasks.add(task)
            task.add_done_callback(self._group_done)

    def _group_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())

    async def _put_loop(self) -> None:
        while True:
            await self._finished_event.wait()
            self._finished_event.clear()
            async with self._put_lock:
                ready = self.admission.take_finished()
                if not ready:
                    continue
                t0 = time.monotonic()
                batch = samples_to_batch([s for w in ready for s in w.samples])
                await self.buffer.put(batch)
                self.tracer.complete("put", t0, time.monotonic(), track="buffer", groups=len(ready),
                                     group_ids=[w.group_id for w in ready], samples=batch.num_rows)
                self.admission.accept(ready)
            self._ledger_changed()

    # ---- weights, eval, metrics --------------------------------------------------------------
    async def update_weights(
        self, version: int, buckets: Sequence[Any], per_engine: Mapping[str, Sequence[Any]] | None = None
    ) -> dict[str, float]:
        """Load version `version` into every engine (generation goes on; in-flight requests follow
        `rollout.weight_update_mode`), then open the slots of that version. Returns timing metrics.
        `per_engine[name]` gives that engine its own buckets (collective transport)."""
        await self.check()
        async with self._version_lock:  # never while an evaluation pins the current version
            t0 = time.monotonic()
            if self.spec.delay_weight_sync_s and self.spec.delay_weight_sync_at_step in (0, version):
                logger.warning("faults.delay_weight_sync_s: holding version %d back %.1f s", version,
                               self.spec.delay_weight_sync_s)
                await asyncio.sleep(self.spec.delay_weight_sync_s)
            per_engine = await self.pool.update_weights(
                version, buckets, self.spec.rollout.weight_update_mode, per_engine=per_engine
            )
            seconds = time.monotonic() - t0
        for name, secs in per_engine.items():
            if secs == secs:
                self.tracer.complete("update_weights", t0, t0 + secs, track=name, version=version, engine=name)
        counts = await self.buffer.counts()
        self.admission.set_dropped(counts.dropped_groups)
        self.admission.set_engine_version(version)
        self._wake.set()
        finite = [t for t in per_engine.values() if t == t]
        self._last_update = {
            "rollout/weight_update_s": seconds,
            "rollout/weight_update_engine_max_s": max(finite, default=float("nan")),
            "rollout/engine_version": float(version),
        }
        return dict(self._last_update)

    def _ledger_changed(self) -> None:
        self._left_ledger.set()
        self._wake.set()

    async def wait_due(self, trainer_version: int, timeout_s: float) -> int:
        """Wait (at most `timeout_s`) until no group the trainer must take at `trainer_version` is
        still in flight (`Admission.due`); returns how many still are (0: take the batch)."""
        deadline = time.monotonic() + timeout_s
        while True:
            due = self.admission.due(trainer_version)
            left = deadline - time.monotonic()
            if not due or left <= 0 or self._error is not None:
                return len(due)
            self._left_ledger.clear()
            try:
                await asyncio.wait_for(self._left_ledger.wait(), left)
            except asyncio.TimeoutError:
                pass

    def open_slots(self, version: int) -> None:
        """Advance admission as if the engines held `version` without loading weights
        (rollout-only runs, where no trainer produces new weights)."""
        self.admission.set_engine_version(version)
        self._wake.set()

    async def evaluate(self) -> dict[str, float]:
        """Greedy accuracy (and pass@k) on the eval split, pinned to the engines' current version.

        Runs beside training generation; weight updates wait until it ends. Returns `eval/...`
        metrics with `eval/version`.
        """
        if self.eval_data is None:
            return {}
        await self.check()
        async with self._version_lock:
            with self.tracer.span("eval", version=self.admission.engine_version):
                return await evaluate_prompts(
                    self.pool, self.eval_data, self.spec.eval, self.tokenizer, self.eval_runner, seed=self.spec.seed,
                    episodes=self.episodes if self.episodes is not None and self.episodes.replaces_generation else None,
                )

    async def metrics(self) -> dict[str, float]:
        """The window's rollout and reward metrics (resets the window)."""
        await self.check()
        try:
            reward = self.runner.end_step(check=True)
        except Exception as e:
            self._fail(e)
            raise
        busy, now = self.pool.busy_seconds(), time.monotonic()
        idle = []
        for slot in self.pool.slots:  # each engine's idle share of the part of the window it existed
            window = max(now - max(self._window_start, slot.added_at), 1e-9)
            idle.append(1.0 - min(1.0, (busy[slot.name] - self._busy_mark.get(slot.name, 0.0)) / window))
        out = self.stats.reduce(self.admission.in_flight, idle)
        self._busy_mark, self._window_start = busy, now
        out.update(self.watch.metrics())
        out["rollout/num_engines"] = float(self.pool.num_serving)
        self.tracer.counter("engines_serving", self.pool.num_serving)
        out["rollout/engines_target"] = float(self.fleet.target)
        out["rollout/engines_lost"] = float(self.fleet.lost)
        out.update({k if k.startswith("reward/") else f"reward/{k}": v for k, v in reward.metrics().items()})
        out.update(self._last_update)
        if self.teacher is not None:
            out.update(self.teacher.metrics())
        out["data/skipped_rows"] = float(sum(self.train_data.skipped.values()))
        out["data/epoch"] = float(self.cursor.epoch)
        out["rollout/admission_limit"] = float(self.admission.limit)
        out["rollout/accepted_groups"] = float(self.admission.accepted)
        return out

    # ---- checkpoint ----------------------------------------------------------------------------
    async def snapshot(self, folder: str) -> dict[str, Any]:
        """A consistent checkpoint of the rollout side: the buffer's groups (saved under `folder`),
        the dataset cursor, the admission counts and the groups admitted but not yet in the buffer
        (re-dispatched on restore). No put runs while it is taken."""
        async with self._put_lock:
            path = await self.buffer.save(str(Path(folder) / "buffer"))
            return {
                "buffer": path,
                "cursor": self.cursor.state_dict(),
                "admission": self.admission.state_dict(),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from `snapshot` state (the buffer is restored separately); groups that were in
        flight are generated again first, under the same group ids."""
        self.cursor.load_state_dict(state["cursor"])
        admission = dict(state["admission"])
        admission.setdefault("in_flight", state.get("in_flight", []))  # checkpoints before the ledger
        self.admission.load_state_dict(admission, self.train_data.__getitem__)
        self._wake.set()


def _kill_engine(client: Any) -> None:
    """End a stalled engine's actor (Ray actors); in-process engines cannot be killed."""
    handle = getattr(client, "handle", None)
    if handle is None:
        logger.warning("%s is stalled but is not a Ray actor: it cannot be killed", getattr(client, "name", "?"))
        return
    import ray

    ray.kill(handle, no_restart=True)
