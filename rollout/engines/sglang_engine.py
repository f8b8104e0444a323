"""`sglang` engine: SGLang's offline `Engine` (GPU only), driven through its async API.

    generate() ──► [admission gate] ──► tokenizer_manager.generate_request(GenerateReqInput(
                       input_ids, rid, sampling_params, return_logprob=True, stream=True))
                   each streamed chunk: new tokens + log-probs, tagged with the live version
    abort()    ──► tokenizer_manager.abort_request(rid), re-sent until the stream ends
    commit_weight_update ──► [wait: close gate, drain] ─► pause_generation(retract | abort)
                              ─► update_weights_from_tensor / _from_distributed (all buckets,
                              flush_cache=False) / _from_disk ─► flush_cache (checked)
                              ─► version = v ─► continue_generation ─► open gate

SGLang's synchronous `Engine.update_weights_from_tensor` etc. call `loop.run_until_complete`
and cannot run inside the Ray actor's event loop, so this backend awaits the same
`TokenizerManager` coroutines those wrappers call. Log-probs: SGLang's default (with
`SGLANG_RETURN_ORIGINAL_LOGPROB` off, which the engine enforces) is log_softmax(logits / T)
before top-k/top-p, the protocol's contract. SGLang honours per-request seeds only with
`enable_deterministic_inference=True` (pass it in `engine_kwargs`). Per-token versions come
from streaming: each chunk is tagged with the version live when it arrives.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
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
# Our pause modes -> SGLang's. "in_place" would keep KV computed with the old weights, so
# KEEP retracts (requests re-prefill under the new weights); WAIT drains first (see
# SGLangEngine._pause), then retracts whatever is left (nothing, normally).
_SGLANG_PAUSE = {PauseMode.KEEP: "retract", PauseMode.ABORT: "abort", PauseMode.WAIT: "retract"}
ABORT_RESEND_S = 0.5
"""How often an abort is re-sent while the request's stream has not ended (an abort that
reaches SGLang before the request does is dropped)."""
ABORT_DEADLINE_S = 30.0


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


def new_stream_tokens(
    have: int, out: Mapping[str, Any], request_id: str
) -> tuple[list[int], list[float]]:
    """The tokens and log-probs a streamed chunk adds to the `have` already received.
    Works whether SGLang streams increments or cumulative lists (`stream_output`): the new
    ones are the last `completion_tokens - have` entries of both lists."""
    meta = out.get("meta_info", {})
    ids = [int(t) for t in out.get("output_ids", [])]
    lps = [float(entry[0]) for entry in meta.get("output_token_logprobs", [])]
    total = int(meta.get("completion_tokens", have + len(ids)))
    new = max(total - have, 0)
    if len(ids) < new or len(lps) < new:
        raise RuntimeError(
            f"sglang chunk for {request_id} reports {total} tokens ({have} known) but carries "
            f"{len(ids)} token ids and {len(lps)} log-probs"
        )
    return ids[len(ids) - new :], lps[len(lps) - new :]


def from_sglang_output(
    request: GenerateRequest,
    out: Mapping[str, Any],
    version_start: int,
    version_end: int,
    token_ids: list[int] | None = None,
    logprobs: list[float] | None = None,
    weight_versions: list[int] | None = None,
) -> GenerateResult:
    """Translate SGLang's (last) result dict into a `GenerateResult`; the tokens, log-probs
    and versions gathered from the stream override the dict's when given."""
    meta = out.get("meta_info", {})
    if token_ids is None:
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
        weight_versions=weight_versions or [version_start] * len(token_ids),
        version_start=version_start,
        version_end=version_end,
        stop_reason=stop_reason,
    )


