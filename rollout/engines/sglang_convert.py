"""SGLang request/result translation: our `SamplingParams` to SGLang's sampling dict, the
tokens a streamed chunk adds, and SGLang's last result dict to a `GenerateResult`.

    SamplingParams ──► to_sglang_sampling ──► GenerateReqInput(sampling_params=...)
    each streamed chunk ──► new_stream_tokens(have, chunk) ──► (new ids, new log-probs)
    last chunk (+ gathered tokens/versions) ──► from_sglang_output ──► GenerateResult
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    SamplingParams,
)

_INSTALL_HINT = "install slime-rl[sglang] (CUDA GPU only) to use rollout.engine=sglang"


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
    policy_version: int,
    policy_version_end: int,
    token_ids: list[int] | None = None,
    logprobs: list[float] | None = None,
    token_versions: list[int] | None = None,
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
        token_versions=token_versions or [policy_version] * len(token_ids),
        policy_version=policy_version,
        policy_version_end=policy_version_end,
        stop_reason=stop_reason,
    )
