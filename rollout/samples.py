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

MoE routing (`GenerateResult.routed_experts`, engines that record it) goes into the sample's
`routed_experts` column, one entry per position the trainer scores: a continuation's positions
already covered by an earlier piece keep the earlier piece's routing (the one that produced
those tokens' log-probs); a piece without routing leaves the column empty.

Text is decoded with special tokens KEPT (`</think>` is a special token of the tiny model and of
Qwen3/GLM; dropping it makes every think-mode answer unreadable to the reward); only the final
EOS token is cut from `Sample.response`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from slime_rl.buffers.schema import Sample, Status
from slime_rl.rollout.data import Prompt
from slime_rl.rollout.engines.base import FinishReason, GenerateResult

logger = logging.getLogger(__name__)

_STATUS = {
    FinishReason.STOP: Status.COMPLETED,
    FinishReason.LENGTH: Status.TRUNCATED,
    FinishReason.ABORT: Status.ABORTED,
}


def status_of(result: GenerateResult | MergedResult) -> Status:
    """Sample status from an engine finish reason; unknown reasons (engine errors) are `failed`."""
    return _STATUS.get(result.finish_reason, Status.FAILED)


@dataclasses.dataclass(frozen=True, slots=True)
class MergedResult:
    """One response assembled from one or more engine results (continuations)."""

    token_ids: list[int]
    logprobs: list[float]
    token_versions: list[int]
    finish_reason: FinishReason
    policy_version: int
    policy_version_end: int
    pieces: int
    error: str | None = None
    routed_experts: Any = None
    """int16 (positions, L, K) MoE routing, or None (not recorded by every piece)."""


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
        if not (len(p.token_ids) == len(p.logprobs) == len(p.token_versions)):
            raise ValueError(
                f"engine result {p.request_id!r} has {len(p.token_ids)} tokens, {len(p.logprobs)} log-probs "
                f"and {len(p.token_versions)} versions; they must be equal"
            )
        tokens += p.token_ids
        logprobs += p.logprobs
        versions += p.token_versions
    first, last = pieces[0], pieces[-1]
    start = versions[0] if versions else first.policy_version
    end = max([last.policy_version_end, start, *versions])
    return MergedResult(
        tokens, logprobs, versions, last.finish_reason, start, end, len(pieces), getattr(last, "error", None),
        _merge_routing(pieces),
    )


def _merge_routing(pieces: Sequence[GenerateResult]) -> Any:
    """Routing of the whole sequence: each piece adds the positions past those of the pieces
    before it (every piece's prompt is the sequence so far, so its routing starts at position 0)."""
    parts = [getattr(p, "routed_experts", None) for p in pieces]
    if any(r is None for r in parts):
        return None
    if len(parts) == 1:
        return parts[0]
    import numpy as np

    merged, covered = [parts[0]], len(parts[0])
    for r in parts[1:]:
        merged.append(r[covered:])
        covered = max(covered, len(r))
    return np.concatenate(merged)


def routing_column(routed_experts: Any, num_prompt: int, num_response: int) -> list[list[int]]:
    """The `routed_experts` column entry of a sample: one flat (L x K) list per scored position
    (`num_prompt + num_response - 1` of them), or [] when none (or not all) was recorded."""
    if routed_experts is None or num_response == 0:
        return []
    n = num_prompt + num_response - 1
    if len(routed_experts) < n:
        logger.warning("routed experts cover %d of %d positions; the sample is stored without routing", len(routed_experts), n)
        return []
    return routed_experts[:n].reshape(n, -1).tolist()


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
    status = status_of(merged)
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
        token_versions=list(merged.token_versions),
        status=status.value,
        policy_version=merged.policy_version,
        policy_version_end=merged.policy_version_end,
        mode=prompt.mode,
        label=prompt.label,
        metadata=metadata,
        created_at=time.time(),
        gen_seconds=float(gen_seconds),
        routed_experts=routing_column(merged.routed_experts, len(prompt.prompt_ids), len(merged.token_ids)),
        prompt=prompt.text,
        response=decode(tokenizer, merged.token_ids, eos),
        messages=[dict(m) for m in prompt.messages],
    )
