"""Sandbox isolation: the host's files are neither writable nor readable, disk use and file
count are capped, ctypes cannot reach the network, and "auto" never falls back to the audit hook."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from slime_rl.buffers.schema import Sample
from slime_rl.rewards import RewardRunner, load_reward
from slime_rl.rewards.sandbox import NOBODY, Sandbox, SandboxLimits

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def box() -> Sandbox:
    return Sandbox(SandboxLimits(wall_s=10, disk_mb=4, max_files=64, file_size_mb=16))


def _run(box: Sandbox, code: str, **kw):
    return asyncio.run(box.run(code, **kw))


def _try_write(paths: list[str]) -> str:
    return (
        "import os\n"
        f"for p in {paths!r}:\n"
        "    try:\n"
        "        os.makedirs(os.path.dirname(p), exist_ok=True)\n"
        "        with open(p, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        print('WROTE', p)\n"
        "    except OSError as e:\n"
        "        print('REFUSED', p, e.errno)\n"
    )


def test_writes_outside_the_work_folder_fail_or_leave_nothing_on_the_host(box, tmp_path):
    owned = tmp_path / "owned_by_sandbox_user"
    owned.mkdir()
    os.chown(owned, box.uid, box.gid)  # a folder the sandbox's own user may write to on the host
    targets = [str(owned / "x.txt"), str(tmp_path / "y.txt"), "/tmp/slime_rl_escape_probe.txt",
               str(REPO / "escape_probe.txt"), "/etc/escape_probe", "/usr/escape_probe"]
    res = _run(box, _try_write(targets))
    assert res.returncode == 0, res.stderr
    for t in targets:
        assert not os.path.exists(t), f"{t} appeared on the host"
    assert "REFUSED /etc/escape_probe 30" in res.stdout  # EROFS: system folders are read-only
    assert "REFUSED /usr/escape_probe 30" in res.stdout


def test_repository_and_home_files_are_not_visible(box):
    secrets = [str(REPO / "pyproject.toml"), str(REPO / "rewards" / "sandbox.py"),
               os.path.expanduser("~/.bashrc"), "/root/.profile"]
    code = (
        "import os\n"
        f"for p in {secrets!r}:\n"
        "    try:\n"
        "        print('READ', p, len(open(p).read()))\n"
        "    except OSError as e:\n"
        "        print('HIDDEN', p, type(e).__name__)\n"
        "try:\n"
        f"    print('LIST', sorted(os.listdir({str(REPO)!r})))\n"
        "except OSError:\n"
        "    print('LIST', [])\n"
    )
    res = _run(box, code)
    assert res.returncode == 0, res.stderr
    assert "READ" not in res.stdout
    assert res.stdout.count("HIDDEN") == len(secrets)
    # At most the interpreter's own prefix (a venv inside the repository) is visible there.
    listing = res.stdout.split("LIST", 1)[1]
    assert "pyproject.toml" not in listing and "rewards" not in listing


def test_disk_use_and_file_count_are_capped(box):
    code = (
        "import os\nn = 0\n"
        "try:\n"
        "    with open('fill', 'wb') as f:\n"
        "        while True:\n"
        "            f.write(b'x' * (1 << 20)); f.flush(); n += 1\n"
        "except OSError as e:\n"
        "    print('DISK', n, e.errno)\n"
        "os.remove('fill')\nk = 0\n"
        "try:\n"
        "    while True:\n"
        "        open(f'/tmp/f{k}', 'w').close(); k += 1\n"
        "except OSError as e:\n"
        "    print('FILES', k, e.errno)\n"
    )
    res = _run(box, code)
    assert res.returncode == 0, res.stderr
    disk = res.stdout.split("DISK")[1].split()
    files = res.stdout.split("FILES")[1].split()
    assert int(disk[0]) <= 4 and disk[1] == "28"  # ENOSPC at the 4 MB cap
    assert int(files[0]) <= 64 and files[1] == "28"  # ENOSPC at the 64-inode cap


def test_ctypes_socket_cannot_reach_the_host_in_the_namespace_mode():
    box = Sandbox(SandboxLimits(wall_s=10), network="auto")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    code = (
        "import ctypes, socket\n"
        "fd = ctypes.CDLL(None).socket(2, 1, 0)\n"
        "print('FD', fd)\n"
        "s = socket.socket(fileno=fd)\n"
        "try:\n"
        f"    s.settimeout(3); s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
        "except OSError as e:\n    print('BLOCKED', e)\n"
    )
    try:
        res = _run(box, code)
    finally:
        server.close()
    assert "FD" in res.stdout, res.stderr
    assert "BLOCKED" in res.stdout and "CONNECTED" not in res.stdout


def test_auto_never_falls_back_to_the_audit_hook(monkeypatch):
    import slime_rl.rewards.sandbox as sandbox

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match=r"`unshare` is not installed.*network='audit'"):
        Sandbox(network="auto")


def test_audit_mode_is_an_explicit_opt_in_that_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="slime_rl.rewards.sandbox"):
        box = Sandbox(SandboxLimits(wall_s=5), network="audit")
    assert box.mode == "audit" and not box.isolated
    assert "not a security boundary" in caplog.text


def test_sandbox_runs_as_an_unprivileged_user(box):
    res = _run(box, "import os\nprint(os.getuid(), open('/proc/self/status').read().split('CapEff:')[1].split()[0])")
    uid, caps = res.stdout.split()
    assert caps == "0000000000000000"
    assert int(uid) == (NOBODY if os.geteuid() == 0 else 0)  # non-root: root of its own namespace


def test_queueing_behind_max_parallel_does_not_count_against_the_timeout():
    # 6 programs of ~0.4 s on one sandbox slot take ~2.4 s in all, more than the 1.5 s
    # per-call timeout: each call's clock must start when its program gets the slot.
    comp = load_reward("code_execution", {"timeout_s": 1.0, "max_parallel": 1})
    runner = RewardRunner([comp], timeout_s=1.5)
    tests = '{"inputs": ["2 3\\n"], "outputs": ["5\\n"]}'
    program = "import time\ntime.sleep(0.4)\na, b = map(int, input().split())\nprint(a + b)"
    samples = [
        Sample(f"g0-{i}", "g0", [1], [2], response=f"```python\n{program}\n```", label=tests) for i in range(6)
    ]
    outcomes = asyncio.run(runner.score(samples))
    runner.close()
    assert [o.error for o in outcomes] == [None] * 6
    assert [o.score for o in outcomes] == [1.0] * 6


def test_runner_timeout_below_the_code_timeout_is_refused_at_start_up():
    comp = load_reward("code_execution", {"timeout_s": 5.0})
    with pytest.raises(ValueError, match=r"reward.timeout_s=2 is below the 5 s that reward 'code_execution'"):
        RewardRunner([comp], timeout_s=2.0)


_UNPRIVILEGED = r"""
import asyncio, importlib.util, json, sys
spec = importlib.util.spec_from_file_location("sbx", sys.argv[1])
sbx = sys.modules["sbx"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sbx)
box = sbx.Sandbox(sbx.SandboxLimits(wall_s=10), python=sys.executable)
res = asyncio.run(box.run(sys.argv[2]))
print(json.dumps({"uid": box.uid, "stdout": res.stdout, "stderr": res.stderr, "rc": res.returncode}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root (to become nobody), setpriv and /usr/bin/python3")
def test_unprivileged_user_gets_the_same_isolation(tmp_path):
    # A non-root sandbox user is root of its own user namespace: it must still not write to
    # a host folder it owns, nor read the repository.
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, NOBODY, NOBODY)
    os.chmod(tmp_path, 0o755)
    program = _try_write([str(owned / "x.txt")]) + (
        f"try:\n    open({str(REPO / 'pyproject.toml')!r}).read()\n    print('READ REPO')\n"
        "except OSError:\n    print('REPO HIDDEN')\n"
    )
    proc = subprocess.run(
        ["setpriv", "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups", "/usr/bin/python3",
         "-I", "-c", _UNPRIVILEGED, str(REPO / "rewards" / "sandbox.py"), program],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    if proc.returncode != 0 and "no usable sandbox" in proc.stderr:
        pytest.skip(f"unprivileged user namespaces unavailable here: {proc.stderr[-300:]}")
    out = json.loads(proc.stdout)
    assert out["uid"] == NOBODY and out["rc"] == 0, out
    assert not (owned / "x.txt").exists()
    assert "REPO HIDDEN" in out["stdout"] and "READ REPO" not in out["stdout"]
