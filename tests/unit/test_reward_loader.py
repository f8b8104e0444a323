"""The reward loader: references by built-in name, module and file path, and its errors."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import (
    RewardComponentConfig,
    RewardConfig,
    RewardLoadError,
    RewardRunner,
    load_reward,
    resolve_config,
)

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, name: str, source: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def _sample(response: str, label: str | None = "42", **kw) -> Sample:
    return Sample("g0-0", "g0", [1], [2, 3], response=response, label=label, **kw)


def test_default_config_reference_resolves_to_math_answer():
    comp = load_reward(RewardConfig().fn)
    assert comp.name == "math_answer" and not comp.is_async and not comp.is_batched
    assert comp.fn(_sample("so the answer is 42"))["score"] == 1.0


def test_builtin_short_name_and_class_reference_is_instantiated_with_kwargs():
    comp = load_reward("llm_judge", {"base_url": "http://127.0.0.1:1/v1", "model": "m", "max_score": 5})
    assert comp.name == "llm_judge" and comp.is_async
    assert comp.fn.max_score == 5.0 and comp.kwargs == {}


def test_file_reference_loads_function_with_kwargs(tmp_path):
    path = _write(tmp_path, "my_reward.py", """
        def length_reward(sample, scale=1.0):
            return scale * len(sample.response)
    """)
    comp = load_reward(f"{path}:length_reward", {"scale": 2.0})
    assert comp.fn(_sample("abc"), **comp.kwargs) == 6.0
    assert comp.ref == f"{path.resolve()}:length_reward"


def test_relative_file_reference_uses_base_dir(tmp_path):
    _write(tmp_path, "r.py", "def f(sample):\n    return 1.0\n")
    comp = load_reward("r.py:f", base_dir=tmp_path)
    assert comp.ref == f"{(tmp_path / 'r.py').resolve()}:f"


@pytest.mark.parametrize(
    ("ref", "kwargs", "expected"),
    [
        ("nope_no_such_builtin", {}, "not a built-in reward name"),
        ("no_such_pkg_xyz.rewards:f", {}, "no such module: 'no_such_pkg_xyz.rewards'"),
        ("slime_rl.rewards.builtin:no_such_fn", {}, "no attribute 'no_such_fn' in module 'slime_rl.rewards.builtin'"),
        ("slime_rl.rewards.registry:BUILTINS", {}, "'BUILTINS' in module 'slime_rl.rewards.registry' is a dict, not callable"),
        ("slime_rl.rewards.builtin:exact_match", {"bogus": 1}, "wrong signature exact_match"),
        ("remote_reward_model", {}, "wrong constructor arguments for RemoteRewardModel"),
        ("remote_reward_model", {"url": "ftp://x"}, "must start with http:// or https://"),
    ],
)
def test_loader_errors_name_reference_and_reason(ref, kwargs, expected):
    with pytest.raises(RewardLoadError) as e:
        load_reward(ref, kwargs)
    assert f"reward.fn={ref!r}" in str(e.value)
    assert expected in str(e.value)


def test_loader_error_missing_file(tmp_path):
    ref = f"{tmp_path}/missing.py:f"
    with pytest.raises(RewardLoadError, match="no such file: .*missing.py") as e:
        load_reward(ref, key="reward.combine[1].fn")
    assert str(e.value).startswith(f"reward.combine[1].fn={ref!r}")


def test_loader_error_file_that_fails_to_import(tmp_path):
    path = _write(tmp_path, "broken.py", "import definitely_not_a_module_xyz\n")
    with pytest.raises(RewardLoadError, match="importing .*broken.py failed: ModuleNotFoundError"):
        load_reward(f"{path}:f")


def test_loader_error_wrong_signatures(tmp_path):
    path = _write(tmp_path, "sig.py", """
        def no_args():
            return 1.0
        def needs_more(sample, threshold):
            return 1.0
        def kw_only(*, sample):
            return 1.0
    """)
    for fn in ("no_args", "needs_more", "kw_only"):
        with pytest.raises(RewardLoadError, match=f"wrong signature {fn}") as e:
            load_reward(f"{path}:{fn}")
        assert "def fn(sample, **kwargs)" in str(e.value)
    # The missing argument is fine once configured.
    assert load_reward(f"{path}:needs_more", {"threshold": 0.5}).kwargs == {"threshold": 0.5}


def test_components_from_config_and_resolve_config_make_paths_absolute(tmp_path, monkeypatch):
    _write(tmp_path, "r.py", "def f(sample):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    cfg = RewardConfig(combine=[
        RewardComponentConfig(fn="r.py:f", weight=0.5),
        RewardComponentConfig(fn="think_format", weight=0.1, name="fmt"),
    ])
    resolved = resolve_config(cfg)
    assert resolved.combine[0].fn == f"{(tmp_path / 'r.py').resolve()}:f"
    assert resolved.combine[1].fn == "slime_rl.rewards.builtin.formats:think_format"
    runner = RewardRunner.from_config(resolved)
    assert [c.name for c in runner.components] == ["f", "fmt"]
    assert [c.weight for c in runner.components] == [0.5, 0.1]
    bad = RewardConfig(combine=[RewardComponentConfig(fn="r.py:f"), RewardComponentConfig(fn="r.py:g")])
    with pytest.raises(RewardLoadError, match=r"reward.combine\[1\].fn='r.py:g': no attribute 'g'"):
        resolve_config(bad)


def test_example_custom_reward_file_scores_by_path():
    cfg = RewardConfig(
        fn="examples/custom_reward/my_reward.py:correct_and_concise",
        kwargs={"max_chars": 40},
    )
    runner = RewardRunner.from_config(cfg, base_dir=REPO)
    good = _sample("The answer is 42.")
    wordy = _sample("Let me think about this for a long while... the answer is 42.")
    wrong = _sample("The answer is 41.")
    outcomes = asyncio.run(runner.score([good, wordy, wrong]))
    assert [o.failed for o in outcomes] == [False, False, False]
    assert outcomes[0].score == 1.0
    assert 0.0 < outcomes[1].score < 1.0
    assert outcomes[2].score == 0.0
    runner.close()


def test_file_reference_imports_siblings_without_leaving_its_folder_on_sys_path(tmp_path):
    import sys

    _write(tmp_path, "helper_mod_xyz.py", "BONUS = 0.25\n")
    path = _write(tmp_path, "uses_helper.py", """
        import helper_mod_xyz

        def f(sample):
            return helper_mod_xyz.BONUS
    """)
    before = list(sys.path)
    comp = load_reward(f"{path}:f")
    assert comp.fn(_sample("x")) == 0.25
    assert sys.path == before and str(tmp_path) not in sys.path


def test_keyboard_interrupt_while_importing_a_reward_file_is_not_swallowed(tmp_path):
    interrupt = _write(tmp_path, "interrupt.py", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_reward(f"{interrupt}:f")
    exits = _write(tmp_path, "exits.py", "import sys\nsys.exit(3)\n")
    with pytest.raises(RewardLoadError, match="importing .*exits.py failed: SystemExit: 3"):
        load_reward(f"{exits}:f")
