"""EngineActor end to end (hf backend): concurrent generation, bucketed/ObjectRef weight
updates from a publisher, timeouts that name the actor, health and shutdown."""

from __future__ import annotations

import pytest
import ray
from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engines import FinishReason, GenerateRequest, PauseMode, SamplingParams
from slime_rl.rollout.engines.actor import (
    ActorClient,
    start_engine_actor,
    start_engine_actor_from_config,
)
from slime_rl.rollout.engines.conformance import (
    check_logprobs_match,
    load_reference,
    make_prompts,
    wait_for_tokens,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model_dir_b):
    return {"a": load_reference(tiny_model_dir), "b": load_reference(tiny_model_dir_b)}


@pytest.fixture(scope="module")
def client(ray_cluster, tiny_model_dir):
    handle = start_engine_actor(
        "hf",
        tiny_model_dir,
        name="test-engine-actor",
        num_cpus=0,
        num_threads=1,
        weight_update_timeout_s=1.0,
    )
    c = ActorClient(handle, timeout_s=120)
    yield c
    c.close()


def test_concurrent_generation_through_the_actor(client, models):
    prompts = make_prompts(10, models["a"].config.vocab_size, seed=1)
    results = check_logprobs_match(client, models["a"], prompts, "actor")
    assert [r.request_id for r in results] == [f"actor-{i}" for i in range(10)]
    health = client.health()
    assert health.ok and health.backend == "hf" and health.num_running == 0


def test_update_weights_takes_a_state_dict_or_a_list_of_buckets(client, models):
    """The two bucket shapes a caller may send; each must land the full model."""
    prompts = make_prompts(3, models["a"].config.vocab_size, seed=2)
    items_b = list(models["b"].state_dict().items())
    items_a = list(models["a"].state_dict().items())
    h = client.handle
    # 1. one ObjectRef of a whole state dict
    assert ray.get(h.update_weights.remote(1, ray.put(dict(items_b))), timeout=60) == 1
    check_logprobs_match(client, models["b"], prompts, "ref-dict")
    # 2. a list of buckets (plain lists of (name, tensor))
    buckets = [items_a[i : i + 10] for i in range(0, len(items_a), 10)]
    assert ray.get(h.update_weights.remote(2, buckets), timeout=60) == 2
    check_logprobs_match(client, models["a"], prompts, "bucket-list")
    assert client.version() == 2


def test_update_timeout_names_actor_and_version(client, models):
    prompt = make_prompts(1, models["a"].config.vocab_size, seed=3)[0]
    long = SamplingParams(max_new_tokens=1000, ignore_eos=True)
    fut = client.submit_generate(GenerateRequest("long", prompt, long))
    wait_for_tokens(client, "long", 1)
    v = client.version()
    with pytest.raises(
        TimeoutError,
        match=rf"test-engine-actor.*version {v + 1}.*weight_update_timeout_s\); nothing was "
        rf"loaded: the engine keeps version {v}",
    ):
        client.update_weights(v + 1, models["a"].state_dict(), PauseMode.WAIT)  # waits for "long"
    assert client.version() == v and client.health().ok
    assert client.abort(["long"])[0].finish_reason is FinishReason.ABORT
    assert fut.result(timeout=30).finish_reason is FinishReason.ABORT
    assert client.update_weights(v + 1, models["a"].state_dict(), PauseMode.WAIT) == v + 1


def test_shutdown_ends_the_engine(ray_cluster, tiny_model_dir):
    cfg = RolloutConfig(engine="hf", cpu_threads=3, max_batch_size=4)
    c = ActorClient(start_engine_actor_from_config(cfg, tiny_model_dir, num_cpus=0), timeout_s=60)
    assert c.generate(GenerateRequest("x", [5, 6, 7], SamplingParams(max_new_tokens=2))).token_ids
    # rollout.cpu_threads reaches the thread that runs the model (Ray's default would be 1)
    assert ray.get(c.handle.torch_threads.remote(), timeout=30) == 3
    ray.get(c.handle.shutdown.remote(), timeout=60)
    health = c.health()
    assert not health.ok and health.detail == "shut down"
    with pytest.raises(ray.exceptions.RayTaskError, match="shut down"):
        c.generate(GenerateRequest("y", [5, 6]))
    c.close()


def test_generate_group_returns_an_error_result_for_a_bad_request(client, models):
    """One call per prompt group; a prompt too long for the context fails alone."""
    p = SamplingParams(max_new_tokens=3, ignore_eos=True, seed=2)
    reqs = [GenerateRequest("grp-0", [5, 6, 7], p), GenerateRequest("grp-1", list(range(3, 300)) * 4, p),
            GenerateRequest("grp-2", [9, 10], p)]  # fmt: skip
    ok0, bad, ok2 = ray.get(client.handle.generate_group.remote(reqs), timeout=60)
    assert [r.request_id for r in (ok0, bad, ok2)] == ["grp-0", "grp-1", "grp-2"]
    assert len(ok0.token_ids) == len(ok2.token_ids) == 3
    assert bad.finish_reason is FinishReason.ERROR and bad.token_ids == []
    assert "does not fit the model's 1024 positions" in bad.error
    info = ray.get(client.handle.tokenizer_info.remote(), timeout=30)
    assert info == {"max_model_len": 1024, "eos_token_id": [2]}


def test_update_weights_checks_versions_and_counts_of_weight_buckets(client, models):
    """The rollout manager's path: ObjectRefs of the trainer's WeightBuckets, in any order."""
    from slime_rl.trainer.weights import WeightBucket

    state = {k: t for k, t in models["b"].state_dict().items() if k != "lm_head.weight"}
    names = list(state)
    chunks = [names[i : i + 12] for i in range(0, len(names), 12)]
    v = client.version()
    h = client.handle

    def buckets(version: int, n: int | None = None) -> list[WeightBucket]:
        return [WeightBucket(version, i, n or len(chunks), c, [state[x] for x in c]) for i, c in enumerate(chunks)]

    wrong = buckets(v + 1)
    wrong[2] = buckets(v + 7)[2]
    with pytest.raises(ray.exceptions.RayTaskError, match=rf"bucket 2 .* holds weight version {v + 7}, expected {v + 1}"):
        ray.get(h.update_weights.remote(v + 1, [ray.put(b) for b in wrong]), timeout=60)
    short = buckets(v + 1)[:-1]
    with pytest.raises(ray.exceptions.RayTaskError, match=rf"version {v + 1} has \[{len(chunks)}\] buckets but {len(chunks) - 1} arrived"):
        ray.get(h.update_weights.remote(v + 1, [ray.put(b) for b in short]), timeout=60)
    assert client.version() == v
    refs = [ray.put(b) for b in reversed(buckets(v + 1))]  # staged by index, whatever the order
    assert ray.get(h.update_weights.remote(v + 1, refs, "keep"), timeout=60) == v + 1
    check_logprobs_match(client, models["b"], make_prompts(2, models["a"].config.vocab_size, seed=5), "from-refs")
