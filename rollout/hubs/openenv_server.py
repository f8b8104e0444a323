"""A local OpenEnv server for `rollout.environment_kwargs.transport: http`, started by the run and
stopped with it (no container).

    OpenEnvHub.start ─► LocalServer.start: `python -m slime_rl.rollout.hubs.openenv_server REF KWARGS PORT`
        child: load REF (an Environment subclass) ─► openenv's create_app(factory, Action, Observation)
               ─► uvicorn on 127.0.0.1:PORT (dies with its parent: PR_SET_PDEATHSIG)
    ◄── GET /health answers ─► base URL ─► GenericEnvClient sessions (one WebSocket per episode)
    OpenEnvHub.close ─► LocalServer.stop: SIGTERM, then SIGKILL after 10 s
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def action_fields(env_cls: Any) -> tuple[Any, Any]:
    """`(Action class, Observation class)` of an OpenEnv `Environment` subclass: from its generic
    parameters (`Environment[MyAction, MyObservation, State]`) or the annotations of `step`."""
    from openenv.core.env_server.types import Action, Observation

    for klass in env_cls.__mro__:
        for base in getattr(klass, "__orig_bases__", ()):
            args = typing.get_args(base)
            if len(args) >= 2 and isinstance(args[0], type) and issubclass(args[0], Action):
                return args[0], args[1] if isinstance(args[1], type) and issubclass(args[1], Observation) else Observation
    try:
        hints = typing.get_type_hints(env_cls.step)
    except Exception:
        hints = {}
    act, obs = hints.get("action"), hints.get("return")
    if isinstance(act, type) and issubclass(act, Action):
        return act, obs if isinstance(obs, type) and issubclass(obs, Observation) else Observation
    return None, None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class LocalServer:
    """OpenEnv's FastAPI app for one environment class under uvicorn, in a child process."""

    def __init__(self, ref: str, kwargs: dict[str, Any], *, base_dir: str | Path | None = None,
                 max_concurrent_envs: int = 64, start_timeout_s: float = 120.0) -> None:
        self.ref, self.kwargs = ref, dict(kwargs)
        self.base_dir = str(base_dir) if base_dir is not None else os.getcwd()
        self.max_concurrent_envs = max_concurrent_envs
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    async def start(self) -> str:
        """Start the server and wait until `/health` answers; returns its base URL.

        Raises:
            RuntimeError: the server exited or did not answer within `start_timeout_s` (its output named).
        """
        port = _free_port()
        cmd = [sys.executable, "-m", "slime_rl.rollout.hubs.openenv_server", self.ref, json.dumps(self.kwargs), str(port),
               str(self.max_concurrent_envs)]
        self.proc = subprocess.Popen(cmd, cwd=self.base_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent, env={**os.environ, "ENABLE_WEB_INTERFACE": "false"})
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.start_timeout_s
        import aiohttp

        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    out = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                    raise RuntimeError(f"the OpenEnv server for {self.ref} exited with code {self.proc.returncode}: {out[-2000:]}")
                try:
                    async with s.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            self.url = url
                            logger.info("OpenEnv server for %s serving at %s (pid %d)", self.ref, url, self.proc.pid)
                            return url
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.25)
        await self.stop()
        raise RuntimeError(f"the OpenEnv server for {self.ref} did not answer on {url}/health within {self.start_timeout_s:g} s")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


def main(argv: list[str]) -> None:  # pragma: no cover - the child process
    """`python -m slime_rl.rollout.hubs.openenv_server REF KWARGS_JSON PORT [MAX_CONCURRENT_ENVS]`."""
    import uvicorn
    from openenv.core.env_server.http_server import create_app
    from slime_rl.rollout.plugins import load_object

    ref, kwargs, port = argv[0], json.loads(argv[1]), int(argv[2])
    max_envs = int(argv[3]) if len(argv) > 3 else 64
    env_cls = load_object(ref, key="rollout.environment", base_dir=os.getcwd())
    action_cls, obs_cls = action_fields(env_cls)
    app = create_app(lambda: env_cls(**kwargs), action_cls, obs_cls, env_name=env_cls.__name__, max_concurrent_envs=max_envs)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
