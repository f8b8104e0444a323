"""LoRA on the trainer (peft), in-process: what trains, what a sync ships, exports, resume."""

from __future__ import annotations

import json

import pytest
import torch
from slime_rl.trainer.config import LoraConfig, TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.lora import adapter_state, merged_state, publish_state
from slime_rl.trainer.testing import on_policy, synthetic_table
from slime_rl.trainer.weights import iter_weight_buckets

from slime_rl.config import ConfigError, load_config

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 400


def _cfg(rank: int = 8, **lora) -> TrainerConfig:
    cfg = TrainerConfig(lr=1e-2, global_batch_groups=2)
    cfg.batching.max_tokens_per_micro_batch = 64
    cfg.lora = LoraConfig(rank=rank, **lora)
    return cfg


def _snapshot(core: TrainerCore) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in core.policy.state_dict().items()}


@pytest.fixture(scope="module")
def stepped(tiny_model_dir):
    """A rank-8 LoRA core before and after two on-policy train steps (mismatch check on)."""
    core = TrainerCore(_cfg(), tiny_model_dir)
    before = _snapshot(core)
    for seed in (1, 2):
        core.train_step(on_policy(core, synthetic_table(num_groups=2, group_size=4, vocab_size=VOCAB, seed=seed)))
    return core, before


def test_only_adapter_tensors_move(stepped):
    core, before = stepped
    after = _snapshot(core)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "nothing trained"
    assert all(".lora_A." in k or ".lora_B." in k for k in moved), sorted(moved)[:5]
    assert any(".lora_B." in k for k in moved)  # B starts at 0: it must have moved for the adapter to act
    # tied embeddings stay one (frozen) weight
    p = core.policy
    assert p.get_input_embeddings().weight is p.get_output_embeddings().weight


def test_optimizer_holds_only_adapter_params(stepped):
    core, _ = stepped
    held = {id(q) for g in core.optimizer.param_groups for q in g["params"]}
    names = {n for n, q in core.policy.named_parameters() if id(q) in held}
    assert names and all("lora_" in n for n in names)
    assert len(names) == 2 * 4 * core.policy.config.num_hidden_layers  # A, B x q/k/v/o x layers


def test_adapter_bucket_is_a_few_percent_of_full(stepped, tiny_model_dir):
    core, _ = stepped
    adapter = sum(b.nbytes for b in iter_weight_buckets(core.policy, 1, 1 << 30, state=publish_state(core.policy, "adapter")))
    merged = sum(b.nbytes for b in iter_weight_buckets(core.policy, 1, 1 << 30, state=publish_state(core.policy, "merged")))
    full = TrainerCore(_cfg(rank=0), tiny_model_dir)
    plain = sum(b.nbytes for b in full.iter_weight_buckets(1 << 30))
    assert merged == plain
    assert adapter < 0.1 * plain, (adapter, plain)
    names = [n for b in iter_weight_buckets(core.policy, 1, 1 << 30, state=adapter_state(core.policy)) for n in b.names]
    assert all(n.startswith("base_model.model.") and (".lora_A.weight" in n or ".lora_B.weight" in n) for n in names)


