"""`sglang` engine: SGLang's offline `Engine` (GPU only), driven through its async API.

    generate() ──► tokenizer_manager.generate_request(GenerateReqInput(input_ids, rid,
                       sampling_params, return_logprob=True)) ──► meta_info.output_token_logprobs
    abort()    ──► tokenizer_manager.abort_request(rid)
    commit_weight_update ──► pause_generation(mode) ─► update_weights_from_tensor
                              (or _from_distributed / _from_disk) ─► flush ─► continue_generation

SGLang's synchronous `Engine.update_weights_from_tensor` etc. call `loop.run_until_complete`
and cannot run inside the Ray actor's event loop, so this backend awaits the same
`TokenizerManager` coroutines those wrappers call. `SGLANG_RETURN_ORIGINAL_LOGPROB=1` makes the
log-probs raw (before temperature), as on the other backends. SGLang honours per-request
seeds only with `enable_deterministic_inference=True` (pass it in `engine_kwargs`).
SGLang does not say which weights produced which token, so a request that spans an update
(PauseMode.KEEP) has every token tagged with the version it started with (conservative for
staleness); `version_end` is exact.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from slime_rl.rollout.engines.base import (
    EngineHealth,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    NamedTensors,
    PauseMode,
    SamplingParams,
    as_named_tensors,
)

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install slime-rl[sglang] (CUDA GPU only) to use rollout.engine=sglang"
# Our pause modes -> SGLang's: "in_place" keeps requests and their KV, "retract" re-prefills.
_SGLANG_PAUSE = {PauseMode.KEEP: "retract", PauseMode.ABORT: "abort", PauseMode.WAIT: "in_place"}


def _import_sglang():
    try:
        import sglang
        from sglang.srt.managers import io_struct
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    return sglang, io_struct


def to_sglang_sampling(params: SamplingParams) -> dict[str, Any]:
    """Our `SamplingParams` as SGLang's sampling-params dict."""
    out: dict[str, Any] = {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k if params.top_k > 0 else -1,
        "max_new_tokens": params.max_new_tokens,
        "ignore_eos": params.ignore_eos,
        "skip_special_tokens": False,
        "no_stop_trim": True,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    if params.stop_token_ids:
        out["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def from_sglang_output(
    request: GenerateRequest, out: Mapping[str, Any], version_start: int, version_end: int
) -> GenerateResult:
    """Translate SGLang's result dict (`output_ids`, `meta_info`) into a `GenerateResult`."""
    meta = out.get("meta_info", {})
    token_ids = [int(t) for t in out.get("output_ids", [])]
    logprobs = [float(entry[0]) for entry in meta.get("output_token_logprobs", [])]
    if len(logprobs) != len(token_ids):
        raise RuntimeError(
            f"sglang returned {len(token_ids)} tokens but {len(logprobs)} log-probs for {request.request_id}"
        )
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, Mapping) else str(finish)
    reason = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH}.get(
        kind, FinishReason.ABORT
    )
    matched = finish.get("matched") if isinstance(finish, Mapping) else None
    stop_reason = matched if reason is FinishReason.STOP else None
    if isinstance(stop_reason, int) and stop_reason not in request.sampling.stop_token_ids:
        stop_reason = None  # EOS, like the other backends
    return GenerateResult(
        request_id=request.request_id,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=reason,
        weight_versions=[version_start] * len(token_ids),
        version_start=version_start,
        version_end=version_end,
        stop_reason=stop_reason,
    )


