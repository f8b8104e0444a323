"""The `hf` reference engine: log-probs, weight updates, abort, sampling params, shutdown."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_helpers import gen, set_weights
from slime_rl.rollout.engines import (
    FinishReason,
    GenerateRequest,
    PauseMode,
    RolloutEngine,
    SamplingParams,
)
from slime_rl.rollout.engines.conformance import (
    LOGPROB_ATOL,
    check_abort_is_prefix,
    check_logprobs_match,
    check_sampling_filters,
    check_update_mid_request,
    check_update_mid_request_keeping_kv,
    load_reference,
    make_prompts,
    max_logprob_gap,
    wait_for_tokens,
)
from slime_rl.rollout.engines.sync import EngineRunner

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_model_dir_b):
    return {"a": load_reference(tiny_model_dir), "b": load_reference(tiny_model_dir_b)}


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    r = EngineRunner("hf", tiny_model_dir, num_threads=1, max_batch_size=16)
    r.weights = "a"  # which reference model the engine holds
    yield r
    r.close()


@pytest.fixture
def eng(runner, models):
    """The shared engine, holding model A."""
    set_weights(runner, models, "a")
    return runner


def test_logprobs_match_teacher_forcing(eng, models):
    assert isinstance(eng.engine, RolloutEngine)
    prompts = make_prompts(12, models["a"].config.vocab_size, seed=1)
    check_logprobs_match(eng, models["a"], prompts, "lp")
    filtered = dict(temperature=0.7, top_k=20, top_p=0.9)
    check_logprobs_match(eng, models["a"], prompts[:4], "lp-filtered", **filtered)


def test_update_weights_switches_to_model_b(eng, models):
    prompts = make_prompts(6, models["a"].config.vocab_size, seed=2)
    before = check_logprobs_match(eng, models["a"], prompts, "pre")
    v = eng.version()
    set_weights(eng, models, "b")
    assert eng.version() == v + 1
    after = check_logprobs_match(eng, models["b"], prompts, "post")
    assert any(x.token_ids != y.token_ids for x, y in zip(before, after)), (
        "new weights, same seeds: tokens should change"
    )
    assert all(r.token_versions == [v + 1] * len(r.token_ids) for r in after)


def test_partial_or_unknown_weights_are_refused(eng, models):
    sd = models["b"].state_dict()
    partial = {k: t for k, t in sd.items() if "layers.0." not in k}
    with pytest.raises(ValueError, match="full state dict"):
        eng.update_weights(99, partial)
    with pytest.raises(ValueError, match="not parameters of the model"):
        eng.update_weights(99, {**sd, "bogus.weight": torch.zeros(1)})
    assert eng.version() != 99


def test_bucketed_update_applies_the_whole_state_dict(eng, models):
    items = list(models["b"].state_dict().items())
    engine = eng.engine
    v = engine.version + 1
    assert eng.call(engine.update_weights(v, [items[i : i + 7] for i in range(0, len(items), 7)])) == v
    eng.weights = "b"
    check_logprobs_match(
        eng, models["b"], make_prompts(3, models["a"].config.vocab_size, seed=3), "bucketed"
    )


def test_update_mid_request_tags_tokens_with_versions(eng, models):
    prompt = make_prompts(1, models["a"].config.vocab_size, seed=4)[0]
    check_update_mid_request(eng, models["a"], models["b"], prompt, eng.version() + 1, "hf")
    eng.weights = "b"


def test_update_mid_request_keeping_the_kv_cache(tiny_model_dir, models):
    """`recompute_kv_on_update=False`: a request kept across the update goes on with the old
    weights' KV of its earlier tokens (the check fails if the engine recomputes it)."""
    r = EngineRunner("hf", tiny_model_dir, num_threads=1, max_batch_size=4, recompute_kv_on_update=False)
    try:
        prompt = make_prompts(1, models["a"].config.vocab_size, seed=4)[0]
        check_update_mid_request_keeping_kv(r, models["a"], models["b"], prompt, r.version() + 1, "hf")
    finally:
        r.close()


