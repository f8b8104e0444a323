"""Run untrusted Python in a throw-away folder with resource limits and no network.

    Sandbox.run(code, stdin)
      └─ mkdtemp (owned by the sandbox user) ── write main.py
      └─ [unshare --net --pid --fork --kill-child (--setuid nobody | --map-root-user)]
           python -I -c LAUNCHER spec        (own session = own process group)
             LAUNCHER: setrlimit(AS, CPU, NPROC, FSIZE, NOFILE, CORE) -> [audit hook] -> runpy main.py
      └─ wall-time timeout -> SIGKILL the process group (a pid namespace takes every descendant
         with it; without one, leftovers are found by an environment token and killed)
      └─ rmtree the folder

Containment of each threat:
- infinite loop: RLIMIT_CPU and the wall-time kill;
- memory hog: RLIMIT_AS (MemoryError or failed allocation);
- fork bomb: RLIMIT_NPROC (counted per user, so as root the program runs as ``nobody``,
  and without root inside a fresh user namespace) plus the pid namespace;
- network: a fresh network namespace (no interfaces up); where ``unshare`` is unavailable an
  audit hook refuses AF_INET/AF_INET6 sockets and starting other programs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

NOBODY = 65534

_LAUNCHER = r"""
import json, os, resource, sys
spec = json.loads(sys.argv[1])
for name, value in spec["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (value, value))
if spec["block_network"]:
    import socket
    _inet = {int(socket.AF_INET), int(socket.AF_INET6)}
    _exec = {"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "pty.spawn"}
    def _hook(event, args):
        if event == "socket.__new__" and len(args) > 1 and int(args[1]) in _inet:
            raise PermissionError("network access is disabled in the reward sandbox")
        if event in _exec:
            raise PermissionError("starting programs is disabled in the reward sandbox")
    sys.addaudithook(_hook)
    del socket
sys.argv = [spec["file"]]
sys.path.insert(0, os.getcwd())
import runpy
runpy.run_path(spec["file"], run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 10.0
    """Wall-clock limit; the whole process group is killed when it passes."""
    cpu_s: int = 10
    """CPU-seconds limit (RLIMIT_CPU) of each process."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS) of each process."""
    max_processes: int = 32
    """Processes/threads the program may add (RLIMIT_NPROC); contains fork bombs."""
    file_size_mb: int = 16
    """Largest file the program may write (RLIMIT_FSIZE)."""
    open_files: int = 64
    """Open file descriptors (RLIMIT_NOFILE)."""
    max_output_bytes: int = 1 << 20
    """Bytes of stdout/stderr kept (the rest is read and dropped)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _count_tasks(uid: int) -> int:
    """Tasks (threads count: RLIMIT_NPROC counts them) whose real uid is ``uid``."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(fields.get("Uid", "-1 0").split()[0]) == uid:
            n += int(fields.get("Threads", "1").strip() or 1)
    return n


def _kill_by_token(token: str) -> None:
    """SIGKILL every process whose environment holds ``token`` (escapees of the group)."""
    needle = token.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read():
                    os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


class Sandbox:
    """Runs Python source under :class:`SandboxLimits`; probes the host once at construction.

    ``network``: ``"unshare"`` (namespaces, required), ``"audit"`` (audit hook only) or
    ``"auto"`` (namespaces when ``unshare`` works here). ``python``: the interpreter, or
    ``"auto"`` for the first of this interpreter and the system ``python3`` that the sandbox
    user can run (as root the program runs as ``nobody``, who may not read a venv under /root).

    >>> import asyncio
    >>> box = Sandbox(SandboxLimits(wall_s=5))
    >>> asyncio.run(box.run("print(input()[::-1])", stdin="abc")).stdout
    'cba\\n'
    """

    def __init__(
        self, limits: SandboxLimits | None = None, *, python: str = "auto", network: str = "auto"
    ) -> None:
        if network not in ("auto", "unshare", "audit"):
            raise ValueError(f"sandbox network={network!r}; allowed: 'auto', 'unshare', 'audit'")
        self.limits = limits or SandboxLimits()
        self.is_root = os.geteuid() == 0
        self.uid, self.gid = (NOBODY, NOBODY) if self.is_root else (os.getuid(), os.getgid())
        self._unshare = shutil.which("unshare")
        pythons = [python] if python != "auto" else [sys.executable, "/usr/bin/python3", shutil.which("python3")]
        modes = {"auto": ["unshare", "audit"], "unshare": ["unshare"], "audit": ["audit"]}[network]
        problems = []
        for mode in modes:
            if mode == "unshare" and not self._unshare:
                problems.append("unshare: not installed")
                continue
            for exe in dict.fromkeys(p for p in pythons if p):
                self.mode, self.python = mode, exe
                err = self._probe()
                if err is None:
                    logger.debug("sandbox: network=%s python=%s uid=%d", mode, exe, self.uid)
                    return
                problems.append(f"{mode} + {exe}: {err}")
        raise RuntimeError(
            "no usable sandbox on this host: " + "; ".join(problems)
            + ". Install util-linux `unshare`, or pass python= an interpreter that uid "
            f"{self.uid} can run."
        )

    # -- command construction -------------------------------------------------------------

    def _argv(self, spec: dict) -> list[str]:
        wrapper: list[str] = []
        if self.mode == "unshare":
            wrapper = [self._unshare, "--net", "--pid", "--fork", "--kill-child"]
            if self.is_root:
                wrapper += ["--setgid", str(self.gid), "--setuid", str(self.uid)]
            else:
                wrapper += ["--map-root-user"]
        return [*wrapper, self.python, "-I", "-c", _LAUNCHER, json.dumps(spec)]

    def _popen_user(self) -> dict:
        # Without unshare, root drops to nobody through Popen itself (no preexec_fn).
        if self.is_root and self.mode != "unshare":
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}

    def _spec(self) -> dict:
        lim = self.limits
        nproc = lim.max_processes
        if not (self.mode == "unshare" and not self.is_root):
            # Outside a fresh user namespace RLIMIT_NPROC counts all the user's tasks.
            nproc += _count_tasks(self.uid)
        mb = 1 << 20
        rlimits = {
            "RLIMIT_AS": lim.memory_mb * mb,
            "RLIMIT_CPU": max(1, int(lim.cpu_s)),
            "RLIMIT_NPROC": nproc,
            "RLIMIT_FSIZE": lim.file_size_mb * mb,
            "RLIMIT_NOFILE": lim.open_files,
            "RLIMIT_CORE": 0,
        }
        return {"rlimits": rlimits, "block_network": self.mode == "audit", "file": "main.py"}

    def _probe(self) -> str | None:
        workdir = tempfile.mkdtemp(prefix="slime-rl-sandbox-probe-")
        try:
            self._prepare(Path(workdir), {"main.py": "import json, collections, re\n"})
            proc = subprocess.run(
                self._argv(self._spec()), cwd=workdir, env=self._env(workdir, "probe"),
                capture_output=True, timeout=30, **self._popen_user(),
            )
            if proc.returncode != 0:
                return f"exit {proc.returncode}: {proc.stderr.decode(errors='replace').strip()[-300:]}"
            return None
        except (OSError, subprocess.SubprocessError) as e:
            return f"{type(e).__name__}: {e}"
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _prepare(self, workdir: Path, files: dict[str, str]) -> None:
        for name, text in files.items():
            path = workdir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        if self.is_root:
            for root, dirs, names in os.walk(workdir):
                for n in [*dirs, *names]:
                    os.chown(os.path.join(root, n), self.uid, self.gid)
            os.chown(workdir, self.uid, self.gid)
        os.chmod(workdir, 0o700)

    @staticmethod
    def _env(workdir: str, token: str) -> dict[str, str]:
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": workdir,
            "TMPDIR": workdir,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SLIME_RL_SANDBOX_TOKEN": token,
        }

    # -- running ------------------------------------------------------------------------

    async def run(self, code: str, stdin: str = "", files: dict[str, str] | None = None) -> SandboxResult:
        """Run ``code`` as ``main.py`` (plus ``files``) with ``stdin``; never raises for what
        the program does -- a crash, a limit or a timeout shows in the result."""
        t0 = time.monotonic()
        token = uuid.uuid4().hex
        workdir = tempfile.mkdtemp(prefix="slime-rl-sandbox-")
        out, err = bytearray(), bytearray()
        proc = None
        io_tasks: list[asyncio.Future] = []
        timed_out = False
        try:
            self._prepare(Path(workdir), {**(files or {}), "main.py": code})
            spec = await asyncio.to_thread(self._spec)  # may scan /proc: keep it off the loop
            proc = await asyncio.create_subprocess_exec(
                *self._argv(spec), cwd=workdir, env=self._env(workdir, token),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True, **self._popen_user(),
            )
            cap = self.limits.max_output_bytes
            io_tasks += [
                asyncio.ensure_future(_feed(proc.stdin, stdin.encode())),
                asyncio.ensure_future(_pump(proc.stdout, cap, out)),
                asyncio.ensure_future(_pump(proc.stderr, cap, err)),
            ]
            timed_out = not await _wait_exit(proc, self.limits.wall_s)
            self._kill(proc, token)
            await _wait_exit(proc, 2.0)
            _, pending = await asyncio.wait(io_tasks, timeout=2.0)
            for t in pending:
                t.cancel()
        finally:
            if proc is not None and proc.returncode is None:  # cancelled: clean up anyway
                self._kill(proc, token)
            for t in io_tasks:
                if not t.done():
                    t.cancel()
            shutil.rmtree(workdir, ignore_errors=True)
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            timed_out=timed_out,
            seconds=time.monotonic() - t0,
        )

    def _kill(self, proc: asyncio.subprocess.Process, token: str) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.mode != "unshare":  # no pid namespace: hunt processes that left the group
            _kill_by_token(token)


async def _wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait until the process itself exits; True if it did within ``timeout``.

    Polls ``returncode`` because ``Process.wait()`` (before Python 3.12) also waits for the
    pipes to close, which a surviving grandchild can hold open.
    """
    deadline = time.monotonic() + timeout
    while proc.returncode is None:
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def _feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
    if stream is None:
        return
    try:
        if data:
            stream.write(data)
            await stream.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        stream.close()


async def _pump(stream: asyncio.StreamReader | None, cap: int, buf: bytearray) -> None:
    if stream is None:
        return
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return
        if len(buf) < cap:
            buf.extend(chunk[: cap - len(buf)])
