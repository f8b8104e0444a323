"""`sglang` engine: SGLang's offline `Engine` (GPU only), driven through its async API.

    generate() ──► [admission gate] ──► tokenizer_manager.generate_request(GenerateReqInput(
                       input_ids, rid, sampling_params, return_logprob=True, stream=True))
                   each streamed chunk: new tokens + log-probs, tagged with the live version
    abort()    ──► tokenizer_manager.abort_request(rid), re-sent until the stream ends
    update_weights ──────► [wait: close gate, drain] ─► pause_generation(retract | abort)
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

from slime_rl.rollout.engines.base import (
    EngineHealth,
    FinishReason,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    RequestRejected,
    generate_each,
)
from slime_rl.rollout.engines.sglang_convert import (
    _import_sglang,
    from_sglang_output,
    new_stream_tokens,
    to_sglang_sampling,
)
from slime_rl.rollout.engines.sglang_weights import SGLangWeightUpdates

__all__ = [
    "ABORT_DEADLINE_S",
    "ABORT_RESEND_S",
    "SGLangEngine",
    "SGLangWeightUpdates",
    "from_sglang_output",
    "new_stream_tokens",
    "to_sglang_sampling",
]

logger = logging.getLogger(__name__)

# Our pause modes -> SGLang's. "in_place" would keep KV computed with the old weights, so
# KEEP retracts (requests re-prefill under the new weights); WAIT drains first (see
# SGLangEngine._pause), then retracts whatever is left (nothing, normally).
_SGLANG_PAUSE = {PauseMode.KEEP: "retract", PauseMode.ABORT: "abort", PauseMode.WAIT: "retract"}
ABORT_RESEND_S = 0.5
"""How often an abort is re-sent while the request's stream has not ended (an abort that
reaches SGLang before the request does is dropped)."""
ABORT_DEADLINE_S = 30.0


@dataclasses.dataclass(slots=True)
class _Stream:
    request: GenerateRequest
    policy_version: int
    done: asyncio.Future
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    token_versions: list[int] = dataclasses.field(default_factory=list)
    admitted: bool = False
    """Sent to SGLang (False while held at the admission gate of a wait-mode update)."""


class SGLangEngine(SGLangWeightUpdates):
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
        self._loading_version: int | None = None
        self._closed = False

    @property
    def version(self) -> int:
        return self._version

    # ---- generation ---------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResult:
        if self._closed:
            raise RuntimeError("sglang engine is shut down; create a new one")
        if request.request_id in self._streams:
            raise RequestRejected(
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
            st.admitted, st.policy_version = True, self._version
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
                st.token_versions += [self._version] * len(ids)  # the version live on arrival
                last = out
            result = from_sglang_output(
                request, last, st.policy_version, self._version,
                st.token_ids, st.logprobs, st.token_versions,
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
        """Concurrent `generate`; a request refused alone gives a `FinishReason.ERROR` result."""
        return await generate_each(self, requests)

    def tokenizer_info(self) -> dict[str, Any]:
        """`{"max_model_len": context length, "eos_token_id": [ids]}` as SGLang resolved them."""
        config = getattr(self._tm, "model_config", None)
        context = getattr(self._tm, "context_len", None) or getattr(config, "context_len", 0)
        eos = getattr(config, "hf_eos_token_id", None)
        if not eos:
            eos = getattr(getattr(self._tm, "tokenizer", None), "eos_token_id", None)
        eos_ids = sorted(eos) if isinstance(eos, (set, list, tuple)) else ([] if eos is None else [eos])
        return {"max_model_len": int(context), "eos_token_id": eos_ids}

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
                        st.policy_version,
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

    async def _drain(self) -> None:
        """Admit nothing new and wait for the running requests to finish (wait mode); the
        gate reopens if the wait is cancelled."""
        self._gate.clear()
        try:
            while running := [
                st.done for st in self._streams.values() if st.admitted and not st.done.done()
            ]:
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._gate.set()
            raise

    async def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None:
        mode = PauseMode(mode)
        if mode is PauseMode.WAIT:
            await self._drain()
        await self._tm.pause_generation(self._io.PauseGenerationReqInput(mode=_SGLANG_PAUSE[mode]))
        self._paused = True

    async def resume(self) -> None:
        await self._tm.continue_generation(self._io.ContinueGenerationReqInput())
        self._paused = False
        self._gate.set()

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
