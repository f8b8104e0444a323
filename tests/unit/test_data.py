"""Prompt datasets (slime_rl.rollout.data): formats, rendering, bad rows; the cursor (slime_rl.rollout.cursor)."""

from __future__ import annotations

import copy
import datetime
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from slime_rl.rollout.config import DataConfig
from slime_rl.rollout.cursor import DatasetCursor
from slime_rl.rollout.data import DataError, Prompt, PromptDataset

EMPTY_THINK = "<think>\n\n</think>\n\n"
LOGGER = "slime_rl.rollout.data"


@pytest.fixture(scope="module")
def tok():
    from slime_rl.tiny.tokenizer import build_tokenizer

    return build_tokenizer()


def cfg(**kw) -> DataConfig:
    return DataConfig(train_path="unused", **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    """rows: dicts (dumped) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def load(path, tok, **kw) -> PromptDataset:
    max_prompt_tokens = kw.pop("max_prompt_tokens", 0)
    seed = kw.pop("seed", 0)
    return PromptDataset.load(
        path, cfg(**kw), tok, max_prompt_tokens=max_prompt_tokens, seed=seed, name="train"
    )


def data_warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING
    ]


# ---------------------------------------------------------------------------------------------
# Formats


def test_slime_jsonl_loads(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is 1+1?", "label": 2, "difficulty": "easy"},
            "",  # blank lines are not rows but keep the line numbering
            {"prompt": "What is 2+3?", "label": "5", "difficulty": "easy"},
        ],
    )
    ds = load(path, tok)
    assert len(ds) == 2 and ds.skipped == {} and ds.num_rows == 2
    p = ds[1]
    assert isinstance(p, Prompt)
    assert (p.row, p.uid, p.label, p.mode) == (3, "train-3", "5", "non_think")
    assert ds[0].label == "2"  # numbers become text
    assert p.messages == ({"role": "user", "content": "What is 2+3?"},)
    assert p.text == tok.apply_chat_template(
        list(p.messages), tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert list(p.prompt_ids) == tok(p.text, add_special_tokens=False)["input_ids"]
    assert p.metadata == {"difficulty": "easy"} and p.data_source is None and p.tools is None
    assert [q.row for q in ds] == [1, 3]


def test_verl_parquet_loads(tmp_path, tok):
    table = pa.table(
        {
            "data_source": ["openai/gsm8k", "math"],
            "prompt": [
                [{"role": "user", "content": "Natalia sold 48 clips. How many?"}],
                [{"role": "system", "content": "Reason."}, {"role": "user", "content": "2+2?"}],
            ],
            "ability": ["math", "math"],
            "reward_model": [
                {"style": "rule", "ground_truth": "72"},
                {"style": "rule", "ground_truth": "4"},
            ],
            "extra_info": [{"index": 0, "split": "train"}, {"index": 1, "split": "train"}],
        }
    )
    assert pa.types.is_struct(table.schema.field("reward_model").type)
    pq.write_table(table, tmp_path / "train.parquet")
    ds = PromptDataset.load(
        tmp_path / "train.parquet", cfg(label_key="reward_model.ground_truth"), tok, name="gsm"
    )
    assert [p.label for p in ds] == ["72", "4"]
    assert [(p.row, p.uid) for p in ds] == [(0, "gsm-0"), (1, "gsm-1")]  # Parquet rows are 0-based
    assert [p.data_source for p in ds] == ["openai/gsm8k", "math"]
    assert ds[0].metadata == {
        "data_source": "openai/gsm8k",
        "ability": "math",
        "reward_model": {"style": "rule"},  # the label leaf is consumed, the rest travels
        "extra_info": {"index": 0, "split": "train"},
    }
    assert ds[1].messages[0] == {"role": "system", "content": "Reason."}
    json.dumps(ds[0].metadata)


def test_parquet_flattened_dotted_column_and_non_json_types(tmp_path, tok):
    pq.write_table(
        pa.table(
            {
                "prompt": ["hi"],
                "reward_model.ground_truth": ["7"],
                "blob": pa.array([b"\x00ab"], pa.binary()),
                "when": pa.array([datetime.datetime(2024, 1, 2)], pa.timestamp("s")),
            }
        ),
        tmp_path / "d.parquet",
    )
    (p,) = PromptDataset.load(
        tmp_path / "d.parquet", cfg(label_key="reward_model.ground_truth"), tok
    )
    assert p.label == "7"
    assert p.metadata == {"blob": "\x00ab", "when": "2024-01-02T00:00:00"}


def test_label_field_absent_is_allowed(tmp_path, tok):
    ds = load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b"}]), tok)
    assert [p.label for p in ds] == [None, None]


def test_labels_keep_their_text_when_ints_and_floats_mix(tmp_path, tok):
    # pyarrow widens a column mixing 3 and 3.5 to float, which would turn the label 3 into "3.0"
    ds = load(
        write_jsonl(
            tmp_path / "d.jsonl", [{"prompt": "a", "label": 3}, {"prompt": "b", "label": 3.5}]
        ),
        tok,
    )
    assert [p.label for p in ds] == ["3", "3.5"]
    nested = [{"prompt": "a", "label": {"x": [1, 2.5]}}, {"prompt": "b", "label": {"x": [2]}}]
    assert [p.label for p in load(write_jsonl(tmp_path / "n.jsonl", nested), tok)] == [
        '{"x": [1, 2.5]}',
        '{"x": [2]}',
    ]
    ds = load(
        write_jsonl(
            tmp_path / "e.jsonl", [{"prompt": "c", "label": [1, 2]}, {"prompt": "d", "label": True}]
        ),
        tok,
    )
    assert [p.label for p in ds] == ["[1, 2]", "true"]


def test_bad_line_fallback_reads_good_rows_like_the_fast_path(tmp_path, tok):
    rows = [
        {"prompt": f"q{i}", "label": str(i), "mode": "think", "extra": {"k": i}} for i in range(4)
    ]
    clean = load(write_jsonl(tmp_path / "clean.jsonl", rows), tok)
    dirty = load(write_jsonl(tmp_path / "dirty.jsonl", rows[:2] + ["{oops"] + rows[2:]), tok)
    assert dirty.skipped == {"invalid_json": 1} and dirty.skipped_rows == {"invalid_json": [3]}
    strip = lambda p: (p.prompt_ids, p.text, p.messages, p.label, p.mode, p.metadata)  # noqa: E731
    assert [strip(p) for p in dirty] == [strip(p) for p in clean]
    assert [p.row for p in dirty] == [1, 2, 4, 5]


# ---------------------------------------------------------------------------------------------
# Rendering


def test_think_and_non_think_differ_by_the_empty_think_block(tmp_path, tok):
    ds = load(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                {"prompt": "2+2?", "mode": "think"},
                {"prompt": "2+2?", "mode": "non_think"},
            ],
        ),
        tok,
    )
    think, plain = ds[0], ds[1]
    assert (think.mode, plain.mode) == ("think", "non_think")
    assert plain.text == think.text + EMPTY_THINK
    assert plain.prompt_ids[: len(think.prompt_ids)] == think.prompt_ids
    assert len(plain.prompt_ids) > len(think.prompt_ids)
    assert load(tmp_path / "d.jsonl", tok, default_mode="think")[1].mode == "non_think"  # row wins


def test_default_mode_applies_to_rows_without_mode(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}])
    assert load(path, tok, default_mode="think")[0].mode == "think"
    assert not load(path, tok, default_mode="think")[0].text.endswith(EMPTY_THINK)
    assert load(path, tok, default_mode="non_think")[0].text.endswith(EMPTY_THINK)


def test_system_prompt_only_when_row_has_none(tmp_path, tok):
    ds = load(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                {"prompt": "plain"},
                {
                    "prompt": [
                        {"role": "system", "content": "Own rules."},
                        {"role": "user", "content": "q"},
                    ]
                },
            ],
        ),
        tok,
        system_prompt="Be brief.",
    )
    assert ds[0].messages[0] == {"role": "system", "content": "Be brief."}
    assert ds[0].text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nplain")
    assert "Be brief." not in ds[1].text and "Own rules." in ds[1].text
    assert len(ds[1].messages) == 2


TOOL = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate",
        "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}},
    },
}


def test_tools_rendered(tmp_path, tok):
    ds = load(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                {"prompt": "use it", "tools": [TOOL]},
                {"prompt": "no tools", "tools": None},
            ],
        ),
        tok,
    )
    assert ds[0].tools == (TOOL,)
    assert "# Tools" in ds[0].text and json.dumps(TOOL)[:20] in ds[0].text.replace("\n", "")
    assert "calculator" in ds[0].text
    assert ds[1].tools is None and "# Tools" not in ds[1].text


def test_tools_as_json_string_in_parquet(tmp_path, tok):
    pq.write_table(
        pa.table({"prompt": ["q"], "tools": [json.dumps([TOOL])]}), tmp_path / "t.parquet"
    )
    (p,) = PromptDataset.load(tmp_path / "t.parquet", cfg(), tok)
    assert p.tools == (TOOL,) and "calculator" in p.text


def test_custom_dotted_keys(tmp_path, tok):
    ds = load(
        write_jsonl(
            tmp_path / "d.jsonl",
            [
                {"q": {"text": "hello"}, "a": {"gt": "x", "why": "y"}, "cfg": {"mode": "think"}},
            ],
        ),
        tok,
        prompt_key="q.text",
        label_key="a.gt",
        mode_key="cfg.mode",
    )
    (p,) = ds
    assert (p.messages[-1]["content"], p.label, p.mode) == ("hello", "x", "think")
    assert p.metadata == {"a": {"why": "y"}}


# ---------------------------------------------------------------------------------------------
# Bad rows

LONG = "1 + " * 200

BAD_ROWS = [  # (line, reason, field named in the error)
    ('{"prompt": "unterminated', "invalid_json", "<line>"),
    ('["not", "an", "object"]', "wrong_type", "<row>"),
    ('{"label": "1"}', "missing_prompt", "prompt"),
    ('{"prompt": null}', "missing_prompt", "prompt"),
    ('{"prompt": "   "}', "empty_prompt", "prompt"),
    ('{"prompt": []}', "empty_prompt", "prompt"),
    ('{"prompt": [{"role": "system", "content": "only a system"}]}', "empty_prompt", "prompt"),
    ('{"prompt": 42}', "wrong_type", "prompt"),
    ('{"prompt": ["text"]}', "wrong_type", "prompt[0]"),
    ('{"prompt": [{"content": "no role"}]}', "wrong_type", "prompt[0].role"),
    ('{"prompt": [{"role": "robot", "content": "x"}]}', "wrong_type", "prompt[0].role"),
    ('{"prompt": [{"role": "user"}]}', "wrong_type", "prompt[0].content"),
    ('{"prompt": [{"role": "user", "content": 7}]}', "wrong_type", "prompt[0].content"),
    ('{"prompt": "x", "tools": {"name": "f"}}', "wrong_type", "tools"),
    ('{"prompt": "x", "tools": "not json"}', "wrong_type", "tools"),
    ('{"prompt": "x", "mode": 1}', "wrong_type", "mode"),
    ('{"prompt": "x", "mode": "fast"}', "bad_mode", "mode"),
    (json.dumps({"prompt": LONG}), "too_long", "prompt"),
]


@pytest.mark.parametrize(
    "line,reason,field", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_ROWS)]
)
def test_bad_row_skip(tmp_path, tok, caplog, line, reason, field):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "good one", "label": "1"}, line, {"prompt": "good two"}]
    )
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = load(path, tok, max_prompt_tokens=64)
    assert [p.row for p in ds] == [1, 3]
    assert ds.skipped == {reason: 1} and ds.skipped_rows == {reason: [2]}
    (msg,) = data_warnings(caplog)
    assert f"{reason}: 1 (line 2)" in msg and str(path) in msg and "1 of 3 rows" in msg


@pytest.mark.parametrize(
    "line,reason,field", BAD_ROWS, ids=[f"{r}-{i}" for i, (_, r, _) in enumerate(BAD_ROWS)]
)
def test_bad_row_raise(tmp_path, tok, line, reason, field):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "good one"}, line, {"prompt": "good two"}])
    with pytest.raises(DataError) as info:
        load(path, tok, max_prompt_tokens=64, on_error="raise")
    err = info.value
    assert isinstance(err, ValueError)
    assert (err.row, err.reason, err.field, err.path) == (2, reason, field, str(path))
    assert str(path) in str(err) and "line 2" in str(err) and repr(field) in str(err)


def test_render_error_is_a_bad_row(tmp_path, tok):
    picky = copy.deepcopy(tok)
    picky.chat_template = (
        "{% for m in messages %}{% if m.content == 'boom' %}{{ raise_exception('no booms') }}{% endif %}"
        "{{ m.content }}{% endfor %}"
    )
    ds = PromptDataset.load(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ok"}, {"prompt": "boom"}]), cfg(), picky
    )
    assert ds.skipped == {"render_error": 1} and [p.text for p in ds] == ["ok"]
    with pytest.raises(DataError, match="line 2.*no booms"):
        PromptDataset.load(tmp_path / "d.jsonl", cfg(on_error="raise"), picky)


def test_many_bad_rows_one_warning_first_rows_listed(tmp_path, tok, caplog):
    rows = [{"prompt": "ok"}] + ['{"prompt": ""}'] * 8 + ["nope"] * 2 + [{"prompt": "ok"}]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = load(write_jsonl(tmp_path / "d.jsonl", rows), tok)
    assert ds.skipped == {"empty_prompt": 8, "invalid_json": 2}
    assert ds.skipped_rows == {"empty_prompt": [2, 3, 4, 5, 6], "invalid_json": [10, 11]}
    (msg,) = data_warnings(caplog)
    assert "skipped 10 of 12 rows" in msg
    assert (
        "empty_prompt: 8 (line 2, 3, 4, 5, 6, ...)" in msg
        and "invalid_json: 2 (line 10, 11)" in msg
    )


def test_raise_names_the_first_bad_row_and_counts_the_rest(tmp_path, tok):
    rows = [{"prompt": "ok"}, {"prompt": "x", "mode": "??"}, "garbage", {"prompt": LONG}]
    with pytest.raises(DataError) as info:
        load(write_jsonl(tmp_path / "d.jsonl", rows), tok, max_prompt_tokens=64, on_error="raise")
    assert info.value.row == 2 and info.value.reason == "bad_mode"
    assert "2 more bad rows" in str(info.value) and "invalid_json" in str(info.value)


def test_parquet_bad_rows_use_zero_based_rows(tmp_path, tok, caplog):
    pq.write_table(pa.table({"prompt": ["a", "", None, "d"]}), tmp_path / "d.parquet")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ds = PromptDataset.load(tmp_path / "d.parquet", cfg(), tok)
    assert [p.row for p in ds] == [0, 3]
    assert ds.skipped_rows == {"empty_prompt": [1], "missing_prompt": [2]}
    assert "(row 1)" in data_warnings(caplog)[0]


# ---------------------------------------------------------------------------------------------
# Unusable files


def test_missing_empty_and_unsupported_files(tmp_path, tok):
    with pytest.raises(DataError, match="does not exist") as info:
        load(tmp_path / "nope.jsonl", tok)
    assert "nope.jsonl" in str(info.value)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        load(tmp_path / "empty.jsonl", tok)
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(DataError, match=r"empty\.parquet is empty"):
        load(tmp_path / "empty.parquet", tok)
    (tmp_path / "d.csv").write_text("prompt\nx\n")
    with pytest.raises(DataError, match=r"d\.csv.*unsupported suffix '\.csv'"):
        load(tmp_path / "d.csv", tok)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet could not be read"):
        load(tmp_path / "bad.parquet", tok)


def test_all_rows_bad_names_file_and_reasons(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": ""}, "nope"])
    with pytest.raises(
        DataError, match=r"d\.jsonl has no usable row: empty_prompt: 1 \(line 1\); invalid_json: 1"
    ):
        load(path, tok)


def test_wrong_prompt_key_hints_at_fields(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match="prompt_key.*fields present: answer, question"):
        load(path, tok)


def test_tokenizer_without_chat_template(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    plain.name_or_path = "my-base-model"
    with pytest.raises(DataError, match="'my-base-model' has no chat template"):
        PromptDataset.load(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x"}]), cfg(), plain)


# ---------------------------------------------------------------------------------------------
# Mode mix


def test_mode_mix_ratio_and_stability(tmp_path, tok):
    rows = [{"prompt": f"{i}"} for i in range(2000)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    a = load(path, tok, mode_mix=0.3, seed=7)
    modes = [p.mode for p in a]
    assert 0.25 < modes.count("think") / len(modes) < 0.35
    assert [p.mode for p in load(path, tok, mode_mix=0.3, seed=7)] == modes  # reload: same
    assert [
        p.mode for p in load(path, tok, mode_mix=0.3, seed=8)
    ] != modes  # other seed: other draw
    assert all(p.text.endswith(EMPTY_THINK) == (p.mode == "non_think") for p in a)
    # a row's mode depends on (seed, row) only: breaking other rows changes nothing
    edited = write_jsonl(tmp_path / "e.jsonl", ["broken"] * 10 + rows[10:])
    b = load(edited, tok, mode_mix=0.3, seed=7)
    assert {p.row: p.mode for p in b} == {p.row: p.mode for p in a if p.row > 10}


def test_mode_mix_extremes_and_row_mode_wins(tmp_path, tok):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a"}, {"prompt": "b", "mode": "non_think"}] * 20
    )
    assert {p.mode for p in load(path, tok, mode_mix=0.0)} == {"non_think"}
    modes = [p.mode for p in load(path, tok, mode_mix=1.0, seed=-3)]
    assert modes == ["think", "non_think"] * 20


# ---------------------------------------------------------------------------------------------
# Cursor


def take(cur: DatasetCursor, n: int) -> list[tuple[int, int]]:
    return [cur.next() for _ in range(n)]


def test_cursor_same_seed_same_order_and_epochs_reshuffle():
    a = take(DatasetCursor(10, seed=3), 30)
    assert a == take(DatasetCursor(10, seed=3), 30)
    assert a != take(DatasetCursor(10, seed=4), 30)
    assert [e for _, e in a] == [0] * 10 + [1] * 10 + [2] * 10
    epochs = [[i for i, e in a if e == k] for k in range(3)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[1] == list(np.random.default_rng((3, 1)).permutation(10))


def test_cursor_without_shuffle_is_file_order():
    assert take(DatasetCursor(3, seed=9, shuffle=False), 6) == [
        (0, 0),
        (1, 0),
        (2, 0),
        (0, 1),
        (1, 1),
        (2, 1),
    ]


@pytest.mark.parametrize(
    "taken", [0, 4, 7, 14]
)  # 7 = end of an epoch: resume must not yield an empty epoch
def test_cursor_state_round_trip(taken):
    cur = DatasetCursor(7, seed=11)
    take(cur, taken)
    state = json.loads(json.dumps(cur.state_dict()))  # survives a JSON checkpoint
    assert set(state) == {"epoch", "position", "seed", "shuffle", "size"}
    expected = take(cur, 10)
    resumed = DatasetCursor(7, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 10) == expected


def test_cursor_refuses_mismatched_state():
    state = DatasetCursor(5, seed=1).state_dict()
    for kwargs, key in [
        ({"size": 6, "seed": 1}, "size"),
        ({"size": 5, "seed": 2}, "seed"),
        ({"size": 5, "seed": 1, "shuffle": False}, "shuffle"),
    ]:
        size = kwargs.pop("size")
        with pytest.raises(ValueError, match=rf"{key} \(saved"):
            DatasetCursor(size, **kwargs).load_state_dict(state)
    with pytest.raises(ValueError, match="lacks position"):
        DatasetCursor(5, seed=1).load_state_dict(
            {"epoch": 0, "seed": 1, "shuffle": True, "size": 5}
        )
    with pytest.raises(ValueError, match="out of range"):
        DatasetCursor(5, seed=1).load_state_dict({**state, "position": 6})
    with pytest.raises(ValueError, match="at least one prompt"):
        DatasetCursor(0, seed=1)


def test_json_array_file_gets_a_hint(tmp_path, tok):
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "a"}, {"prompt": "b"}], indent=1))
    with pytest.raises(DataError, match="looks like one JSON array"):
        load(tmp_path / "d.json", tok)


def test_prompt_is_frozen_and_pickles(tmp_path, tok):
    import dataclasses
    import pickle

    (p,) = load(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "label": "1", "tools": [TOOL]}]), tok
    )
    assert pickle.loads(pickle.dumps(p)) == p  # prompts cross Ray boundaries
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.label = "2"
