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
    # The demo config's `enforce_eager: false` compiles vllm and leaves an engine switch to hf working.
    assert engine_params_from_config(RolloutConfig(engine="vllm", enforce_eager=False))["enforce_eager"] is False
    assert "enforce_eager" not in engine_params_from_config(RolloutConfig(engine="hf", enforce_eager=False))


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
    res = from_sglang_output(req, out, policy_version=2, policy_version_end=3)
    assert (res.token_ids, res.logprobs, res.finish_reason, res.stop_reason) == (
        [4, 9],
        [-0.5, -1.5],
        FinishReason.STOP,
        9,
    )
    assert res.token_versions == [2, 2] and res.policy_version_end == 3
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


def test_stop_string_of_multibyte_characters_stops_on_its_last_byte_token(tiny_model_dir):
    """A 5-character CJK stop string is 15 byte-level tokens in the tiny tokenizer: the checker
    must look at enough tokens to cover the string's bytes, not its characters."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    stop = "停止生成吧"
    pre, ids_stop = tok("Sam has 3 pens. ", add_special_tokens=False)["input_ids"], tok(stop, add_special_tokens=False)["input_ids"]
    assert len(ids_stop) == 15  # one token per UTF-8 byte
    generated = pre + ids_stop + tok(" more", add_special_tokens=False)["input_ids"]
    chk = StopChecker(SamplingParams(stop=(stop,)), eos_token_ids=[], tokenizer=tok)
    ends = [i for i in range(1, len(generated) + 1) if chk.check(generated[:i])[0]]
    assert ends[0] == len(pre) + len(ids_stop) and chk.check(generated[: ends[0]]) == (True, stop)


def test_vllm_detokenizes_only_for_stop_strings():
    """Token ids and log-probs are all the engine uses; text is needed only to match stops."""
    from slime_rl.rollout.engines.vllm_engine import vllm_sampling_kwargs

    plain = vllm_sampling_kwargs(SamplingParams(stop_token_ids=(9,), seed=1))
    assert plain["detokenize"] is False and plain["stop"] is None and plain["stop_token_ids"] == [9]
    assert vllm_sampling_kwargs(SamplingParams(stop=("</answer>",)))["detokenize"] is True


QWEN2_PARAMS = [
    "model.embed_tokens.weight",
    *(f"model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.qkv_proj.weight", "self_attn.qkv_proj.bias", "self_attn.o_proj.weight",
        "mlp.gate_up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")),
    "model.norm.weight",
]  # fmt: skip
QWEN2_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _hf_names() -> list[str]:
    """The HF checkpoint names of QWEN2_PARAMS (what the trainer sends)."""
    out = []
    for name in QWEN2_PARAMS:
        for packed, subs in QWEN2_PACKED.items():
            if f".{packed}." in name:
                out += [name.replace(packed, s) for s in subs]
                break
        else:
            out.append(name)
    return out


def test_expected_weight_names_come_from_the_engine_parameters():
    from slime_rl.rollout.engines.vllm_ext import check_full_state_dict, weight_ways

    expected = weight_ways(QWEN2_PARAMS, QWEN2_PACKED)
    full = _hf_names()
    check_full_state_dict(expected, {"lm_head.weight"}, full)  # HF names
    check_full_state_dict(expected, {"lm_head.weight"}, [*full, "lm_head.weight", "model.layers.0.self_attn.rotary_emb.inv_freq"])
    check_full_state_dict(expected, set(), QWEN2_PARAMS)  # a checkpoint storing packed weights fused
    no_layer1 = [n for n in full if "layers.1." not in n]
    with pytest.raises(ValueError, match=r"misses \['model.layers.1.input_layernorm.weight', .*\(12 tensors\); send the full state dict"):
        check_full_state_dict(expected, set(), no_layer1)
    no_k = [n for n in full if n != "model.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(ValueError, match=r"misses \['model.layers.0.self_attn.k_proj.bias'\]\.\.\. \(1 tensors\)"):
        check_full_state_dict(expected, set(), no_k)
    with pytest.raises(ValueError, match=r"weights \['bogus.weight'\] \(1 in all\) are not parameters"):
        check_full_state_dict(expected, set(), [*full, "bogus.weight"])


def test_expected_weight_names_for_fused_experts_and_renamed_prefixes():
    from slime_rl.rollout.engines.vllm_ext import check_full_state_dict, weight_ways

    params = ["lm.layers.0.mlp.experts.w13_weight", "lm.layers.0.mlp.experts.w2_weight", "lm.norm.weight"]
    experts = [
        (p, f"experts.{e}.{w}.", (e, shard))
        for e in range(2)
        for p, w, shard in (("experts.w13_", "gate_proj", "w1"), ("experts.w13_", "up_proj", "w3"), ("experts.w2_", "down_proj", "w2"))
    ]
    expected = weight_ways(params, {}, experts, prefix_renames={"lm.": "model."})
    full = ["model.norm.weight"] + [f"model.layers.0.mlp.experts.{e}.{w}.weight" for e in range(2) for w in ("gate_proj", "up_proj", "down_proj")]
    check_full_state_dict(expected, set(), full)
    with pytest.raises(ValueError, match=r"misses \['model.layers.0.mlp.experts.1.up_proj.weight'\]"):
        check_full_state_dict(expected, set(), [n for n in full if "experts.1.up_proj" not in n])


def test_reload_warning_is_filtered_only_for_layers_without_parameters_of_their_own():
    import logging

    from slime_rl.rollout.engines.vllm_ext import QuietReloadFilter, parameterless_layer_classes

    class Rotary(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cos_sin_cache", torch.zeros(4))

    class Head(torch.nn.Module):
        pass

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(4, 2)
            self.rotary = Rotary()
            self.proj = torch.nn.Linear(2, 2)
            self.head = Head()
            self.head.weight = self.embed.weight  # tied

    classes = parameterless_layer_classes(Net())
    assert {"Rotary", "Head"} <= classes and not {"Embedding", "Linear"} & classes
    quiet = QuietReloadFilter(classes)

    def record(name: str) -> logging.LogRecord:
        return logging.LogRecord("vllm.x", logging.WARNING, "f", 1, "%s: Failed to load weights", (name,), None)

    assert not quiet.filter(record("Rotary")) and not quiet.filter(record("Head"))
    assert quiet.filter(record("Linear")), "a real layer that failed to load is news"
    other = logging.LogRecord("vllm.x", logging.WARNING, "f", 1, "%s: other", ("Rotary",), None)
    assert quiet.filter(other)
