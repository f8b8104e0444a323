"""The `longtail` tiny task (slime_rl/tiny/longtail.py): data, reply lengths, a tiny build."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from slime_rl.tiny import build_tokenizer, extract_answer
from slime_rl.tiny.longtail import (
    LongtailSpec,
    build_longtail_tiny_model,
    chain_problem,
    length_stats,
    make_longtail_dataset,
)
from slime_rl.tiny.task import is_hasty_reply, render_response


def test_dataset_is_deterministic_mixed_and_disjoint() -> None:
    a = make_longtail_dataset(seed=1, n_train=400, n_eval=40)
    assert a == make_longtail_dataset(seed=1, n_train=400, n_eval=40)
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}
    chains = [r for r in a["train"] if r["kind"] == "chain"]
    assert 0.12 < len(chains) / len(a["train"]) < 0.28  # chain_frac 0.2
    assert all(r["mode"] == "think" for r in chains)
    assert all(r["mode"] == "non_think" for r in a["train"] if r["kind"] == "arith")
    assert {r["solver"] for r in a["train"]} == {"careful", "hasty"}
    assert all(r["solver"] == "careful" for r in a["eval"])


def test_chain_lines_are_right_and_end_in_the_label() -> None:
    spec = LongtailSpec()
    rng = random.Random(0)
    for _ in range(50):
        text, answer, lines = chain_problem(rng, spec)
        assert spec.min_days <= len(lines) <= spec.max_days
        assert f"for {len(lines)} days" in text
        for day, line in enumerate(lines, start=1):
            head, rest = line.split(": ")
            left, total = rest.split(" = ")
            a, b = left.split(" + ")
            assert int(head) == day and int(a) + int(b) == int(total)
        assert lines[-1].endswith(f"= {answer}")


def test_careful_chains_are_tens_of_times_longer_than_short_replies() -> None:
    """The tail the task exists for: careful chain replies against the median reply."""
    tok = build_tokenizer()
    rows = make_longtail_dataset(seed=0, n_train=300, n_eval=1)["train"]
    n_tokens = {id(r): len(tok(render_response(r, r["mode"] == "think"), add_special_tokens=False)["input_ids"]) for r in rows}
    careful_chains = [n_tokens[id(r)] for r in rows if r["kind"] == "chain" and r["solver"] == "careful"]
    median = statistics.median(n_tokens.values())
    assert min(careful_chains) >= 8 * median
    assert max(careful_chains) < 640  # fits the config's think budget
    for r in rows[:20]:  # the reward and the evaluator read every reply form
        reply = render_response(r, r["mode"] == "think")
        assert is_hasty_reply(reply) == (r["solver"] == "hasty")
        if r["solver"] == "careful":
            assert extract_answer(reply) == r["label"]


def test_length_stats_and_spec_checks() -> None:
    s = length_stats([5] * 90 + [400] * 10)
    assert (s["median"], s["p95"], s["max"]) == (5.0, 400.0, 400.0)
    assert length_stats([])["n"] == 0
    with pytest.raises(ValueError, match="min_days"):
        LongtailSpec(min_days=30, max_days=20)
    with pytest.raises(ValueError, match="chain_frac"):
        LongtailSpec(chain_frac=1.5)


def test_tiny_build_writes_model_data_and_lengths_then_reuses(tmp_path: Path) -> None:
    spec = LongtailSpec(min_days=2, max_days=3)
    out = tmp_path / "m"
    r = build_longtail_tiny_model(out, steps=2, n_train=40, n_eval=6, spec=spec, progress=False)
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    rows = [json.loads(x) for x in r.train_path.read_text().splitlines()]
    assert len(rows) == 40 and {x["kind"] for x in rows} <= {"arith", "chain"}
    assert r.lengths_t1["n"] == 40 and 1 <= r.lengths_t1["median"] <= r.lengths_t1["max"]
    again = build_longtail_tiny_model(out, steps=2, n_train=40, n_eval=6, spec=spec, progress=False, reuse=True)
    assert again.reused and again.lengths_t1 == r.lengths_t1
