"""Engine protocol pieces that need no model: params validation, registry, sampling filters,
stop rules, and the request/result translation of the vllm and sglang backends."""

from __future__ import annotations

import sys

import pytest
import torch
from slime_rl.rollout.config import RolloutConfig
from slime_rl.rollout.engines import (
    FinishReason,
    GenerateRequest,
    SamplingParams,
    create_engine,
    engine_kinds,
    engine_params_from_config,
    register_engine,
    sampling_from_config,
)
from slime_rl.rollout.engines.sampling import StopChecker, filter_logits, sample_next


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -1}, "temperature=-1 must be >= 0"),
        ({"top_p": 0}, r"top_p=0 must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k=-2 must be -1"),
        ({"max_new_tokens": 0}, "max_new_tokens=0 must be >= 1"),
    ],
)
def test_sampling_params_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_request_validation_and_config_translation():
    with pytest.raises(ValueError, match="'r1': prompt_token_ids is empty"):
        GenerateRequest("r1", [])
    cfg = RolloutConfig(
        temperature=0.5, top_k=5, stop=["</answer>"], stop_token_ids=[7], max_new_tokens=9
    )
    p = sampling_from_config(cfg, seed=3)
    assert p == SamplingParams(0.5, 1.0, 5, 9, ("</answer>",), (7,), 3)
    assert SamplingParams(top_k=1).greedy and SamplingParams(temperature=0).greedy and not p.greedy


def test_registry_and_config_params():
    assert {"hf", "vllm", "sglang"} <= set(engine_kinds())
    with pytest.raises(ValueError, match=r"rollout.engine='nope' is unknown; choose one of \['hf'"):
        create_engine("nope", "/x")
    with pytest.raises(ValueError, match="already registered"):
        register_engine("hf", lambda path, **kw: None)
    vllm = engine_params_from_config(
        RolloutConfig(engine="vllm", kv_cache_gb=0.5, cpu_threads=1, max_batch_size=8)
    )
    assert (
        vllm["kv_cache_gb"] == 0.5
        and vllm["num_threads"] == 1
        and vllm["engine_kwargs"]["max_num_seqs"] == 8
    )
    hf = engine_params_from_config(RolloutConfig(engine="hf", engine_kwargs={"device": "cpu"}))
    assert hf["device"] == "cpu" and hf["num_threads"] is None


def test_registered_engine_brings_its_own_config_params(monkeypatch):
    from slime_rl.rollout.engines import registry

    monkeypatch.setattr(registry, "_CUSTOM", dict(registry._CUSTOM))
    monkeypatch.setattr(registry, "_PARAMS", dict(registry._PARAMS))
    register_engine(
        "mine", lambda path, **kw: (path, kw), params_from_config=lambda c: {"t": c.temperature}
    )
    register_engine("plain", lambda path, **kw: (path, kw))
    assert engine_params_from_config(RolloutConfig(engine="mine", temperature=0.5)) == {"t": 0.5}
    cfg = RolloutConfig(engine="plain", engine_kwargs={"x": 1})
    assert engine_params_from_config(cfg) == {"x": 1}
    assert registry.create_engine_from_config(cfg, "/m") == ("/m", {"x": 1})


def test_filter_logits_top_k_and_top_p():
    logits_V = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.10]))
    k2 = filter_logits(logits_V, SamplingParams(top_k=2))
    assert torch.isinf(k2[2:]).all() and torch.isfinite(k2[:2]).all()
    p = filter_logits(logits_V, SamplingParams(top_p=0.7))  # 0.5 + 0.25 reaches 0.7: two kept
    assert torch.isfinite(p[:2]).all() and torch.isinf(p[2:]).all()
    hot = filter_logits(logits_V, SamplingParams(temperature=2.0))
    assert torch.allclose(hot, logits_V / 2)


def test_sample_next_reports_temperature_scaled_full_vocab_logprobs_and_respects_seeds():
    logits_BV = torch.randn(4, 11)
    params = [
        SamplingParams(temperature=0),  # greedy: log_softmax(logits), T = 1
        SamplingParams(temperature=0.3, seed=1),
        SamplingParams(top_k=1, temperature=0.7),  # greedy by top_k, still scaled by 0.7
        SamplingParams(temperature=0.7, top_k=3, top_p=0.5),  # filters do not renormalise
    ]
    gens = [torch.Generator().manual_seed(0) for _ in params]
    toks_B, lps_B = sample_next(logits_BV, params, gens)
    temps_B1 = torch.tensor([[1.0], [0.3], [0.7], [0.7]])
    want_BV = torch.log_softmax(logits_BV / temps_B1, -1)
    assert toks_B[0] == logits_BV[0].argmax() and toks_B[2] == logits_BV[2].argmax()
    assert torch.allclose(lps_B, want_BV.gather(1, toks_B[:, None]).squeeze(1))
    again = sample_next(logits_BV, params, [torch.Generator().manual_seed(0) for _ in params])[0]
    assert torch.equal(toks_B, again)


def test_stop_checker_eos_ids_and_ignore_eos():
    chk = StopChecker(SamplingParams(stop_token_ids=(9,)), eos_token_ids=[2], tokenizer=None)
    assert chk.check([5, 2]) == (True, None)
    assert chk.check([5, 9]) == (True, 9)
    assert chk.check([5, 6]) == (False, None)
    assert StopChecker(SamplingParams(ignore_eos=True), [2], None).check([2]) == (False, None)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        StopChecker(SamplingParams(stop=("x",)), [2], None)


def test_sglang_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)  # import sglang -> ImportError
    with pytest.raises(ImportError, match=r"install slime-rl\[sglang\] .* rollout.engine=sglang"):
        create_engine("sglang", "/x")


def test_sglang_request_and_result_translation():
    from slime_rl.rollout.engines.sglang_engine import from_sglang_output, to_sglang_sampling

    params = SamplingParams(
        temperature=0.9, top_k=-1, max_new_tokens=6, stop=("\n",), stop_token_ids=(9,), seed=5
    )
    assert to_sglang_sampling(params) == {
        "temperature": 0.9,
        "top_p": 1.0,
        "top_k": -1,
        "max_new_tokens": 6,
        "ignore_eos": False,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "stop": ["\n"],
        "stop_token_ids": [9],
        "sampling_seed": 5,
    }
    req = GenerateRequest("r", [1, 2], params)
    out = {
        "output_ids": [4, 9],
        "meta_info": {
            "finish_reason": {"type": "stop", "matched": 9},
            "output_token_logprobs": [(-0.5, 4, None), (-1.5, 9, None)],
        },
    }
    res = from_sglang_output(req, out, version_start=2, version_end=3)
    assert (res.token_ids, res.logprobs, res.finish_reason, res.stop_reason) == (
        [4, 9],
        [-0.5, -1.5],
        FinishReason.STOP,
        9,
    )
    assert res.weight_versions == [2, 2] and res.version_end == 3
    eos = {
        **out,
        "meta_info": {**out["meta_info"], "finish_reason": {"type": "stop", "matched": 2}},
    }
    assert from_sglang_output(req, eos, 0, 0).stop_reason is None
    cut = {
        "output_ids": [4],
        "meta_info": {
            "finish_reason": {"type": "abort"},
            "output_token_logprobs": [(-0.5, 4, None)],
        },
    }
    assert from_sglang_output(req, cut, 0, 0).finish_reason is FinishReason.ABORT
