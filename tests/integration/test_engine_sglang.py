"""The `sglang` engine on a CUDA GPU (skipped elsewhere): log-probs, weight updates, abort.

Run on a GPU machine with `pip install slime-rl[sglang]`:
    pytest tests/integration/test_engine_sglang.py -m gpu
"""

from __future__ import annotations

import pytest
from slime_rl.rollout.engines import FinishReason, GenerateRequest, SamplingParams
from slime_rl.rollout.engines.conformance import (
    load_reference,
    make_prompts,
    max_logprob_gap,
    wait_for_tokens,
)
from slime_rl.rollout.engines.sync import EngineRunner

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(600)]

GPU_ATOL = 2e-3
"""fp32 weights on GPU (TF32 matmuls, other kernels than torch's): looser than the CPU tolerance."""


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    pytest.importorskip("sglang", reason="install slime-rl[sglang]")
    r = EngineRunner(
        "sglang",
        tiny_model_dir,
        dtype="float32",
        mem_fraction_static=0.3,
        engine_kwargs={"enable_deterministic_inference": True, "disable_cuda_graph": True},
    )
    yield r
    r.close()


def _sample(runner, prompts, tag, **sampling):
    reqs = [
        GenerateRequest(
            f"{tag}-{i}", p, SamplingParams(max_new_tokens=24, seed=i, ignore_eos=True, **sampling)
        )
        for i, p in enumerate(prompts)
    ]
    return reqs, runner.generate_many(reqs)


def test_sglang_logprobs_weights_and_abort(runner, tiny_model_dir, tiny_model_dir_b):
    model_a, model_b = load_reference(tiny_model_dir), load_reference(tiny_model_dir_b)
    prompts = make_prompts(8, model_a.config.vocab_size, seed=1)
    reqs, res_a = _sample(runner, prompts, "a")
    assert max_logprob_gap(model_a, reqs, res_a) < GPU_ATOL
    # log_softmax(logits / 0.7) over the full vocabulary, not truncated by top-k/top-p
    reqs_t, res_t = _sample(runner, prompts, "a-t07", temperature=0.7, top_k=20, top_p=0.9)
    assert max_logprob_gap(model_a, reqs_t, res_t) < GPU_ATOL
    assert runner.update_weights(1, model_b.state_dict()) == 1
    reqs, res_b = _sample(runner, prompts, "b")
    assert max_logprob_gap(model_b, reqs, res_b) < GPU_ATOL
    assert any(x.token_ids != y.token_ids for x, y in zip(res_a, res_b))
    assert all(r.policy_version == r.policy_version_end == 1 for r in res_b)
    # abort: wait for streamed tokens (no sleep race), then abort
    fut = runner.submit_generate(
        GenerateRequest("cut", prompts[0], SamplingParams(max_new_tokens=2000, ignore_eos=True))
    )
    wait_for_tokens(runner, "cut", 3)
    (partial,) = runner.abort(["cut"])
    assert partial.finish_reason is FinishReason.ABORT and 3 <= len(partial.token_ids) < 2000
    assert fut.result(timeout=60) == partial
