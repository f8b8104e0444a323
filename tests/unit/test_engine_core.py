"""The shared stepped driver (`core.py`) with a fake backend, and vLLM's finish-reason mapping."""

from __future__ import annotations

import asyncio
import threading
import types

import pytest
import torch
from slime_rl.rollout.engines import FinishReason, GenerateRequest, RequestRejected, SamplingParams
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

    def backend_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
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
    eng._request_lora = {}  # (LoRA bookkeeping: which adapter id each request runs with)
    deltas = {d.request_id: d for d in eng.backend_step()}
    assert deltas["a"].finish_reason is FinishReason.ABORT
    assert deltas["b"].finish_reason is FinishReason.ABORT
    assert deltas["c"].finish_reason is None and deltas["c"].logprobs == [-0.25]


class SlowFake(FakeBackend):
    """FakeBackend whose prompts longer than 4 tokens are refused and whose load waits on a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.admit_gate.set()
        self.load_gate = threading.Event()
        self.loads = 0

    def backend_add(self, requests: list[GenerateRequest]) -> None:
        for r in requests:
            if len(r.prompt_token_ids) > 4:
                raise ValueError(f"prompt of {len(r.prompt_token_ids)} tokens is too long")
        super().backend_add(requests)

    def backend_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        assert self.load_gate.wait(10)
        self.loads += 1


def test_generate_many_returns_an_error_result_for_a_refused_request():
    """One bad prompt must not lose the group's good results; `generate` alone still raises."""

    async def main():
        eng = SlowFake()
        reqs = [GenerateRequest(f"r{i}", [1] * n, SamplingParams(max_new_tokens=2)) for i, n in enumerate((2, 9, 3))]
        good, bad, good2 = await eng.generate_many(reqs)
        assert good.finish_reason is FinishReason.LENGTH and good.token_ids == [7, 7] and good2.token_ids == [7, 7]
        assert bad.finish_reason is FinishReason.ERROR and bad.token_ids == [] and bad.logprobs == []
        assert bad.error.startswith("RequestRejected: fake engine refused request 'r1': prompt of 9 tokens")
        assert good.error is None
        with pytest.raises(RequestRejected, match="prompt of 9 tokens is too long"):
            await eng.generate(reqs[1])
        assert (await eng.health()).ok
        await eng.shutdown()

    asyncio.run(main())


def _weights():
    return {"w": torch.zeros(2)}


def test_update_cancelled_while_pausing_leaves_the_old_version():
    """A wait-mode commit that times out while requests drain loads nothing."""

    async def main():
        eng = SlowFake()
        eng.load_gate.set()
        long = asyncio.create_task(eng.generate(GenerateRequest("long", [1], SamplingParams(max_new_tokens=10**6))))
        while not (await eng.progress(["long"])).get("long"):
            await asyncio.sleep(0.001)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(eng.update_weights(1, _weights(), "wait"), 0.2)
        assert eng.version == 0 and eng.loading_version is None and eng.loads == 0
        n = (await eng.progress(["long"]))["long"]
        await asyncio.sleep(0.05)
        assert (await eng.progress(["long"]))["long"] > n, "generation must go on"
        await eng.abort(["long"])
        assert (await long).finish_reason is FinishReason.ABORT
        assert await eng.update_weights(2, _weights(), "wait") == 2 and eng.loads == 1
        await eng.shutdown()

    asyncio.run(main())


