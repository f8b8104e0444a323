"""vLLM worker extension: in-place weight reload, called through `collective_rpc`.

    VLLMEngine.backend_update_weights ──collective_rpc("slime_update_weights", payload)──► every worker:
        payload = [(name, tensor), ...]  (in-process executor: tensors passed by reference)
               or safetensors bytes      (worker processes: tensors do not survive the RPC)
        worker.reload_weights(weights_iterator)   # vLLM's layerwise in-place reload
        tied lm_head: repack from the new embedding (else it keeps the OLD packed weights)

With LoRA, `slime_load_lora(id, payload, config, alias_ids)` builds the adapter from the
update's tensors in memory and registers it under a new id (no folder is written).

Called once after start:
- `slime_install_logprob_sampler` switches the worker's sampler to report
  `log_softmax(logits / T)` over the full vocabulary (see `TemperatureLogprobSampler`);
- `slime_expected_weights` derives, from the model's own parameters, the checkpoint (HF)
  names a full update must hold, for any checkpoint format (see `weight_ways`);
- `slime_quiet_reload_warnings` filters vLLM's "<Layer>: Failed to load weights" warning
  for layers a reload has nothing to load into (rotary embeddings, a tied `lm_head`).

With routed-experts recording (`slime_capture_routing`, MoE models): every MoE layer's router
gets a capture function (vLLM's `BaseRouter.set_capture_fn`, the hook its own capturer uses);
a wrapper around the model runner's `execute_model` notes which request each row of the step's
token batch belongs to and at which position, so after each step `slime_take_routing` hands
the engine `{request_id: [(first position, int16 (n, L, K)), ...]}`.

Loaded by vLLM by dotted path (`worker_extension_cls`); imports vllm only inside methods so
the module itself imports without vllm installed.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXTENSION_PATH = "slime_rl.rollout.engines.vllm_ext.WeightSyncExtension"

IGNORED_CHECKPOINT_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_pos_emb.inv_freq",
    "rotary_emb.cos_cached",
    "rotary_emb.sin_cached",
)
"""Tensors some checkpoints carry and vLLM drops on load: allowed in an update, never required."""

Ways = list[list[list[str]]]
"""How one vLLM parameter can be covered by checkpoint names: a list of *ways*, each a list
of *slots*, each slot a list of alternative names. Covered when every slot of some way has
one of its names in the update."""


def weight_ways(
    param_names: Iterable[str],
    packed: Mapping[str, Sequence[str]],
    experts: Sequence[tuple[str, str, Any]] = (),
    prefix_renames: Mapping[str, str] | None = None,
) -> dict[str, Ways]:
    """The checkpoint names that cover each vLLM parameter (pure: no vLLM needed).

    Args:
        param_names: the model's `named_parameters()` names (vLLM naming; a tied `lm_head`
            is not among them).
        packed: the model's `packed_modules_mapping`, e.g. `{"qkv_proj": ["q_proj",
            "k_proj", "v_proj"]}`: a packed parameter is covered by itself (a checkpoint
            that stores it fused) or by all of its shards.
        experts: `(param_prefix, weight_prefix, key)` from the model's
            `get_expert_mapping()` (`("experts.w13_", "experts.0.gate_proj.", (0, "w1"))`):
            a fused-experts parameter is covered by itself or by one name per key.
        prefix_renames: vLLM-name prefix -> checkpoint-name prefix (the inverse of the
            model's `hf_to_vllm_mapper.orig_to_new_prefix`).
    """
    renames = dict(prefix_renames or {})

    def to_checkpoint(name: str) -> str:
        for new, orig in renames.items():
            if name.startswith(new):
                return orig + name[len(new) :]
        return name

    param_names = list(param_names)
    # Entries in full names are looked up by the parameter's module; relative ones (an older
    # model-level mapping) are tried on every name.
    modules = {n.rsplit(".", 1)[0] for n in param_names}
    by_module: dict[str, list[tuple[str, str, Any]]] = {}
    loose: list[tuple[str, str, Any]] = []
    for entry in experts:
        module = entry[0].rsplit(".", 1)[0]
        (by_module.setdefault(module, []) if module in modules else loose).append(entry)
    out: dict[str, Ways] = {}
    for name in param_names:
        ways: Ways = [[[name]]]
        parts = name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in packed:
                ways.append([[".".join([*parts[:i], sub, *parts[i + 1 :]])] for sub in packed[part]])
                break
        candidates = by_module.get(name.rsplit(".", 1)[0], []) + loose
        matched = [(pp, wp, key) for pp, wp, key in candidates if pp in name]
        shared = collections.Counter(wp for _, wp, _ in matched)
        layouts: dict[tuple[bool, bool], dict[Any, list[str]]] = {}
        for param_prefix, weight_prefix, key in matched:
            # One way per checkpoint layout: stacked over experts or per expert, gate and up
            # in one tensor or two (vLLM loads each; an update must be complete in one).
            per_expert = _EXPERT_INDEX.search(weight_prefix) is not None
            gate_up_together = shared[weight_prefix] > 1
            slots = layouts.setdefault((per_expert, gate_up_together), {})
            alternative = name.replace(param_prefix, weight_prefix, 1)
            slot = slots.setdefault((param_prefix, key), [])
            if alternative not in slot:
                slot.append(alternative)
        ways.extend(list(slots.values()) for slots in layouts.values())
        out[name] = [[[to_checkpoint(n) for n in slot] for slot in way] for way in ways]
    return out


_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+\.")


def module_expert_mapping(model: torch.nn.Module) -> list[tuple[str, str, Any]]:
    """`(vllm_param_prefix, checkpoint_prefix, key)` entries for `weight_ways`, in full names,
    from every fused-MoE layer of a vLLM model (vLLM >= 0.3x: each layer's routed-experts
    module has `get_expert_mapping(include_fused=True)` and `layer_name`; older models have
    one model-level `get_expert_mapping()`, relative names that `weight_ways` substitutes).
    Covers the stacked transformers layout (`experts.gate_up_proj` (E, 2I, H),
    `experts.down_proj`) and the per-expert ones (`experts.<e>.gate_proj.weight`, ...)."""
    out: list[tuple[str, str, Any]] = []
    for mod_name, module in model.named_modules():
        mapping = getattr(module, "get_expert_mapping", None)
        layer_name = getattr(module, "layer_name", None)
        if not (callable(mapping) and isinstance(layer_name, str) and layer_name.endswith("experts")):
            continue
        ckpt_base = layer_name[: -len("experts")]  # "model.layers.1.mlp."
        for param_prefix, weight_prefix, expert_id, shard_id in mapping(include_fused=True):
            if not param_prefix.startswith("experts."):
                continue
            out.append(
                (f"{mod_name}.{param_prefix[len('experts.'):]}", ckpt_base + weight_prefix, (expert_id, shard_id))
            )
    if not out and callable(getattr(model, "get_expert_mapping", None)):
        for param_prefix, weight_prefix, expert_id, shard_id in model.get_expert_mapping():
            out.append((param_prefix, weight_prefix, (expert_id, shard_id)))
    return out


def check_full_state_dict(expected: Mapping[str, Ways], optional: set[str], names: Sequence[str]) -> None:
    """Refuse a partial or foreign update before vLLM touches the model (its in-place reload
    of a partial state dict gives NaN or a mix of old and new weights).

    Raises:
        ValueError: naming up to 5 unknown names, or the missing names (checkpoint naming)
            with how many are missing.
    """
    got = set(names)
    allowed = set(optional)
    for ways in expected.values():
        allowed.update(n for way in ways for slot in way for n in slot)
    unknown = sorted(n for n in got - allowed if not n.endswith(IGNORED_CHECKPOINT_SUFFIXES))
    if unknown:
        raise ValueError(
            f"vllm engine: weights {unknown[:5]} ({len(unknown)} in all) are not parameters of "
            "the engine's model; send the model's own (HF-named) state dict"
        )
    missing: list[str] = []
    per_expert_update = any(_EXPERT_INDEX.search(n) for n in got)

    def other_layout(way: list[list[str]]) -> bool:  # per-expert names vs the update's stacked ones, or back
        return any(_EXPERT_INDEX.search(slot[0]) for slot in way) != per_expert_update

    for ways in expected.values():
        gaps = [[slot[0] for slot in way if got.isdisjoint(slot)] for way in ways]
        if any(not gap for gap in gaps):
            continue
        # Report the way closest to complete; on a tie one in the update's expert layout, then
        # the most split one (checkpoint naming).
        best = min(range(len(ways)), key=lambda i: (len(gaps[i]) / len(ways[i]), other_layout(ways[i]), -i))
        missing += gaps[best]
    if missing:
        raise ValueError(
            f"vllm engine: the update misses {sorted(missing)[:5]}... ({len(missing)} tensors); "
            "send the full state dict (partial updates corrupt vLLM's in-place reload)"
        )


_RELOAD_WARNING = "%s: Failed to load weights"


class QuietReloadFilter(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" reload warning for layer classes that
    own no parameter of their own (rotary embeddings hold only buffers; a tied `lm_head`'s
    weight is the embedding's, loaded there): a reload has nothing to load into them. The
    warning for any other layer passes: that one is news (a layer kept its old weights)."""

    def __init__(self, classes: Iterable[str] = ()) -> None:
        super().__init__()
        self.classes: set[str] = set(classes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _RELOAD_WARNING or not record.args:
            return True
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return args[0] not in self.classes


def parameterless_layer_classes(model: torch.nn.Module) -> set[str]:
    """Names of module classes none of whose instances owns a parameter not already owned by
    an earlier module (tied aliases do not count)."""
    seen: set[int] = set()
    silent: set[str] = set()
    loud: set[str] = set()
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False, remove_duplicate=False)]
        fresh = [p for p in own if id(p) not in seen]
        seen.update(id(p) for p in own)
        (loud if fresh else silent).add(type(module).__name__)
    return silent - loud


def pack_weights(named_tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors blob for RPCs that cross a process boundary (names must be unique)."""
    from safetensors.torch import save

    return save({name: t.detach().contiguous().cpu() for name, t in named_tensors})


def _unpack(payload: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(payload, (bytes, bytearray)):
        from safetensors.torch import load

        return list(load(bytes(payload)).items())
    return list(payload)


def _temperature_logprob_sampler_cls():
    """vLLM's V1 `Sampler` reporting log-probs of the temperature-scaled, unfiltered
    distribution. None of vLLM 0.32's `logprobs_mode`s gives that: `raw_logprobs` ignores the
    temperature, `processed_logprobs` is also renormalised over the top-k/top-p survivors,
    `processed_logits`/`raw_logits` are unnormalised. So keep `raw_logprobs` (computed on
    the raw logits before penalties and temperature) and divide by each row's temperature
    first (rows with temperature < 1e-5, i.e. greedy, use 1)."""
    from vllm.v1.sample.sampler import Sampler

    class TemperatureLogprobSampler(Sampler):
        _slime_temperature = None

        def forward(self, logits, sampling_metadata, *args, **kwargs):
            self._slime_temperature = sampling_metadata.temperature  # None when all greedy
            try:
                return super().forward(logits, sampling_metadata, *args, **kwargs)
            finally:
                self._slime_temperature = None

        def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
            temp = self._slime_temperature
            logits = logits.to(torch.float32)
            if temp is not None:
                temp_B1 = torch.where(temp < 1e-5, 1.0, temp).to(logits)[:, None]
                logits = logits / temp_B1
            return logits.log_softmax(dim=-1)

    return Sampler, TemperatureLogprobSampler


def repack_cpu_experts(model: torch.nn.Module) -> int:
    """Re-pack the fused-MoE expert weights of vLLM's CPU kernel after an in-place reload;
    returns the number of layers re-packed.

    vLLM 0.32's CPU experts (`CPUUnquantizedExperts`) pre-pack `w13_weight` / `w2_weight` into
    their grouped-GEMM layout once, when the kernel is first set up; a reload
    (`process_weights_after_loading` on a weight update) copies the new weights in their plain
    layout and skips that step, so the kernel reads unpacked data (log-probs off by ~0.4 nats
    on the tiny GLM-4.5 even when the same weights are reloaded). Packing them again here
    restores it."""
    count = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if type(experts).__name__ == "CPUUnquantizedExperts" and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)
            count += 1
    return count


class RoutingCapture:
    """Per-step capture of the experts every MoE layer routed each token to (worker side).

    `capture(layer, topk_ids)` is the routers' capture function (called inside the forward);
    the first call of a step notes the batch layout (the model runner's request order, each
    request's scheduled tokens and the position of its first one); `end_step` files the step's
    rows under their requests; `take` hands them over.
    """

    def __init__(self, runner: Any, num_layers: int) -> None:
        self.runner = runner
        self.num_layers = num_layers
        self._in_step = False
        self._scheduled: Mapping[str, int] = {}
        self._layout: list[tuple[str, int, int]] | None = None
        self._ids: list[torch.Tensor | None] = [None] * num_layers
        self._pending: dict[str, list[tuple[int, Any]]] = {}

    def begin_step(self, scheduler_output: Any) -> None:
        self._in_step = True
        self._scheduled = scheduler_output.num_scheduled_tokens
        self._layout = None
        self._ids = [None] * self.num_layers

    def capture(self, layer: int, topk_ids: torch.Tensor) -> None:
        if not self._in_step:  # warm-up / profiling runs
            return
        if self._layout is None:
            batch = self.runner.input_batch
            req_ids = list(batch.req_ids)
            starts = batch.num_computed_tokens_cpu[: len(req_ids)]
            self._layout = [(r, int(starts[i]), int(self._scheduled[r])) for i, r in enumerate(req_ids)]
        self._ids[layer] = topk_ids.detach().to("cpu", torch.int16)

    def end_step(self) -> None:
        self._in_step = False
        if self._layout is None:  # no forward pass this step
            return
        missing = [i for i, t in enumerate(self._ids) if t is None]
        if missing:
            raise RuntimeError(
                f"routed-experts capture: MoE layers {missing[:5]} reported no routing this step; their kernel "
                "bypasses vLLM's router capture (record_routed_experts cannot be used with it)"
            )
        total = sum(n for _, _, n in self._layout)
        rows_NLK = torch.stack([t[:total] for t in self._ids], dim=1).numpy()
        offset = 0
        for rid, start, n in self._layout:
            self._pending.setdefault(rid, []).append((start, rows_NLK[offset : offset + n]))
            offset += n

    def take(self) -> dict[str, list[tuple[int, Any]]]:
        out, self._pending = self._pending, {}
        return out


def _input_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        return get() if callable(get) else None
    except Exception:  # (some vLLM models do not implement it)
        return None


def share_tied_packing(lm_head: Any, embed: Any, packed_before: Any) -> bool:
    """Give a tied `lm_head` the embedding's CPU GEMM packing when the reload just re-made it
    (vLLM packs the vocabulary matrix for each of the two modules; one packing of the same
    weight serves both). False when it cannot: not CPU, not the same weight, not re-packed."""
    packed = getattr(embed, "cpu_linear", None)
    weight, embed_weight = getattr(lm_head, "weight", None), getattr(embed, "weight", None)
    if packed is None or packed is packed_before or not hasattr(lm_head, "cpu_linear"):
        return False
    if weight is None or embed_weight is None or weight.data_ptr() != embed_weight.data_ptr():
        return False
    lm_head.cpu_linear = packed
    return True


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""`max_lora_rank` values vLLM 0.32 accepts."""
LORA_SLOTS = 4
"""Adapters one batch may mix (`max_loras`): the newest version plus the ids of requests kept
across updates; the CPU-side cache (`max_cpu_loras`) holds twice as many, so no id a request
still names is ever evicted (vLLM would then re-read it from its fake `mem://` path)."""


