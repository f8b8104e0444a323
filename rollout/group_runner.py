"""One admitted group's life on the rollout side (the "group task" of docs/design.md).

    GroupRunner.run(work, slot):
        engine.generate_group(n requests) ─► responses aborted by a weight update continue as new
        pieces (same seed stream) ─► build_sample ─► RewardRunner.score ─► filter
            (trainer.distill: the teacher scores the tokens beside the reward, or after the filter
             kept the group when a filter is set: rollout/teacher.py)
            ─┬─ keep: admission.finish (FINISHED; the put loop takes it)
             ├─ drop: admission.release (slot freed; a replacement is admitted)
             └─ engine lost: admission.requeue (QUEUED at the front, same id, same slot)
        (rollout.environment / generate_fn / agent_fn: rollout/episodes.py makes the samples)

Every stage is a span on the run's timeline (`slime_rl.tracing`): generate on the engine's track,
score and filter on the manager's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from slime_rl.rollout.admission import Admission, GroupWork
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engine_pool import EngineLostError, EnginePool, EngineSlot
from slime_rl.rollout.engines.base import FinishReason, GenerateRequest, SamplingParams
from slime_rl.rollout.filters import GroupFilter, reward_std
from slime_rl.rollout.samples import build_sample, merge_results
from slime_rl.rollout.stats import RolloutStats

logger = logging.getLogger(__name__)

MAX_PIECES = 64
"""Most continuations of one response (each weight update in abort mode adds one)."""


class GroupError(RuntimeError):
    """A group failed for a reason other than a lost engine; names the group and the engine."""


def request_seed(run_seed: int, request_key: str) -> int:
    """A per-request sampling seed: the same run seed and request give the same tokens."""
    digest = hashlib.blake2b(f"{run_seed}:{request_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclasses.dataclass
class GroupRunner:
    """Runs admitted groups; owned by the `RolloutManager`, which gives it what it needs."""

    rollout: Any
    """The `rollout` config section."""
    seed: int
    pool: EnginePool
    admission: Admission
    reward: Any
    """`RewardRunner` of the training samples."""
    filter: GroupFilter
    stats: RolloutStats
    tokenizer: Any
    sampling: SamplingParams
    tracer: Any
    episodes: Any = None
    """Episodes runner that replaces per-request generation (agent loop, generate_fn, agent_fn)."""
    on_generated: Callable[[float], None] = lambda seconds: None
    """Called with each group's generation seconds (the stall watch's yardstick)."""
    on_kept: Callable[[], None] = lambda: None
    on_slot_free: Callable[[], None] = lambda: None
    stopping: Callable[[], bool] = lambda: False
    teacher: Any = None
    """`TeacherClient` of on-policy distillation (rollout/teacher.py): fills `teacher_logprobs`."""
    generated: int = 0
    """Groups generated and scored (whole run)."""
    kept: int = 0
    """Of those, groups the filter kept."""
    _drop_streak: int = 0
    _warned_filter: bool = False

    def sampling_for(self, prompt: Prompt) -> SamplingParams:
        by_mode = getattr(self.rollout, "max_new_tokens_by_mode", None) or {}
        if prompt.mode in by_mode:
            return dataclasses.replace(self.sampling, max_new_tokens=int(by_mode[prompt.mode]))
        return self.sampling

    async def generate(self, slot: EngineSlot, work: GroupWork, n: int, sampling: SamplingParams) -> list[Any]:
        """Generate `n` responses; responses aborted by a weight update continue where they stopped."""
        pieces: list[list[Any]] = [[] for _ in range(n)]
        pending = list(range(n))
        attempt = 0
        while pending:
            requests = []
            for i in pending:
                done = [t for p in pieces[i] for t in p.token_ids]
                key = f"{work.group_id}/{i}/{attempt}"
                params = dataclasses.replace(
                    sampling, max_new_tokens=sampling.max_new_tokens - len(done), seed=request_seed(self.seed, key)
                )
                requests.append(GenerateRequest(key, [*work.prompt.prompt_ids, *done], params))
            t0 = time.monotonic()
            work.request_ids = [r.request_id for r in requests]
            results = await slot.client.generate_group(requests)
            self.tracer.complete("generate", t0, time.monotonic(), track=slot.name, group_id=work.group_id,
                                 engine=slot.name, tokens=sum(len(r.token_ids) for r in results), attempt=attempt)
            again = []
            for i, res in zip(pending, results):
                pieces[i].append(res)
                produced = sum(len(p.token_ids) for p in pieces[i])
                resumable = res.finish_reason is FinishReason.ABORT and produced < sampling.max_new_tokens
                if resumable and not self.stopping() and attempt + 1 < MAX_PIECES:
                    again.append(i)
            pending = again
            attempt += 1
        return [merge_results(p) for p in pieces]

    async def run(self, work: GroupWork, slot: EngineSlot) -> None:
        n = self.rollout.n_samples_per_prompt
        sampling = self.sampling_for(work.prompt)
        t0 = time.monotonic()
        episodes = self.episodes if self.episodes is not None and self.episodes.replaces_generation else None
        try:
            if episodes is not None:  # the one hook: rollout/episodes.py makes the group's samples
                samples = await episodes.run_group(slot.client, work.prompt, work.group_id, n, sampling,
                                                   {"engine": slot.name, "epoch": work.epoch})
                self.tracer.complete("generate", t0, time.monotonic(), track=slot.name, group_id=work.group_id,
                                     engine=slot.name, tokens=sum(len(s.response_ids) for s in samples))
            else:
                merged = await self.generate(slot, work, n, sampling)
        except EngineLostError:
            self.pool.release(slot, n)
            self.pool.mark_down(slot)
            self.admission.requeue(work)
            self.stats.requeued += 1
            self.tracer.instant("requeue", group_id=work.group_id, engine=slot.name)
            self.on_slot_free()
            return
        except Exception as e:
            self.pool.release(slot, n)
            raise GroupError(f"group {work.group_id} on {slot.name}: {type(e).__name__}: {e}") from e
        self.pool.release(slot, n)
        gen_s = time.monotonic() - t0
        self.on_generated(gen_s)
        if episodes is None:
            samples = [
                build_sample(work.prompt, m, group_id=work.group_id, index=i, tokenizer=self.tokenizer,
                             temperature=sampling.temperature, gen_seconds=gen_s,
                             extra_metadata={"engine": slot.name, "epoch": work.epoch})
                for i, m in enumerate(merged)
            ]
        t1 = time.monotonic()
        teach_now = self.teacher is not None and self.filter.is_noop  # no filter: nothing is scored in vain
        if teach_now:
            await asyncio.gather(self.reward.score(samples), self._teach(samples, work))
        else:
            await self.reward.score(samples)
        t2 = time.monotonic()
        self.tracer.complete("score", t1, t2, group_id=work.group_id, samples=len(samples))
        keep, reason = (True, "kept") if self.filter.is_noop else self.filter(samples)
        self.tracer.complete("filter", t2, time.monotonic(), group_id=work.group_id, kept=keep, reason=reason)
        if keep and self.teacher is not None and not teach_now:
            await self._teach(samples, work)
        self.stats.add_group(samples, kept=keep, reason=reason, zero_std=reward_std(samples) == 0.0, gen_s=gen_s,
                             reward_s=t2 - t1)
        self.generated += 1
        self.kept += keep
        if keep:
            self._drop_streak = 0
            self.admission.finish(work, samples)
            self.on_kept()
        else:
            self.admission.release(work)
            self._note_drop(reason)
            self.on_slot_free()

    async def _teach(self, samples: list[Any], work: GroupWork) -> None:
        t0 = time.monotonic()
        await self.teacher.fill(samples, work.group_id)
        self.tracer.complete("teacher", t0, time.monotonic(), group_id=work.group_id, samples=len(samples))

    def _note_drop(self, reason: str) -> None:
        self._drop_streak += 1
        if self._drop_streak >= self.rollout.filter_warn_after and not self._warned_filter:
            self._warned_filter = True
            logger.warning(
                "rollout.filter=%s dropped the last %d groups in a row (latest reason: %s): the reward is probably the "
                "same for every sample (check the reward function and the labels), or the task is far too easy or hard "
                "for the model; the trainer waits until enough groups pass", self.filter.ref, self._drop_streak, reason,
            )
