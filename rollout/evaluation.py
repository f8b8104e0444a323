"""Evaluation on the eval split: greedy accuracy (and pass@k), per mode and per data source.

    eval prompts (first `eval.max_prompts`, file order) ─► split over the engines that are up
        ─► generate_group (greedy; + `pass_k` samples each at `pass_k_temperature`)
        ─► build_sample ─► the eval RewardRunner ─► eval/accuracy, eval/accuracy/<mode>,
           eval/accuracy/source/<data_source>, eval/pass@k, eval/format_rate, eval/reward_mean,
           eval/response_len_mean, eval/truncated_frac, eval/version, eval/seconds,
           eval/format_violation_frac; reward, length, truncation and format per mode
           (eval/<metric>/<mode>)
    with an agent loop / generate_fn / agent_fn (`episodes`): each prompt is one greedy episode

The caller pins the weight version for the duration (no weight commit runs meanwhile), so every
token of an evaluation comes from `eval/version`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from typing import Any

from slime_rl.buffers.schema import Sample
from slime_rl.rollout.config import EvalConfig
from slime_rl.rollout.data import PromptDataset
from slime_rl.rollout.engine_pool import EngineLostError, EnginePool
from slime_rl.rollout.engines.base import GenerateRequest, SamplingParams
from slime_rl.rollout.modes import format_violation
from slime_rl.rollout.samples import build_sample


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


async def _generate_on_pool(pool: EnginePool, requests: list[GenerateRequest]) -> list[Any]:
    """Spread requests over the engines that are up; an engine lost mid-way is retried elsewhere."""
    for _ in range(len(pool.slots) + 1):
        slots = [s for s in pool.slots if s.up]
        if not slots:
            break
        chunks = [requests[i :: len(slots)] for i in range(len(slots))]
        calls = [asyncio.ensure_future(s.client.generate_group(c)) for s, c in zip(slots, chunks) if c]
        done = await asyncio.gather(*calls, return_exceptions=True)
        lost = [s for s, d in zip(slots, done) if isinstance(d, EngineLostError)]
        other = [d for d in done if isinstance(d, BaseException) and not isinstance(d, EngineLostError)]
        if other:
            raise other[0]
        if lost:
            for s in lost:
                pool.mark_down(s)
            continue
        parts = done
        by_id = {r.request_id: r for part in parts for r in part}
        return [by_id[r.request_id] for r in requests]
    raise RuntimeError("evaluation: no rollout engine is up")


async def evaluate_prompts(
    pool: EnginePool,
    data: PromptDataset,
    cfg: EvalConfig,
    tokenizer: Any,
    runner: Any,
    *,
    seed: int = 0,
    episodes: Any = None,
) -> dict[str, float]:
    """Generate, score and reduce one evaluation; see the module docstring for the metrics.
    `episodes` (rollout/episodes.py) makes each reply an episode instead of one request."""
    t0 = time.monotonic()
    version = pool.version
    prompts = [data[i] for i in range(min(cfg.max_prompts, len(data)))]
    greedy = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=seed)
    requests = [GenerateRequest(f"eval-v{version}-{i}", p.prompt_ids, greedy) for i, p in enumerate(prompts)]
    for k in range(cfg.pass_k):
        sampled = dataclasses.replace(greedy, temperature=cfg.pass_k_temperature, seed=seed * 1000 + k)
        requests += [GenerateRequest(f"eval-v{version}-{i}-k{k}", p.prompt_ids, sampled) for i, p in enumerate(prompts)]
    samples: list[Sample] = []
    if episodes is not None:
        from slime_rl.rollout.episodes import episodes_for_eval

        for k, req in enumerate(requests[:: len(prompts)] if prompts else []):
            samples += await episodes_for_eval(episodes, pool, prompts, req.sampling, f"eval-v{version}-k{k}")
    else:
        results = await _generate_on_pool(pool, requests)
        for req, res in zip(requests, results):
            i = int(req.request_id.split("-")[2])
            samples.append(
                build_sample(prompts[i], res, group_id=f"eval-{i}", index=len(samples), tokenizer=tokenizer,
                             temperature=req.sampling.temperature, gen_seconds=0.0)
            )
    await runner.score(samples)
    runner.end_step(check=False)
    n = len(prompts)
    ok = [s.reward >= cfg.success_threshold for s in samples]
    head = samples[:n]
    out: dict[str, float] = {
        "eval/version": float(version),
        "eval/num_prompts": float(n),
        "eval/accuracy": _mean([float(x) for x in ok[:n]]),
        "eval/reward_mean": _mean([s.reward for s in head]),
        "eval/response_len_mean": _mean([float(len(s.response_ids)) for s in head]),
        "eval/truncated_frac": _mean([float(s.status == "truncated") for s in head]),
        "eval/format_violation_frac": _mean([float(format_violation(s)) for s in head]),
    }
    for mode in sorted({s.mode for s in head}):
        of_mode = [s for s in head if s.mode == mode]
        out[f"eval/reward_mean/{mode}"] = _mean([s.reward for s in of_mode])
        out[f"eval/response_len_mean/{mode}"] = _mean([float(len(s.response_ids)) for s in of_mode])
        out[f"eval/truncated_frac/{mode}"] = _mean([float(s.status == "truncated") for s in of_mode])
        out[f"eval/format_violation_frac/{mode}"] = _mean([float(format_violation(s)) for s in of_mode])
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for s, hit in zip(head, ok[:n]):
        groups[f"eval/accuracy/{s.mode}"].append(hit)
        if s.metadata.get("data_source"):
            groups[f"eval/accuracy/source/{s.metadata['data_source']}"].append(hit)
    out.update({k: _mean([float(x) for x in v]) for k, v in groups.items()})
    terms: dict[str, list[float]] = collections.defaultdict(list)
    for s in head:
        for k, v in s.metadata.get("reward_metrics", {}).items():
            terms[f"eval/{k}"].append(float(v))
    out.update({k: _mean(v) for k, v in terms.items()})
    extracted = [v for k, v in out.items() if k.endswith("/extracted")]
    if extracted:
        out["eval/format_rate"] = _mean(extracted)
    if cfg.pass_k:
        any_ok = [any(ok[n * (k + 1) + i] for k in range(cfg.pass_k)) for i in range(n)]
        out[f"eval/pass@{cfg.pass_k}"] = _mean([float(x) for x in any_ok])
    out["eval/seconds"] = time.monotonic() - t0
    return out