@dataclasses.dataclass(slots=True)
class _Stream:
    request: GenerateRequest
    version_start: int
    done: asyncio.Future
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    versions: list[int] = dataclasses.field(default_factory=list)
    admitted: bool = False
    """Sent to SGLang (False while held at the admission gate of a wait-mode update)."""


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
        # Log-probs must be log_softmax(logits / T), SGLang's default; "1" would make them
        # temperature-1 ("original"). Set before SGLang starts its scheduler processes.
        if os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "0").lower() not in ("0", "false"):
            logger.warning(
                "sglang engine: overriding SGLANG_RETURN_ORIGINAL_LOGPROB=%s with 0: the "
                "protocol reports temperature-scaled log-probs",
                os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"],
            )
        os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] = "0"
        sglang, io = _import_sglang()
        kwargs: dict[str, Any] = dict(
            model_path=str(model_path), dtype=dtype, tp_size=tensor_parallel_size, random_seed=seed
        )
        if mem_fraction_static is not None:
            kwargs["mem_fraction_static"] = mem_fraction_static
        kwargs.update(engine_kwargs or {})
        self._engine = sglang.Engine(**kwargs)
        self._setup(self._engine.tokenizer_manager, io, tensor_parallel_size)

    def _setup(self, tokenizer_manager: Any, io: Any, tp: int, serialize: Any = None) -> None:
        """State shared by the real constructor and tests (which pass fakes)."""
        self._tm, self._io, self._tp = tokenizer_manager, io, tp
        self._serialize = serialize
        self._version = 0
        self._streams: dict[str, _Stream] = {}
        self._gate = asyncio.Event()  # cleared while a wait-mode update drains
        self._gate.set()
        self._paused = False
        self._update_lock = asyncio.Lock()
        self._staged: list[tuple[str, torch.Tensor]] | None = None
        self._staged_version: int | None = None
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def staged_version(self) -> int | None:
        return self._staged_version

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise RuntimeError("sglang engine is shut down; create a new one")
        if request.request_id in self._streams:
            raise ValueError(
                f"request_id {request.request_id!r} is already in flight; ids must be unique"
            )
        st = _Stream(request, self._version, asyncio.get_running_loop().create_future())
        self._streams[request.request_id] = st
        try:
            if not self._gate.is_set():  # a wait-mode update admits nothing new until done
                gate = asyncio.ensure_future(self._gate.wait())
                await asyncio.wait([gate, st.done], return_when=asyncio.FIRST_COMPLETED)
                gate.cancel()
            if st.done.done():  # aborted while held at the gate
                return st.done.result()
            st.admitted, st.version_start = True, self._version
            obj = self._io.GenerateReqInput(
                input_ids=list(request.prompt_token_ids),
                sampling_params=to_sglang_sampling(request.sampling),
                return_logprob=True,
                stream=True,
                rid=request.request_id,
            )
            last: Mapping[str, Any] = {}
            async for out in self._tm.generate_request(obj, None):
                ids, lps = new_stream_tokens(len(st.token_ids), out, request.request_id)
                st.token_ids += ids
                st.logprobs += lps
                st.versions += [self._version] * len(ids)  # the version live on arrival
                last = out
            result = from_sglang_output(
                request, last, st.version_start, self._version,
                st.token_ids, st.logprobs, st.versions,
            )  # fmt: skip
        except BaseException as e:
            if not st.done.done():  # an abort() waiting on this request must not hang
                st.done.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
                st.done.exception()  # mark retrieved: the caller gets the error from this call
            raise
        finally:
            self._streams.pop(request.request_id, None)
        if not st.done.done():
            st.done.set_result(result)
        return result

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        return list(await asyncio.gather(*(self.generate(r) for r in requests)))

    async def abort(
        self, request_ids: Sequence[str], deadline_s: float = ABORT_DEADLINE_S
    ) -> list[GenerateResult]:
        """Abort and return the partial results. The abort is re-sent every
        `ABORT_RESEND_S` until the request's stream ends (SGLang drops an abort that arrives
        before the request); `TimeoutError` after `deadline_s`."""
        streams = [self._streams[r] for r in request_ids if r in self._streams]
        deadline = time.monotonic() + deadline_s
        for st in streams:
            if not st.admitted and not st.done.done():  # never reached SGLang
                st.done.set_result(
                    GenerateResult(
                        st.request.request_id,
                        [],
                        [],
                        FinishReason.ABORT,
                        [],
                        st.version_start,
                        self._version,
                    )  # fmt: skip
                )
            while not st.done.done():
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"sglang engine: request {st.request.request_id!r} did not end within "
                        f"{deadline_s} s of abort"
                    )
                self._tm.abort_request(rid=st.request.request_id)
                await asyncio.wait([st.done], timeout=ABORT_RESEND_S)
        done = await asyncio.gather(*(st.done for st in streams), return_exceptions=True)
        return [r for r in done if isinstance(r, GenerateResult)]

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        return {r: len(self._streams[r].token_ids) for r in request_ids if r in self._streams}

    async def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        mode = PauseMode(mode)
        if mode is PauseMode.WAIT:
            self._gate.clear()  # admit nothing new; let running requests finish
            try:
                while running := [
                    st.done for st in self._streams.values() if st.admitted and not st.done.done()
                ]:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            except BaseException:
                self._gate.set()
                raise
        await self._tm.pause_generation(self._io.PauseGenerationReqInput(mode=_SGLANG_PAUSE[mode]))
        self._paused = True

    async def resume(self) -> None:
        await self._tm.continue_generation(self._io.ContinueGenerationReqInput())
        self._paused = False
        self._gate.set()

    # ---- weights ------------------------------------------------------------------------------
    async def begin_weight_update(self, version: int) -> None:
        self._staged, self._staged_version = [], int(version)

    async def load_weight_bucket(self, bucket: NamedTensors | Mapping[str, torch.Tensor]) -> int:
        if self._staged is None:
            raise RuntimeError("load_weight_bucket before begin_weight_update(version)")
        self._staged.extend(as_named_tensors(bucket))
        return len(self._staged)

    async def commit_weight_update(self, mode: PauseMode | str = PauseMode.KEEP) -> int:
        """Load every staged bucket in one `update_weights_from_tensor` call (SGLang, like
        vLLM, must see the full state dict at once), flush once, set the version."""
        if not self._staged or self._staged_version is None:
            raise RuntimeError(
                "commit_weight_update needs begin_weight_update(version) and at least one bucket"
            )
        serialize = self._serialize
        if serialize is None:
            from sglang.srt.utils import MultiprocessingSerializer

            serialize = MultiprocessingSerializer.serialize
        staged, version = self._staged, self._staged_version
        self._staged = self._staged_version = None
        payload = [serialize(staged) for _ in range(self._tp)]

        async def load() -> None:
            obj = self._io.UpdateWeightsFromTensorReqInput(
                serialized_named_tensors=payload, flush_cache=False
            )
            self._check(await self._tm.update_weights_from_tensor(obj, None), version)

        await self._with_pause(mode, load, version)
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
        async def load() -> None:
            obj = self._io.UpdateWeightFromDiskReqInput(model_path=str(model_path))
            self._check(await self._tm.update_weights_from_disk(obj, None), version)

        await self._with_pause(mode, load, version)
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
        buckets: Sequence[tuple[list[str], list[str], list[list[int]]]],
        group_name: str = "weight_update_group",
        mode: PauseMode | str = PauseMode.KEEP,
    ) -> int:
        """Receive a whole version as buckets of `(names, dtypes, shapes)` broadcast by the
        trainer (which broadcasts bucket i while this receives it, in the same order): pause
        once, receive every bucket with `flush_cache=False`, flush once, set the version,
        resume. Generation never sees a half-updated model."""
        if not buckets:
            raise ValueError(f"update_weights_from_distributed({version}): no buckets")

        async def load() -> None:
            for names, dtypes, shapes in buckets:
                obj = self._io.UpdateWeightsFromDistributedReqInput(
                    names=list(names),
                    dtypes=list(dtypes),
                    shapes=[list(s) for s in shapes],
                    group_name=group_name,
                    flush_cache=False,
                )
                self._check(await self._tm.update_weights_from_distributed(obj, None), version)

        await self._with_pause(mode, load, version)
        return version

    @staticmethod
    def _check(result: Any, version: int) -> None:
        ok, message = result[0], result[1]
        if not ok:
            raise RuntimeError(f"sglang weight update to version {version} failed: {message}")

    async def _flush(self, version: int) -> None:
        out = await self._tm.flush_cache()
        if not getattr(out, "success", out):
            raise RuntimeError(
                f"sglang flush_cache failed after loading weight version {version}: the radix "
                "cache would serve KV of the old weights; the version is not advanced"
            )

    async def _with_pause(self, mode: PauseMode | str, load, version: int) -> None:
        async with self._update_lock:
            was_paused = self._paused
            if not was_paused:
                await self.pause(mode)
            try:
                await asyncio.sleep(0)  # deliver chunks produced before the pause
                await load()
                await self._flush(version)
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
            num_running=sum(st.admitted for st in self._streams.values()),
            num_waiting=sum(not st.admitted for st in self._streams.values()),
            detail="shut down" if self._closed else "",
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        await self.abort(list(self._streams))
        self._closed = True
        self._engine.shutdown()
