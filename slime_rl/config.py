"""The typed run configuration: dataclasses are the OmegaConf schema.

    YAML file ─► key=value overrides ─► unknown-key check ─► typed merge ─► range checks
                                                                    └─► <output_dir>/<name>/config.yaml

Each component owns its section's dataclass (``buffers/config.py`` and friends); this
module composes them, loads and validates. Allowed values are declared in field metadata
(``ge``, ``gt``, ``le``, ``choices``, ``path_exists``) and checked once here, so every error
names the full key path, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from slime_rl.buffers.config import BufferConfig
from slime_rl.faults import FaultsConfig
from slime_rl.rewards.config import RewardConfig
from slime_rl.rollout.config import DataConfig, EvalConfig, RolloutConfig
from slime_rl.trainer.config import TrainerConfig


class ConfigError(ValueError):
    """A config problem a user can fix; the message names the key and what is allowed."""


@dataclass
class RunConfig:
    name: str = "slime-run"
    """Run name; the run directory is `<output_dir>/<name>`."""
    output_dir: str = "runs"
    """Parent folder of run directories (config, metrics, checkpoints)."""
    seed: int = 0
    """Seed for data order, sampling and initialisation."""
    mode: str = field(default="async", metadata={"choices": ("async", "sync")})
    """`async`: rollout keeps generating while the trainer trains; `sync`: the baseline that alternates."""
    num_steps: int = field(default=20, metadata={"ge": 1})
    """Trainer steps (optimizer updates) to run."""
    max_minutes: float | None = field(default=None, metadata={"gt": 0})
    """Wall-clock budget of the training loop in minutes (from its first step, start-up and the
    final eval not counted): when it is spent the run finishes as at `num_steps` (final sync,
    eval, checkpoint, summary), so a run takes about as long on any machine. None: no budget."""
    rollout_only: bool = False
    """Debug: generate, score and save `num_steps` batches to `<run_dir>/samples/` (Parquet), no trainer."""
    train_only: str | None = None
    """Debug: train from saved batches (a folder of `step_*.parquet`, e.g. a rollout-only run's
    `samples/`), no engines."""


@dataclass
class ModelConfig:
    path: str = MISSING
    """HF model folder (config.json, weights, tokenizer) of the policy to train."""
    tokenizer_path: str | None = None
    """Tokenizer folder if not the model folder."""
    trust_remote_code: bool = False
    """Allow custom modelling code shipped with the model."""


@dataclass
class WeightSyncConfig:
    interval: int = field(default=1, metadata={"ge": 1})
    """Push weights to the engines every this many trainer steps."""
    transport: str = field(default="object_store", metadata={"choices": ("object_store", "collective", "disk")})
    """`object_store` (buckets through Ray's object store; one node), `collective` (a torch.distributed
    broadcast group of trainer rank 0 and the engines: gloo on CPU, NCCL on GPU), or `disk`
    (safetensors files under the run directory)."""
    bucket_mb: float = field(default=256.0, metadata={"gt": 0})
    """Size of one transfer bucket of named tensors."""
    timeout_s: float = field(default=300.0, metadata={"gt": 0})
    """A sync that takes longer fails with the engine and step named, never hangs."""


@dataclass
class LoggingConfig:
    wandb_mode: str = field(default="offline", metadata={"choices": ("offline", "online", "disabled")})
    """wandb mode; `offline` writes under the run directory, `online` needs WANDB_API_KEY."""
    wandb_project: str = "slime-rl"
    """wandb project name."""
    progress: bool = True
    """Show a progress bar on the console."""
    level: str = field(default="INFO", metadata={"choices": ("DEBUG", "INFO", "WARNING", "ERROR")})
    """Log level of slime-rl's loggers."""
    save_samples: bool = False
    """Write every trained batch to `<run_dir>/samples/step_NNNNNN.parquet` (ids, text, rewards, versions)."""
    plot_every: int = field(default=5, metadata={"ge": 1})
    """Redraw the PNG plots every this many steps (and at the end)."""
    trace: bool = True
    """Write the run's timeline to `<run_dir>/trace.json` (Chrome trace events: open in Perfetto;
    every group's admit, generate, score, filter, put, every step's buffer wait, train step, weight
    sync and eval). Costs well under 1 % of a step (docs/BENCHMARKS.md); `slime-rl trace RUN_DIR`
    summarises it."""
    trace_head_steps: int = field(default=20, metadata={"ge": 0})
    """Keep every event of the first this many steps in trace.json."""
    trace_tail_steps: int = field(default=200, metadata={"ge": 1})
    """And of the last this many steps (a rolling window); steps between the two keep only their
    `step` span, so the file stays a few MB however long the run."""
    trace_flush_s: float = field(default=5.0, metadata={"ge": 0})
    """Rewrite trace.json (atomically: a killed run leaves the last complete file) at most this
    often; 0 = after every step. Always written at the end."""
    otel_endpoint: str | None = None
    """Also send the spans to this OpenTelemetry collector (OTLP over HTTP, e.g.
    `http://127.0.0.1:4318`; `/v1/traces` is added). Needs `logging.trace: true` and
    `pip install slime-rl[otel]`."""

    def validate(self) -> None:
        if self.otel_endpoint is not None:
            if not self.otel_endpoint.startswith(("http://", "https://")):
                raise ValueError(f"otel_endpoint={self.otel_endpoint!r} must be an http:// or https:// URL of an "
                                 "OTLP/HTTP collector, e.g. http://127.0.0.1:4318")
            if not self.trace:
                raise ValueError("otel_endpoint is set but trace is false: the spans sent to OpenTelemetry are the "
                                 "trace's; set logging.trace=true or drop logging.otel_endpoint")


