"""Pure pieces of the MoE engine support (no vLLM needed): the expected expert-weight names per
checkpoint layout, the per-step routing capture, the CPU expert re-pack hook, and the config
rules that tie routing replay to recording."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from slime_rl.rollout.engines.vllm_ext import (
    RoutingCapture,
    check_full_state_dict,
    repack_cpu_experts,
    weight_ways,
)

from slime_rl.config import ConfigError, load_config

E = 2
P = "model.layers.1.mlp.experts.routed_experts."  # vLLM's parameter prefix
C = "model.layers.1.mlp."  # checkpoint prefix
PARAMS = [P + "w13_weight", P + "w2_weight", "model.norm.weight"]
# What module_expert_mapping builds from vLLM 0.32's get_expert_mapping(include_fused=True), in full names.
ENTRIES = (
    [(P + "w13_weight", C + "experts.gate_up_proj", (0, "w1")), (P + "w13_weight", C + "experts.gate_up_proj", (1, "w3")),
     (P + "w2_weight", C + "experts.down_proj", (0, "w2"))]
    + [(P + "w13_", f"{C}experts.{e}.gate_up_proj.", (e, s)) for e in range(E) for s in ("w1", "w3")]
    + [(P + ("w2_" if w == "down_proj" else "w13_"), f"{C}experts.{e}.{w}.", (e, s))
       for e in range(E) for w, s in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))]
)
FUSED = ["model.norm.weight", C + "experts.gate_up_proj", C + "experts.down_proj"]
PER_EXPERT = ["model.norm.weight"] + [f"{C}experts.{e}.{w}.weight" for e in range(E) for w in ("gate_proj", "up_proj", "down_proj")]


def test_every_expert_layout_is_a_complete_update_and_a_mix_of_them_is_not_needed() -> None:
    expected = weight_ways(PARAMS, {}, ENTRIES)
    # each layout alone is complete (all expert entries in one way used to demand every layout at once)
    check_full_state_dict(expected, set(), FUSED)  # what the trainer publishes (transformers >= 5)
    check_full_state_dict(expected, set(), PER_EXPERT)  # HF checkpoints on disk
    per_expert_gate_up = ["model.norm.weight"] + [f"{C}experts.{e}.gate_up_proj.weight" for e in range(E)] + [
        f"{C}experts.{e}.down_proj.weight" for e in range(E)]
    check_full_state_dict(expected, set(), per_expert_gate_up)
    # a missing tensor is named in the update's own layout
    with pytest.raises(ValueError, match=r"misses \['model.layers.1.mlp.experts.1.up_proj.weight'\]"):
        check_full_state_dict(expected, set(), [n for n in PER_EXPERT if "experts.1.up_proj" not in n])
    with pytest.raises(ValueError, match=r"misses \['model.layers.1.mlp.experts.down_proj'\]"):
        check_full_state_dict(expected, set(), FUSED[:2])


def test_routing_capture_files_each_row_under_its_request_and_position() -> None:
    batch = types.SimpleNamespace(req_ids=["a-x1", "b-x2"], num_computed_tokens_cpu=np.array([0, 7]))
    capture = RoutingCapture(types.SimpleNamespace(input_batch=batch), num_layers=2)
    capture.capture(0, torch.zeros(9, 2, dtype=torch.long))  # a warm-up pass outside a step: ignored
    capture.begin_step(types.SimpleNamespace(num_scheduled_tokens={"a-x1": 3, "b-x2": 1}))
    for layer in range(2):  # rows: a's prefill (positions 0..2), then b's decode (position 7); padded to 5
        capture.capture(layer, torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0], [9, 9]]) + 10 * layer)
    capture.end_step()
    out = capture.take()
    assert [(start, rows.shape) for start, rows in out["a-x1"]] == [(0, (3, 2, 2))]
    assert [(start, rows.shape) for start, rows in out["b-x2"]] == [(7, (1, 2, 2))]
    assert out["b-x2"][0][1].tolist() == [[[7, 0], [17, 10]]] and out["a-x1"][0][1].dtype == np.int16
    assert capture.take() == {}
    capture.begin_step(types.SimpleNamespace(num_scheduled_tokens={"a-x1": 3, "b-x2": 1}))
    capture.capture(0, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"MoE layers \[1\] reported no routing"):
        capture.end_step()


def test_cpu_experts_are_repacked_after_a_reload_and_nothing_else() -> None:
    calls = []

    class CPUUnquantizedExperts:
        def process_weights_after_loading(self, layer):
            calls.append(layer)

    class OtherExperts(CPUUnquantizedExperts):
        pass

    def layer(experts_cls):
        m = torch.nn.Module()
        m.w13_weight = torch.nn.Parameter(torch.zeros(1))
        m.quant_method = types.SimpleNamespace(moe_kernel=types.SimpleNamespace(fused_experts=experts_cls()))
        return m

    model = torch.nn.ModuleList([layer(CPUUnquantizedExperts), layer(OtherExperts), torch.nn.Linear(1, 1)])
    assert repack_cpu_experts(model) == 1 and calls == [model[0]]


def test_routing_replay_needs_recording_and_an_engine_that_records(tmp_path) -> None:
    base = ["model.path=m", "data.train_path=d"]
    with pytest.raises(ConfigError, match=r"trainer.routing_replay=true .* rollout.record_routed_experts=true"):
        load_config(None, [*base, "trainer.routing_replay=true"], check_paths=False)
    with pytest.raises(ConfigError, match=r"record_routed_experts=true is implemented for rollout.engine=hf and vllm, not 'sglang'"):
        load_config(None, [*base, "rollout.engine=sglang", "rollout.record_routed_experts=true"], check_paths=False)
    cfg = load_config(None, [*base, "trainer.routing_replay=true", "rollout.record_routed_experts=true"], check_paths=False)
    assert cfg.trainer.routing_replay and cfg.rollout.record_routed_experts
    from slime_rl.rollout.engines.registry import engine_params_from_config

    assert engine_params_from_config(cfg.rollout)["record_routed_experts"] is True
    cfg.rollout.engine = "vllm"
    assert engine_params_from_config(cfg.rollout)["record_routed_experts"] is True


def test_make_tiny_model_takes_an_architecture() -> None:
    from slime_rl.cli import build_parser
    from slime_rl.tiny.model import ARCHS, build_tiny_model

    args = build_parser().parse_args(["make-tiny-model", "out", "--arch", "glm5"])
    assert args.arch == "glm5" and build_parser().parse_args(["make-tiny-model", "out"]).arch == "qwen2"
    assert ARCHS == ("qwen2", "glm5", "glm4_moe")
    with pytest.raises(ValueError, match=r"arch='glm6' is not known; available: \['qwen2', 'glm5', 'glm4_moe'\]"):
        build_tiny_model("unused", arch="glm6")
