"""Replay-buffer throughput through a Ray actor: Arrow ReplayBuffer vs Python dicts of lists.

    writer actors ──put(k groups)──► buffer actor ──get_batch(B groups)──► driver (trainer stand-in)
                                                                    └─► flat numpy token arrays

Each group is ``--samples`` samples x ``--tokens`` response tokens (+ ``--prompt-tokens``).
Writers hold ready-made payloads (an Arrow RecordBatch, or a list of dicts of lists) and
only rename group ids per put; the reader turns every batch into the flat numpy arrays a
trainer needs (zero-copy for Arrow, a Python walk for dicts). Both actors are threaded Ray
actors with the same call pattern. MB/s counts the Arrow size of the sample data.

    python benchmarks/buffer.py --out benchmarks/results/buffer.json
    python -m benchmarks.buffer --quick --json /tmp/buffer.json   # CI smoke: tiny groups, seconds
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import pickle
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from slime_rl.buffers import (
    BufferConfig,
    ReplayBuffer,
    Sample,
    create_buffer_actor,
    samples_to_batch,
)

TOKEN_COLUMNS = ("response_ids", "response_logprobs", "loss_mask", "token_versions")


class DictBuffer:
    """The baseline: a threaded actor holding groups as Python dicts of lists."""

    def __init__(self) -> None:
        self._groups: collections.deque[dict[str, Any]] = collections.deque()
        self._ready = threading.Condition()

    def put(self, groups: list[dict[str, Any]]) -> int:
        with self._ready:
            self._groups.extend(groups)
            self._ready.notify_all()
        return len(groups)

    def get_batch(self, num_groups: int, timeout: float) -> list[dict[str, Any]]:
        with self._ready:
            if not self._ready.wait_for(lambda: len(self._groups) >= num_groups, timeout):
                raise TimeoutError("baseline buffer: not enough groups")
            return [self._groups.popleft() for _ in range(num_groups)]


class Writer:
    """Puts ``calls`` payloads of ``k`` groups, renaming group/sample ids each time."""

    def __init__(self, buffer: Any, kind: str, payload: Any, name: str) -> None:
        self.buffer, self.kind, self.payload, self.name = buffer, kind, payload, name
        self.calls = 0

    def run(self, calls: int) -> int:
        refs = []
        for _ in range(calls):
            self.calls += 1  # fresh group ids: the buffer skips ids it already accepted
            data = rename(self.kind, self.payload, f"{self.name}-{self.calls}")
            refs.append(self.buffer.put.remote(data))
            if len(refs) >= 2:  # a rollout manager keeps a little work in flight
                ray.get(refs.pop(0))
        ray.get(refs)
        return calls


def rename(kind: str, payload: Any, prefix: str) -> Any:
    if kind == "dicts":
        return [{**g, "group_id": f"{prefix}-{i}", "sample_id": [f"{prefix}-{i}-{j}" for j in range(len(g["sample_id"]))]} for i, g in enumerate(payload)]
    gids = payload.column("group_id").to_pylist()
    mapping = {g: f"{prefix}-{i}" for i, g in enumerate(dict.fromkeys(gids))}
    new_g = [mapping[g] for g in gids]
    batch = payload.set_column(payload.schema.get_field_index("group_id"), "group_id", pa.array(new_g, pa.string()))
    return batch.set_column(batch.schema.get_field_index("sample_id"), "sample_id", pa.array([f"{g}-{j}" for j, g in enumerate(new_g)], pa.string()))


def make_lists(k: int, samples: int, tokens: int, prompt_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """k groups as dicts of lists (what a rollout manager has in hand from the engine)."""
    rng = np.random.default_rng(seed)
    groups = []
    for g in range(k):
        groups.append(
            {
                "group_id": f"g{g}",
                "sample_id": [f"g{g}-{i}" for i in range(samples)],
                "prompt_ids": [rng.integers(0, 30000, prompt_tokens).tolist() for _ in range(samples)],
                "response_ids": [rng.integers(0, 30000, tokens).tolist() for _ in range(samples)],
                "response_logprobs": [(-rng.random(tokens)).astype(np.float32).tolist() for _ in range(samples)],
                "loss_mask": [[1] * tokens for _ in range(samples)],
                "token_versions": [[0] * tokens for _ in range(samples)],
                "reward": [float(i % 2) for i in range(samples)],
                "policy_version": [0] * samples,
            }
        )
    return groups


def to_arrow(groups: list[dict[str, Any]]) -> pa.RecordBatch:
    samples = [
        Sample(
            sample_id=g["sample_id"][i], group_id=g["group_id"], prompt_ids=g["prompt_ids"][i], response_ids=g["response_ids"][i],
            response_logprobs=g["response_logprobs"][i], loss_mask=g["loss_mask"][i], token_versions=g["token_versions"][i], reward=g["reward"][i],
        )
        for g in groups
        for i in range(len(g["sample_id"]))
    ]
    return samples_to_batch(samples)


def arrays_from_arrow(table: pa.Table) -> dict[str, np.ndarray]:
    return {c: pc.list_flatten(table.column(c)).to_numpy() for c in TOKEN_COLUMNS}


def arrays_from_dicts(groups: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    # np.fromiter over a chain was the fastest of listcomp / concatenate(asarray) / fromiter here.
    return {
        c: np.fromiter(itertools.chain.from_iterable(row for g in groups for row in g[c]), dtype=np.float32 if c == "response_logprobs" else np.int32)
        for c in TOKEN_COLUMNS
    }


def run_case(kind: str, put_groups: int, args: argparse.Namespace, spill_dir: str | None = None) -> dict[str, Any]:
    lists = make_lists(put_groups, args.samples, args.tokens, args.prompt_tokens)
    payload = lists if kind == "dicts" else to_arrow(lists)
    group_bytes = to_arrow(lists[:1]).nbytes
    calls = max(1, args.groups // (args.writers * put_groups))
    total = calls * args.writers * put_groups
    if kind == "dicts":
        buffer = ray.remote(DictBuffer).options(max_concurrency=64, num_cpus=0).remote()
    else:
        cfg = BufferConfig(capacity_groups=max(total, args.batch_groups), max_staleness=10, spill_dir=spill_dir)
        buffer = create_buffer_actor(cfg, group_size=args.samples)
        ray.get(buffer.ready.remote())
    writers = [ray.remote(Writer).options(num_cpus=0).remote(buffer, kind, payload, f"w{w}") for w in range(args.writers)]
    ray.get([w.run.remote(1) for w in writers])  # warm up: actors started, code paths exercised
    warm = args.writers * put_groups
    _drain(buffer, kind, warm, args.batch_groups)
    t0 = time.perf_counter()
    done = [w.run.remote(calls) for w in writers]
    got = _drain(buffer, kind, total, args.batch_groups)
    seconds = time.perf_counter() - t0
    ray.get(done)
    assert got == total, (got, total)
    for a in (buffer, *writers):
        ray.kill(a)
    name = kind + ("+wal" if spill_dir else "")
    return {
        "format": name, "put_groups": put_groups, "groups": total, "seconds": seconds,
        "groups_per_s": total / seconds, "mb_per_s": total * group_bytes / seconds / 2**20, "group_bytes": group_bytes,
    }


def _drain(buffer: Any, kind: str, total: int, batch_groups: int) -> int:
    got = 0
    while got < total:
        n = min(batch_groups, total - got)
        if kind == "dicts":
            arrays_from_dicts(ray.get(buffer.get_batch.remote(n, 120)))
        else:
            arrays_from_arrow(ray.get(buffer.get_batch.remote(n, trainer_version=0, timeout=120)))
        got += n
    return got


def in_process(kind: str, put_groups: int, args: argparse.Namespace) -> dict[str, Any]:
    """The same pipeline without Ray: pickle protocol 5 (out-of-band buffers, as Ray uses)
    stands in for each hop. Shows what the data format costs apart from Ray's per-call cost."""
    lists = make_lists(put_groups, args.samples, args.tokens, args.prompt_tokens)
    payload = lists if kind == "dicts" else to_arrow(lists)
    if kind == "dicts":
        buffer: Any = DictBuffer()
    else:
        buffer = ReplayBuffer(BufferConfig(capacity_groups=args.groups + args.batch_groups, max_staleness=10), group_size=args.samples)
    calls = max(1, args.groups // put_groups)
    held, got = 0, 0
    t0 = time.perf_counter()
    for c in range(calls):
        buffer.put(hop(rename(kind, payload, f"c{c}")))
        held += put_groups
        while held >= args.batch_groups:
            if kind == "dicts":
                arrays_from_dicts(hop(buffer.get_batch(args.batch_groups, 10)))
            else:
                arrays_from_arrow(hop(buffer.get_batch(args.batch_groups, trainer_version=0, timeout=10)))
            held -= args.batch_groups
            got += args.batch_groups
    seconds = time.perf_counter() - t0
    return {"format": kind, "put_groups": put_groups, "groups": got, "seconds": seconds, "groups_per_s": got / seconds}


def hop(obj: Any) -> Any:
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return pickle.loads(data, buffers=buffers)


def writer_side_cost(args: argparse.Namespace) -> float:
    """Microseconds to build one group's RecordBatch from Python lists (the rollout manager pays it)."""
    lists = make_lists(1, args.samples, args.tokens, args.prompt_tokens)
    t0 = time.perf_counter()
    for _ in range(20):
        to_arrow(lists)
    return (time.perf_counter() - t0) / 20 * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=4096, help="groups moved per case")
    p.add_argument("--writers", type=int, default=2, help="writer actors")
    p.add_argument("--samples", type=int, default=8, help="samples per group")
    p.add_argument("--tokens", type=int, default=1024, help="response tokens per sample")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--put-groups", type=int, nargs="+", default=[1, 8, 32], help="groups per put call")
    p.add_argument("--batch-groups", type=int, default=32, help="groups per get_batch (the train batch)")
    p.add_argument("--json", "--out", dest="out", type=Path, default=None, help="write results JSON here")
    p.add_argument("--quick", action="store_true", help="smoke run: 64 groups of 2 x 16 tokens, 1 and 8 groups per put")
    args = p.parse_args()
    if args.quick:
        args.groups, args.writers, args.samples, args.tokens, args.prompt_tokens = 64, 1, 2, 16, 8
        args.put_groups, args.batch_groups = [1, 8], 8
    sizes = {"--groups": args.groups, "--writers": args.writers, "--samples": args.samples, "--tokens": args.tokens,
             "--put-groups": min(args.put_groups), "--batch-groups": args.batch_groups}
    bad = [k for k, v in sizes.items() if v < 1]
    if bad:
        raise SystemExit(f"{', '.join(bad)} must be at least 1")
    ray.init(address="local", include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in args.put_groups:
            rows.append(run_case("dicts", k, args))
            rows.append(run_case("arrow", k, args))
            rows.append(run_case("arrow", k, args, spill_dir=f"{tmp}/wal-{k}"))
    base = {r["put_groups"]: r["groups_per_s"] for r in rows if r["format"] == "dicts"}
    for r in rows:
        r["speedup_vs_dicts"] = r["groups_per_s"] / base[r["put_groups"]]
    local = [in_process(kind, k, args) for k in args.put_groups for kind in ("dicts", "arrow")]
    local_base = {r["put_groups"]: r["groups_per_s"] for r in local if r["format"] == "dicts"}
    for r in local:
        r["speedup_vs_dicts"] = r["groups_per_s"] / local_base[r["put_groups"]]
    build_us = writer_side_cost(args)
    print(f"\n{args.samples} samples x {args.tokens} tokens per group ({rows[0]['group_bytes'] / 2**10:.0f} KiB Arrow), "
          f"{args.writers} writer actors, get_batch of {args.batch_groups} groups, reader builds numpy token arrays\n")
    print(f"{'format':<10} {'groups/put':>10} {'groups':>7} {'groups/s':>10} {'MB/s':>8} {'vs dicts':>9}")
    for r in rows:
        print(f"{r['format']:<10} {r['put_groups']:>10} {r['groups']:>7} {r['groups_per_s']:>10.0f} {r['mb_per_s']:>8.1f} {r['speedup_vs_dicts']:>8.1f}x")
    print("\nsame pipeline in one process, pickle-5 hops instead of Ray (what the data format costs):")
    for r in local:
        print(f"{r['format']:<10} {r['put_groups']:>10} {r['groups']:>7} {r['groups_per_s']:>10.0f} {'':>8} {r['speedup_vs_dicts']:>8.1f}x")
    print(f"\nwriter side, not in the table: building one group's RecordBatch from Python lists takes {build_us:.0f} us")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"cpus": ray.cluster_resources().get("CPU"), "python": platform.python_version(), "pyarrow": pa.__version__, "ray": ray.__version__}
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "machine": meta, "build_group_us": build_us, "results": rows, "in_process": local}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
