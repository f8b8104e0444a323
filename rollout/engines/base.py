"""The rollout-engine protocol: typed requests and results, and the weight-update contract.

    GenerateRequest ──► engine.generate() ──► GenerateResult
      (prompt ids,          │  many at once       (token ids, log-probs of the sampled tokens,
       SamplingParams)      │                      finish reason, weight version per token)
                            ▼
    trainer buckets ──► update_weights(v, buckets, mode) (every bucket read, then applied
                        between decode steps in one go; then version = v)

Every backend (`hf`, `vllm`, `sglang`) implements `RolloutEngine`; `create_engine` in
`registry.py` builds one by name. Log-probs are `log_softmax(logits / T)` over the full
vocabulary (T = the request's temperature, 1 when greedy; not renormalised by top-k/top-p),
i.e. what the trainer's teacher-forced forward pass gives with the same temperature.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

NamedTensors = Iterable[tuple[str, torch.Tensor]]
"""A (part of a) state dict as `(name, tensor)` pairs, HF parameter names."""

WeightBuckets = Any
"""What `update_weights` takes: one bucket or a sequence of buckets, a bucket being a
`dict[str, Tensor]`, a list of `(name, tensor)` pairs, or an object with `named_tensors()`
(the trainer's `WeightBucket`, a transport's bucket handle)."""


class FinishReason(str, enum.Enum):
    """Why a generation ended."""

    STOP = "stop"
    """EOS, a stop token id or a stop string (the token that completed it is kept)."""
    LENGTH = "length"
    """`max_new_tokens` reached (or the model's context is full)."""
    ABORT = "abort"
    """Aborted (`abort`, `pause(mode="abort")`, shutdown): the tokens so far are returned."""
    ERROR = "error"
    """Refused or failed alone (e.g. a prompt longer than the context): no tokens, the reason
    in `GenerateResult.error`. Only `generate_many` (and the actor's `generate_group`) return
    it; `generate` raises `RequestRejected` instead."""


class RequestRejected(ValueError):
    """The engine refused this one request (too long, duplicate id, invalid for the backend);
    other requests and the engine are unaffected. `generate` raises it, `generate_many`
    turns it into a `FinishReason.ERROR` result."""


class PauseMode(str, enum.Enum):
    """What `pause` (and a weight commit) does with requests in flight."""

    KEEP = "keep"
    """Freeze them; they continue after `resume` (with the new weights, if any were loaded)."""
    WAIT = "wait"
    """Admit nothing new and let the running ones finish first."""
    ABORT = "abort"
    """Abort them; their callers get partial results with `finish_reason=abort`."""


@dataclasses.dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling of one request. `temperature=0` (or `top_k=1`) is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 (or 0) disables top-k."""
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends at the token whose text completes one; that token stays
    in `token_ids` (with its log-prob), so the decoded response contains the stop string."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation besides EOS (the stop token is kept in `token_ids`)."""
    seed: int | None = None
    """Per-request seed: the same seed, prompt and weights give the same tokens."""
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(
                f"SamplingParams.temperature={self.temperature} must be >= 0 (0 = greedy)"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(
                f"SamplingParams.top_p={self.top_p} must be in (0, 1]; use 1 to disable"
            )
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k={self.top_k} must be -1 (off) or >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens={self.max_new_tokens} must be >= 1")
        # Lists from configs become tuples so the params stay hashable and frozen.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One prompt to complete. `request_id` must be unique among the requests in flight."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams = SamplingParams()

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"GenerateRequest {self.request_id!r}: prompt_token_ids is empty")
        object.__setattr__(self, "prompt_token_ids", tuple(int(t) for t in self.prompt_token_ids))


@dataclasses.dataclass(frozen=True, slots=True)
class GenerateResult:
    """What one request produced. `logprobs[i]` is the log-prob of `token_ids[i]` under
    `log_softmax(logits / T)` (full vocabulary; T = 1 for greedy)."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    token_versions: list[int]
    """Weight version that generated each token (differs within a request only if weights
    were committed with `PauseMode.KEEP` while it ran)."""
    policy_version: int
    """Engine weight version when the request was admitted."""
    policy_version_end: int
    """Engine weight version when it finished."""
    stop_reason: str | int | None = None
    """The stop string or stop token id that ended it (None for EOS, length, abort)."""
    error: str | None = None
    """Why the request failed (`finish_reason=error` only), e.g. `RequestRejected: request
    'g3-1': prompt of 1200 tokens does not fit the model's 1024 positions`."""
    routed_experts: Any = None
    """MoE routing the engine used (engines built with `record_routed_experts=True`; None
    otherwise or for dense models): an int16 `numpy.ndarray` of shape (P + R - 1, L, K) for
    a prompt of P and a response of R tokens: for every position whose output was computed
    (the prompt and every generated token but the last), the K experts chosen at each of the
    model's L MoE layers (in layer order). A position recomputed later (a `keep` weight
    update re-prefills) keeps the routing of its first computation, the one that produced
    its next-token log-prob."""


@dataclasses.dataclass(frozen=True, slots=True)
class EngineHealth:
    """A snapshot of an engine's state."""

    ok: bool
    backend: str
    version: int
    paused: bool
    num_running: int
    num_waiting: int
    detail: str = ""


