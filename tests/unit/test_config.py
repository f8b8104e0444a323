"""Config loading, overrides and every start-up error a user can hit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from slime_rl.config import Config, ConfigError, load_config, save_config
from slime_rl.config_docs import render_defaults

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    model = tmp_path / "model"
    model.mkdir()
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "1 + 1?", "label": "2"}\n')
    return [f"model.path={model}", f"data.train_path={train}"]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_yaml_then_overrides_win(tmp_path: Path, paths: list[str]) -> None:
    cfg_file = write(tmp_path, "rollout:\n  temperature: 0.5\n  top_k: 20\nrun:\n  name: exp1\n")
    cfg = load_config(cfg_file, [*paths, "rollout.temperature=0.9", "buffer.max_staleness=3"])
    assert isinstance(cfg, Config)
    assert cfg.rollout.temperature == 0.9  # override beats YAML
    assert cfg.rollout.top_k == 20  # YAML beats default
    assert cfg.buffer.max_staleness == 3
    assert cfg.run.name == "exp1"
    assert cfg.rollout.n_samples_per_prompt == 4  # untouched default
    assert cfg.run_dir == Path("runs") / "exp1"


def test_free_form_dicts_accept_any_key(paths: list[str]) -> None:
    cfg = load_config(None, [*paths, "rollout.engine_kwargs.enforce_eager=true", "reward.kwargs.scale=2"])
    assert cfg.rollout.engine_kwargs == {"enforce_eager": True}
    assert cfg.reward.kwargs["scale"] == 2


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("rollout.temperature=-1", ["rollout.temperature", "-1", ">= 0"]),
        ("buffer.max_staleness=-2", ["buffer.max_staleness", "-2", ">= 0"]),
        ("run.mode=fast", ["run.mode", "'fast'", "'async'", "'sync'"]),
        ("rollout.top_p=1.5", ["rollout.top_p", "1.5", "> 0 and <= 1"]),
        ("rollout.engine=tensorrt", ["rollout.engine", "'tensorrt'", "'vllm'", "'sglang'", "'hf'"]),
        ("trainer.num_workers=0", ["trainer.num_workers", "0", ">= 1"]),
        ("rollout.temperature=hot", ["rollout.temperature", "'hot'", "expected float"]),
        ("run.num_steps=2.5", ["run.num_steps", "2.5", "expected int"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(paths: list[str], override: str, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*paths, override])
    for piece in expected:
        assert piece in str(err.value), (piece, str(err.value))


def test_unknown_key_names_full_path_and_nearest(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [*paths, "rollout.temprature=0.7"])
    msg = str(err.value)
    assert "'rollout.temprature'" in msg and "did you mean rollout.temperature" in msg

    cfg_file = write(tmp_path, "buffer:\n  max_stalenes: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, paths)
    assert "'buffer.max_stalenes'" in str(err.value) and "buffer.max_staleness" in str(err.value)
    assert str(cfg_file) in str(err.value)

    with pytest.raises(ConfigError, match=r"unknown config key 'trainr'.*did you mean trainer"):
        load_config(None, [*paths, "trainr.lr=1"])


def test_missing_and_nonexistent_model_path(paths: list[str], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.path is required but not set"):
        load_config(None, [paths[1]])
    with pytest.raises(ConfigError, match=r"model.path='/no/such/model' does not exist"):
        load_config(None, ["model.path=/no/such/model", paths[1]])
    with pytest.raises(ConfigError, match=r"data.eval_path=.*does not exist"):
        load_config(None, [*paths, f"data.eval_path={tmp_path}/nope.jsonl"])
    # paths need not exist when only printing / validating the shape
    cfg = load_config(None, ["model.path=/no/such/model", "data.train_path=/x"], check_paths=False)
    assert cfg.model.path == "/no/such/model"


def test_trainer_temperature_follows_sampling_temperature(paths: list[str]) -> None:
    assert load_config(None, [*paths, "rollout.temperature=0.7"]).trainer.batching.temperature == 0.7
    # greedy sampling: the trainer scores at temperature 1
    assert load_config(None, [*paths, "rollout.temperature=0"]).trainer.batching.temperature == 1.0
    # set explicitly to something else: refused, naming both keys
    with pytest.raises(ConfigError, match=r"trainer.batching.temperature=0.5 must equal the rollout sampling temperature \(0.7"):
        load_config(None, [*paths, "rollout.temperature=0.7", "trainer.batching.temperature=0.5"])
    assert load_config(None, [*paths, "rollout.temperature=0.7", "trainer.batching.temperature=0.7"]).trainer.batching.temperature == 0.7


def test_bad_files_and_overrides(tmp_path: Path, paths: list[str]) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", paths)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "run: [unclosed\n"), paths)
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), paths)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, [*paths, "rollout.temperature"])
    with pytest.raises(ConfigError, match="rollout must be a mapping"):
        load_config(None, [*paths, "rollout=3"])


def test_resolved_config_round_trips(tmp_path: Path, paths: list[str]) -> None:
    cfg = load_config(None, [*paths, "rollout.temperature=0.3", f"run.output_dir={tmp_path}/runs"])
    out = save_config(cfg, cfg.run_dir / "config.yaml")
    assert out == tmp_path / "runs" / "slime-run" / "config.yaml"
    again = load_config(out)
    assert again == cfg


def test_base_yaml_is_generated_and_documents_every_key() -> None:
    text = (REPO / "configs" / "base.yaml").read_text()
    assert text == render_defaults(), "configs/base.yaml is stale: run `slime-rl config --defaults > configs/base.yaml`"
    data = yaml.safe_load(text)
    expected = {"run", "model", "data", "rollout", "reward", "buffer", "trainer", "weight_sync", "eval", "logging", "checkpoint", "ray"}
    assert expected <= set(data)
    # every leaf key carries a comment line right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if line.startswith("  ") and stripped and not stripped.startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"undocumented key: {line!r}"


def test_example_configs_only_state_differences_and_load() -> None:
    base = yaml.safe_load((REPO / "configs" / "base.yaml").read_text())
    examples = sorted((REPO / "configs" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = load_config(path, check_paths=False)
        assert isinstance(cfg, Config)
        data = yaml.safe_load(path.read_text())
        for section, values in data.items():
            for key, value in (values or {}).items():
                assert base[section].get(key) != value, f"{path.name}: {section}.{key} repeats the default"
