"""Weight sync at size: trainer -> rollout engines, per transport, against the memory-copy limit.

    Qwen2-shaped random model (100M / 500M / 1B; fp32 or bf16) saved once under a cache folder
      ├─ limits: torch copy of the same bytes into a preallocated buffer; bare ray.put/ray.get
      └─ the run's own path, per engine kind (vllm, hf) and transport (object_store, collective,
         disk): TrainerGroup (1 rank) ─► WeightSync.publish(v) ─► a manager actor holding an
         EnginePool of RayEngineClients over EngineActors ─► EngineActor.update_weights
         ─► PendingSync.wait(); one warm-up sync, then --repeats timed ones (median)
    columns: trainer gather / hand-off (put, write or send), engine transfer (resolve refs, read
    files, receive) and load (pause, load, reset caches), end to end, GB/s, x memory copy,
    engine unique memory (USS) after the syncs; object_store also with 1, 2, 4 engines at once.

Usage:
    python -m benchmarks.weight_sync --quick                 # tiny model, hf, object_store (CI)
    python -m benchmarks.weight_sync --sizes 100m 500m --dtypes fp32 bf16
    python -m benchmarks.weight_sync --sizes 1b --engines vllm --transports object_store
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from benchmarks import json_path

SIZES = {  # Qwen2 shapes (tie_word_embeddings like Qwen2-0.5B); "500m" is Qwen2-0.5B itself
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=32000),
    "500m": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936),
    "1b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=16, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore"}


def build_model(size: str, dtype: str, cache: Path) -> Path:
    """An HF folder of a random-init Qwen2 of `size` in `dtype` (built once, then reused)."""
    out = cache / f"qwen2-{size}-{dtype}"
    if (out / ".complete").exists():
        return out
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from slime_rl.tiny.tokenizer import build_tokenizer, save_tokenizer

    tok = build_tokenizer()
    config = Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=2048,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(DTYPES[dtype])
    model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tok, out)
    (out / ".complete").write_text(str(sum(p.numel() for p in model.parameters())))
    return out


def tiny_model(cache: Path) -> Path:
    from slime_rl.tiny import random_tiny_model

    out = cache / "tiny-fp32"
    if not (out / "config.json").exists():
        random_tiny_model(out, seed=0)
    return out


# ---- the limits ---------------------------------------------------------------------------------
def memcopy_s(nbytes: int, threads: int, repeats: int = 5) -> float:
    """Best seconds of `dst.copy_(src)` of `nbytes` into a preallocated, touched buffer."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.zeros(nbytes, dtype=torch.uint8)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        torch.set_num_threads(old)


@ray.remote(num_cpus=0)
class _Reader:
    def get(self, refs: list) -> float:
        t0 = time.perf_counter()
        value = ray.get(refs[0])
        seconds = time.perf_counter() - t0
        del value
        return seconds


