"""The rollout manager in one process (hf engine on the tiny model, in-process buffer, no Ray)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch
from slime_rl.buffers import BufferConfig, ReplayBuffer, batch_to_samples, validate_batch
from slime_rl.rewards.config import RewardConfig
from slime_rl.rollout.clients import LocalBufferClient, LocalEngineClient
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.rollout.engines import create_engine
from slime_rl.rollout.manager import ManagerSpec, RolloutManager

pytestmark = pytest.mark.timeout(300)

REWARD = '''
def parity(sample):
    """Varies within a group (so no group is all-equal), deterministic per response."""
    return float(sum(sample.response_ids) % 2)
'''


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rollout_data")
    rows = [{"prompt": f"What is {i} + {i % 7}?", "label": str(i + i % 7), "mode": "think" if i % 2 else "non_think"} for i in range(40)]
    (d / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (d / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    (d / "reward.py").write_text(REWARD)
    return d


def _spec(data_dir: Path, model_dir: Path, *, S: int = 1, B: int = 2, n: int = 4, **rollout) -> ManagerSpec:
    r = RolloutConfig(engine="hf", n_samples_per_prompt=n, max_new_tokens=rollout.pop("max_new_tokens", 6),
                      cpu_threads=1, max_batch_size=64, **rollout)
    return ManagerSpec(
        rollout=r,
        data=DataConfig(train_path=str(data_dir / "train.jsonl"), eval_path=str(data_dir / "eval.jsonl")),
        reward=RewardConfig(fn=f"{data_dir / 'reward.py'}:parity"),
        eval=EvalConfig(max_prompts=6, max_new_tokens=6),
        model_path=str(model_dir), global_batch_groups=B, max_staleness=S, seed=0,
    )


async def _make(spec: ManagerSpec, model_dir: Path, capacity: int = 64) -> tuple[RolloutManager, ReplayBuffer]:
    engine = create_engine("hf", model_dir, num_threads=1, max_batch_size=64)
    buf = ReplayBuffer(BufferConfig(capacity_groups=capacity, max_staleness=spec.max_staleness), group_size=spec.rollout.n_samples_per_prompt)
    m = RolloutManager(spec, [LocalEngineClient(engine)], LocalBufferClient(buf))
    await m.setup()
    return m, buf


async def _wait_for(pred, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def _stop(m: RolloutManager) -> None:
    await m.stop()
    for slot in m.pool.slots:
        await slot.client.engine.shutdown()


def _weights(model_dir: Path) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict().items())


def test_fills_the_buffer_up_to_the_admission_limit(data_dir: Path, tiny_model_dir: Path) -> None:
    async def main() -> None:
        m, buf = await _make(_spec(data_dir, tiny_model_dir, S=1, B=2), tiny_model_dir)
        await m.start()
        await _wait_for(lambda: len(buf) == 4)  # (S + 0 + 1) * B groups, then admission stops
        await asyncio.sleep(0.5)
        assert len(buf) == 4 and m.admission.in_flight == 0
        table = buf.get_batch(4, trainer_version=0, timeout=1)
        validate_batch(table)
        samples = batch_to_samples(table)
        by_group: dict[str, list] = {}
        for s in samples:
            by_group.setdefault(s.group_id, []).append(s)
        assert len(by_group) == 4 and all(len(g) == 4 for g in by_group.values())
        for s in samples:
            assert s.status in ("completed", "truncated") and s.policy_version == 0
            assert len(s.response_logprobs) == len(s.response_ids) and all(lp <= 0 for lp in s.response_logprobs)
            assert s.metadata["prompt_uid"].startswith("train-") and "reward_metrics" in s.metadata
        metrics = await m.metrics()
        assert metrics["rollout/groups"] == 4 and metrics["rollout/samples"] == 16
        assert 0 <= metrics["rollout/engine_idle_frac"] <= 1 and "reward/parity/score_mean" in metrics
        await _stop(m)

    asyncio.run(main())


def test_zero_staleness_trains_only_current_version_tokens(data_dir: Path, tiny_model_dir: Path, tiny_model_dir_b: Path) -> None:
    weights = [_weights(tiny_model_dir_b), _weights(tiny_model_dir)]

    async def main() -> None:
        m, buf = await _make(_spec(data_dir, tiny_model_dir, S=0, B=2), tiny_model_dir)
        await m.start()
        for version in range(3):
            table = await asyncio.to_thread(buf.get_batch, 2, version, 0, 60)
            for s in batch_to_samples(table):
                assert set(s.token_versions) <= {version} and s.policy_version == version == s.policy_version_end
            update = await m.update_weights(version + 1, [weights[version % 2]])
            assert update["rollout/engine_version"] == version + 1
        assert buf.stats()["buffer/dropped_stale"] == 0
        await _stop(m)

    asyncio.run(main())


@pytest.mark.parametrize("mode", ["keep", "abort"])
def test_weight_update_during_generation(data_dir: Path, tiny_model_dir: Path, tiny_model_dir_b: Path, mode: str) -> None:
    weights = _weights(tiny_model_dir_b)

    async def main() -> None:
        spec = _spec(data_dir, tiny_model_dir, S=2, B=4, n=8, max_new_tokens=48, weight_update_mode=mode)
        m, buf = await _make(spec, tiny_model_dir)
        await m.start()
        await asyncio.sleep(0.3)  # requests are mid-generation
        await m.update_weights(1, [weights])
        await _wait_for(lambda: len(buf) >= 8, timeout=120)
        await _stop(m)
        samples = batch_to_samples(buf.get_batch(len(buf), trainer_version=1, timeout=1))
        mixed = [s for s in samples if s.policy_version < s.policy_version_end]
        assert mixed, "no sample straddled the update"
        for s in samples:
            changes = sum(a != b for a, b in zip(s.token_versions, s.token_versions[1:]))
            assert changes <= 1 and s.token_versions == sorted(s.token_versions)
            assert s.status != "aborted"  # abort mode resumes the partial response after the update
        for s in mixed:
            assert s.token_versions[0] == 0 and s.token_versions[-1] == 1
            if mode == "abort":
                assert s.metadata["pieces"] >= 2

    asyncio.run(main())


def test_evaluate_is_tagged_with_the_version(data_dir: Path, tiny_model_dir: Path, tiny_model_dir_b: Path) -> None:
    async def main() -> None:
        m, _ = await _make(_spec(data_dir, tiny_model_dir), tiny_model_dir)
        out = await m.evaluate()
        assert out["eval/version"] == 0 and out["eval/num_prompts"] == 6
        assert 0 <= out["eval/accuracy"] <= 1 and "eval/accuracy/think" in out and "eval/accuracy/non_think" in out
        await m.update_weights(5, [_weights(tiny_model_dir_b)])
        assert (await m.evaluate())["eval/version"] == 5
        await _stop(m)

    asyncio.run(main())


def test_snapshot_and_restore_redispatch_groups_in_flight(data_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        m, buf = await _make(_spec(data_dir, tiny_model_dir, S=1, B=2), tiny_model_dir)
        await m.start()
        await asyncio.sleep(0.2)
        state = await m.snapshot(str(tmp_path / "ck"))
        await _stop(m)
        held = set(buf.group_ids())
        in_flight = {entry[0] for entry in state["admission"]["in_flight"]}
        assert len(held) + len(in_flight) == 4 and not held & in_flight

        m2, buf2 = await _make(_spec(data_dir, tiny_model_dir, S=1, B=2), tiny_model_dir)
        buf2.load(state["buffer"])
        m2.restore(state)
        await m2.start()
        await _wait_for(lambda: len(buf2) == 4)
        assert set(buf2.group_ids()) == held | in_flight  # same ids, none lost, none new
        await _stop(m2)

    asyncio.run(main())
