"""Pure parts of the rollout side: admission rule, filters, engine result -> Sample."""

from __future__ import annotations

from pathlib import Path

import pytest
from slime_rl.buffers.schema import Sample, samples_to_batch
from slime_rl.buffers.validation import validate_batch
from slime_rl.rollout.admission import Admission, GroupState, GroupWork
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import FinishReason, GenerateResult
from slime_rl.rollout.filters import GroupFilter, nonzero_std
from slime_rl.rollout.plugins import PluginLoadError
from slime_rl.rollout.samples import build_sample, merge_results, status_of


# ---- admission -------------------------------------------------------------------------------
def _admit_all(a: Admission, limit: int = 100) -> list[GroupWork]:
    """Admit new groups until the rule refuses; each starts on an engine at once."""
    out = []
    while len(out) < limit and (w := a.admit(f"g{a.accepted + a.in_flight}-{len(out)}", 0, 0, None)) is not None:
        a.start(w, "engine-0")
        out.append(w)
    return out


def _accept(a: Admission, works: list[GroupWork]) -> None:
    for w in works:
        a.finish(w)
    a.accept(a.take_finished())


def test_admission_bounds_committed_groups_by_version() -> None:
    a = Admission(global_batch_groups=4, max_staleness=1)
    works = _admit_all(a)
    assert len(works) == 8  # (S + 0 + 1) * B
    a.release(works[0]), a.release(works[1])  # filtered out: slots come back
    more = _admit_all(a)
    assert len(more) == 2
    _accept(a, works[2:] + more)
    assert a.accepted == 8 and a.in_flight == 0
    assert not _admit_all(a)  # accepted groups still count until the trainer moves on
    a.set_engine_version(1)
    assert len(_admit_all(a)) == 4
    a.set_dropped(2)  # groups the buffer dropped as stale are never trained: their slots reopen
    assert len(_admit_all(a)) == 2


def test_admission_zero_staleness_is_one_batch_per_version() -> None:
    a = Admission(global_batch_groups=3, max_staleness=0)
    for version in range(4):
        a.set_engine_version(version)
        works = _admit_all(a)
        assert len(works) == 3
        _accept(a, works)


