"""`SGLangEngine` control flow against a fake TokenizerManager (SGLang itself needs a GPU).

Checks the call sequences the real engine relies on: wait-mode updates drain then retract,
flush_cache is checked, distributed updates pause/flush once, streamed per-token versions
and progress, and aborts re-sent until the stream ends.
"""

from __future__ import annotations

import asyncio
import types

import pytest
import torch
from slime_rl.rollout.engines import FinishReason, GenerateRequest, SamplingParams, sglang_engine
from slime_rl.rollout.engines.sglang_engine import SGLangEngine

pytestmark = pytest.mark.timeout(30)


class _IO:
    """Stands in for `sglang.srt.managers.io_struct`: every request class is a namespace."""

    def __getattr__(self, name):
        return lambda **kw: types.SimpleNamespace(kind=name, **kw)


class FakeTM:
    """Records calls; each request's stream is fed by the test through `push`/`end`."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.queues: dict[str, asyncio.Queue] = {}
        self.sent = asyncio.Event()
        self.flush_ok = True
        self.drop_aborts = 0  # aborts ignored (as SGLang does before the request arrives)
        self.cumulative = False
        self.out: dict[str, list[int]] = {}

    async def generate_request(self, obj, _request):
        assert obj.stream and obj.return_logprob
        q = self.queues.setdefault(obj.rid, asyncio.Queue())
        self.calls.append(("generate", obj.rid))
        self.sent.set()
        while True:
            chunk = await q.get()
            yield chunk
            if chunk["meta_info"]["finish_reason"] is not None:
                return

    def push(self, rid: str, tokens: list[int], finish: str | None = None) -> None:
        have = self.out.setdefault(rid, [])
        have += tokens
        ids = list(have) if self.cumulative else list(tokens)
        meta = {
            "completion_tokens": len(have),
            "output_token_logprobs": [(-0.1 * t, t, None) for t in ids],
            "finish_reason": None if finish is None else {"type": finish},
        }
        self.queues.setdefault(rid, asyncio.Queue()).put_nowait(
            {"output_ids": ids, "meta_info": meta}
        )

    def abort_request(self, rid: str) -> None:
        self.calls.append(("abort", rid))
        if self.drop_aborts > 0:
            self.drop_aborts -= 1
            return
        self.push(rid, [], finish="abort")

    async def pause_generation(self, obj) -> None:
        self.calls.append(("pause", obj.mode))

    async def continue_generation(self, obj) -> None:
        self.calls.append(("continue",))

    async def update_weights_from_tensor(self, obj, _request):
        self.calls.append(("tensor", obj.flush_cache))
        return True, "ok"

    async def update_weights_from_distributed(self, obj, _request):
        self.calls.append(("dist", tuple(obj.names), obj.flush_cache))
        return True, "ok"

    async def flush_cache(self):
        self.calls.append(("flush",))
        return types.SimpleNamespace(success=self.flush_ok)


def make_engine() -> tuple[SGLangEngine, FakeTM]:
    eng = SGLangEngine.__new__(SGLangEngine)
    tm = FakeTM()
    eng._setup(tm, _IO(), tp=1, serialize=lambda staged: [n for n, _ in staged])
    return eng, tm


def req(rid: str) -> GenerateRequest:
    return GenerateRequest(rid, [1, 2, 3], SamplingParams(max_new_tokens=50))


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


WEIGHTS = {"w": torch.zeros(2)}


def test_wait_update_drains_then_retracts_and_checks_flush():
    async def main():
        eng, tm = make_engine()
        running = asyncio.create_task(eng.generate(req("r1")))
        await settle()
        tm.push("r1", [5, 6])
        update = asyncio.create_task(eng.update_weights(1, WEIGHTS, mode="wait"))
        await settle()
        late = asyncio.create_task(eng.generate(req("r2")))
        await settle()
        # draining: not paused yet, and the newcomer is held back from SGLang
        assert not any(c[0] == "pause" for c in tm.calls)
        assert ("generate", "r2") not in tm.calls
        assert (await eng.health()).num_waiting == 1
        tm.push("r1", [7], finish="length")
        assert (await running).token_ids == [5, 6, 7]
        assert await update == 1
        await settle()
        assert tm.calls[1:5] == [("pause", "retract"), ("tensor", False), ("flush",), ("continue",)]
        assert tm.calls[5] == ("generate", "r2")
        tm.push("r2", [9], finish="stop")
        res = await late
        assert res.policy_version == 1 and res.token_versions == [1]

        tm.flush_ok = False
        with pytest.raises(RuntimeError, match="flush_cache failed after loading weight version 2"):
            await eng.update_weights(2, WEIGHTS)
        assert eng.version == 1 and tm.calls[-1] == ("continue",)

    asyncio.run(main())


def test_distributed_update_pauses_once_receives_all_buckets_flushes_once():
    async def main():
        eng, tm = make_engine()
        buckets = [(["a"], ["float32"], [[2]]), (["b", "c"], ["float32"] * 2, [[1], [3]])]
        assert await eng.update_weights_from_distributed(4, buckets) == 4
        assert tm.calls == [
            ("pause", "retract"),
            ("dist", ("a",), False),
            ("dist", ("b", "c"), False),
            ("flush",),
            ("continue",),
        ]
        assert eng.version == 4

    asyncio.run(main())


@pytest.mark.parametrize("cumulative", [False, True])
def test_streamed_tokens_give_progress_and_per_token_versions(cumulative):
    async def main():
        eng, tm = make_engine()
        tm.cumulative = cumulative
        task = asyncio.create_task(eng.generate(req("r")))
        await settle()
        tm.push("r", [4, 5])
        await settle()
        assert await eng.progress(["r"]) == {"r": 2}
        await eng.update_weights(1, WEIGHTS, mode="keep")
        tm.push("r", [6])
        tm.push("r", [7], finish="stop")
        res = await task
        assert res.token_ids == [4, 5, 6, 7]
        assert res.logprobs == pytest.approx([-0.4, -0.5, -0.6, -0.7])
        assert res.token_versions == [0, 0, 1, 1]
        assert (res.policy_version, res.policy_version_end) == (0, 1)
        assert res.finish_reason is FinishReason.STOP

    asyncio.run(main())


def test_abort_is_resent_until_the_stream_ends(monkeypatch):
    monkeypatch.setattr(sglang_engine, "ABORT_RESEND_S", 0.01)

    async def main():
        eng, tm = make_engine()
        task = asyncio.create_task(eng.generate(req("r")))
        await settle()
        tm.push("r", [4])
        await settle()
        tm.drop_aborts = 2  # the first two aborts are lost
        (partial,) = await eng.abort(["r"])
        assert partial.finish_reason is FinishReason.ABORT and partial.token_ids == [4]
        assert [c for c in tm.calls if c[0] == "abort"] == [("abort", "r")] * 3
        assert await task == partial

        stuck = asyncio.create_task(eng.generate(req("s")))
        await settle()
        tm.drop_aborts = 10**6
        with pytest.raises(TimeoutError, match="'s' did not end within 0.05 s of abort"):
            await eng.abort(["s"], deadline_s=0.05)
        tm.push("s", [], finish="abort")
        await stuck

    asyncio.run(main())