def test_merged_weights_give_the_adapted_policy(stepped, tiny_model_dir):
    core, _ = stepped
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    missing, unexpected = plain.load_state_dict(merged_state(core.policy), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    plain.tie_weights()
    ids = torch.tensor([[5, 17, 42, 99, 7, 8]])
    core.policy.eval()
    with torch.no_grad():
        want = core.policy(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    core.policy.train()
    assert torch.allclose(want, got, atol=1e-4)


def test_export_and_resume(stepped, tiny_model_dir, tmp_path):
    core, _ = stepped
    ckpt = core.save_checkpoint(tmp_path / "ckpt")
    assert (ckpt / "hf" / "adapter_config.json").exists() and (ckpt / "hf" / "adapter_model.safetensors").exists()
    dcp_bytes = sum(f.stat().st_size for f in (ckpt / "dcp").rglob("*") if f.is_file())
    model_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    assert dcp_bytes < 0.3 * model_bytes, (dcp_bytes, model_bytes)  # adapter + Adam moments, no base
    fresh = TrainerCore(_cfg(), tiny_model_dir)
    fresh.load_checkpoint(ckpt)
    assert fresh.version == core.version
    for k, v in adapter_state(core.policy).items():
        assert torch.equal(v, adapter_state(fresh.policy)[k]), k
    # the PEFT folder loads with peft and the merged export with transformers: same outputs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = core.export_hf(tmp_path / "final_hf", merged=True)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(out / "merged"), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)


def test_bad_target_module_names_the_key_and_the_choices(tiny_model_dir):
    with pytest.raises(ValueError, match=r"trainer\.lora\.target_modules.*q_proj"):
        TrainerCore(_cfg(target_modules=["qkv"]), tiny_model_dir)
    # and at start-up, before any actor, from the model's config alone
    from slime_rl.preflight import PreflightError, check_lora

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "data.train_path=x.jsonl", "trainer.lora.rank=8",
                                "trainer.lora.target_modules=[qkv]"], check_paths=False)
    with pytest.raises(PreflightError, match=r"trainer\.lora\.target_modules=\['qkv'\].*'q_proj'"):
        check_lora(cfg)
    check_lora(load_config(None, [f"model.path={tiny_model_dir}", "data.train_path=x.jsonl", "trainer.lora.rank=8"],
                           check_paths=False))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("trainer.lora.rank=-1", r"trainer\.lora\.rank=-1"),
        ("trainer.lora.target_modules=[lm_head]", r"trainer\.lora\.target_modules"),
        ("trainer.lora.publish=full", r"trainer\.lora\.publish"),
    ],
)
def test_bad_lora_config_is_one_clear_error(override, match, tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [f"model.path={tiny_model_dir}", "trainer.lora.rank=8", override])


def test_publish_resolves_against_the_engine():
    from slime_rl.weight_sync import resolve_lora_publish

    assert resolve_lora_publish("auto", "vllm") == "adapter"
    assert resolve_lora_publish("auto", "hf") == "adapter"
    assert resolve_lora_publish("auto", "sglang") == "merged"
    with pytest.raises(ValueError, match=r"trainer\.lora\.publish=adapter.*rollout\.engine='sglang'"):
        resolve_lora_publish("adapter", "sglang")


def test_hf_engine_serves_the_published_adapter(stepped, tiny_model_dir):
    """The engine's log-probs of its own samples equal the trainer's recomputation: at version 0
    (zero adapter = base) and after loading the trained adapter (version 1)."""
    from slime_rl.rollout.engines import GenerateRequest, SamplingParams
    from slime_rl.rollout.engines.sync import EngineRunner
    from slime_rl.trainer.lora import engine_adapter_config

    core, _ = stepped
    fresh = TrainerCore(_cfg(), tiny_model_dir)
    prompt = [5, 17, 42, 99, 7, 8, 33]

    def gap(runner: EngineRunner, policy: torch.nn.Module, tag: str) -> float:
        res = runner.call(runner.engine.generate(GenerateRequest(tag, prompt, SamplingParams(max_new_tokens=12, seed=1))))
        with torch.no_grad():
            policy.eval()
            lp = torch.log_softmax(policy(input_ids=torch.tensor([prompt + res.token_ids])).logits[0].float(), -1)
            policy.train()
        want = [lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(res.token_ids)]
        return max(abs(a - b) for a, b in zip(res.logprobs, want, strict=True))

    with EngineRunner("hf", tiny_model_dir, num_threads=1, lora=engine_adapter_config(core.cfg.lora)) as runner:
        assert gap(runner, fresh.policy, "v0") < 1e-4
        runner.call(runner.engine.update_weights(1, list(adapter_state(core.policy).items())))
        assert gap(runner, core.policy, "v1") < 1e-4
        with pytest.raises(ValueError, match="base weights"):
            runner.call(runner.engine.update_weights(2, [("model.norm.weight", torch.ones(4))]))
