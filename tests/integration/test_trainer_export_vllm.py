"""The trainer's HF export loads in vLLM and gives the trainer's log-probs."""

from __future__ import annotations

import pytest
import torch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.testing import synthetic_table

PROMPT = [5, 17, 42, 99, 7]


def _vllm_sample(model_dir) -> tuple[list[int], torch.Tensor]:
    """8 tokens sampled by vLLM from the HF folder ``model_dir`` after ``PROMPT``, and vLLM's
    log-prob of each (fp32, in-process engine)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20, seed=0)
    try:
        params = SamplingParams(max_tokens=8, logprobs=0, temperature=1.0, seed=1, ignore_eos=True)
        result = llm.generate([{"prompt_token_ids": PROMPT}], params)[0].outputs[0]
    finally:
        llm.llm_engine.engine_core.shutdown()
    return list(result.token_ids), torch.tensor([next(iter(d.values())).logprob for d in result.logprobs])


def _token_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """``model``'s log-prob of each of ``tokens`` after ``PROMPT``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([PROMPT + tokens])).logits[0, len(PROMPT) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)


@pytest.mark.timeout(300)
def test_hf_export_loads_in_vllm_with_matching_logprobs(tiny_model_dir, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: ~2 s start
    core = TrainerCore(TrainerConfig(lr=1e-2, global_batch_groups=2, max_logprob_mismatch=0.0), tiny_model_dir)
    for seed in range(2):  # move the weights well away from the initial ones
        core.train_step(synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=seed))
    out = core.export_hf(tmp_path / "hf")
    tokens, engine_lp = _vllm_sample(out)
    trainer_lp = _token_logprobs(core.policy, tokens)
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
    tokens, engine_lp = _vllm_sample(tmp_path / "hf" / "merged")
    trainer_lp = _token_logprobs(core.policy, tokens)
    with core.policy.disable_adapter():  # the base alone: what a merge that lost the adapter gives
        base_lp = _token_logprobs(core.policy, tokens)
    assert (trainer_lp - base_lp).abs().max() > 1e-3  # the adapter trained: the test can tell them apart
    torch.testing.assert_close(trainer_lp, engine_lp, atol=1e-4, rtol=0)
