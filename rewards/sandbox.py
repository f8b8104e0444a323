"""Run untrusted Python in a throw-away, isolated folder with resource limits and no network.

    Sandbox.run(code, stdin, tests=None)
      └─ mkdtemp ── write main.py (+ files)        pipes: secret (tests + nonce) ─► fd, verdict ◄─ fd
      └─ unshare --mount --net --pid --fork --kill-child --mount-proc [--user --map-root-user]
           python -I -c sandbox_launcher.py spec   (own session = own process group)
             isolate: read-only binds of /usr /etc ... and the interpreter, fresh /proc, minimal
                      /dev, one capped tmpfs for /tmp /var/tmp /dev/shm and the work folder
                      -> chroot -> drop privileges (nobody, or no capabilities)
             with tests: fork; child: setrlimit -> main.py -> serve calls; parent (judge):
             read the secret -> run the tests against the child -> nonce to verdict
      └─ wall-time timeout -> SIGKILL the process group (the pid namespace takes every descendant)
      └─ rmtree the folder (whatever the program wrote lived in the tmpfs and is gone already)

Containment of each threat:
- infinite loop: RLIMIT_CPU and the wall-time kill;
- memory hog: RLIMIT_AS (MemoryError or failed allocation);
- fork bomb: RLIMIT_NPROC (counted per user, so as root the program runs as ``nobody``,
  and without root inside a fresh user namespace) plus the pid namespace;
- network: a fresh network namespace (no interfaces up);
- file system: a mount namespace; nothing of the host is writable, only system folders
  and the interpreter are visible (read-only), and every write lands in one tmpfs capped in
  size (``disk_mb``) and number of files (``max_files``);
- scoring cheats: assert-style tests run in a judge process forked off before the program
  starts; the program runs in the child and answers the judge's calls with plain data only.
  The tests and the success nonce reach the judge over a pipe the child closed unread; they
  are in no file, argument, environment variable or memory the program can reach (the judge
  is not dumpable and is the pid namespace's init). See ``sandbox_judge``.

``network="audit"`` (explicit opt-in) runs without namespaces: an audit hook refuses
AF_INET/AF_INET6 sockets and starting programs. ctypes bypasses it and there is no
file-system isolation; it is not a security boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)


def _load_sibling(name: str) -> types.ModuleType:
    """``rewards/<name>.py``: imported from the package, or by file path when this file was
    itself loaded by path outside the installed package (it needs only the standard library)."""
    if __package__:
        return importlib.import_module(f"{__package__}.{name}")
    spec = importlib.util.spec_from_file_location(f"_slime_rl_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_hostproc = _load_sibling("sandbox_process")

NOBODY = 65534
# The judge's code first: the launcher calls its serve() and run_judge() (one -c program).
_LAUNCHER = "\n".join(Path(__file__).with_name(f).read_text() for f in ("sandbox_judge.py", "sandbox_launcher.py"))
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_PREFIXES = (
    "import json, os, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
    "sys.base_exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]))"
)


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
    disk_mb: int = 64
    """Size of the one tmpfs behind the work folder, /tmp, /var/tmp and /dev/shm."""
    max_files: int = 1024
    """Files and folders the program may create in all (the tmpfs's inode cap)."""
    max_output_bytes: int = 1 << 20
    """Bytes of stdout/stderr kept (the rest is read and dropped)."""


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    tests_passed: bool | None = None
    """With ``tests``: True only when the tests ran to their end after the program."""


def _under(path: str, dirs: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


class Sandbox:
    """Runs Python source under :class:`SandboxLimits`; probes the host once at construction.

    ``network``: ``"auto"`` or ``"unshare"`` (network, mount and pid namespaces; an error
    when this host cannot create them), or ``"audit"`` (explicit opt-in, logs a warning: an
    audit hook only, bypassable with ctypes, no file-system isolation). ``python``: the
    interpreter, or ``"auto"`` for the first of this interpreter and the system ``python3``
    that works in the sandbox; its prefix folders are visible read-only inside.

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
        self.mode = "audit" if network == "audit" else "unshare"
        self.isolated = self.mode == "unshare"
        self._unshare = shutil.which("unshare")
        if self.mode == "audit":
            logger.warning(
                "reward sandbox network='audit': an audit hook only (ctypes bypasses it) and no "
                "file-system isolation; this is not a security boundary"
            )
        elif not self._unshare:
            raise RuntimeError(
                "no usable sandbox on this host: util-linux `unshare` is not installed. Install "
                "it, or opt in to the weak network='audit' mode (not a security boundary)."
            )
        pythons = [python] if python != "auto" else [sys.executable, "/usr/bin/python3", shutil.which("python3")]
        problems = []
        for exe in dict.fromkeys(p for p in pythons if p):
            self.python = exe
            self.binds = self._binds(exe)
            err = self._probe()
            if err is None:
                logger.debug("sandbox: mode=%s python=%s uid=%d", self.mode, exe, self.uid)
                return
            problems.append(f"{self.mode} + {exe}: {err}")
        raise RuntimeError(
            "no usable sandbox on this host: " + "; ".join(problems)
            + ". The sandbox needs `unshare` with mount/net/pid namespaces (root, or unprivileged "
            "user namespaces enabled); pass python= an interpreter that works there, or opt in to "
            "the weak network='audit' mode (not a security boundary)."
        )

    # -- command construction -------------------------------------------------------------

    def _binds(self, exe: str) -> list[str]:
        """Folders visible (read-only) inside: system folders plus the interpreter's prefixes."""
        binds = [d for d in _SYSTEM_DIRS if os.path.lexists(d)]
        if not self.isolated:
            return binds
        try:
            out = subprocess.run([exe, "-I", "-c", _PREFIXES], capture_output=True, text=True, timeout=30)
            prefixes = json.loads(out.stdout) if out.returncode == 0 else []
        except (OSError, subprocess.SubprocessError, ValueError):
            prefixes = []
        for p in prefixes:
            p = os.path.realpath(p)
            if p != "/" and not _under(p, binds):
                binds = [b for b in binds if not _under(b, [p])] + [p]
        return binds

    def _argv(self, spec: dict) -> list[str]:
        wrapper: list[str] = []
        if self.isolated:
            wrapper = [self._unshare, "--mount", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
            if not self.is_root:
                wrapper += ["--user", "--map-root-user"]
        return [*wrapper, self.python, "-I", "-c", _LAUNCHER, json.dumps(spec)]

    def _popen_user(self) -> dict:
        # Without namespaces, root drops to nobody through Popen itself (no preexec_fn).
        if self.is_root and not self.isolated:
            return {"user": self.uid, "group": self.gid, "extra_groups": []}
        return {}

    def _inside(self, workdir: str) -> str:
        """The work folder's path as the program sees it."""
        return f"/tmp/{os.path.basename(workdir)}" if self.isolated else workdir

    def _spec(self, workdir: str, secret_fd: int | None = None, verdict_fd: int | None = None) -> dict:
        lim = self.limits
        nproc = lim.max_processes
        if not (self.isolated and not self.is_root):
            # Outside a fresh user namespace RLIMIT_NPROC counts all the user's tasks.
            nproc += _hostproc.count_tasks(self.uid)
        mb = 1 << 20
        rlimits = {
            "RLIMIT_AS": lim.memory_mb * mb,
            "RLIMIT_CPU": max(1, int(lim.cpu_s)),
            "RLIMIT_NPROC": nproc,
            "RLIMIT_FSIZE": lim.file_size_mb * mb,
            "RLIMIT_NOFILE": lim.open_files,
            "RLIMIT_CORE": 0,
        }
        return {
            "rlimits": rlimits, "audit": self.mode == "audit", "file": "main.py",
            "isolate": self.isolated, "root": workdir, "work": self._inside(workdir),
            "binds": self.binds, "uid": self.uid, "gid": self.gid, "drop_to_nobody": self.is_root,
            "disk_bytes": lim.disk_mb * mb, "max_files": lim.max_files,
            "secret_fd": secret_fd, "verdict_fd": verdict_fd,
        }

    def _probe(self) -> str | None:
        workdir = tempfile.mkdtemp(prefix="slime-rl-sandbox-probe-")
        try:
            self._prepare(Path(workdir), {"main.py": "import json, collections, re\n"})
            proc = subprocess.run(
                self._argv(self._spec(workdir)), cwd=workdir, env=self._env(workdir, "probe"),
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
        if self.is_root and not self.isolated:
            for root, dirs, names in os.walk(workdir):
                for n in [*dirs, *names]:
                    os.chown(os.path.join(root, n), self.uid, self.gid)
            os.chown(workdir, self.uid, self.gid)
        os.chmod(workdir, 0o700)

    def _env(self, workdir: str, token: str) -> dict[str, str]:
        inside = self._inside(workdir)
        return {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": inside,
            "TMPDIR": inside,
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "SLIME_RL_SANDBOX_TOKEN": token,
        }

    # -- running ------------------------------------------------------------------------

    async def run(
        self, code: str, stdin: str = "", files: dict[str, str] | None = None, *, tests: str | None = None
    ) -> SandboxResult:
        """Run ``code`` as ``main.py`` (plus ``files``) with ``stdin``; never raises for what
        the program does -- a crash, a limit or a timeout shows in the result.

        With ``tests`` (Python source), the tests run after the program finishes, in a judge
        process that calls the program's functions across a pipe and gets plain data back
        (see ``sandbox_judge``); ``tests_passed`` says whether they reached their end. The
        program cannot read them nor fake the verdict (printing, exiting early, patching
        ``exec``, reading frames or memory, always-equal objects): only the judge knows the
        nonce the host checks.
        """
        t0 = time.monotonic()
        token = uuid.uuid4().hex
        workdir = tempfile.mkdtemp(prefix="slime-rl-sandbox-")
        out, err = bytearray(), bytearray()
        proc = None
        io_tasks: list[asyncio.Future] = []
        timed_out = False
        nonce = uuid.uuid4().hex
        secret_r = secret_w = verdict_r = verdict_w = None
        verdict = b""
        try:
            self._prepare(Path(workdir), {**(files or {}), "main.py": code})
            if tests is not None:
                secret_r, secret_w = os.pipe()
                verdict_r, verdict_w = os.pipe()
            spec = await asyncio.to_thread(self._spec, workdir, secret_r, verdict_w)  # scans /proc
            proc = await asyncio.create_subprocess_exec(
                *self._argv(spec), cwd=workdir, env=self._env(workdir, token),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True,
                pass_fds=tuple(fd for fd in (secret_r, verdict_w) if fd is not None),
                **self._popen_user(),
            )
            cap = self.limits.max_output_bytes
            io_tasks += [
                asyncio.ensure_future(_hostproc.feed(proc.stdin, stdin.encode())),
                asyncio.ensure_future(_hostproc.pump(proc.stdout, cap, out)),
                asyncio.ensure_future(_hostproc.pump(proc.stderr, cap, err)),
            ]
            if tests is not None:
                os.close(secret_r)
                os.close(verdict_w)
                secret_r = verdict_w = None
                message = json.dumps({"tests": tests, "nonce": nonce}).encode()
                io_tasks.append(asyncio.ensure_future(asyncio.to_thread(_hostproc.write_all, secret_w, message)))
                secret_w = None  # _write_all closes it
            timed_out = not await _hostproc.wait_exit(proc, self.limits.wall_s)
            self._kill(proc, token)
            await _hostproc.wait_exit(proc, 2.0)
            _, pending = await asyncio.wait(io_tasks, timeout=2.0)
            for t in pending:
                t.cancel()
            if verdict_r is not None:
                verdict = _hostproc.read_available(verdict_r, len(nonce) + 1)
        finally:
            if proc is not None and proc.returncode is None:  # cancelled: clean up anyway
                self._kill(proc, token)
            for t in io_tasks:
                if not t.done():
                    t.cancel()
            for fd in (secret_r, secret_w, verdict_r, verdict_w):
                if fd is not None:
                    _hostproc.close_quietly(fd)
            shutil.rmtree(workdir, ignore_errors=True)
        return SandboxResult(
            returncode=None if timed_out else proc.returncode,
            stdout=out.decode(errors="replace"),
            stderr=err.decode(errors="replace"),
            timed_out=timed_out,
            seconds=time.monotonic() - t0,
            tests_passed=None if tests is None else (not timed_out and verdict == nonce.encode()),
        )

    def _kill(self, proc: asyncio.subprocess.Process, token: str) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not self.isolated:  # no pid namespace: hunt processes that left the group
            _hostproc.kill_by_token(token)
