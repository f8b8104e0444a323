"""SGLang weight-update paths: staged tensors, disk, and NCCL broadcast from the trainer.

    update_weights(v, buckets, mode)         ─┐
    update_weights_from_disk(v, path)        ─┼─► _with_pause: [pause(mode)] ─► load (all
    update_weights_from_distributed(v, ...)  ─┘   buckets, flush_cache=False) ─► flush_cache
                                                  (checked) ─► version = v ─► [resume]

SGLang's synchronous `Engine.update_weights_*` wrappers call `loop.run_until_complete`, so
these await the `TokenizerManager` coroutines directly. `SGLangWeightUpdates` is a mixin of
`SGLangEngine`, which provides `_tm`, `_io`, `_tp`, `_serialize`, `_paused`, `_update_lock`,
`_loading_version`, `_version`, `_drain`, `pause` and `resume`.

As in `core.py`, only the wait-mode drain can be cancelled (a caller's timeout then leaves
the old weights and version); from SGLang's pause on, the update runs to the end in its own
task (load, flush, version, resume) even if the caller gives up: a cancelled RPC could still
change SGLang's weights while the version stayed behind.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from typing import Any

from slime_rl.rollout.engines.base import PauseMode, WeightBuckets, collect_buckets
from slime_rl.rollout.engines.core import report_orphan_load


class SGLangWeightUpdates:
    """Weight-update half of `SGLangEngine`."""

    async def update_weights(
        self, version: int, buckets: WeightBuckets, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        """Load every bucket in one `update_weights_from_tensor` call (SGLang, like vLLM,
        must see the full state dict at once), flush once, set the version."""
        staged = collect_buckets(buckets)
        if not staged:
            raise ValueError(f"weight update to version {version} has no tensors")
        serialize = self._serialize
        if serialize is None:
            from sglang.srt.utils import MultiprocessingSerializer

            serialize = MultiprocessingSerializer.serialize
        version = int(version)
        payload = [serialize(staged) for _ in range(self._tp)]

        async def load() -> None:
            obj = self._io.UpdateWeightsFromTensorReqInput(
                serialized_named_tensors=payload, flush_cache=False
            )
            self._check(await self._tm.update_weights_from_tensor(obj, None), version)

        await self._with_pause(mode, load, version)
        return version

    async def update_weights_from_disk(
        self, version: int, model_path: str, mode: PauseMode | str = PauseMode.KEEP
    ) -> int:
        async def load() -> None:
            obj = self._io.UpdateWeightFromDiskReqInput(model_path=str(model_path))
            self._check(await self._tm.update_weights_from_disk(obj, None), version)

        await self._with_pause(mode, load, version)
        return version

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the trainer's process group for `update_weights_from_distributed` (NCCL broadcast)."""
        obj = self._io.InitWeightsUpdateGroupReqInput(
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        ok, message = await self._tm.init_weights_update_group(obj, None)
        if not ok:
            raise RuntimeError(f"sglang init_weights_update_group failed: {message}")

    async def update_weights_from_distributed(
        self,
        version: int,
        buckets: Sequence[tuple[list[str], list[str], list[list[int]]]],
        group_name: str = "weight_update_group",
        mode: PauseMode | str = PauseMode.KEEP,
    ) -> int:
        """Receive a whole version as buckets of `(names, dtypes, shapes)` broadcast by the
        trainer (which broadcasts bucket i while this receives it, in the same order): pause
        once, receive every bucket with `flush_cache=False`, flush once, set the version,
        resume. Generation never sees a half-updated model."""
        if not buckets:
            raise ValueError(f"update_weights_from_distributed({version}): no buckets")

        async def load() -> None:
            for names, dtypes, shapes in buckets:
                obj = self._io.UpdateWeightsFromDistributedReqInput(
                    names=list(names),
                    dtypes=list(dtypes),
                    shapes=[list(s) for s in shapes],
                    group_name=group_name,
                    flush_cache=False,
                )
                self._check(await self._tm.update_weights_from_distributed(obj, None), version)

        await self._with_pause(mode, load, version)
        return version

    @staticmethod
    def _check(result: Any, version: int) -> None:
        ok, message = result[0], result[1]
        if not ok:
            raise RuntimeError(f"sglang weight update to version {version} failed: {message}")

    async def _flush(self, version: int) -> None:
        out = await self._tm.flush_cache()
        if not getattr(out, "success", out):
            raise RuntimeError(
                f"sglang flush_cache failed after loading weight version {version}: the radix "
                "cache would serve KV of the old weights; the version is not advanced"
            )

    @property
    def loading_version(self) -> int | None:
        """Version being loaded right now (None otherwise); it completes even if its caller
        gave up."""
        return self._loading_version

    async def _with_pause(self, mode: PauseMode | str, load, version: int) -> None:
        mode = PauseMode(mode)
        await self._update_lock.acquire()  # released by the update task (it may outlive us)
        was_paused = self._paused
        try:
            if not was_paused and mode is PauseMode.WAIT:
                await self._drain()  # the long, cancellable part: nothing loaded yet
        except BaseException:
            self._update_lock.release()
            raise
        self._loading_version = version
        task = asyncio.ensure_future(self._pause_load_resume(mode, load, version, was_paused))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                task.add_done_callback(functools.partial(report_orphan_load, self.backend, version))
            raise

    async def _pause_load_resume(self, mode: PauseMode, load, version: int, was_paused: bool) -> None:
        try:
            if not was_paused:
                await self.pause(mode)  # (wait mode: already drained, returns at once)
            try:
                await asyncio.sleep(0)  # deliver chunks produced before the pause
                await load()
                await self._flush(version)
                self._version = version
            finally:
                if not was_paused:
                    await self.resume()
        finally:
            self._loading_version = None
            self._update_lock.release()
