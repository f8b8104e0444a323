"""Trainer checkpoints in-process: atomic save, HF export inside, RNG round trip."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from slime_rl.trainer import weights
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.testing import synthetic_table

pytestmark = pytest.mark.usefixtures("one_thread")


def _core(model_dir, **kw) -> TrainerCore:
    cfg = TrainerConfig(lr=1e-3, global_batch_groups=2, max_logprob_mismatch=0.0, **kw)  # synthetic log-probs
    cfg.batching.max_tokens_per_micro_batch = 64
    return TrainerCore(cfg, model_dir)


def _table(seed: int):
    return synthetic_table(num_groups=2, group_size=2, vocab_size=400, seed=seed)


def _draws() -> tuple[list[float], list[float], list[float]]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_states_round_trip(tiny_model_dir, tmp_path):
    core = _core(tiny_model_dir)
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    core.save_checkpoint(tmp_path / "ck", hf=False)
    expected = _draws()
    assert _draws() != expected  # the streams moved on
    _core(tiny_model_dir).load_checkpoint(tmp_path / "ck")
    assert _draws() == expected  # torch, numpy and python RNGs restored


def test_crash_mid_save_keeps_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    core = _core(tiny_model_dir)
    core.train_step(_table(0))
    ck = tmp_path / "ck"
    core.save_checkpoint(ck, hf=False)
    assert not (tmp_path / "ck.tmp").exists()
    core.train_step(_table(1))

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(weights, "export_hf", crash)  # fails after the DCP and rank files
    with pytest.raises(RuntimeError, match="disk full"):
        core.save_checkpoint(ck, hf=True)
    monkeypatch.undo()
    assert json.loads((ck / "meta.json").read_text())["step"] == 1  # the old checkpoint is intact
    assert (tmp_path / "ck.tmp" / "dcp").exists()
    with pytest.raises(ValueError, match="not a complete trainer checkpoint"):
        _core(tiny_model_dir).load_checkpoint(tmp_path / "ck.tmp")
    assert _core(tiny_model_dir).load_checkpoint(ck) == {"step": 1, "version": 1}
    # The next save replaces it atomically and clears the debris.
    core.save_checkpoint(ck, hf=False)
    assert _core(tiny_model_dir).load_checkpoint(ck) == {"step": 2, "version": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_missing_checkpoint_names_interrupted_save(tiny_model_dir, tmp_path):
    (tmp_path / "ck.tmp").mkdir()
    with pytest.raises(ValueError, match=r"no meta.json\) \(.*ck.tmp exists: a save was interrupted\)"):
        _core(tiny_model_dir).load_checkpoint(tmp_path / "ck")


def test_checkpoint_holds_hf_export_unless_disabled(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    core = _core(tiny_model_dir)
    core.train_step(_table(0))
    core.save_checkpoint(tmp_path / "ck")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / "hf", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, core.policy(input_ids=ids).logits)
    off = _core(tiny_model_dir, checkpoint_hf=False)
    off.save_checkpoint(tmp_path / "ck2")
    assert (tmp_path / "ck2" / "meta.json").exists() and not (tmp_path / "ck2" / "hf").exists()