def ray_put_get_s(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """Best seconds of a bare ray.put here and ray.get in another process, of a numpy array
    (zero-copy on get) and of a torch tensor (Ray pickles it: copies on both sides)."""
    reader = _Reader.remote()
    out: dict[str, float] = {}
    for kind, value in (("numpy", np.ones(nbytes, dtype=np.uint8)), ("torch", torch.ones(nbytes, dtype=torch.uint8))):
        put, get = float("inf"), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            ref = ray.put(value)
            put = min(put, time.perf_counter() - t0)
            get = min(get, ray.get(reader.get.remote([ref])))
            del ref
        out[f"ray_put_{kind}_s"], out[f"ray_get_{kind}_s"] = put, get
    ray.kill(reader)
    return out


# ---- the run's path -----------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class BenchManager:
    """The rollout manager's weight path alone: `update_weights(v, buckets, per_engine)` over an
    `EnginePool` of `RayEngineClient`s (what `RolloutManager.update_weights` calls)."""

    def __init__(self, handles: list, timeout_s: float) -> None:
        from slime_rl.rollout.engine_pool import EnginePool, RayEngineClient

        clients = [RayEngineClient(h, f"engine-{i}", timeout_s) for i, h in enumerate(handles)]
        self.pool = EnginePool(clients, max_in_flight=8, weight_timeout_s=timeout_s)

    async def sync_members(self) -> list[str]:
        return [s.name for s in self.pool.slots]

    async def update_weights(self, version: int, buckets: list, per_engine: dict | None = None) -> dict[str, float]:
        t0 = time.monotonic()
        per = await self.pool.update_weights(version, buckets, "keep", per_engine=per_engine)
        return {"rollout/weight_update_s": time.monotonic() - t0,
                "rollout/weight_update_engine_max_s": max(per.values())}


def start_engines(kind: str, model_dir: Path, dtype: str, n: int, threads: int) -> list:
    from slime_rl.rollout.engines.actor import start_engine_actor

    params: dict[str, Any] = {"num_threads": threads, "dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
    if kind == "vllm":
        params |= {"kv_cache_gb": 0.25, "max_model_len": 512}
    handles = [
        start_engine_actor(kind, model_dir, name=f"wsb-{kind}-{i}-{time.monotonic_ns()}", num_cpus=0, weight_update_timeout_s=900,
                           actor_options={"runtime_env": {"env_vars": ENGINE_ENV}}, **params)
        for i in range(n)
    ]
    ray.get([h.version.remote() for h in handles], timeout=900)
    return handles


@contextlib.contextmanager
def _engines(kind: str, model_dir: Path, dtype: str, n: int, threads: int):
    engines = start_engines(kind, model_dir, dtype, n, threads)
    try:
        yield engines
    finally:
        for e in engines:
            try:
                ray.get(e.shutdown.remote(), timeout=120)
            except Exception:
                pass
            ray.kill(e)


def _uss_mb(handle: Any) -> float:
    import psutil

    pid = ray.get(handle.__ray_call__.remote(lambda self: os.getpid()))
    return psutil.Process(pid).memory_full_info().uss / 1e6


def _stats(handle: Any, method: str) -> dict[str, float]:
    try:
        return ray.get(getattr(handle, method).remote(), timeout=60)
    except Exception:  # an older build without the stats method
        return {}


def run_case(trainer: Any, engines: list, transport: str, args: argparse.Namespace, publish_dtype: str | None,
             tmp: Path) -> dict[str, Any]:
    """Warm-up sync + `repeats` timed syncs of the trainer's weights into `engines`."""
    from slime_rl.weight_sync import WeightSync

    manager = BenchManager.remote(engines, 900.0)
    kwargs: dict[str, Any] = {"dtype": publish_dtype} if publish_dtype else {}
    sync = WeightSync(transport, trainer, manager, bucket_bytes=int(args.bucket_mb * (1 << 20)), run_dir=tmp,
                      timeout_s=900.0, **kwargs)
    rank0 = trainer.worker_handles()[0]
    uss_before = [round(_uss_mb(e)) for e in engines]
    memcopy = min(memcopy_s(int(args.nbytes), 1, 3), memcopy_s(int(args.nbytes), args.threads, 3))
    rows = []
    for i in range(1 + args.repeats):
        version = trainer.version + 1
        trainer.set_version(version)
        t0 = time.perf_counter()
        pending = sync.publish(version)
        blocked = time.perf_counter() - t0
        metrics = pending.wait()
        e2e = time.perf_counter() - t0
        tstats = _stats(rank0, "weight_publish_stats")
        estats = [_stats(e, "weight_update_stats") for e in engines]
        versions = ray.get([e.version.remote() for e in engines])
        assert versions == [version] * len(engines), f"engines at {versions}, expected {version}"
        if i == 0:
            continue  # warm-up
        rows.append({
            "e2e_s": e2e, "publish_blocked_s": blocked, "bytes": metrics["weight_sync/bytes"],
            "gather_s": tstats.get("gather_s", float("nan")), "hand_off_s": tstats.get("hand_off_s", float("nan")),
            "transfer_s": max(e.get("transfer_s", e.get("resolve_s", float("nan"))) for e in estats),
            "load_s": max(e.get("load_s", e.get("engine_s", float("nan"))) for e in estats),
            "uss_mb": [round(_uss_mb(e)) for e in engines],
        })
    ray.kill(manager)
    out: dict[str, Any] = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "uss_mb"}
    out |= {"uss_mb_before": uss_before, "uss_mb": rows[-1]["uss_mb"], "memcopy_s": memcopy, "rows": rows}
    out["gb_per_s"] = out["bytes"] / 1e9 / out["e2e_s"]
    out["x_memcopy"] = out["e2e_s"] / memcopy
    return out


# ---- driver -------------------------------------------------------------------------------------
def bench_model(model_dir: Path, label: str, dtype: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from slime_rl.trainer.config import TrainerConfig
    from slime_rl.trainer.group import TrainerGroup

    trainer = TrainerGroup(TrainerConfig(num_workers=1, num_threads=args.threads, timeout_s=900), str(model_dir),
                           name=f"wsb-trainer-{label}")
    try:
        fp32_bytes = 4 * _checkpoint_numel(model_dir)
        nbytes = fp32_bytes // 2 if dtype == "bf16" else fp32_bytes
        args.nbytes = nbytes
        res: dict[str, Any] = {"params": fp32_bytes // 4, "bytes": nbytes}
        res["memcopy_1t_s"] = memcopy_s(nbytes, 1)
        res["memcopy_s"] = min(res["memcopy_1t_s"], memcopy_s(nbytes, args.threads))
        res |= ray_put_get_s(nbytes)
        print(f"\n== {label}: {res['params'] / 1e6:.0f}M params, {nbytes / 1e6:.0f} MB per sync; memory copy "
              f"{res['memcopy_s'] * 1e3:.0f} ms ({nbytes / 1e9 / res['memcopy_s']:.1f} GB/s); ray.put+get numpy "
              f"{(res['ray_put_numpy_s'] + res['ray_get_numpy_s']) * 1e3:.0f} ms, torch "
              f"{(res['ray_put_torch_s'] + res['ray_get_torch_s']) * 1e3:.0f} ms\n{HEADER}", flush=True)
        publish_dtype = "bfloat16" if dtype == "bf16" and not args.publish_fp32 else None
        cases: dict[str, Any] = {}
        fanout = [n for n in args.fanout if n > 1] if label.split("-")[0] in args.fanout_sizes else []
        for kind in args.engines:
            with _engines(kind, model_dir, dtype, 1, args.threads) as engines:
                for transport in args.transports:
                    key = f"{kind}/{transport}/1"
                    cases[key] = run_case(trainer, engines, transport, args, publish_dtype, tmp)
                    _print_row(key, cases[key])
            if fanout:  # each engine gets its share of the cores, as a deployment would give it
                threads = args.fanout_threads or max(1, args.threads // max(fanout))
                with _engines(kind, model_dir, dtype, max(fanout), threads) as engines:
                    for n in [1, *fanout]:
                        key = f"{kind}/object_store/{n}x{threads}t"
                        cases[key] = run_case(trainer, engines[:n], "object_store", args, publish_dtype, tmp)
                        _print_row(key, cases[key])
        res["cases"] = cases
        return res
    finally:
        trainer.shutdown()


HEADER = (f"{'engine/transport/engines':<28}{'gather':>8}{'hand-off':>9}{'transfer':>9}{'load':>8}{'e2e s':>8}"
          f"{'GB/s':>7}{'x copy':>8}{'copy ms':>7}{'blocked':>8}  engine USS MB before>after")


def _print_row(key: str, r: dict[str, Any]) -> None:
    uss = ",".join(f"{b}>{a}" for b, a in zip(r["uss_mb_before"], r["uss_mb"]))
    print(f"{key:<28}{r['gather_s']:>8.3f}{r['hand_off_s']:>9.3f}{r['transfer_s']:>9.3f}{r['load_s']:>8.3f}"
          f"{r['e2e_s']:>8.3f}{r['gb_per_s']:>7.2f}{r['x_memcopy']:>8.1f}{r['memcopy_s'] * 1e3:>7.0f}"
          f"{r['publish_blocked_s']:>8.3f}  {uss}", flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["100m", "500m", "1b"], choices=list(SIZES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--engines", nargs="+", default=["vllm", "hf"], choices=["vllm", "hf"])
    p.add_argument("--transports", nargs="+", default=["object_store", "collective", "disk"])
    p.add_argument("--fanout", nargs="+", type=int, default=[1, 2, 4], help="engines for the object_store fan-out")
    p.add_argument("--fanout-sizes", nargs="*", default=["100m", "500m"], help="sizes that get the fan-out runs")
    p.add_argument("--fanout-threads", type=int, default=0,
                   help="torch threads per engine in the fan-out runs (default: --threads shared among the engines)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mb", type=float, default=256.0)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the trainer, engines and memory copy")
    p.add_argument("--publish-fp32", action="store_true", help="bf16 models: publish the trainer's fp32 weights")
    p.add_argument("--cache", default=os.environ.get("SLIME_RL_BENCH_CACHE", str(Path.home() / ".cache/slime-rl/bench-models")))
    p.add_argument("--json", default=None, help="results JSON (default benchmarks/results/weight_sync.json; --quick: a temporary folder)")
    p.add_argument("--quick", action="store_true", help="tiny model, hf engine, object_store, one timed sync (CI smoke)")
    args = p.parse_args(argv)
    args.json = str(json_path(args.json, "weight_sync.json", args.quick))
    if args.quick:
        args.engines, args.transports, args.fanout, args.repeats, args.dtypes = ["hf"], ["object_store"], [1], 1, ["fp32"]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f"run-{os.getpid()}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False, object_store_memory=args_store_bytes(args))
    t_start = time.time()
    results: dict[str, Any] = {}
    try:
        models = [("tiny", "fp32", tiny_model(cache))] if args.quick else [
            (s, d, build_model(s, d, cache)) for s in args.sizes for d in args.dtypes]
        for size, dtype, model_dir in models:
            results[f"{size}-{dtype}"] = bench_model(model_dir, f"{size}-{dtype}", dtype, args, tmp)
    finally:
        ray.shutdown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    out = {"args": vars(args), "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                                           "torch": torch.__version__, "ray": ray.__version__},
           "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {args.json}")
    return out


def args_store_bytes(args: argparse.Namespace) -> int:
    """Object store size: two versions of the biggest model in flight and a margin (at least
    1 GB); small enough that its pages are reused (touched) after a few syncs, as in a long run."""
    biggest = 0 if args.quick else max(_fp32_params(s) * 4 for s in args.sizes)
    return int(max(1e9, 2.5 * biggest))


def _checkpoint_numel(model_dir: Path) -> int:
    """Elements of the tensors a sync carries (the checkpoint's; a tied lm_head is not in it)."""
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                total += 0 if k == "lm_head.weight" else int(np.prod(sf.get_slice(k).get_shape()))
    return total


def _fp32_params(size: str) -> int:
    c = SIZES[size]
    h, i, n, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return v * h + n * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h + h + 2 * kv) + h


if __name__ == "__main__":
    main()
