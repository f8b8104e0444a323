"""The whole asynchronous RL loop in one file, without Ray: the runnable version of docs/design.md.

    python examples/minimal_loop.py artifacts/tiny --steps 30      # after `make demo` built the tiny model

    rollout task (asyncio):  dataset ─► admission: committed < (S + w + 1)·B ─► engine.generate_many
                             ─► build_sample ─► reward ─► buffer.put ─► (wakes the trainer)
    trainer loop (asyncio):  buffer.get_batch(B, v, S) ─► train_step (a thread) ─► v += 1
                             ─► engine.update_weights(v) ─► w = v (opens the next slots)

The engine decodes on its own thread and the train step runs in another, so generation goes on
while the trainer trains: that overlap is what `slime-rl train` scales out with Ray actors,
placement groups, a buffer actor and weight-sync transports. Same pieces, same rule: the
hf engine, `Admission`, `ReplayBuffer`, `TrainerCore`, `RewardRunner`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path

from slime_rl.buffers import BufferConfig, ReplayBuffer, samples_to_batch
from slime_rl.rewards.config import RewardConfig
from slime_rl.rewards.runner import RewardRunner
from slime_rl.rollout.admission import Admission
from slime_rl.rollout.config import DataConfig
from slime_rl.rollout.cursor import DatasetCursor
from slime_rl.rollout.data import PromptDataset
from slime_rl.rollout.engines import GenerateRequest, SamplingParams, create_engine
from slime_rl.rollout.samples import build_sample
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from transformers import AutoTokenizer


@dataclasses.dataclass
class LoopResult:
    steps: int
    rewards: list[float]
    """Mean reward of each trained batch."""
    staleness_max: int
    """Largest `trainer_version - policy_version` among trained samples."""
    engine_version: int
    seconds: float


async def run(model_dir: str, train_path: str, *, steps: int = 30, groups: int = 4, group_size: int = 8,
              max_staleness: int = 1, lr: float = 5e-5, max_new_tokens: int = 48, seed: int = 0) -> LoopResult:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = PromptDataset.load(train_path, DataConfig(train_path=train_path), tokenizer, seed=seed, name="train")
    cursor = DatasetCursor(len(data), seed=seed)
    admission = Admission(global_batch_groups=groups, max_staleness=max_staleness)
    buffer = ReplayBuffer(BufferConfig(max_staleness=max_staleness), group_size=group_size)
    reward = RewardRunner.from_config(RewardConfig())  # math_answer: 1 when the final answer equals the label
    engine = create_engine("hf", model_dir, num_threads=1, max_batch_size=64)
    trainer = TrainerCore(TrainerConfig(lr=lr, global_batch_groups=groups, num_threads=1), model_dir)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
    slot_freed = asyncio.Event()

    async def one_group() -> None:  # admitted -> generated -> scored -> put
        idx, epoch = cursor.next()
        prompt = data[idx]
        work = admission.admit(f"{prompt.uid}-e{epoch}", idx, epoch, prompt)
        admission.start(work, "engine-0")
        requests = [GenerateRequest(f"{work.group_id}/{i}", prompt.prompt_ids, dataclasses.replace(sampling, seed=seed + i))
                    for i in range(group_size)]
        t0 = time.monotonic()
        results = await engine.generate_many(requests)
        samples = [build_sample(prompt, r, group_id=work.group_id, index=i, tokenizer=tokenizer,
                                temperature=sampling.temperature, gen_seconds=time.monotonic() - t0)
                   for i, r in enumerate(results)]
        await reward.score(samples)
        admission.finish(work, samples)
        await asyncio.to_thread(buffer.put, samples_to_batch(samples))
        admission.accept([work])

    async def rollout() -> None:  # the admit loop: as many groups in flight as the rule allows
        tasks: set[asyncio.Task] = set()
        failed: list[BaseException] = []

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                failed.append(task.exception())
                slot_freed.set()

        while not failed:
            while admission.free_slots:
                task = asyncio.create_task(one_group())
                tasks.add(task)
                task.add_done_callback(done)
                await asyncio.sleep(0)  # let it take its slot
            slot_freed.clear()
            await slot_freed.wait()
        raise failed[0]

    producer = asyncio.create_task(rollout())
    rewards, staleness_max, t_start = [], 0, time.monotonic()
    try:
        for _ in range(steps):
            table = None
            while table is None:  # poll, so a failed rollout side stops the loop at once
                if producer.done():
                    producer.result()  # raises the rollout side's error
                try:
                    table = await asyncio.to_thread(buffer.get_batch, groups, trainer.version, max_staleness, 1.0)
                except TimeoutError:
                    pass
            staleness_max = max(staleness_max, trainer.version - min(table.column("policy_version").to_pylist()))
            metrics = await asyncio.to_thread(trainer.train_step, table)  # generation goes on meanwhile
            buckets = list(trainer.iter_weight_buckets(256 << 20))
            await engine.update_weights(trainer.version, buckets)  # in-flight requests continue on new weights
            admission.set_engine_version(trainer.version)
            slot_freed.set()
            rewards.append(metrics["train/reward_mean"])
            print(f"step {trainer.step:3d}  reward {rewards[-1]:.3f}  staleness≤{staleness_max}  "
                  f"loss {metrics['train/loss']:+.4f}  {time.monotonic() - t_start:6.1f} s", flush=True)
    finally:
        producer.cancel()
        await engine.shutdown()
        await reward.aclose()
    return LoopResult(trainer.step, rewards, staleness_max, engine.version, time.monotonic() - t_start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", help="an HF model folder built by `slime-rl make-tiny-model` (e.g. artifacts/tiny)")
    p.add_argument("--train", default=None, help="prompts JSONL (default: <model_dir>/data/train.jsonl)")
    p.add_argument("--steps", type=int, default=30)
    args = p.parse_args()
    train = args.train or str(Path(args.model_dir) / "data" / "train.jsonl")
    result = asyncio.run(run(args.model_dir, train, steps=args.steps))
    first, last = result.rewards[: 5], result.rewards[-5:]
    print(f"{result.steps} steps in {result.seconds:.0f} s: reward {sum(first) / len(first):.3f} (first 5 steps) -> "
          f"{sum(last) / len(last):.3f} (last 5); staleness at most {result.staleness_max}")


if __name__ == "__main__":
    main()