def test_update_in_abort_mode_returns_partials(eng, models):
    prompt = make_prompts(1, models["a"].config.vocab_size, seed=5)[0]
    fut = eng.submit_generate(
        GenerateRequest("ab", prompt, SamplingParams(max_new_tokens=400, ignore_eos=True))
    )
    wait_for_tokens(eng, "ab", 2)
    eng.update_weights(eng.version() + 1, models["b"].state_dict(), PauseMode.ABORT)
    eng.weights = "b"
    res = fut.result(timeout=60)
    assert res.finish_reason is FinishReason.ABORT and 2 <= len(res.token_ids) < 400


def test_abort_returns_prefix_of_same_seed_generation(eng, models):
    check_abort_is_prefix(
        eng, make_prompts(1, models["a"].config.vocab_size, seed=6)[0], "hf-abort"
    )


def test_sampling_params_are_honoured(eng, models):
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
    assert max_logprob_gap(models["a"], [GenerateRequest("x", p)], [greedy]) < LOGPROB_ATOL
    short = gen(eng, p, max_new_tokens=5, ignore_eos=True, seed=1)
    assert len(short.token_ids) == 5 and short.finish_reason is FinishReason.LENGTH
    s1, s2, s3 = (gen(eng, p, seed=s, max_new_tokens=30, ignore_eos=True) for s in (11, 11, 12))
    assert s1.token_ids == s2.token_ids and s1.token_ids != s3.token_ids
    # a stop token id ends generation at its first occurrence and is kept
    stop_id = greedy.token_ids[6]
    st = gen(eng, p, temperature=0.0, max_new_tokens=30, ignore_eos=True, stop_token_ids=[stop_id])
    first = greedy.token_ids.index(stop_id)
    assert st.token_ids == greedy.token_ids[: first + 1]
    assert st.finish_reason is FinishReason.STOP and st.stop_reason == stop_id


def test_sampling_filters_change_what_is_sampled(eng, models):
    p = make_prompts(1, models["a"].config.vocab_size, seed=17)[0]
    check_sampling_filters(eng, models["a"], p, "hf-filters")


@pytest.mark.gpu
def test_cuda_sampling_and_logprobs(tiny_model_dir, models):
    """On CUDA: tokens, generators and log-probs live on the logits' device (no CPU/CUDA mix)."""
    r = EngineRunner("hf", tiny_model_dir, device="cuda", dtype="float32")
    try:
        prompts = make_prompts(4, models["a"].config.vocab_size, seed=21)
        reqs = [
            GenerateRequest(f"cuda-{i}", q, SamplingParams(temperature=0.7, top_k=20,
                            top_p=0.9, seed=i, max_new_tokens=16, ignore_eos=True))
            for i, q in enumerate(prompts)
        ]  # fmt: skip
        results = r.generate_many(reqs)
        assert max_logprob_gap(models["a"], reqs, results) < 2e-3  # TF32 / CUDA kernels
        again = r.generate_many([GenerateRequest(f"{q.request_id}-2", q.prompt_token_ids,
                                                 q.sampling) for q in reqs])  # fmt: skip
        assert [x.token_ids for x in again] == [x.token_ids for x in results]
    finally:
        r.close()


