"""Weight-sync building blocks without Ray: zero-copy bucket pickling, publish dtype and layout,
disk buckets over mmap, the flat collective broadcast over a real gloo group, the tied lm_head
packing share, and engines dropping a load's tensors once it is done."""

from __future__ import annotations

import gc
import pickle
import socket
import subprocess
import sys
import threading
import weakref

import pytest
import torch
from slime_rl.rollout.engines.core import BackendThread
from slime_rl.rollout.engines.vllm_ext import share_tied_packing
from slime_rl.trainer.weights import WeightBucket, iter_weight_buckets, resolve_dtype, weight_layout

from slime_rl.weight_transports import (
    CollectiveAborted,
    CollectiveBucket,
    CollectiveSender,
    CollectiveSpec,
    DiskWriter,
    _Groups,
    flat_offsets,
    read_safetensors,
)

pytestmark = pytest.mark.timeout(60)


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.tensor(3.5),
        torch.empty(0, 7),
        torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous
        torch.randn(2, 3, generator=g, requires_grad=True),
    ]


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        torch.testing.assert_close(g, w.detach(), rtol=0, atol=0)


def test_weight_bucket_pickles_tensor_bytes_out_of_band():
    ts = _tensors()
    bucket = WeightBucket(4, 1, 3, [f"t{i}" for i in range(len(ts))], ts)
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(bucket, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(ts) and len(payload) < 1000  # the bytes travel beside the pickle
    back = pickle.loads(payload, buffers=buffers)
    assert (back.version, back.index, back.num_buckets, back.names) == (4, 1, 3, bucket.names)
    _assert_same(back.tensors, ts)
    _assert_same(pickle.loads(pickle.dumps(bucket)).tensors, ts)  # in-band pickling still works


def test_publish_dtype_casts_and_layout_matches_the_buckets(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    budget = 1 << 19
    for dtype in (None, "bfloat16"):
        buckets = list(iter_weight_buckets(model, 7, budget, dtype=dtype))
        layout = weight_layout(model, budget, dtype=dtype)
        assert layout == [[(n, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in b.named_tensors()]
                          for b in buckets]
        want = torch.bfloat16 if dtype else torch.float32
        assert all(t.dtype == want for b in buckets for t in b.tensors)
        state = model.state_dict()
        for b in buckets:
            for n, t in b.named_tensors():
                torch.testing.assert_close(t, state[n].to(want), rtol=0, atol=0)
    half = sum(b.nbytes for b in iter_weight_buckets(model, 7, budget, dtype="bfloat16"))
    assert 2 * half == sum(b.nbytes for b in iter_weight_buckets(model, 7, budget))
    assert resolve_dtype("torch.float16") is torch.float16
    with pytest.raises(ValueError, match="'int8' is not a torch floating-point dtype"):
        resolve_dtype("int8")


def test_disk_buckets_map_the_file(tmp_path):
    from safetensors.torch import load_file

    ts = [t.detach().contiguous() for t in _tensors()]
    names = [f"layer.{i}.w" for i in range(len(ts))]
    handle = DiskWriter(str(tmp_path / "v000003"))(WeightBucket(3, 0, 2, names, ts))
    assert (handle.version, handle.index, handle.num_buckets) == (3, 0, 2)
    got = dict(handle.named_tensors())
    assert sorted(got) == sorted(names)
    _assert_same([got[n] for n in names], ts)
    ref = load_file(handle.path)
    _assert_same([t for _, t in sorted(read_safetensors(handle.path))], [ref[n] for n in sorted(ref)])
    got[names[0]].add_(1)  # a private mapping: the file keeps its bytes
    torch.testing.assert_close(load_file(handle.path)[names[0]], ts[0], rtol=0, atol=0)


def test_flat_offsets_are_aligned_for_every_dtype():
    shapes = ((3,), (5, 1), (), (2, 2))
    dtypes = ("bfloat16", "float32", "float64", "int8")
    offsets, size = flat_offsets(shapes, dtypes)
    assert all(o % 64 == 0 for o in offsets) and offsets == sorted(offsets)
    assert size == offsets[-1] + 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collective_bucket_receives_what_the_sender_broadcasts():
    """Rank 0 (sender) and rank 1 (an engine) over a real gloo group, in two threads; a bucket
    bigger than one broadcast piece, mixed dtypes."""
    spec = CollectiveSpec("127.0.0.1", _free_port(), 2, 30.0)
    ts = [t.detach() for t in _tensors()] + [torch.arange(3 << 20, dtype=torch.float32)]  # 12 MiB
    names = [f"w{i}" for i in range(len(ts))]
    bucket = WeightBucket(5, 0, 1, names, ts)
    recv = CollectiveBucket(spec, 1, 5, 0, 1, tuple(names), tuple(tuple(t.shape) for t in ts),
                            tuple(str(t.dtype).removeprefix("torch.") for t in ts))
    got: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            got.update(recv.named_tensors())
        except BaseException as e:  # reported below
            errors.append(e)

    thread = threading.Thread(target=receive)
    thread.start()
    try:
        CollectiveSender(spec)(bucket)
        thread.join(30)
        assert not errors and list(got) == names
        _assert_same([got[n] for n in names], ts)
    finally:
        _Groups.drop(spec)
    assert not any(k[:3] == spec.key for k in _Groups._groups)


_MEMBER_THAT_DIES = """
import datetime, os, sys, torch
host, port, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = datetime.timedelta(seconds=60)
store = torch.distributed.TCPStore(host, port, world, False, timeout=t)
torch.distributed.ProcessGroupGloo(store, rank, world, t)
os._exit(0)
"""


def test_a_member_lost_mid_sync_fails_the_others_at_once_and_the_next_group_works():
    """Rank 2 (an engine) joins and dies before the broadcast: rank 0 fails on it, marks the group
    given up, and rank 1 (waiting for data that will never come) stops with `CollectiveAborted`
    instead of waiting out the group's 60 s timeout (or, when rank 0 sent all of rank 1's chunks
    before failing on rank 2, rank 1 has the whole bucket); a new group of the two that are left
    then carries the bucket."""
    ts = [torch.arange(3 << 20, dtype=torch.float32), torch.ones(4, dtype=torch.bfloat16)]
    names = ("a", "b")
    shapes = tuple(tuple(t.shape) for t in ts)
    dtypes = tuple(str(t.dtype).removeprefix("torch.") for t in ts)
    bucket = WeightBucket(1, 0, 1, list(names), ts)

    def run_pair(spec: CollectiveSpec) -> tuple[list[BaseException], dict[str, torch.Tensor], list[BaseException]]:
        got: dict[str, torch.Tensor] = {}
        recv_errors: list[BaseException] = []

        def receive() -> None:
            try:
                got.update(CollectiveBucket(spec, 1, 1, 0, 1, names, shapes, dtypes).named_tensors())
            except BaseException as e:  # reported below
                recv_errors.append(e)

        thread = threading.Thread(target=receive)
        thread.start()
        send_errors: list[BaseException] = []
        if spec.world == 3:  # rank 0 joins (hosting the store) while rank 2 joins, then rank 2 is gone
            join = threading.Thread(target=_Groups.get, args=(spec, 0))
            join.start()
            dies = subprocess.Popen([sys.executable, "-c", _MEMBER_THAT_DIES, spec.host, str(spec.port), "2", "3"])
            assert dies.wait(60) == 0
            join.join(60)
        try:
            CollectiveSender(spec)(bucket)
        except BaseException as e:  # reported below
            send_errors.append(e)
        thread.join(30)
        assert not thread.is_alive(), "the receiver still waits on a group the sender gave up"
        return send_errors, got, recv_errors

    broken = CollectiveSpec("127.0.0.1", _free_port(), 3, 60.0)
    send_errors, got, recv_errors = run_pair(broken)
    assert send_errors and not isinstance(send_errors[0], CollectiveAborted)
    if recv_errors:  # the usual case: rank 0 failed on rank 2 before rank 1 had all its data
        assert len(recv_errors) == 1 and isinstance(recv_errors[0], CollectiveAborted), recv_errors
        assert "given up by rank 0" in str(recv_errors[0]) and not got
        assert not any(k[:3] == broken.key for k in _Groups._groups)  # abandoned on both members
    else:  # rank 1's chunks all went out before rank 0 failed on rank 2: complete and correct
        _assert_same([got[n] for n in names], ts)
        _Groups.drop(broken)

    fresh = CollectiveSpec("127.0.0.1", _free_port(), 2, 60.0)
    try:
        send_errors, got, recv_errors = run_pair(fresh)
        assert not send_errors and not recv_errors
        _assert_same([got[n] for n in names], ts)
    finally:
        _Groups.drop(fresh)


def test_tied_lm_head_takes_the_fresh_embedding_packing():
    class Layer:
        def __init__(self, weight):
            self.weight, self.cpu_linear = weight, object()

    w = torch.zeros(4, 2)
    embed, head = Layer(w), Layer(w)
    old = embed.cpu_linear
    assert not share_tied_packing(head, embed, old)  # the reload did not re-pack the embedding
    embed.cpu_linear = fresh = object()
    assert share_tied_packing(head, embed, old) and head.cpu_linear is fresh
    other = Layer(torch.zeros(4, 2))
    assert not share_tied_packing(other, embed, old)  # not the same weight
    assert not share_tied_packing(head, None, None)


def test_engine_thread_drops_a_call_arguments_when_it_returns():
    thread = BackendThread("test-engine")
    try:
        arg = torch.ones(8)
        ref = weakref.ref(arg)
        assert thread.submit(lambda t: float(t.sum()), arg).result(10) == 8.0
        del arg
        gc.disable()  # only reference counting may free it
        try:
            for _ in range(100):
                if ref() is None:
                    break
                threading.Event().wait(0.01)
            assert ref() is None
        finally:
            gc.enable()
    finally:
        thread.shutdown()