@pytest.mark.parametrize("B,S", [(1, 0), (2, 1), (4, 3), (8, 2)])
def test_admission_rule_keeps_every_trained_group_within_the_bound(B: int, S: int) -> None:
    """Simulate: the k-th accepted group is trained at version k // B; it was admitted at the
    engine version of its admission. Staleness must never exceed S, and the run never stalls."""
    a = Admission(global_batch_groups=B, max_staleness=S)
    admitted_at: list[int] = []
    trained = 0
    for _ in range(200):
        works = _admit_all(a)
        admitted_at += [a.engine_version] * len(works)
        _accept(a, works)  # every group in flight finishes
        while len(admitted_at) - trained >= B:  # the trainer takes B groups per step
            for k in range(trained, trained + B):
                assert k // B - admitted_at[k] <= S
            trained += B
            a.set_engine_version(trained // B)
    assert trained >= 100 * B


def test_admission_states_requeue_first_and_refuse_wrong_transitions() -> None:
    a = Admission(global_batch_groups=2, max_staleness=1)
    g0, g1, g2 = (a.admit(f"g{i}", i, 0, None) for i in range(3))
    assert [w.group_id for w in a.queued()] == ["g0", "g1", "g2"]
    a.start(g0, "engine-0"), a.start(g1, "engine-1")
    assert (g0.state, g0.engine, g0.attempts) == (GroupState.RUNNING, "engine-0", 1)
    a.requeue(g1)  # engine-1 lost: back in front, slot kept
    assert a.next_queued() is g1 and a.in_flight == 3 and a.count(GroupState.QUEUED) == 2
    a.start(g1, "engine-0")
    assert g1.attempts == 2
    with pytest.raises(AssertionError, match="g2 is queued, expected running"):
        a.finish(g2)
    a.finish(g0, ["s0"])
    with pytest.raises(AssertionError, match="g1 is running, expected finished"):
        a.accept([g1])
    assert a.take_finished() == [g0] and g0.samples == ["s0"]


def test_admission_state_round_trip_requeues_every_group_in_flight() -> None:
    a = Admission(2, 1)
    a.accepted, a.dropped, a.engine_version = 7, 1, 3
    running, queued = a.admit("g-run", 4, 1, None), a.admit("g-q", 5, 1, None)
    a.start(running, "engine-0")
    b = Admission(2, 1)
    b.load_state_dict(a.state_dict(), prompt_of=lambda i: f"prompt-{i}")
    assert (b.accepted, b.dropped, b.engine_version, b.in_flight) == (7, 1, 3, 2)
    assert [(w.group_id, w.ds_index, w.prompt, w.state) for w in b.queued()] == [
        ("g-run", 4, "prompt-4", GroupState.QUEUED), ("g-q", 5, "prompt-5", GroupState.QUEUED)]
    assert queued.state is GroupState.QUEUED


# ---- filters -------------------------------------------------------------------------------
def _group(rewards: list[float], status: str = "completed") -> list[Sample]:
    return [Sample(f"g/{i}", "g", [1], [2], reward=r, status=status) for i, r in enumerate(rewards)]


@pytest.mark.parametrize(
    "rewards,keep",
    [([0, 0, 0, 0], False), ([1, 1, 1, 1], False), ([1.2] * 8, False), ([0, 1, 0, 0], True), ([0.1, 0.1000001], False), ([-7.7, -7.6], True)],
)
def test_nonzero_std_filter(rewards: list[float], keep: bool) -> None:
    assert nonzero_std(_group(rewards))[0] is keep


def test_filter_from_a_file_and_its_errors(tmp_path: Path) -> None:
    f = tmp_path / "my_filter.py"
    f.write_text("def long_enough(samples):\n    return (len(samples) > 2, 'small')\n\ndef boom(samples):\n    raise RuntimeError('bug')\n")
    flt = GroupFilter(f"{f}:long_enough")
    assert flt(_group([0, 1, 2])) == (True, "small")
    assert flt(_group([0, 1])) == (False, "small")
    assert GroupFilter(f"{f}:boom")(_group([0, 1])) == (True, "filter_error")  # a buggy filter keeps the group
    with pytest.raises(PluginLoadError, match="rollout.filter.*no attribute 'nope'"):
        GroupFilter(f"{f}:nope")
    with pytest.raises(PluginLoadError, match="no such file"):
        GroupFilter(f"{tmp_path / 'missing.py'}:f")


# ---- engine result -> Sample -------------------------------------------------------------------
class _Tok:
    """Decodes ids to characters; id 9 is the special `</think>`, 0 the EOS."""

    eos_token = "<E>"
    table = {0: "<E>", 9: "</think>"}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(("" if skip_special_tokens else self.table[i]) if i in self.table else chr(96 + i) for i in ids)


def _prompt(mode: str = "think") -> Prompt:
    return Prompt(row=3, uid="train-3", prompt_ids=(5, 6), text="q", messages=({"role": "user", "content": "q"},),
                  label="ab", mode=mode, tools=None, metadata={"data_source": "x", "extra": 1}, data_source="x")


def _result(rid: str, tokens: list[int], versions: list[int], reason: FinishReason, start: int = 0, end: int = 0) -> GenerateResult:
    return GenerateResult(rid, tokens, [-0.5] * len(tokens), reason, versions, start, end)


def test_build_sample_keeps_special_tokens_and_fills_every_column() -> None:
    res = _result("r", [3, 9, 1, 2, 0], [4, 4, 4, 5, 5], FinishReason.STOP, 4, 5)
    s = build_sample(_prompt(), res, group_id="train-3-e0", index=2, tokenizer=_Tok(), temperature=0.7, gen_seconds=1.5)
    assert s.response == "c</think>ab"  # `</think>` kept (a think-mode reward needs it), final EOS cut
    assert (s.sample_id, s.group_id, s.mode, s.label) == ("train-3-e0/2", "train-3-e0", "think", "ab")
    assert (s.policy_version, s.policy_version_end, s.token_versions) == (4, 5, [4, 4, 4, 5, 5])
    assert s.status == "completed" and s.loss_mask == [1] * 5 and s.response_logprobs == [-0.5] * 5
    assert s.metadata["extra"] == 1 and s.metadata["temperature"] == 0.7 and s.metadata["data_source"] == "x"
    validate_batch(samples_to_batch([s]))

    from slime_rl.rewards.builtin.answers import math_answer

    s.label = "12"
    s.response = "<think>\n5 + 7 = 12\n</think>\n\nThe answer is 12."
    assert math_answer(s)["score"] == 1.0


@pytest.mark.parametrize("reason,status", [(FinishReason.STOP, "completed"), (FinishReason.LENGTH, "truncated"), (FinishReason.ABORT, "aborted")])
def test_status_from_finish_reason(reason: FinishReason, status: str) -> None:
    assert status_of(_result("r", [1], [0], reason)).value == status


def test_merge_continuations_keeps_tokens_logprobs_and_versions_aligned() -> None:
    a = _result("r/0", [1, 2], [3, 3], FinishReason.ABORT, 3, 3)
    b = _result("r/1", [3], [4], FinishReason.STOP, 4, 4)
    m = merge_results([a, b])
    assert m.token_ids == [1, 2, 3] and m.token_versions == [3, 3, 4] and len(m.logprobs) == 3
    assert (m.policy_version, m.policy_version_end, m.finish_reason, m.pieces) == (3, 4, FinishReason.STOP, 2)
    s = build_sample(_prompt("non_think"), m, group_id="g", index=0, tokenizer=_Tok(), temperature=1.0, gen_seconds=0)
    assert s.policy_version < s.policy_version_end and s.metadata["pieces"] == 2
    with pytest.raises(ValueError, match="3 tokens, 2 log-probs"):
        merge_results([GenerateResult("bad", [1, 2, 3], [0.0, 0.0], FinishReason.STOP, [0, 0, 0], 0, 0)])