def test_stop_string_ends_generation(eng, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    p = tok("What is 12+7? Think step by step.", add_special_tokens=False)["input_ids"]
    params = dict(temperature=1.0, seed=5, max_new_tokens=40, ignore_eos=True)
    full = gen(eng, p, **params)
    text = tok.decode(full.token_ids[:20], skip_special_tokens=True)
    stop = text[-2:] if text[-2:].strip() else text[-3:]
    res = gen(eng, p, stop=[stop], **params)
    assert res.finish_reason is FinishReason.STOP and res.stop_reason == stop
    assert res.token_ids == full.token_ids[: len(res.token_ids)]
    assert stop in tok.decode(res.token_ids, skip_special_tokens=True)
    assert stop not in tok.decode(res.token_ids[:-1], skip_special_tokens=True)


def test_pause_keep_and_resume(eng, models):
    p = make_prompts(1, models["a"].config.vocab_size, seed=9)[0]
    eng.pause()
    fut = eng.submit_generate(
        GenerateRequest("paused", p, SamplingParams(max_new_tokens=8, seed=1))
    )
    health = eng.health()
    assert health.paused and health.num_waiting == 1 and not fut.done()
    eng.resume()
    assert len(fut.result(timeout=60).token_ids) >= 1
    assert not eng.health().paused


def test_duplicate_request_id_is_refused(eng, models):
    p = make_prompts(1, models["a"].config.vocab_size, seed=10)[0]
    fut = eng.submit_generate(
        GenerateRequest("dup", p, SamplingParams(max_new_tokens=300, ignore_eos=True))
    )
    wait_for_tokens(eng, "dup", 1)
    with pytest.raises(ValueError, match="already in flight"):
        gen(eng, p, tag="dup")
    eng.abort(["dup"])
    assert fut.result(timeout=30).finish_reason is FinishReason.ABORT


def test_shutdown_frees_and_refuses(tiny_model_dir):
    r = EngineRunner("hf", tiny_model_dir, num_threads=1)
    assert gen(r, [5, 6, 7], max_new_tokens=3, ignore_eos=True).token_ids
    r.close()
    assert not hasattr(r.engine, "model"), "shutdown must drop the model"
    health = asyncio.run(r.engine.health())
    assert not health.ok and health.detail == "shut down"
    with pytest.raises(RuntimeError, match="shut down"):
        asyncio.run(r.engine.generate(GenerateRequest("late", [5, 6])))


def test_context_limit_ends_with_length(eng):
    res = gen(
        eng, list(range(3, 300)) * 3 + [5] * 120, max_new_tokens=50, ignore_eos=True
    )  # 1011 tokens
    assert res.finish_reason is FinishReason.LENGTH and len(res.token_ids) == 1024 - 1011


def test_bad_request_fails_alone(eng):
    with pytest.raises(ValueError, match="does not fit the model's 1024 positions"):
        gen(eng, list(range(3, 300)) * 4, tag="too-long")
    assert eng.health().ok
    assert gen(eng, [5, 6, 7], max_new_tokens=2, ignore_eos=True).token_ids


def test_generate_many_keeps_the_good_results_when_one_prompt_is_too_long(eng):
    """A group with one over-long prompt: the others complete, the bad one is an error result."""
    p = SamplingParams(max_new_tokens=3, ignore_eos=True, seed=1)
    reqs = [GenerateRequest("ok-0", [5, 6, 7], p), GenerateRequest("long", list(range(3, 300)) * 4, p),
            GenerateRequest("ok-1", [8, 9], p)]  # fmt: skip
    ok0, bad, ok1 = eng.generate_many(reqs)
    assert len(ok0.token_ids) == len(ok1.token_ids) == 3 and ok0.finish_reason is FinishReason.LENGTH
    assert bad.finish_reason is FinishReason.ERROR and bad.token_ids == [] and bad.token_versions == []
    assert "request 'long'" in bad.error and "does not fit the model's 1024 positions" in bad.error
    assert eng.engine.tokenizer_info() == {"max_model_len": 1024, "eos_token_id": [2]}


def test_num_threads_is_honoured_on_the_engine_thread(tiny_model_dir):
    """Built on one thread, driven from another's event loop (as in a Ray asyncio actor), with
    another component of the process setting its own count in between (a trainer's
    `num_threads`): the thread that runs the model still computes with the engine's count."""
    import threading

    from slime_rl.rollout.engines.hf import HFEngine

    main_threads = torch.get_num_threads()
    want = main_threads + 1  # differs from every thread's default
    built: dict = {}
    builder = threading.Thread(target=lambda: built.setdefault("e", HFEngine(tiny_model_dir, num_threads=want)))
    builder.start()
    builder.join()
    engine = built["e"]
    torch._C.set_num_threads(want + 1)  # another component's count (new threads get the latest)

    async def drive():
        res = await engine.generate(GenerateRequest("t", [5, 6, 7], SamplingParams(max_new_tokens=2)))
        threads = await engine.torch_threads()
        await engine.shutdown()
        return res, threads

    res, threads = asyncio.run(drive())
    assert threads == want and len(res.token_ids) >= 1
    torch.set_num_threads(main_threads)
