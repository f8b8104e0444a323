"""TrainerCore.train_step on the tiny model against hand-built objectives.

The test computes each token's log-prob with its own forward pass (model logits ->
log-softmax), builds the expected per-token loss coefficients with plain python floats
(PPO clip, importance weight, entropy/SFT/KL terms), and compares ``train/loss`` and the
parameter gradients of the update with d/dtheta of sum_t coef_t * logp_t / N.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
import torch
from slime_rl.buffers.schema import Sample, samples_to_batch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore

OFFSETS = [-1.0, 0.5, 0.0, 0.3, -0.4]  # engine log-prob = trainer log-prob + offset (cycled)
PROMPTS = [[5, 17, 42], [9, 8, 77, 31]]
RESPONSES = [[12, 99, 7, 250, 33], [61, 61, 3, 140], [18, 222, 5, 9, 90], [44, 301, 6]]


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(groups: int, **kw) -> TrainerConfig:
    cfg = TrainerConfig(lr=1e-3, global_batch_groups=groups)
    cfg.batching.max_tokens_per_micro_batch = 64
    cfg.optim.grad_clip = None  # compare raw gradients
    cfg.advantage.estimator = "rloo"
    for k, v in kw.items():
        section, _, name = k.rpartition("__")
        setattr(getattr(cfg, section) if section else cfg, name, v)
    return cfg


def _token_logprobs(model, prompt: list[int], response: list[int], entropy: bool = False):
    """log pi(response_t | prefix) (with grad), by hand: one unpadded row, logits -> log-softmax."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(response)].float()
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    lp = logp[torch.arange(len(response)), torch.tensor(response)]
    if entropy:
        return lp, -(logp.exp() * logp).sum(-1)
    return lp


def _table(rows: list[tuple[int, int, float]], behaviour: list[list[float]], status: list[str] | None = None) -> pa.Table:
    """rows: (group, response index, reward); group g uses PROMPTS[g]."""
    samples = [
        Sample(
            sample_id=f"s{i}",
            group_id=f"g{g}",
            prompt_ids=PROMPTS[g],
            response_ids=RESPONSES[r],
            response_logprobs=behaviour[i],
            reward=reward,
            status=status[i] if status else "completed",
        )
        for i, (g, r, reward) in enumerate(rows)
    ]
    return pa.Table.from_batches([samples_to_batch(samples)])


def _grads(model, surrogate: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    surrogate.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-4) -> None:
    assert set(got) == set(expected)
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 1e-6, "the expected gradient is zero: the test would prove nothing"
    worst = max((got[n] - expected[n]).abs().max().item() for n in expected)
    assert worst <= rel * scale, f"max |grad diff| {worst} vs scale {scale}"


def _ppo(r: float, a: float, eps_low: float = 0.2, eps_high: float = 0.28, dual: float = 3.0) -> tuple[float, float]:
    """PPO token loss and its derivative w.r.t. log pi (d r / d logp = r), by hand."""
    unclipped, clipped = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
    loss, d = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
    if a < 0 and loss > -dual * a:
        loss, d = -dual * a, 0.0
    return loss, d


IS = {
    "truncate": lambda w, cap: min(w, cap),
    "mask": lambda w, cap: w if w <= cap else 0.0,
    "none": lambda w, cap: 1.0,
}