@dataclass
class CheckpointConfig:
    interval: int = field(default=0, metadata={"ge": 0})
    """Save a checkpoint every this many trainer steps (0 = only at the end)."""
    keep_last: int = field(default=2, metadata={"ge": 1})
    """Checkpoints kept on disk; older ones are deleted."""
    resume: str | None = None
    """`auto` (latest in the run directory), a checkpoint folder, or None for a fresh run."""
    save_hf: bool = True
    """Also export the final policy as an HF model folder (loadable by transformers and vLLM)."""
    save_hf_merged: bool = False
    """With LoRA (`trainer.lora.rank` > 0): besides the PEFT adapter folder `final_hf/`, write the base with the adapter merged in to `final_hf/merged/` (a plain HF model that vLLM serves). Ignored without LoRA."""


@dataclass
class RayConfig:
    address: str | None = None
    """Ray cluster to join (`auto`, `host:port`, `ray://host:port`). None: join the cluster running
    on this machine (`ray start --head`) if there is one, else start a local one that ends with the
    run; `local`: always start a private local one."""
    num_cpus: int | None = field(default=None, metadata={"ge": 1})
    """CPUs of a local cluster (None = all)."""
    placement: str = field(default="colocate", metadata={"choices": ("colocate", "disaggregate")})
    """Share devices between rollout and trainer, or give each side its own."""
    runtime_env: dict[str, Any] = field(default_factory=dict)
    """Ray runtime_env for all actors (env_vars, working_dir, pip...)."""
    engine_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each rollout engine needs besides CPU/GPU, e.g. `{rollout: 1}`: engines
    then run only on nodes started with that resource (`ray start --resources='{"rollout": 2}'`).
    `rollout.elastic` follows the first one."""
    trainer_resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each trainer worker needs, e.g. `{trainer: 1}`."""
    engine_strategy: str = field(default="PACK", metadata={"choices": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")})
    """Placement-group strategy of the engines' reserved bundles (disaggregate): SPREAD puts them
    on as many nodes as possible. Engines started later (scale, elastic, replacements) are placed
    by Ray wherever their resources are free."""
    trainer_strategy: str = field(default="PACK", metadata={"choices": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")})
    """Placement-group strategy of the trainer workers' bundles (and of the one colocated group)."""


@dataclass
class Config:
    """Root config of one slime-rl run."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)

    def sampling_temperature(self) -> float:
        """Temperature of the distribution the engines sample from (1.0 for greedy)."""
        return self.rollout.temperature if self.rollout.temperature > 0 else 1.0

    def max_staleness(self) -> int:
        """The staleness bound in effect: 0 in sync mode, `buffer.max_staleness` otherwise."""
        return 0 if self.run.mode == "sync" else self.buffer.max_staleness

    def validate(self) -> None:
        """Rules that span sections."""
        if not self.data.train_path and not (self.rollout.environment or "").startswith("verifiers:"):
            raise ValueError("data.train_path is required but not set; set it in the YAML file or pass data.train_path=... "
                             "(only a rollout.environment: verifiers:... brings its own dataset)")
        s, k, b = self.max_staleness(), self.weight_sync.interval, self.trainer.global_batch_groups
        if self.run.mode == "sync" and k != 1:
            raise ValueError(f"run.mode=sync pushes weights after every step; weight_sync.interval={k} must be 1")
        if s < k - 1:
            raise ValueError(
                f"buffer.max_staleness={s} is below weight_sync.interval - 1 = {k - 1}: the engines keep version v "
                f"for {k} steps, so samples are up to {k - 1} versions old when trained and the run would stall; "
                f"set buffer.max_staleness >= {k - 1} or lower weight_sync.interval"
            )
        if self.buffer.capacity_groups < (s + 2) * b:
            raise ValueError(
                f"buffer.capacity_groups={self.buffer.capacity_groups} is too small: up to (max_staleness + 2) x "
                f"global_batch_groups = {(s + 2) * b} groups can wait in it; raise it to at least {(s + 2) * b}"
            )
        if self.rollout.num_engines == 0 and not self.rollout.elastic:
            raise ValueError("rollout.num_engines=0 starts no engine; set it >= 1, or rollout.elastic=true to follow the cluster")
        if self.rollout.elastic and not self.ray.engine_resources:
            raise ValueError(
                "rollout.elastic=true follows the nodes that carry the engines' custom resource, but "
                "ray.engine_resources is empty; set e.g. ray.engine_resources={rollout: 1} and start rollout nodes "
                "with `ray start --resources='{\"rollout\": 1}'`"
            )
        if self.rollout.elastic and self.ray.placement == "colocate":
            raise ValueError("rollout.elastic=true needs ray.placement=disaggregate (colocated engines share the "
                             "trainer's reserved bundles and cannot follow the cluster)")
        if self.run.rollout_only and self.run.train_only:
            raise ValueError("run.rollout_only and run.train_only exclude each other; set one")
        if self.rollout.record_routed_experts and self.rollout.engine not in ("hf", "vllm"):
            raise ValueError(
                f"rollout.record_routed_experts=true is implemented for rollout.engine=hf and vllm, not "
                f"{self.rollout.engine!r}; use one of them or set rollout.record_routed_experts=false"
            )
        if self.trainer.routing_replay and not self.rollout.record_routed_experts:
            raise ValueError(
                "trainer.routing_replay=true replays the experts the engine routed each token to, which the engines "
                "record only with rollout.record_routed_experts=true; set it (or trainer.routing_replay=false)"
            )
        sampling_t = self.sampling_temperature()
        if self.trainer.batching.temperature != sampling_t:
            raise ValueError(
                f"trainer.batching.temperature={self.trainer.batching.temperature} must equal the rollout "
                f"sampling temperature ({sampling_t}; 1.0 when rollout.temperature=0): the trainer recomputes "
                f"the engine's log-probs at that temperature for the importance ratio. "
                f"Set trainer.batching.temperature={sampling_t}"
            )

    @property
    def run_dir(self) -> Path:
        """`<run.output_dir>/<run.name>`."""
        return Path(self.run.output_dir) / self.run.name


_TRAINER_TEMPERATURE = "trainer.batching.temperature"

REQUIRED_PATHS = ("model.path", "data.train_path")
"""Keys that must name an existing file or folder when `check_paths` is on."""
OPTIONAL_PATHS = ("model.tokenizer_path", "data.eval_path", "trainer.distill.teacher_path")
"""Keys that, when set, must name an existing file or folder."""


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    check_paths: bool = True,
    base: Config | None = None,
) -> Config:
    """Load YAML ``path`` (or the defaults, or ``base``), apply ``key=value`` overrides, validate.

    Relative paths in the config stay relative to the working directory.

    Raises:
        ConfigError: unknown key (with the nearest valid keys), wrong type, value out of
            range, a required value not set, or a path that does not exist.
    """
    layers: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = OmegaConf.load(path)
        except Exception as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from e
        if not isinstance(raw, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
        layers.append((str(path), raw))
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. rollout.temperature=0.7)")
        try:
            layers.append((f"override {item!r}", OmegaConf.from_dotlist([item])))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r} could not be parsed: {e}") from e

    merged = OmegaConf.structured(base if base is not None else Config)
    for source, layer in layers:
        _check_known_keys(OmegaConf.to_container(layer, resolve=False), Config, prefix="", source=source)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _type_error(e, source) from None
    _check_values(merged, Config, prefix="")
    missing = _missing_keys(merged)
    if missing:
        raise ConfigError(f"{missing[0]} is required but not set; set it in the YAML file or pass {missing[0]}=...")
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    sets = lambda key: any(OmegaConf.select(layer, key) is not None for _, layer in layers)  # noqa: E731
    if not sets(_TRAINER_TEMPERATURE) and (base is None or sets("rollout.temperature")):
        # Unless set explicitly, the trainer scores log-probs at the sampling temperature.
        cfg.trainer.batching.temperature = cfg.sampling_temperature()
    _check_cross_field(cfg, prefix="")
    if check_paths:
        _check_paths(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config as YAML (creating folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _field_types(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _nested_dataclass(cls: type, name: str) -> type | None:
    f = _field_types(cls)[name]
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    return type(default) if dataclasses.is_dataclass(default) else None


def _list_item_dataclass(cls: type, name: str) -> type | None:
    """The element type of a `list[SomeDataclass]` field, else None."""
    hint = typing.get_type_hints(cls).get(name)
    if typing.get_origin(hint) is list:
        (arg,) = typing.get_args(hint)
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _check_known_keys(data: Any, cls: type, prefix: str, source: str) -> None:
    if not isinstance(data, Mapping):
        return
    known = _field_types(cls)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else ""
            valid = ", ".join(prefix + n for n in known)
            raise ConfigError(f"unknown config key {full!r} (from {source}){hint} valid keys here: {valid}")
        sub = _nested_dataclass(cls, key)
        if sub is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full} must be a mapping of {sub.__name__} fields, got {value!r}")
            _check_known_keys(value, sub, prefix=f"{full}.", source=source)
        item = _list_item_dataclass(cls, key)
        if item is not None and isinstance(value, list):
            for i, entry in enumerate(value):
                if not isinstance(entry, Mapping):
                    raise ConfigError(f"{full}[{i}] must be a mapping of {item.__name__} fields, got {entry!r}")
                _check_known_keys(entry, item, prefix=f"{full}[{i}].", source=source)


def _schema_field(dotted: str) -> dataclasses.Field | None:
    cls: type | None = Config
    found = None
    for part in dotted.split("."):
        if cls is None or part not in _field_types(cls):
            return found if cls is None else None
        found = _field_types(cls)[part]
        cls = _nested_dataclass(cls, part)
    return found


def _type_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    value = getattr(e, "value", None)
    f = _schema_field(key) if key != "?" else None
    expected = f"; expected {f.type}" if f is not None else ""
    msg = str(e).splitlines()[0]
    return ConfigError(f"{key}={value!r} (from {source}) has the wrong type: {msg}{expected}")


def _missing_keys(node: DictConfig, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key in node:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            out.append(full)
        else:
            child = node[key]
            if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
                out += _missing_keys(child, prefix=f"{full}.")
    return out


def _check_values(node: DictConfig, cls: type, prefix: str) -> None:
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        if OmegaConf.is_missing(node, f.name):
            continue
        sub = _nested_dataclass(cls, f.name)
        item = _list_item_dataclass(cls, f.name)
        if sub is not None:
            _check_values(node[f.name], sub, prefix=f"{full}.")
        elif item is not None and node[f.name] is not None:
            for i, entry in enumerate(node[f.name]):  # e.g. faults.kill[0].actor
                _check_values(entry, item, prefix=f"{full}[{i}].")
        else:
            _check_field(full, node[f.name], f.metadata)


def _check_cross_field(obj: Any, prefix: str) -> None:
    """Run each section's optional `validate()` (rules that involve several fields)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_cross_field(value, prefix=f"{prefix}{f.name}.")
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(f"{prefix}{e}") from None


def _check_field(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {', '.join(map(repr, choices))}")
    bounds = [("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b), ("le", "<=", lambda v, b: v <= b)]
    for name, _, ok in bounds:
        if name in meta and not ok(value, meta[name]):
            rule = " and ".join(f"{s} {meta[n]}" for n, s, _ in bounds if n in meta)
            raise ConfigError(f"{key}={value!r} is out of range; it must be {rule}")


def _lookup(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_paths(cfg: Config) -> None:
    for key in REQUIRED_PATHS + OPTIONAL_PATHS:
        value = _lookup(cfg, key)
        if value is not None and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist; point it at an existing {'file' if key.startswith('data') else 'folder'}")
