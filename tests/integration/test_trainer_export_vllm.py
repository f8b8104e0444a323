"""The trainer's HF export loads in vLLM and gives the trainer's log-probs."""

from __future__ import annotations

import pytest
import torch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.testing import synthetic_table


@pytest.mark.timeout(300)
def test_hf_export_loads_in_vllm_with_matching_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~2 s start
    core = TrainerCore(TrainerConfig(lr=1e-2, global_batch_groups=2, max_logprob_mismatch=0.0), tiny_model_dir)
    for seed in range(2):  # move the weights well away from the initial ones
        core.train_step(synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=seed))
    out = core.export_hf(tmp_path / "hf")

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(out), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0)
    try:
        prompt = [5, 17, 42, 99, 7]
        params = SamplingParams(max_tokens=8, logprobs=0, temperature=1.0, seed=1, ignore_eos=True)
        result = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = list(result.token_ids)
    engine_lp = torch.tensor([next(iter(d.values())).logprob for d in result.logprobs])
    with torch.no_grad():
        logits = core.policy(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
    trainer_lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
    # fp32 on both sides: measured max gap 1.7e-6; a stale tied lm_head would be off by ~1-10
    torch.testing.assert_close(trainer_lp, engine_lp, atol=1e-4, rtol=0)


@pytest.mark.timeout(300)
def test_lora_merged_export_loads_in_vllm_with_the_adapted_policys_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    """trainer.lora: `final_hf/merged` is a plain HF model vLLM serves, with the log-probs of the
    peft policy (base + trained adapter), not the base's."""
    pytest.importorskip("vllm")
    pytest.importorskip("peft")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cfg = TrainerConfig(lr=1e-2, global_batch_groups=2, max_logprob_mismatch=0.0)
    cfg.lora.rank = 8
    core = TrainerCore(cfg, tiny_model_dir)
    for seed in range(2):
        core.train_step(synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=seed))
    core.export_hf(tmp_path / "hf", merged=True)
    assert (tmp_path / "hf" / "adapter_config.json").exists()

    from vllm import LLM, SamplingParams

    llm = LLM(model=str(tmp_path / "hf" / "merged"), dtype="float32", enforce_eager=True,
              kv_cache_memory_bytes=256 << 20, seed=0)
    try:
        prompt = [5, 17, 42, 99, 7]
        params = SamplingParams(max_tokens=8, logprobs=0, temperature=1.0, seed=1, ignore_eos=True)
        result = llm.generate([{"prompt_token_ids": prompt}], params)[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    tokens = list(result.token_ids)
    engine_lp = torch.tensor([next(iter(d.values())).logprob for d in result.logprobs])
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = core.policy(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        with core.policy.disable_adapter():  # the base alone: what a merge that lost the adapter gives
            base_logits = core.policy(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    pick = torch.tensor(tokens)[:, None]
    trainer_lp = torch.log_softmax(logits, -1).gather(1, pick).squeeze(1)
    base_lp = torch.log_softmax(base_logits, -1).gather(1, pick).squeeze(1)
    assert (trainer_lp - base_lp).abs().max() > 1e-3  # the adapter trained: the test can tell them apart
    torch.testing.assert_close(trainer_lp, engine_lp, atol=1e-4, rtol=0)
