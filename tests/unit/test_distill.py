"""On-policy distillation parts: the advantage math (trainer/distill.py), the teacher_logprobs
column (schema, validation, RankBatch), the teacher scorer (rollout/teacher.py) against a direct
transformers forward, start-up errors, and one train step with the teacher term."""

from __future__ import annotations

import asyncio
import shutil

import pyarrow as pa
import pytest
import torch
from slime_rl.buffers.schema import Sample, batch_to_samples, conform_batch, samples_to_batch
from slime_rl.buffers.validation import validate_batch
from slime_rl.rollout.teacher import (
    TeacherModel,
    TeacherScorer,
    TeacherSpec,
    check_same_tokenizer,
    start_teacher,
)
from slime_rl.trainer.advantages import AdvantageOutputs
from slime_rl.trainer.batching import RankBatch
from slime_rl.trainer.config import TrainerConfig
from slime_rl.trainer.core import TrainerCore
from slime_rl.trainer.distill import apply_distill, check_scored, distill_advantages, record_distill
from slime_rl.trainer.metrics import StepMetrics
from slime_rl.trainer.testing import synthetic_table

from slime_rl.config import ConfigError, load_config

VOCAB = 400


# -- the advantage math ------------------------------------------------------------------------
def _hand() -> tuple[torch.Tensor, ...]:
    teacher_NR = torch.tensor([[-0.5, -2.0, -1.0], [-3.0, -0.1, 0.0]])
    behaviour_NR = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -0.1, 0.0]])
    mask_NR = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # row 0: last token masked; row 1: padding
    reward_adv_NR = torch.tensor([[0.7, 0.7, 0.7], [-0.7, -0.7, -0.7]])
    return teacher_NR, behaviour_NR, mask_NR, reward_adv_NR


def test_only_mode_advantage_is_coef_times_teacher_minus_student_per_token() -> None:
    t, b, m, a = _hand()
    got = apply_distill(a, t, b, m, coef=2.0, only=True)
    assert torch.allclose(got, torch.tensor([[1.0, -2.0, 0.0], [-4.0, 0.0, 0.0]]))


