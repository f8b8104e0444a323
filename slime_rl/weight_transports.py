"""Bucket handles and sinks of the `disk` and `collective` weight transports (`weight_sync.py`).

    disk:       trainer rank 0 ─ DiskWriter(bucket) ─► <folder>/bucket-<i>.safetensors ─► DiskBucket
                engine ─ DiskBucket.named_tensors() ─► tensors over a private mmap of the file
                (no read copy: the engine's load copies straight from the page cache)
    collective: trainer rank 0 ─ CollectiveSender(bucket) ─► the bucket packed into one flat
                byte buffer ─► broadcast in 8 MiB pieces (gloo on CPU, NCCL on GPU)
                engine rank r ─ CollectiveBucket.named_tensors() ─► receive into one flat buffer
                ─► typed views of it (the layout is known on both sides: names, shapes, dtypes)

A collective group is made per `CollectiveSpec` (rendezvous host and port, world size, epoch)
and cached per process in `_Groups`; a new membership (an engine added or restarted) gets a
new spec (a new port or epoch) and so a new group. A member whose broadcast fails (a peer
lost) marks the group given up in its store; the others stop waiting within `_ABORT_POLL_S`
and the next sync makes a new group (`_broadcast`).
`named_tensors()` blocks (file reads, receives): engines call it off their event loop.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import mmap
import threading
import time
from pathlib import Path
from typing import Any

import torch

_ALIGN = 64
"""Byte alignment of each tensor inside a flat collective buffer (any dtype view is valid)."""
_CHUNK = 8 << 20
"""Bytes per broadcast call: gloo moved 8 MiB pieces of a bucket ~10 % faster than one piece
here, and per-tensor calls cost a round trip per small tensor (norms, biases)."""

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


# ---- disk ------------------------------------------------------------------------------------
def read_safetensors(path: str) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file as views of a private (copy-on-write) mmap of it: no
    read copy. A tensor whose offset does not suit its dtype, or an unknown dtype, is copied."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    size = int.from_bytes(mm[:8], "little")
    header = json.loads(mm[8 : 8 + size])
    base = 8 + size
    flat = torch.frombuffer(mm, dtype=torch.uint8) if len(mm) else torch.empty(0, dtype=torch.uint8)
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None or (base + start) % torch.empty((), dtype=dtype).element_size():
            from safetensors import safe_open

            with safe_open(path, framework="pt") as sf:
                out.append((name, sf.get_tensor(name)))
            continue
        out.append((name, flat[base + start : base + end].view(dtype).reshape(info["shape"])))
    return out


@dataclasses.dataclass(frozen=True)
class DiskBucket:
    """A bucket written as one safetensors file; `named_tensors()` maps it where it is called."""

    path: str
    version: int
    index: int
    num_buckets: int

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return read_safetensors(self.path)


@dataclasses.dataclass(frozen=True)
class DiskWriter:
    """Sink run inside trainer rank 0: writes each bucket to `<folder>/bucket-<i>.safetensors`
    (atomically: a temporary name, then a rename) and returns its `DiskBucket`."""

    folder: str

    def __call__(self, bucket: Any) -> DiskBucket:
        from safetensors.torch import save_file

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(self.folder) / f".bucket-{bucket.index}.tmp"
        final = Path(self.folder) / f"bucket-{bucket.index}.safetensors"
        save_file({n: t.contiguous() for n, t in bucket.named_tensors()}, str(tmp))
        tmp.rename(final)
        return DiskBucket(str(final), bucket.version, bucket.index, bucket.num_buckets)


# ---- collective ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CollectiveSpec:
    """One weight-sync group: trainer rank 0 (rank 0, hosts the store) and `world - 1` engines."""

    host: str
    port: int
    world: int
    timeout_s: float
    backend: str = "gloo"
    epoch: int = 0
    """Membership generation: a group re-made for other engines at the same address gets a new one."""

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.host, self.port, self.epoch)


_ABORT_KEY = "slime_rl/abort"
"""Store key a member sets when it gives a group up (its value says who and why)."""
_ABORT_POLL_S = 0.2
"""How often a member waiting on a broadcast asks the group's store whether another gave up."""


class CollectiveAborted(RuntimeError):
    """Another member of a weight-sync group gave it up (its error is in the message)."""