class SGLangEngine:
    """Rollout engine on SGLang (CUDA). Implements `RolloutEngine`; see docs/engines.md."""

    backend = "sglang"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        mem_fraction_static: float | None = None,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ) -> None:
        sglang, self._io = _import_sglang()
        os.environ.setdefault("SGLANG_RETURN_ORIGINAL_LOGPROB", "1")
        kwargs: dict[str, Any] = dict(
            model_path=str(model_path), dtype=dtype, tp_size=tensor_parallel_size, random_seed=seed
        )
        if mem_fraction_static is not None:
            kwargs["mem_fraction_static"] = mem_fraction_static
        kwargs.update(engine_kwargs or {})
        self._tp = tensor_parallel_size
        self._engine = sglang.Engine(**kwargs)
        self._tm = self._engine.tokenizer_manager
        self._version = 0
        self._live: dict[str, tuple[GenerateRequest, int]] = {}
        self._results: dict[str, asyncio.Future] = {}
        self._paused = False
        self._staged: list[tuple[str, torch.Tensor]] | None = None
        self._staged_version: int | None = None
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise RuntimeError("sglang engine is shut down; create a new one")
        if request.request_id in self._live:
            raise ValueError(
                f"request_id {request.request_id!r} is already in flight; ids must be unique"
            )
        version_start = self._version
        self._live[request.request_id] = (request, version_start)
        fut = asyncio.get_running_loop().create_future()
        self._results[request.request_id] = fut
        try:
            obj = self._io.GenerateReqInput(
                input_ids=list(request.prompt_token_ids),
                sampling_params=to_sglang_sampling(request.sampling),
                return_logprob=True,
                rid=request.request_id,
            )
            out = await self._tm.generate_request(obj, None).__anext__()
            result = from_sglang_output(request, out, version_start, self._version)
        except BaseException as e:
            if not fut.done():  # an abort() waiting on this request must not hang
                fut.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                fut.exception()  # mark retrieved: the caller gets the error from this call
            raise
        finally:
            self._live.pop(request.request_id, None)
            self._results.pop(request.request_id, None)
        if not fut.done():
            fut.set_result(result)
        return result

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        futs = []
        for rid in request_ids:
            if rid in self._live:
                self._tm.abort_request(rid=rid)
                futs.append(self._results[rid])
        # SGLang answers an aborted request with what it generated so far.
        done = await asyncio.gather(*futs, return_exceptions=True)
        return [r for r in done if isinstance(r, GenerateResult)]

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        """SGLang reports tokens only at the end (non-streaming): in-flight requests show 0."""
        return {r: 0 for r in request_ids if r in self._live}

    async def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        await self._tm.pause_generation(
            self._io.PauseGenerationReqInput(mode=_SGLANG_PAUSE[PauseMode(mode)])
        )
        self._paused = True

    async def resume(self) -> None:
        await self._tm.continue_generation(self._io.ContinueGenerationReqInput())
        self._paused = False

    # ---- weights ------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        self._staged, self._staged_version = [], int(version)

    async def load_weight_bucket(self, bucket: NamedTensors | Mapping[str, torch.Tensor]) -> int:
        if self._staged is None:
            raise RuntimeError("load_weight_bucket before begin_weight_update(version)")
        self._staged.extend(as_named_tensors(bucket))
        return len(self._staged)

    async def commit_weight_update(self, mode: PauseMode | str = PauseMode.KEEP) -> int:
        if not self._staged or self._staged_version is None:
            raise RuntimeError(
                "commit_weight_update needs begin_weight_update(version) and at least one bucket"
            )
        from sglang.srt.utils import MultiprocessingSerializer

        staged, version = self._staged, self._staged_version
        self._staged = self._staged_version = None
        payload = [MultiprocessingSerializer.serialize(staged) for _ in range(self._tp)]
        obj = self._io.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=payload, flush_cache=True
        )
        await self._with_pause(mode, self._tm.update_weights_from_tensor(obj, None), version)
        return version

    async def update_weights(
        self,
        version: int,
        named_tensors: NamedTensors | Mapping[str, torch.Tensor],
        mode: PauseMode | str = PauseMode.KEEP,
    ) -> int:
        await self.begin_weight_update(version)
        await self.load_weight_bucket(named_tensors)
        return await self.commit_weight_update(mode)

    async def update_weights_from_disk(
        self, version: int, model_path: str, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        obj = self._io.UpdateWeightFromDiskReqInput(model_path=str(model_path))
        await self._with_pause(mode, self._tm.update_weights_from_disk(obj, None), version)
        return version

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's process group for `update_weights_from_distributed` (NCCL broadcast)."""
        obj = self._io.InitWeightsUpdateGroupReqInput(
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        ok, message = await self._tm.init_weights_update_group(obj, None)
        if not ok:
            raise RuntimeError(f"sglang init_weights_update_group failed: {message}")

    async def update_weights_from_distributed(
        self,
        version: int,
        names: list[str],
        dtypes: list[str],
        shapes: list[list[int]],
        group_name: str = "weight_update_group",
        mode: PauseMode | str = PauseMode.KEEP,
    ) -> int:
        """Receive one bucket broadcast by the trainer (call once per bucket; the trainer
        broadcasts concurrently). The version is set after this bucket."""
        obj = self._io.UpdateWeightsFromDistributedReqInput(
            names=names, dtypes=dtypes, shapes=shapes, group_name=group_name, flush_cache=True
        )
        await self._with_pause(mode, self._tm.update_weights_from_distributed(obj, None), version)
        return version

    async def _with_pause(self, mode: PauseMode | str, update, version: int) -> None:
        was_paused = self._paused
        if not was_paused:
            await self.pause(mode)
        try:
            result = await update
            ok, message = result[0], result[1]
            if not ok:
                raise RuntimeError(f"sglang weight update to version {version} failed: {message}")
            await self._tm.flush_cache()
            self._version = version
        finally:
            if not was_paused:
                await self.resume()

    # ---- lifecycle ----------------------------------------------------------------------------
    async def health(self) -> EngineHealth:
        return EngineHealth(
            ok=not self._closed,
            backend=self.backend,
            version=self._version,
            paused=self._paused,
            num_running=len(self._live),
            num_waiting=0,
            detail="shut down" if self._closed else "",
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        await self.abort(list(self._live))
        self._closed = True
        self._engine.shutdown()