def test_add_mode_adds_the_term_to_the_reward_advantage_and_respects_the_mask() -> None:
    t, b, m, a = _hand()
    got = apply_distill(a, t, b, m, coef=0.5, only=False)
    want = a + 0.5 * torch.tensor([[0.5, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    assert torch.allclose(got, want)
    assert got[0, 2] == a[0, 2]  # masked token: the teacher term adds nothing


def test_teacher_equal_to_student_gives_zero_advantage() -> None:
    _, b, m, a = _hand()
    assert torch.count_nonzero(apply_distill(a, b.clone(), b, m, coef=3.0, only=True)) == 0
    assert torch.equal(apply_distill(a, b.clone(), b, m, coef=3.0, only=False), a)


def test_metrics_are_token_means_over_loss_tokens() -> None:
    t, b, m, _ = _hand()
    metrics = StepMetrics()
    record_distill(metrics, t, b, m)
    out = metrics.reduce()
    # log p_student - log p_teacher on the 4 loss tokens: -0.5, 1.0, 2.0, 0.0
    assert out["distill/reverse_kl"] == pytest.approx(2.5 / 4)
    assert out["distill/teacher_logprob"] == pytest.approx((-0.5 - 2.0 - 3.0 - 0.1) / 4)
    assert out["distill/student_logprob"] == pytest.approx((-1.0 - 1.0 - 1.0 - 0.1) / 4)


def test_rows_with_loss_tokens_must_be_scored() -> None:
    _, _, m, _ = _hand()
    check_scored(torch.tensor([True, True]), m)
    check_scored(torch.tensor([True, False]), m * torch.tensor([[1.0], [0.0]]))  # no loss token: fine
    with pytest.raises(ValueError, match=r"row 1 of this rank's batch has no teacher log-probs"):
        check_scored(torch.tensor([True, False]), m)
    with pytest.raises(ValueError, match=r"trainer.distill.teacher_path is set but row 0"):
        check_scored(None, m)


# -- the column ----------------------------------------------------------------------------------
def _samples(scored: bool = True) -> list[Sample]:
    out = []
    for i, n in enumerate([3, 1, 2]):
        out.append(Sample(sample_id=f"g0-{i}", group_id="g0", prompt_ids=[5, 6], response_ids=list(range(7, 7 + n)),
                          response_logprobs=[-1.0] * n, teacher_logprobs=[-0.5 * (i + 1)] * n if scored and i != 1 else None))
    return out


def test_teacher_logprobs_column_round_trips_and_reaches_the_rank_batch() -> None:
    batch = samples_to_batch(_samples())
    validate_batch(batch)
    assert batch_to_samples(batch)[1].teacher_logprobs == []
    rb = RankBatch.from_table(pa.Table.from_batches([batch]))
    assert rb.teacher_scored_N.tolist() == [True, False, True]
    assert rb.teacher_NR.tolist() == [[-0.5, -0.5, -0.5], [0.0, 0.0, 0.0], [-1.5, -1.5, 0.0]]
    plain = RankBatch.from_table(pa.Table.from_batches([samples_to_batch(_samples(scored=False))]))
    assert plain.teacher_NR is None and plain.teacher_scored_N is None
    old = batch.drop_columns(["teacher_logprobs"])  # data of schema v2
    validate_batch(old)
    assert conform_batch(old).column("teacher_logprobs").to_pylist() == [[], [], []]


def test_validation_names_a_teacher_column_of_the_wrong_length() -> None:
    samples = _samples()
    samples[2].teacher_logprobs = [-1.0]
    with pytest.raises(ValueError, match=r"column 'teacher_logprobs' row 2 has 1 entries, expected 0 \(not scored\) or 2"):
        validate_batch(samples_to_batch(samples))
    samples = _samples()
    samples[0].teacher_logprobs = [-1.0, float("nan"), -1.0]
    with pytest.raises(ValueError, match=r"column 'teacher_logprobs' row 0 holds a null or non-finite entry"):
        validate_batch(samples_to_batch(samples))


# -- the teacher scorer --------------------------------------------------------------------------
def _seqs() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for p, r in [(5, 7), (9, 3), (4, 0), (12, 11), (3, 1)]:
        ids = torch.randint(3, VOCAB, (p + r,), generator=g).tolist()
        out.append((ids[:p], ids[p:]))
    return out


@torch.no_grad()
def _direct(model_dir, seqs, temperature: float) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    out = []
    for prompt, resp in seqs:
        logits = model(input_ids=torch.tensor([prompt + resp])).logits[0].float() / temperature
        logp = torch.log_softmax(logits, dim=-1)
        out.append([logp[len(prompt) - 1 + j, tok].item() for j, tok in enumerate(resp)])
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_teacher_logprobs_equal_a_direct_transformers_forward(tiny_model_dir, temperature: float) -> None:
    seqs = _seqs()
    # a small token budget: several padded batches of different widths
    teacher = TeacherModel(TeacherSpec(str(tiny_model_dir), temperature=temperature, max_tokens_per_batch=40))
    assert len(teacher.batches(seqs)) > 1
    got = teacher.score(seqs)
    want = _direct(tiny_model_dir, seqs, temperature)
    assert [len(x) for x in got] == [len(r) for _, r in seqs]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=1e-4)


@pytest.mark.usefixtures("one_thread")
def test_scorer_batches_concurrent_groups_and_client_fills_samples(tiny_model_dir) -> None:
    spec = TeacherSpec(str(tiny_model_dir))
    client = start_teacher(spec, name=None, use_ray=False)
    assert isinstance(client.scorer, TeacherScorer)
    groups = [[Sample(sample_id=f"g{g}-{k}", group_id=f"g{g}", prompt_ids=p, response_ids=r) for k, (p, r) in
               enumerate(_seqs()[g : g + 2])] for g in range(4)]

    async def go() -> None:
        await client.load()
        await asyncio.gather(*(client.fill(s, f"g{g}") for g, s in enumerate(groups)))
        await client.close()

    asyncio.run(go())
    assert client.scorer.forwards < 4  # groups that arrived together shared a forward
    direct = _direct(tiny_model_dir, [(s.prompt_ids, s.response_ids) for g in groups for s in g], 1.0)
    for s, w in zip([s for g in groups for s in g], direct, strict=True):
        assert s.teacher_logprobs == pytest.approx(w, abs=1e-4)
    m = client.metrics()
    assert m["distill/teacher_tokens"] == sum(len(s.response_ids) for g in groups for s in g)
    assert m["distill/teacher_seconds"] > 0 and m["distill/teacher_logprob_sampled"] < 0
    assert client.metrics()["distill/teacher_tokens"] == 0  # the window was reset


def test_client_reports_the_reverse_kl_per_mode_over_loss_tokens(tiny_model_dir) -> None:
    """`distill/reverse_kl/<mode>`: mean log p_student - log p_teacher over each mode's loss tokens
    (tool tokens with mask 0 left out), so think and non-think distillation can be told apart."""
    client = start_teacher(TeacherSpec(str(tiny_model_dir)), name=None, use_ray=False)
    seqs = _seqs()[:2]
    think = Sample(sample_id="a", group_id="g", prompt_ids=seqs[0][0], response_ids=seqs[0][1], mode="think",
                   response_logprobs=[-0.5] * len(seqs[0][1]), loss_mask=[1] * len(seqs[0][1]))
    masked = [1] + [0] * (len(seqs[1][1]) - 1)
    plain = Sample(sample_id="b", group_id="g", prompt_ids=seqs[1][0], response_ids=seqs[1][1], mode="non_think",
                   response_logprobs=[-0.25] * len(seqs[1][1]), loss_mask=masked)

    async def go() -> None:
        await client.load()
        await client.fill([think, plain], "g")
        await client.close()

    asyncio.run(go())
    m = client.metrics()
    assert m["distill/reverse_kl/think"] == pytest.approx(sum(-0.5 - t for t in think.teacher_logprobs) / len(think.teacher_logprobs))
    assert m["distill/reverse_kl/non_think"] == pytest.approx(-0.25 - plain.teacher_logprobs[0])


# -- start-up errors -------------------------------------------------------------------------------
def test_missing_teacher_path_is_named_at_load(tmp_path, tiny_model_dir) -> None:
    (tmp_path / "train.jsonl").write_text('{"prompt": "1+1", "label": "2"}\n')
    base = [f"model.path={tiny_model_dir}", f"data.train_path={tmp_path / 'train.jsonl'}"]
    with pytest.raises(ConfigError, match=r"trainer.distill.teacher_path='/no/such/teacher' does not exist; point it at "
                                          r"an existing folder"):
        load_config(None, [*base, "trainer.distill.teacher_path=/no/such/teacher"])
    cfg = load_config(None, [*base, f"trainer.distill.teacher_path={tiny_model_dir}", "trainer.distill.only=true"])
    assert cfg.trainer.distill.enabled and cfg.trainer.distill.only


def test_teacher_with_another_tokenizer_is_refused_naming_the_key(tmp_path, tiny_model_dir) -> None:
    from slime_rl.tiny.tokenizer import build_tokenizer, save_tokenizer

    check_same_tokenizer(str(tiny_model_dir), str(tiny_model_dir))
    other = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, other)
    for f in other.glob("tokenizer*"):
        f.unlink()
    save_tokenizer(build_tokenizer(vocab_size=300, seed=3), other)
    with pytest.raises(ValueError, match=r"trainer.distill.teacher_path='.*teacher' has another tokenizer than the "
                                         r"student"):
        check_same_tokenizer(str(other), str(tiny_model_dir))


# -- one train step --------------------------------------------------------------------------------
def _with_teacher(table: pa.Table, values: list[list[float]]) -> pa.Table:
    i = table.schema.get_field_index("teacher_logprobs")
    return table.set_column(i, table.schema.field(i), pa.array(values, type=pa.list_(pa.float32())))


@pytest.mark.usefixtures("one_thread")
def test_train_step_with_the_teacher_term(tiny_model_dir) -> None:
    cfg = TrainerConfig(lr=1e-3, global_batch_groups=2)
    cfg.max_logprob_mismatch = 0.0  # synthetic behaviour log-probs
    cfg.distill.teacher_path = str(tiny_model_dir)
    cfg.distill.only = True
    cfg.distill.center = False  # a teacher better by a constant: centred, that term would be all zero
    core = TrainerCore(cfg, tiny_model_dir)
    table = synthetic_table(num_groups=2, group_size=2, vocab_size=VOCAB, seed=0, behaviour_logprob=-3.0)
    with pytest.raises(ValueError, match=r"trainer rank 0 step 1: trainer.distill.teacher_path is set but row 0"):
        core.train_step(table)
    lens = [len(r) for r in table.column("response_ids").to_pylist()]
    same = _with_teacher(table, [[-3.0] * n for n in lens])  # teacher = student: nothing to learn
    before = {k: v.clone() for k, v in core.policy.state_dict().items()}
    out = core.train_step(same)
    assert out["distill/reverse_kl"] == pytest.approx(0.0) and out["train/advantage_mean"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in core.policy.state_dict().items())  # zero gradient
    better = _with_teacher(table, [[-1.0] * n for n in lens])
    out = core.train_step(better)
    assert out["distill/reverse_kl"] == pytest.approx(-2.0) and out["train/advantage_mean"] == pytest.approx(2.0)
    assert out["distill/teacher_logprob"] == pytest.approx(-1.0)
    assert any(not torch.equal(before[k], v) for k, v in core.policy.state_dict().items())


def test_distill_advantages_keeps_returns() -> None:
    t, b, m, a = _hand()
    rb = RankBatch(prompt_ids=[[1], [1]], response_ids=[[2, 3, 4], [2, 3]], mask_NR=m, behaviour_NR=b,
                   token_versions_NR=torch.zeros(2, 3, dtype=torch.long), rewards_N=torch.zeros(2),
                   group_index_N=torch.zeros(2, dtype=torch.long), policy_version_N=torch.zeros(2, dtype=torch.long),
                   teacher_NR=t, teacher_scored_N=torch.tensor([True, True]))
    cfg = TrainerConfig().distill
    cfg.coef, cfg.only = 1.0, False
    out = distill_advantages(AdvantageOutputs(a, a * 2), rb, b, m, cfg, StepMetrics())
    assert torch.equal(out.returns_NR, a * 2)
    assert torch.allclose(out.advantages_NR, apply_distill(a, t, b, m, 1.0, False, cfg.center))


def test_centered_term_has_zero_mean_over_loss_tokens_and_keeps_the_order() -> None:
    """center: the batch mean of d is the baseline: the term sums to 0 over loss tokens, the
    token the teacher likes most relative to the student still gets the largest advantage."""
    from slime_rl.trainer.distill import apply_distill

    t = torch.tensor([[-1.0, -4.0, -2.0], [-3.0, -1.0, 0.0]])
    b = torch.tensor([[-2.0, -2.0, -2.0], [-2.0, -2.0, -2.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    a = apply_distill(torch.zeros(2, 3), t, b, m, coef=1.0, only=True, center=True)
    assert abs(float((a * m).sum())) < 1e-6 and float(a[1, 2]) == 0.0
    raw = apply_distill(torch.zeros(2, 3), t, b, m, coef=1.0, only=True)
    on = m > 0
    assert torch.equal(torch.argsort(a[on]), torch.argsort(raw[on]))
