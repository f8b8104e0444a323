"""Host-side process and pipe helpers of the reward sandbox (standard library only).

    Sandbox.run ─► feed(stdin) / pump(stdout, stderr, cap) ─► wait_exit(wall_s)
                ─► SIGKILL group (+ kill_by_token without a pid namespace)
                ─► read_available(verdict pipe)     write_all(secret pipe) ─► close

`rewards/sandbox.py` may be loaded by file path outside the installed package (as another
user's interpreter does in the isolation tests), so this module imports nothing of slime-rl.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time


def count_tasks(uid: int) -> int:
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


def kill_by_token(token: str) -> None:
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


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a pipe and close it; a reader that died early is not an error."""
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass
    finally:
        close_quietly(fd)


def read_available(fd: int, limit: int) -> bytes:
    """What is in the pipe now (at most ``limit`` bytes), without waiting for writers."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while len(data) < limit:
            chunk = os.read(fd, limit - len(data))
            if not chunk:
                break
            data += chunk
    except BlockingIOError:
        pass
    return data


async def wait_exit(proc: asyncio.subprocess.Process, timeout: float) -> bool:
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


async def feed(stream: asyncio.StreamWriter | None, data: bytes) -> None:
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


async def pump(stream: asyncio.StreamReader | None, cap: int, buf: bytearray) -> None:
    if stream is None:
        return
    while True:
        chunk = await stream.read(1 << 16)
        if not chunk:
            return
        if len(buf) < cap:
            buf.extend(chunk[: cap - len(buf)])
