"""The shared stepped driver (`core.py`) with a fake backend, and vLLM's finish-reason mapping."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
import torch
from slime_rl.rollout.engines import FinishReason, GenerateRequest, SamplingParams
from slime_rl.rollout.engines.core import StepDelta, SteppedEngine
from slime_rl.rollout.engines.vllm_engine import VLLMEngine, finish_reason_from_vllm

pytestmark = pytest.mark.timeout(30)


class FakeBackend(SteppedEngine):
    """One token per step per request; `admit_gate` holds `backend_add` (on the engine thread)."""

    backend = "fake"

    def __init__(self) -> None:
        super().__init__()
        self.admit_gate = threading.Event()
        self.rows: dict[str, int] = {}
        self.steps = 0

    def backend_add(self, requests: list[GenerateRequest]) -> None:
        assert self.admit_gate.wait(10)
        for r in requests:
            self.rows[r.request_id] = r.sampling.max_new_tokens

    def backend_step(self) -> list[StepDelta]:
        self.steps += 1
        deltas = []
        for rid in list(self.rows):
            self.rows[rid] -= 1
            done = self.rows[rid] == 0
            deltas.append(StepDelta(rid, [7], [-0.5], FinishReason.LENGTH if done else None))
            if done:
                del self.rows[rid]
        return deltas

    def backend_abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.rows.pop(rid, None)

    def backend_load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        pass

    def backend_close(self) -> None:
        pass


def test_pause_is_a_barrier_no_step_runs_until_resume():
    """pause() issued while a request is being admitted: no step may follow the admission."""

    async def main():
        eng = FakeBackend()
        task = asyncio.create_task(
            eng.generate(GenerateRequest("r", [1], SamplingParams(max_new_tokens=3)))
        )
        await asyncio.sleep(0.05)  # the loop is now inside backend_add, held by the gate
        pausing = asyncio.create_task(eng.pause())
        await asyncio.sleep(0.05)
        eng.admit_gate.set()
        await pausing
        assert (await eng.health()).paused
        await asyncio.sleep(0.2)  # room for a step that must not come
        assert eng.steps == 0 and await eng.progress(["r"]) == {"r": 0}
        await eng.resume()
        res = await task
        assert res.token_ids == [7, 7, 7] and eng.steps == 3
        await eng.shutdown()

    asyncio.run(main())


def test_pause_returns_only_after_the_running_step_is_delivered():
    async def main():
        eng = FakeBackend()
        eng.admit_gate.set()
        task = asyncio.create_task(
            eng.generate(GenerateRequest("r", [1], SamplingParams(max_new_tokens=10_000)))
        )
        while (await eng.progress(["r"])).get("r", 0) < 3:
            await asyncio.sleep(0.001)
        await eng.pause()
        seen = (await eng.progress(["r"]))["r"]
        assert seen == eng.steps  # every step that ran is delivered, none is in flight
        await asyncio.sleep(0.1)
        assert (await eng.progress(["r"]))["r"] == seen == eng.steps
        (partial,) = await eng.abort(["r"])
        assert partial.finish_reason is FinishReason.ABORT and len(partial.token_ids) == seen
        assert (await task) == partial
        await eng.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("reason", "want"),
    [
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("abort", FinishReason.ABORT),
        ("error", FinishReason.ABORT),
        ("repetition", FinishReason.ABORT),
        (None, FinishReason.ABORT),
    ],
)
def test_vllm_finish_reasons_all_end_the_request(reason, want):
    assert finish_reason_from_vllm(reason) is want


def test_vllm_step_with_unknown_finish_reason_resolves_the_request():
    """vLLM 0.32 may finish a request with `error`/`repetition`: it must end, not hang."""
    eng = VLLMEngine.__new__(VLLMEngine)

    def out(rid, reason, finished=True):
        comp = types.SimpleNamespace(
            token_ids=[3],
            logprobs=[{3: types.SimpleNamespace(logprob=-0.25)}],
            finish_reason=reason,
            stop_reason=None,
        )
        return types.SimpleNamespace(request_id=rid, finished=finished, outputs=[comp])

    outs = [out("a", "error"), out("b", "repetition"), out("c", None, finished=False)]
    eng._engine = types.SimpleNamespace(step=lambda: outs)
    deltas = {d.request_id: d for d in eng.backend_step()}
    assert deltas["a"].finish_reason is FinishReason.ABORT
    assert deltas["b"].finish_reason is FinishReason.ABORT
    assert deltas["c"].finish_reason is None and deltas["c"].logprobs == [-0.25]
