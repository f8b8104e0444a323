"""The `arith_agent` tiny task: data, warm-start episodes tokenised as the agent loop builds them,
`make-tiny-model --task arith_agent`, and the agent example configs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from slime_rl.rollout.environments import answer_matches
from slime_rl.rollout.envs_builtin.calculator import CalculatorEnvironment
from slime_rl.rollout.envs_builtin.retrieval import BM25Index

from slime_rl.config import load_config
from slime_rl.tiny.agent_task import (
    CALC_TOOLS,
    AgentTaskSpec,
    calc_episode,
    episode_example,
    make_agent_dataset,
    retrieval_episode,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    from slime_rl.tiny import build_tokenizer

    return build_tokenizer()


def test_dataset_splits_and_answers() -> None:
    data = make_agent_dataset(seed=0, n_calc=200, n_eval=50, n_hybrid=20, spec=AgentTaskSpec(calc_pool=0))
    train = {r["prompt"] for r in data["calc_train"]}
    assert len(data["calc_train"]) == 200 and not train & {r["prompt"] for r in data["calc_eval"]}
    pooled = make_agent_dataset(seed=0, n_calc=200, n_eval=50, n_hybrid=20, spec=AgentTaskSpec(calc_pool=16))
    assert len({r["prompt"] for r in pooled["calc_train"]}) <= 16 and len(pooled["calc_eval"]) == 16
    assert {r["prompt"] for r in pooled["calc_train"]} <= {r["prompt"] for r in pooled["calc_eval"]}
    for row in data["calc_train"][:50]:
        value = None
        for step in row["steps"]:
            expr = step if value is None else f"{value} {step.split(' ', 1)[1]}"
            value = CalculatorEnvironment().calculator(expr)
        assert value == row["label"]
    assert {r["mode"] for r in data["calc_train"]} == {"think", "non_think"}
    assert all("mode" not in r for r in data["hybrid_train"])  # data.mode_mix decides
    index = BM25Index(data["docs"])
    for row in data["retrieval_train"][:30]:
        (hit, _), *_ = index.search(row["query"], 1)
        assert row["label"] in index.docs[hit]  # the teacher's query finds the answer


@pytest.mark.parametrize("mode", ["think", "non_think"])
def test_episode_example_labels_exactly_the_assistant_turns(tok, mode: str) -> None:
    row = {"prompt": "Zoe has 39 boxes with 43 eggs in each and gives away 9. How many eggs are left?", "label": "1668",
           "mode": mode, "steps": ["39 * 43", "1677 - 9"]}
    msgs = [{"role": "user", "content": row["prompt"]}, *calc_episode(row, False, random.Random(0))]
    ids, labels = episode_example(tok, msgs, CALC_TOOLS, mode == "think")
    # the whole sequence is the template's rendering of the conversation (the final newline aside)
    full = tok(tok.apply_chat_template(msgs, tools=CALC_TOOLS, tokenize=False, enable_thinking=mode == "think"),
               add_special_tokens=False)["input_ids"]
    assert full[: len(ids)] == ids and len(full) == len(ids) + 1
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != -100], skip_special_tokens=False)
    assert trained.count("<|im_end|>") == 3 and "<tool_response>" not in trained and "<|im_start|>" not in trained
    assert trained.endswith("The answer is 1668.<|im_end|>") and ("<think>" in trained) == (mode == "think")
    guess = calc_episode(row, True, random.Random(1))
    assert len(guess) == 1 and not answer_matches(guess[0]["content"], row["label"])


def test_retrieval_episode_uses_the_search_result(tok) -> None:
    data = make_agent_dataset(seed=0, n_calc=1, n_eval=1, n_hybrid=1, spec=AgentTaskSpec(people=10))
    row = data["retrieval_train"][0]
    msgs = retrieval_episode(row, False, random.Random(0), BM25Index(data["docs"]))
    assert row["label"] in msgs[1]["content"] and msgs[-1]["content"].endswith(f"The answer is {row['label']}.")


def test_make_tiny_model_arith_agent(tmp_path: Path, one_thread) -> None:
    from slime_rl.cli import main

    assert main(["make-tiny-model", str(tmp_path / "m"), "--task", "arith_agent", "--steps", "1", "--no-progress"]) == 0
    for name in ("calc_train", "calc_eval", "retrieval_train", "retrieval_eval", "hybrid_train", "hybrid_eval", "docs"):
        assert (tmp_path / "m" / "data" / f"{name}.jsonl").is_file()
    first = json.loads((tmp_path / "m" / "data" / "calc_train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "label", "mode", "steps"}
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert AutoConfig.from_pretrained(tmp_path / "m").vocab_size == len(tok)
    schema = tok.apply_chat_template([{"role": "user", "content": "q"}], tools=CALC_TOOLS, tokenize=True, add_generation_prompt=True)
    assert len(schema) < 100  # the task's tokenizer knows the tool schema (the arith one needs ~180 tokens)


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "agent").glob("*.yaml")) + [
    REPO / "configs" / "examples" / "arith_agent_tiny.yaml", REPO / "configs" / "examples" / "hybrid_tiny.yaml"])
def test_agent_example_configs_load(path: Path) -> None:
    cfg = load_config(path, check_paths=False)
    assert cfg.rollout.environment or cfg.rollout.agent_fn or cfg.data.mode_mix is not None