def lora_engine_args(rank: int) -> dict[str, Any]:
    """vLLM engine arguments to serve one LoRA adapter of rank `rank` (versions swap in memory)."""
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise ValueError(f"trainer.lora.rank={rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}")
    return {"enable_lora": True, "max_lora_rank": fits[0], "max_loras": LORA_SLOTS, "max_cpu_loras": 2 * LORA_SLOTS}


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is the worker (has `model_runner`, `reload_weights`)."""

    def slime_add_zero_lora(self, lora_id: int, rank: int) -> bool:
        """Register a zero adapter (lora_B = 0: the base model) under `lora_id`: version 0 of a
        LoRA policy. Every request then runs with an adapter id, which a later update can
        point at new tensors (a request without one would keep the base weights)."""
        from vllm.lora.request import LoRARequest

        wm = self.model_runner.lora_manager
        if wm is None:
            raise RuntimeError("vllm worker: LoRA is not enabled (the engine was started without enable_lora)")
        return bool(wm.add_dummy_lora(LoRARequest("policy@v0", int(lora_id), f"mem://policy/{lora_id}"), int(rank)))

    def slime_load_lora(self, lora_id: int, payload: Any, config: dict[str, Any], alias_ids: Sequence[int]) -> int:
        """Build a LoRA adapter from in-memory tensors (PEFT names) and register it under
        `lora_id` and under each of `alias_ids` (ids that requests kept across the update still
        name: they run with the new tensors from now on); every other adapter is removed.
        vLLM 0.32's own `add_lora` only reads adapters from a folder; this is the same load
        from tensors (`LoRAModel.from_lora_tensors`). Returns the number of tensors."""
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        tensors = dict(_unpack(payload))
        wm = self.model_runner.lora_manager
        if wm is None:
            raise RuntimeError("vllm worker: LoRA is not enabled (the engine was started without enable_lora)")
        helper = PEFTHelper.from_dict({**config, "vllm_max_position_embeddings": wm.max_position_embeddings})
        helper.validate_legal(wm.lora_config)
        manager = wm._adapter_manager
        ids = [int(lora_id), *(int(i) for i in alias_ids if int(i) != int(lora_id))]
        for old in list(manager.list_adapters()):
            if old not in ids:
                manager.remove_adapter(old)
        device = str(getattr(wm, "device", "cpu"))
        for i in ids:
            # A copy per id: vLLM folds the scaling into lora_B in place (`optimize`), which
            # would scale a shared tensor again for every id (and write into the sender's
            # tensors or read-only object-store memory).
            own = {n: t.clone() for n, t in tensors.items()}
            lora = LoRAModel.from_lora_tensors(
                i, own, helper, device=device, dtype=wm.lora_config.lora_dtype, model_vocab_size=wm.vocab_size
            )
            manager.remove_adapter(i)
            if len(manager) + 1 > manager.capacity:
                manager.remove_oldest_adapter()
            manager.add_adapter(lora)
        manager.activate_adapter(int(lora_id))
        return len(tensors)

    def slime_update_weights(self, payload: Any) -> int:
        """Reload the full state dict in place; returns the number of tensors received."""
        weights = _unpack(payload)
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        config = getattr(model, "config", None)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:  # vLLM ties lm_head to embed_tokens itself and ignores a separate copy
            weights = [(n, t) for n, t in weights if n != "lm_head.weight"]
        lm_head = getattr(model, "lm_head", None)
        embed = _input_embeddings(model)
        packed_before = getattr(embed, "cpu_linear", None)
        self.reload_weights(weights_iterator=((n, t.to(device)) for n, t in weights))
        method = getattr(lm_head, "quant_method", None)
        if tied and method is not None and hasattr(method, "process_weights_after_loading"):
            # On CPU the logits GEMM uses a packed copy made at load time; the reload re-packs
            # the embedding but not the tied lm_head, whose log-probs would come from the old
            # weights. Take the embedding's fresh packing (same weight, same kernel) or re-pack.
            if not share_tied_packing(lm_head, embed, packed_before):
                method.process_weights_after_loading(lm_head)
        repack_cpu_experts(model)
        return len(weights)

    def slime_install_logprob_sampler(self) -> str:
        """Make the worker report `log_softmax(logits / T)` log-probs (the trainer's view);
        returns the logprobs mode in effect. Refuses a sampler it does not know."""
        base, scaled = _temperature_logprob_sampler_cls()
        runner = self.model_runner
        sampler = getattr(runner, "sampler", None)
        if type(sampler) is not base or sampler.logprobs_mode != "raw_logprobs":
            raise RuntimeError(
                f"vllm engine: cannot report temperature-scaled log-probs with sampler "
                f"{type(sampler).__name__} (logprobs_mode="
                f"{getattr(sampler, 'logprobs_mode', None)!r}); use vLLM's V1 model runner "
                "(VLLM_USE_V2_MODEL_RUNNER=0) and the default logprobs_mode=raw_logprobs"
            )
        sampler.__class__ = scaled  # same state, temperature-aware compute_logprobs
        return "temperature_scaled_raw_logprobs"

    def slime_expected_weights(self) -> dict[str, Any]:
        """`{"params": {vllm_name: Ways}, "optional": [names]}`: what a full update must hold,
        in checkpoint names, derived from this worker's model (see `weight_ways`)."""
        model = self.model_runner.get_model()
        packed: dict[str, list[str]] = {}
        for module in model.modules():  # packed_modules_mapping may sit on an inner module
            packed.update(getattr(module, "packed_modules_mapping", None) or {})
        experts = module_expert_mapping(model)
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        renames = {
            new: orig
            for orig, new in (getattr(mapper, "orig_to_new_prefix", None) or {}).items()
            if new is not None
        }
        # (with LoRA, vLLM wraps layers: `x.base_layer.weight` loads from `x.weight`)
        names = [n.replace(".base_layer.", ".") for n, _ in model.named_parameters()]
        config = getattr(model, "config", None)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        return {
            "params": weight_ways(names, packed, experts, renames),
            "optional": ["lm_head.weight"] if tied and "lm_head.weight" not in names else [],
        }

    def slime_quiet_reload_warnings(self) -> list[str]:
        """Install `QuietReloadFilter` (once per process) on vLLM's layerwise-reload logger for
        this model's parameterless layer classes; returns the classes filtered."""
        from vllm.model_executor.model_loader.reload import layerwise

        reload_logger = getattr(layerwise, "logger", None) or logging.getLogger(layerwise.__name__)
        quiet = next((f for f in reload_logger.filters if isinstance(f, QuietReloadFilter)), None)
        if quiet is None:
            quiet = QuietReloadFilter()
            reload_logger.addFilter(quiet)
        quiet.classes |= parameterless_layer_classes(self.model_runner.get_model())
        return sorted(quiet.classes)

    def slime_capture_routing(self) -> int:
        """Record the experts each token is routed to (see `RoutingCapture`); returns the number
        of MoE layers hooked (0 for a dense model: nothing is recorded).

        Raises:
            RuntimeError: an MoE layer whose kernel routes outside vLLM's router (monolithic
                kernels) or whose router cannot take a capture function.
        """
        model = self.model_runner.get_model()
        layers = []
        for name, module in model.named_modules():
            router = getattr(module, "router", None)
            if router is None or not hasattr(module, "layer_id") or not hasattr(module, "routed_experts"):
                continue
            method = getattr(module, "_quant_method", None)
            if getattr(method, "is_monolithic", False) or not callable(getattr(router, "set_capture_fn", None)):
                raise RuntimeError(
                    f"vllm engine: cannot record routed experts of {name}: its MoE kernel "
                    f"({type(method).__name__}) routes outside vLLM's router; disable rollout.record_routed_experts"
                )
            layers.append((int(module.layer_id), router))
        if not layers:
            return 0
        layers.sort(key=lambda x: x[0])
        runner = self.model_runner
        capture = RoutingCapture(runner, len(layers))
        for index, (_, router) in enumerate(layers):
            router.set_capture_fn(functools.partial(capture.capture, index))
        original = runner.execute_model

        def execute_model(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            capture.begin_step(scheduler_output)
            try:
                return original(scheduler_output, *args, **kwargs)
            finally:
                capture.end_step()

        runner.execute_model = execute_model
        self._slime_routing = capture
        return len(layers)

    def slime_take_routing(self) -> dict[str, list[tuple[int, Any]]]:
        """Routing recorded since the last call: `{request_id: [(first position, int16 (n, L, K))]}`."""
        capture = getattr(self, "_slime_routing", None)
        return capture.take() if capture is not None else {}

    def slime_param_checksum(self) -> float:
        """Sum of all parameters (float64): lets tests see that weights really changed."""
        model = self.model_runner.get_model()
        return float(sum(p.detach().double().sum() for p in model.parameters()))