@pytest.mark.parametrize(
    ("proximal", "is_mode"), [("trainer", "truncate"), ("trainer", "mask"), ("trainer", "none"), ("engine", "none")]
)
def test_off_policy_loss_and_gradient_by_hand(tiny_model_dir, proximal, is_mode):
    rows = [(0, 0, 1.0), (0, 1, 0.0)]  # rloo: A = +1, -1
    core = TrainerCore(_cfg(1, off_policy__proximal=proximal, off_policy__is_mode=is_mode, off_policy__is_cap=2.0), tiny_model_dir)
    lps = [_token_logprobs(core.policy, PROMPTS[g], RESPONSES[r]) for g, r, _ in rows]
    behaviour = [[v + OFFSETS[t % 5] for t, v in enumerate(lp.tolist())] for lp in lps]
    n = sum(len(lp) for lp in lps)
    loss, surrogate = 0.0, torch.zeros(())
    for (_, _, _), a, lp, beh in zip(rows, (1.0, -1.0), lps, behaviour, strict=True):
        for t, v in enumerate(lp.tolist()):
            if proximal == "trainer":  # ratio pi/pi_prox = 1 on the update pass; w = pi_prox/pi_engine
                r, w = 1.0, IS[is_mode](math.exp(v - beh[t]), 2.0)
            else:  # ratio pi/pi_engine, no weight
                r, w = math.exp(v - beh[t]), 1.0
            tok_loss, d = _ppo(r, a)
            loss += w * tok_loss / n
            surrogate = surrogate + w * d * lp[t] / n
    expected = _grads(core.policy, surrogate)
    metrics = core.train_step(_table(rows, behaviour))
    assert metrics["train/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    _assert_grads_close(core.gradients(), expected)


def test_decoupled_objective_on_second_update_uses_pre_update_proximal(tiny_model_dir):
    """updates_per_batch=2: the second mini-batch's ratio is pi_theta1 / pi_theta0 (the trainer's
    pre-step log-probs), its weight min(pi_theta0 / pi_engine, cap)."""
    rows = [(0, 0, 1.0), (0, 1, 0.0), (1, 2, 0.0), (1, 3, 1.0)]
    cfg = _cfg(2, batching__updates_per_batch=2, off_policy__is_mode="truncate", off_policy__is_cap=2.0)
    core = TrainerCore(cfg, tiny_model_dir)
    with torch.no_grad():
        lp0 = [_token_logprobs(core.policy, PROMPTS[g], RESPONSES[r]) for g, r, _ in rows]
    behaviour = [[v + OFFSETS[t % 5] for t, v in enumerate(lp.tolist())] for lp in lp0]
    # theta1 = the weights after the first mini-batch (group 0 alone, same optimizer state).
    first = TrainerCore(_cfg(1, off_policy__is_mode="truncate", off_policy__is_cap=2.0), tiny_model_dir)
    first.train_step(_table(rows[:2], behaviour[:2]))
    lp1 = [_token_logprobs(first.policy, PROMPTS[g], RESPONSES[r]) for g, r, _ in rows[2:]]
    n = sum(len(lp) for lp in lp1)
    surrogate, moved = torch.zeros(()), 0.0
    for a, lp, prox, beh in zip((-1.0, 1.0), lp1, lp0[2:], behaviour[2:], strict=True):
        for t, v in enumerate(lp.tolist()):
            r = math.exp(v - prox[t].item())
            w = min(math.exp(prox[t].item() - beh[t]), 2.0)
            moved = max(moved, abs(r - 1))
            surrogate = surrogate + w * _ppo(r, a)[1] * lp[t] / n
    assert moved > 1e-3, "the first update did not move the policy"
    expected = _grads(first.policy, surrogate)
    core.train_step(_table(rows, behaviour))
    _assert_grads_close(core.gradients(), expected, rel=1e-3)


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_entropy_sft_and_kl_terms_by_hand(tiny_model_dir, tiny_model_dir_b, estimator):
    """Equal rewards in each group -> zero advantage: the loss is only entropy, SFT and KL terms."""
    from transformers import AutoModelForCausalLM

    rows = [(0, 0, 1.0), (0, 1, 1.0), (1, 2, 0.0), (1, 3, 0.0)]
    cfg = _cfg(2, loss__entropy_coef=0.05, loss__sft_coef=0.3, loss__sft_min_reward=0.5,
               kl__coef=0.2, kl__estimator=estimator, kl__mode="loss", kl__ref_path=str(tiny_model_dir_b))
    core = TrainerCore(cfg, tiny_model_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir_b, dtype=torch.float32)
    n = sum(len(RESPONSES[r]) for _, r, _ in rows)
    loss, surrogate = 0.0, torch.zeros(())
    behaviour = []
    for _, r, reward in rows:
        lp, ent = _token_logprobs(core.policy, PROMPTS[_], RESPONSES[r], entropy=True)
        with torch.no_grad():
            lref = _token_logprobs(ref, PROMPTS[_], RESPONSES[r]).tolist()
        behaviour.append(lp.tolist())
        for t, v in enumerate(lp.tolist()):
            x = v - lref[t]
            kl, dkl = (x, 1.0) if estimator == "k1" else (math.exp(-x) - 1 + x, 1 - math.exp(-x))
            sft = 1.0 if reward >= 0.5 else 0.0
            loss += (-0.05 * ent[t].item() + 0.2 * kl - 0.3 * sft * v) / n
            surrogate = surrogate + (-0.05 * ent[t] + (0.2 * dkl - 0.3 * sft) * lp[t]) / n
    expected = _grads(core.policy, surrogate)
    metrics = core.train_step(_table(rows, behaviour))
    assert metrics["train/loss"] == pytest.approx(loss, rel=1e-4, abs=1e-6)
    _assert_grads_close(core.gradients(), expected)


def test_excluded_statuses_get_no_loss_and_leave_group_baselines(tiny_model_dir):
    """A failed and an aborted sample: same gradient as the batch without them (rescaled by the
    token count), although their rewards would shift the RLOO baselines."""
    rows = [(0, 0, 1.0), (0, 1, 0.0), (0, 2, 1.0), (1, 3, 1.0), (1, 0, 0.0)]
    status = ["completed", "truncated", "failed", "completed", "aborted"]
    behaviour = [[-3.0] * len(RESPONSES[r]) for _, r, _ in rows]  # constant: not the model's
    full = TrainerCore(_cfg(2, max_logprob_mismatch=0.0), tiny_model_dir)
    m_full = full.train_step(_table(rows, behaviour, status))
    kept = [0, 1, 3]
    ref = TrainerCore(_cfg(2, max_logprob_mismatch=0.0), tiny_model_dir)
    m_ref = ref.train_step(_table([rows[i] for i in kept], [behaviour[i] for i in kept]))
    assert m_full["train/excluded_samples"] == 2.0
    assert m_full["train/loss_tokens"] == m_ref["train/loss_tokens"] == sum(len(RESPONSES[rows[i][1]]) for i in kept)
    assert m_full["train/loss"] == pytest.approx(m_ref["train/loss"], rel=1e-5)
    _assert_grads_close(full.gradients(), ref.gradients(), rel=1e-5)
    # Only statuses listed in exclude_status are dropped.
    keep_all = TrainerCore(_cfg(2, exclude_status=[], max_logprob_mismatch=0.0), tiny_model_dir)
    m_all = keep_all.train_step(_table(rows, behaviour, status))
    assert m_all["train/excluded_samples"] == 0.0 and m_all["train/loss_tokens"] > m_full["train/loss_tokens"]


def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_model_dir):
    rows = [(0, 0, 1.0), (0, 1, 0.0), (1, 2, 0.0), (1, 3, 1.0)]
    behaviour = [[-3.0] * len(RESPONSES[r]) for _, r, _ in rows]
    out = []
    for ckpt in (False, True):
        core = TrainerCore(_cfg(2, batching__gradient_checkpointing=ckpt, max_logprob_mismatch=0.0), tiny_model_dir)
        assert core.policy.is_gradient_checkpointing == ckpt
        out.append((core.train_step(_table(rows, behaviour)), core.gradients()))
    (m0, g0), (m1, g1) = out
    assert m1["train/loss"] == pytest.approx(m0["train/loss"], rel=1e-6)
    _assert_grads_close(g1, g0, rel=1e-5)


def test_batch_must_hold_global_batch_groups(tiny_model_dir):
    rows = [(0, 0, 1.0), (0, 1, 0.0), (1, 2, 0.0), (1, 3, 1.0)]
    behaviour = [[-3.0] * len(RESPONSES[r]) for _, r, _ in rows]
    core = TrainerCore(_cfg(3), tiny_model_dir)
    with pytest.raises(ValueError, match=r"has 2 group\(s\) but trainer.global_batch_groups=3"):
        core.train_step(_table(rows, behaviour))