def test_update_cancelled_while_loading_completes_and_keeps_updates_in_order(caplog):
    """Once the load started, a caller's timeout does not stop it: the version follows the
    weights, generation stays paused until the load ends, and the next commit waits for it."""

    async def main():
        eng = SlowFake()
        run = asyncio.create_task(eng.generate(GenerateRequest("r", [1], SamplingParams(max_new_tokens=10**6))))
        while not (await eng.progress(["r"])).get("r"):
            await asyncio.sleep(0.001)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(eng.update_weights(1, _weights(), "keep"), 0.2)
        assert eng.loading_version == 1 and eng.version == 0
        n = (await eng.progress(["r"]))["r"]
        await asyncio.sleep(0.05)
        assert (await eng.progress(["r"]))["r"] == n, "paused while the load runs"
        second = asyncio.create_task(eng.update_weights(2, _weights(), "keep"))
        await asyncio.sleep(0.05)
        assert not second.done() and eng.version == 0
        eng.load_gate.set()
        assert await second == 2 and eng.version == 2 and eng.loads == 2 and eng.loading_version is None
        await asyncio.sleep(0.05)
        assert (await eng.progress(["r"]))["r"] > n, "resumed after the loads"
        versions = (await eng.abort(["r"]))[0].token_versions
        assert versions[0] == 0 and versions[-1] == 2 and versions == sorted(versions)
        await run
        await eng.shutdown()

    with caplog.at_level("WARNING"):
        asyncio.run(main())
    assert "weight update to version 1 finished after its caller gave up" in caplog.text


EXIT_SCRIPT = """
import sys, time, torch
from slime_rl.rollout.engines import GenerateRequest, SamplingParams
from slime_rl.rollout.engines.core import StepDelta, SteppedEngine
from slime_rl.rollout.engines.sync import EngineRunner
from slime_rl.rollout.engines import registry

class Endless(SteppedEngine):
    backend = "endless"
    def __init__(self, path, **kw):
        super().__init__()
        self.rows = []
    def backend_add(self, requests):
        self.rows += [r.request_id for r in requests]
    def backend_step(self):
        time.sleep(0.001)
        return [StepDelta(r, [7], [-0.5]) for r in self.rows]
    def backend_abort(self, ids):
        self.rows = [r for r in self.rows if r not in ids]
    def backend_update_weights(self, named_tensors):
        pass
    def backend_close(self):
        print("closed", flush=True)

registry.register_engine("endless", Endless)
runner = EngineRunner("endless", "/nowhere")
fut = runner.submit_generate(GenerateRequest("r", [1], SamplingParams(max_new_tokens=10**6)))
while not runner.progress(["r"]):
    time.sleep(0.01)
if sys.argv[1] == "asyncio-run":  # the engine's loop is gone before exit
    runner._loop.call_soon_threadsafe(runner._loop.stop)
    runner._thread.join()
print("exiting", flush=True)
"""


@pytest.mark.parametrize("how", ["runner-alive", "asyncio-run"])
def test_exit_with_a_request_in_flight_shuts_the_engine_down_quietly(tmp_path, how):
    """A script that ends without close(): no traceback, the backend is closed, exit code 0."""
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.split() == ["exiting", "closed"]
    assert "endless engine was not shut down; shutting it down at exit (1 requests" in proc.stderr


def test_actor_timeout_says_whether_the_old_weights_are_still_in_place(monkeypatch):
    """EngineActor used directly (no Ray): a commit that times out while pausing says nothing
    was loaded; one that times out while loading says the load goes on to the new version."""
    from slime_rl.rollout.engines import registry
    from slime_rl.rollout.engines.actor import EngineActor

    monkeypatch.setattr(registry, "_CUSTOM", dict(registry._CUSTOM))
    monkeypatch.setattr(registry, "_PARAMS", dict(registry._PARAMS))
    registry.register_engine("slow-fake", lambda path, **kw: SlowFake())

    async def main():
        actor = EngineActor("slow-fake", "/nowhere", {}, weight_update_timeout_s=0.2)
        eng = actor._engine
        run = asyncio.create_task(actor.generate(GenerateRequest("r", [1], SamplingParams(max_new_tokens=10**6))))
        while not (await actor.progress(["r"])).get("r"):
            await asyncio.sleep(0.001)
        with pytest.raises(TimeoutError, match=r"EngineActor\[slow-fake\]: update_weights for weight version 1 .* nothing was loaded: the engine keeps version 0"):
            await actor.update_weights(1, _weights(), mode="wait")
        with pytest.raises(TimeoutError, match=r"version 2 did not finish within 0.2 s .* the load had started .* switches to version 2"):
            await actor.update_weights(2, _weights(), mode="keep")
        eng.load_gate.set()
        while eng.version != 2:
            await asyncio.sleep(0.01)
        await actor.abort(["r"])
        await run
        await actor.shutdown()

    asyncio.run(main())