@runtime_checkable
class RolloutEngine(Protocol):
    """The contract every backend implements (all methods are coroutines).

    Example:
        >>> engine = create_engine("hf", "/path/to/model")            # doctest: +SKIP
        >>> req = GenerateRequest("r0", [1, 2, 3], SamplingParams(max_new_tokens=8, seed=0))
        >>> result = await engine.generate(req)                        # doctest: +SKIP
        >>> await engine.update_weights(1, model_b.state_dict().items())  # doctest: +SKIP
        >>> await engine.shutdown()                                    # doctest: +SKIP
    """

    backend: str

    @property
    def version(self) -> int: ...

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        """Complete one prompt; many calls may run concurrently (they are batched)."""
        ...

    async def generate_many(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Complete many prompts concurrently; results in request order. A request refused
        alone (`ValueError`, e.g. too long) gives a `FinishReason.ERROR` result instead of
        failing the others; an engine failure (`RuntimeError`) still raises."""
        ...

    async def abort(self, request_ids: Sequence[str]) -> list[GenerateResult]:
        """Abort requests in flight; returns their partial results (unknown ids are skipped)."""
        ...

    async def progress(self, request_ids: Sequence[str]) -> dict[str, int]:
        """Tokens generated so far by each of these requests that is still in flight."""
        ...

    async def pause(self, mode: PauseMode | str = PauseMode.KEEP) -> None: ...

    async def resume(self) -> None: ...

    async def update_weights(
        self, version: int, buckets: WeightBuckets, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        """Load a whole new version: read every bucket (together the full state dict), pause
        per `mode`, apply them between decode steps, reset caches derived from the weights,
        set `version`, resume. Returns the new version. Raises `ValueError` for a bucket that
        is not named tensors or a state dict that is not complete (nothing applied)."""
        ...

    async def health(self) -> EngineHealth: ...

    async def shutdown(self) -> None:
        """Abort everything, free the model and caches; the engine is unusable afterwards."""
        ...


def error_result(request: GenerateRequest, error: BaseException, version: int) -> GenerateResult:
    """The `FinishReason.ERROR` result of a request the engine refused alone (no tokens)."""
    return GenerateResult(
        request_id=request.request_id,
        token_ids=[],
        logprobs=[],
        finish_reason=FinishReason.ERROR,
        token_versions=[],
        policy_version=version,
        policy_version_end=version,
        error=f"{type(error).__name__}: {error}",
    )


async def generate_each(engine: Any, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
    """`engine.generate` for every request concurrently, results in request order; a
    `ValueError` (the request refused alone) becomes an error result, anything else (the
    engine failed, the caller was cancelled) propagates. The shared `generate_many`."""

    async def one(request: GenerateRequest) -> GenerateResult:
        try:
            return await engine.generate(request)
        except ValueError as e:
            return error_result(request, e, engine.version)

    return list(await asyncio.gather(*(one(r) for r in requests)))


def as_named_tensors(tensors: Any) -> list[tuple[str, torch.Tensor]]:
    """Normalise a dict, an iterable of `(name, tensor)` pairs, or a bucket object with a
    `named_tensors()` method (the trainer's `WeightBucket`) to a list of pairs."""
    if hasattr(tensors, "named_tensors"):
        tensors = tensors.named_tensors()
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    out: list[tuple[str, torch.Tensor]] = []
    for pair in items:
        name, tensor = pair
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"weight {name!r} is a {type(tensor).__name__}, expected a torch.Tensor"
            )
        out.append((str(name), tensor))
    return out


def collect_buckets(buckets: WeightBuckets) -> list[tuple[str, torch.Tensor]]:
    """Every `(name, tensor)` of one bucket or of a sequence of buckets, in order (a bucket
    handle's `named_tensors()` is called here: a disk bucket reads its file, a collective
    bucket receives its tensors)."""
    single = isinstance(buckets, Mapping) or hasattr(buckets, "named_tensors")
    if single or (isinstance(buckets, Sequence) and buckets and isinstance(buckets[0], tuple)):
        buckets = [buckets]
    out: list[tuple[str, torch.Tensor]] = []
    for bucket in buckets:
        out.extend(as_named_tensors(bucket))
    return out


def sampling_from_config(cfg: Any, **overrides: Any) -> SamplingParams:
    """`SamplingParams` from a `RolloutConfig` (or anything with the same fields)."""
    fields = {
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "top_k": cfg.top_k,
        "max_new_tokens": cfg.max_new_tokens,
        "stop": tuple(cfg.stop),
        "stop_token_ids": tuple(cfg.stop_token_ids),
    }
    fields.update(overrides)
    return SamplingParams(**fields)


def check_adapter_only(engine: str, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
    """An engine serving a LoRA adapter takes updates of ``lora_A`` / ``lora_B`` tensors only.

    Raises:
        ValueError: naming the engine and the first base weights found in the update.
    """
    not_lora = [n for n, _ in named_tensors if ".lora_A." not in n and ".lora_B." not in n]
    if not_lora:
        raise ValueError(
            f"{engine} engine serves a LoRA adapter but the update holds base weights {not_lora[:3]}; "
            "publish the adapter (trainer.lora.publish=adapter) or start the engine without lora"
        )
