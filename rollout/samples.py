"""Engine results -> `Sample` rows: the one place where a generation becomes a buffer row.

    Prompt (rollout.data) ─┐
    GenerateResult(s) ─────┼─► build_sample() ─► Sample: token ids, behaviour log-probs,
    group / sample ids ────┘                      loss mask, per-token versions, the two
                                                  version columns, status, mode, label,
                                                  decoded text (special tokens kept), timings

A response may come in several pieces (a partial rollout aborted by a weight update and
resumed as a continuation): `merge_results` joins them so that tokens, log-probs and
per-token versions stay aligned, and the sample's `policy_version` is the version the first
token was generated with (the conservative staleness; the buffer bounds it).

Text is decoded with special tokens KEPT (`</think>` is a special token of the tiny model and of
Qwen3/GLM; dropping it makes every think-mode answer unreadable to the reward); only the final
EOS token is cut from `Sample.response`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import FinishReason, GenerateResult

_STATUS = {
    FinishReason.STOP: Status.COMPLETED,
    FinishReason.LENGTH: Status.TRUNCATED,
    FinishReason.ABORT: Status.ABORTED,
}


def status_of(result: GenerateResult) -> Status:
    """Sample status from an engine finish reason; unknown reasons (engine errors) are `failed`."""
    return _STATUS.get(result.finish_reason, Status.FAILED)


@dataclasses.dataclass(frozen=True, slots=True)
class MergedResult:
    """One response assembled from one or more engine results (continuations)."""

    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finish_reason: FinishReason
    version_start: int
    version_end: int
    pieces: int
    error: str | None = None


def merge_results(pieces: Sequence[GenerateResult]) -> MergedResult:
    """Join a response and its continuations (each piece's prompt was the previous tokens).

    Raises:
        ValueError: no pieces, or a piece whose token, log-prob and version lists differ in length.
    """
    if not pieces:
        raise ValueError("merge_results needs at least one GenerateResult")
    tokens: list[int] = []
    logprobs: list[float] = []
    versions: list[int] = []
    for p in pieces:
        if not (len(p.token_ids) == len(p.logprobs) == len(p.weight_versions)):
            raise ValueError(
                f"engine result {p.request_id!r} has {len(p.token_ids)} tokens, {len(p.logprobs)} log-probs "
                f"and {len(p.weight_versions)} versions; they must be equal"
            )
        tokens += p.token_ids
        logprobs += p.logprobs
        versions += p.weight_versions
    first, last = pieces[0], pieces[-1]
    start = versions[0] if versions else first.version_start
    end = max([last.version_end, start, *versions])
    return MergedResult(
        tokens, logprobs, versions, last.finish_reason, start, end, len(pieces), getattr(last, "error", None)
    )


def decode(tokenizer: Any, ids: Sequence[int], eos_token: str | None) -> str:
    """Token ids -> text with special tokens kept, a final EOS token cut off."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False)
    if eos_token and text.endswith(eos_token):
        text = text[: -len(eos_token)]
    return text


def build_sample(
    prompt: Prompt,
    result: GenerateResult | MergedResult,
    *,
    group_id: str,
    index: int,
    tokenizer: Any,
    temperature: float,
    gen_seconds: float,
    extra_metadata: dict[str, Any] | None = None,
) -> Sample:
    """The `Sample` of one generated response (reward not set yet).

    `loss_mask` is all ones (every response token is model-generated; the agent loop builds
    its own masks); `token_versions` are the engine's per-token weight versions;
    `policy_version` is the version of the first token (or, for an empty response, the version
    at admission) and `policy_version_end` the newest version involved.
    """
    merged = result if isinstance(result, MergedResult) else merge_results([result])
    status = _STATUS.get(merged.finish_reason, Status.FAILED)
    metadata: dict[str, Any] = dict(prompt.metadata)
    metadata.update(
        prompt_uid=prompt.uid,
        temperature=temperature,
        finish_reason=merged.finish_reason.value,
        pieces=merged.pieces,
    )
    if prompt.data_source is not None:
        metadata["data_source"] = prompt.data_source
    if merged.error:
        metadata["engine_error"] = merged.error
    if extra_metadata:
        metadata.update(extra_metadata)
    eos = getattr(tokenizer, "eos_token", None)
    return Sample(
        sample_id=f"{group_id}/{index}",
        group_id=group_id,
        prompt_ids=list(prompt.prompt_ids),
        response_ids=list(merged.token_ids),
        response_logprobs=[float(x) for x in merged.logprobs],
        loss_mask=[1] * len(merged.token_ids),
        token_versions=list(merged.versions),
        status=status.value,
        policy_version=merged.version_start,
        policy_version_end=merged.version_end,
        mode=prompt.mode,
        label=prompt.label,
        metadata=metadata,
        created_at=time.time(),
        gen_seconds=float(gen_seconds),
        prompt=prompt.text,
        response=decode(tokenizer, merged.token_ids, eos),
        messages=[dict(m) for m in prompt.messages],
    )