class _Groups:
    """Weight-sync process groups of this process (with their rendezvous store), by
    `CollectiveSpec.key` and rank.

    A group whose broadcast failed is abandoned, not freed: gloo's destructor waits for the
    operations still pending (a receive from a member that is gone waits out the group's
    timeout), so it is kept until that timeout has passed, then released off-thread."""

    _lock = threading.Lock()
    _groups: dict[tuple, tuple[Any, Any]] = {}
    _joining: dict[tuple, threading.Lock] = {}
    _abandoned: list[Any] = []

    @classmethod
    def get(cls, spec: CollectiveSpec, rank: int) -> tuple[Any, Any]:
        """(group, store): join (first call: blocks until every member joined, at most
        `timeout_s`) or reuse."""
        key = (*spec.key, rank)
        with cls._lock:
            if key in cls._groups:
                return cls._groups[key]
            joining = cls._joining.setdefault(key, threading.Lock())
        with joining:  # (not under `_lock`: joining waits for the other members)
            if key not in cls._groups:
                timeout = datetime.timedelta(seconds=spec.timeout_s)
                store = torch.distributed.TCPStore(spec.host, spec.port, spec.world, rank == 0, timeout=timeout)
                if spec.backend == "nccl":
                    group = torch.distributed.ProcessGroupNCCL(store, rank, spec.world)
                else:
                    group = torch.distributed.ProcessGroupGloo(store, rank, spec.world, timeout)
                with cls._lock:
                    cls._groups[key] = (group, store)
        return cls._groups[key]

    @classmethod
    def drop(cls, spec: CollectiveSpec) -> None:
        """Forget (and so free) this process's groups of `spec`, if any (none may have an
        operation pending: see `abandon`)."""
        with cls._lock:
            for key in [k for k in cls._groups if k[:3] == spec.key]:
                del cls._groups[key]
                cls._joining.pop(key, None)

    @classmethod
    def abandon(cls, spec: CollectiveSpec, *pending: Any) -> None:
        """Forget the groups of `spec` after a failed broadcast without blocking: they (and the
        operations in `pending`) are released once the group's own timeout has ended them."""
        with cls._lock:
            keys = [k for k in cls._groups if k[:3] == spec.key]
            item = [cls._groups.pop(k) for k in keys] + list(pending)
            for k in keys:
                cls._joining.pop(k, None)
            cls._abandoned.append(item)

        def release() -> None:
            time.sleep(spec.timeout_s + 5.0)
            with cls._lock:
                cls._abandoned.remove(item)
            item.clear()  # the last references, dropped on this thread

        threading.Thread(target=release, name="slime-rl-weight-group-release", daemon=True).start()


def flat_offsets(shapes: tuple[tuple[int, ...], ...], dtypes: tuple[str, ...]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a bucket's flat buffer (each `_ALIGN`-aligned), and its size."""
    offsets, size = [], 0
    for shape, dtype in zip(shapes, dtypes, strict=True):
        size = -(-size // _ALIGN) * _ALIGN
        offsets.append(size)
        size += torch.Size(shape).numel() * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return offsets, size


def _views(flat: torch.Tensor, shapes, dtypes, offsets: list[int]) -> list[torch.Tensor]:
    out = []
    for shape, dtype, off in zip(shapes, dtypes, offsets, strict=True):
        dt = getattr(torch, dtype)
        n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
        out.append(flat[off : off + n].view(dt).reshape(shape))
    return out


def _broadcast(spec: CollectiveSpec, rank: int, flat: torch.Tensor) -> None:
    """Broadcast `flat` from rank 0 in `_CHUNK` pieces (all started, then waited in order).

    A member that fails (a peer gone, its own error) marks the group given up in its store;
    the others, waiting on their receives, see that within `_ABORT_POLL_S` and fail too
    (instead of waiting out the group's timeout for data that will never come), and every
    member abandons the group: the next sync makes a new one.

    Raises:
        CollectiveAborted: another member gave the group up (its reason in the message).
        RuntimeError: this member's own broadcast failed (gloo/NCCL's error).
    """
    group, store = _Groups.get(spec, rank)
    works: list[Any] = []
    try:
        works = [group.broadcast(flat[i : i + _CHUNK], 0) for i in range(0, flat.numel(), _CHUNK)]
        next_check = time.monotonic() + _ABORT_POLL_S
        for work in works:
            nap = 0.0005  # short while pieces arrive; up to 10 ms while rank 0 is still busy elsewhere
            while not work.is_completed():
                if time.monotonic() >= next_check:
                    if store.check([_ABORT_KEY]):
                        reason = store.get(_ABORT_KEY).decode(errors="replace")
                        raise CollectiveAborted(f"weight-sync group {spec.host}:{spec.port} given up by {reason}")
                    next_check = time.monotonic() + _ABORT_POLL_S
                time.sleep(nap)
                nap = min(2 * nap, 0.01)
            work.wait()  # raises the operation's error, if any
    except BaseException as e:
        if not isinstance(e, CollectiveAborted):
            try:
                store.set(_ABORT_KEY, f"rank {rank}: {type(e).__name__}: {e}"[:400])
            except Exception:  # the store went with its host (trainer rank 0): the others fail on it too
                pass
        _Groups.abandon(spec, works, flat)
        raise


@dataclasses.dataclass(frozen=True)
class CollectiveSender:
    """Sink run inside trainer rank 0: packs each bucket into one flat buffer and broadcasts it."""

    spec: CollectiveSpec

    def __call__(self, bucket: Any) -> None:
        s = self.spec
        tensors = [t.detach() for t in bucket.tensors]
        shapes = tuple(tuple(t.shape) for t in tensors)
        dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in tensors)
        offsets, size = flat_offsets(shapes, dtypes)
        device = "cuda" if s.backend == "nccl" else "cpu"
        flat = torch.empty(size, dtype=torch.uint8, device=device)
        for view, t in zip(_views(flat, shapes, dtypes, offsets), tensors, strict=True):
            view.copy_(t)
        _broadcast(s, 0, flat)


@dataclasses.dataclass(frozen=True)
class CollectiveBucket:
    """A bucket that arrives by broadcast: `named_tensors()` (called inside engine `rank`) joins the
    group on first use and receives the tensors described by `names`/`shapes`/`dtypes` (one flat
    buffer; the tensors are views of it)."""

    spec: CollectiveSpec
    rank: int
    version: int
    index: int
    num_buckets: int
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        s = self.spec
        offsets, size = flat_offsets(self.shapes, self.dtypes)
        flat = torch.empty(size, dtype=torch.uint8, device="cuda" if s.backend == "nccl" else "cpu")
        _broadcast(s, self.rank, flat)
        return list(zip(self.names, _views(flat, self.shapes, self.dtypes, offsets), strict=True))
