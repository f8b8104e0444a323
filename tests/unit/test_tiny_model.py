"""The offline tiny model, tokenizer and `arith` task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slime_rl.tiny import build_tiny_model, extract_answer, make_dataset
from slime_rl.tiny.task import corpus, is_hasty_reply, render_response

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sam has 2 pens and gets 3 more."}]


def test_dataset_is_deterministic_and_splits_are_disjoint() -> None:
    a, b = make_dataset(seed=3, n_train=300, n_eval=50), make_dataset(seed=3, n_train=300, n_eval=50)
    assert a == b
    assert make_dataset(seed=4, n_train=300, n_eval=50) != a
    assert not {r["prompt"] for r in a["train"]} & {r["prompt"] for r in a["eval"]}
    for row in a["train"]:
        assert set(row) >= {"prompt", "label", "mode"}
        assert row["mode"] in ("think", "non_think")
        assert int(row["label"]) >= 0
        # the worked solution ends in the label
        assert row["steps"][-1].endswith(f"= {row['label']}")
    assert extract_answer(render_response(a["train"][0], think=True)) == a["train"][0]["label"]


def test_tokenizer_corpus_does_not_follow_the_task_spec() -> None:
    """The BPE is trained on careful solutions over operands 1-9 whatever TaskSpec's defaults are:
    training it on the shipped spec's rows (operands 1-4, hasty replies) cut the warm-started
    model's careful accuracy from ~48 % to ~27 %."""
    text = corpus(0)
    assert text == corpus(0)
    assert not any(is_hasty_reply(t) for t in text)
    assert {str(i) for i in range(5, 10)} <= set(re.findall(r"\d+", " ".join(text)))


def test_chat_template_think_switch_and_tools(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    think = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert think.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert think.endswith("<|im_start|>assistant\n")
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "2+3"}}}]},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "The answer is 5.", "reasoning_content": "2 + 3 = 5"},
    ]
    tools = [{"type": "function", "function": {"name": "calculator", "description": "evaluate", "parameters": {}}}]
    text = tok.apply_chat_template(history, tools=tools, tokenize=False)
    assert '"name": "calculator"' in text.split("<|im_end|>")[0]  # tool listed in the system turn
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>' in text
    assert "<tool_response>\n5\n</tool_response>" in text
    assert "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5.<|im_end|>" in text
    # special tokens are single ids and text round-trips exactly
    for special in ("<think>", "</think>", "<tool_call>", "<|im_end|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    # digits are one token each
    assert len(tok("12345", add_special_tokens=False)["input_ids"]) == 5


@pytest.mark.parametrize("think", [True, False])
def test_model_loads_and_generates_in_both_modes(tiny_model_dir: Path, think: bool) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert model.config.model_type == "qwen2"
    assert 1e6 < sum(p.numel() for p in model.parameters()) < 2e7
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, enable_thinking=think, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0, ids["input_ids"].shape[1]:]), str)


@pytest.mark.timeout(300)
def test_build_tiny_model_warm_start_learns(tmp_path: Path) -> None:
    report = build_tiny_model(tmp_path / "tiny", steps=30, n_train=400, n_eval=8, progress=False)
    assert report.model_dir == tmp_path / "tiny"
    assert (report.model_dir / "model.safetensors").is_file()
    assert (report.model_dir / "tokenizer.json").is_file()
    rows = [json.loads(line) for line in report.train_path.read_text().splitlines()]
    assert len(rows) == 400 and {"prompt", "label", "mode"} <= set(rows[0])
    # the warm start drove the loss well below the uniform-guess level (ln(vocab) ~ 6.1)
    assert report.final_loss < 2.5
    assert 0.0 <= report.eval_accuracy <= 1.0
    assert set(report.eval_accuracy_by_mode) == {"think", "non_think"}
    model = AutoModelForCausalLM.from_pretrained(report.model_dir)
    assert model.config.tie_word_embeddings


def test_unknown_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task='chess' is not known"):
        build_tiny_model(tmp_path, task="chess")


CALL = {"name": "calculator", "arguments": {"expression": "2+3"}}
CALL_TEXT = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'


def test_tool_call_arguments_as_json_string_are_not_encoded_twice(tiny_model_dir: Path) -> None:
    """OpenAI sends `arguments` as a JSON string; the template must write it as given."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    as_string = {"type": "function", "function": {**CALL, "arguments": json.dumps(CALL["arguments"])}}
    as_object = {"type": "function", "function": CALL}
    texts = [
        tok.apply_chat_template(MESSAGES + [{"role": "assistant", "content": "", "tool_calls": [c]}], tokenize=False)
        for c in (as_string, as_object)
    ]
    assert texts[0] == texts[1]
    assert CALL_TEXT in texts[0] and '"{\\"expression' not in texts[0]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# What a rollout generates after the generation prompt (EOS included), and the assistant
# message the agent loop stores for it (several equivalent shapes).
REPLIES = {
    "non_think": (
        "The answer is 5.",
        [{"content": "The answer is 5."}, {"content": "The answer is 5.", "reasoning_content": ""}],
    ),
    "think": (
        "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5.",
        [
            {"content": "<think>\n2 + 3 = 5\n</think>\n\nThe answer is 5."},
            {"content": "The answer is 5.", "reasoning_content": "2 + 3 = 5"},
        ],
    ),
    "non_think-tool": (CALL_TEXT, [{"content": "", "tool_calls": [{"type": "function", "function": CALL}]}]),
    "think-tool": (
        "<think>\nuse the tool\n</think>\n\n" + CALL_TEXT,
        [
            {"content": "", "reasoning_content": "use the tool", "tool_calls": [{"type": "function", "function": CALL}]},
            {"content": "<think>\nuse the tool\n</think>\n\n", "tool_calls": [{"function": {**CALL, "arguments": json.dumps(CALL["arguments"])}}]},
        ],
    ),
}


@pytest.mark.parametrize("case", list(REPLIES))
def test_rollout_tokens_are_a_prefix_of_the_rerendered_conversation(tiny_model_dir: Path, case: str) -> None:
    """prompt ids + generated ids == the conversation re-rendered with that reply (then the
    next turn follows): multi-turn rollouts and the trainer see the same tokens, think or not."""
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    think = case.startswith("think")
    reply_text, messages = REPLIES[case]
    prompt = _ids(tok, tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=think))
    generated = _ids(tok, reply_text + tok.eos_token)
    for message in messages:
        history = MESSAGES + [{"role": "assistant", **message}]
        ended = tok.apply_chat_template(history, tokenize=False, enable_thinking=think)
        assert _ids(tok, ended) == prompt + generated + _ids(tok, "\n"), (case, message, ended)
        follow = history + [{"role": "tool" if "tool" in case else "user", "content": "5"}]
        nxt = _ids(tok, tok.apply_chat_template(follow, tokenize=False, add_generation_prompt=True, enable_thinking=think))
        assert nxt[: len(prompt) + len(generated)] == prompt + generated, (case, message)
