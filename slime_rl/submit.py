"""`slime-rl submit`: run `slime-rl train` as a Ray job through Ray's job-submission SDK.

    config + overrides ─► validated here (same checks as `train`) ─► paths made absolute
      ─► JobSubmissionClient(address).submit_job(entrypoint="<python> -m slime_rl.cli train ...",
                                                 runtime_env={"working_dir": ".", "excludes": [...]})
      ─► job id printed; with --follow: logs streamed, exit code = the job's outcome

The working directory travels with the job (a reward file given by path comes along), but
not model weights, virtual environments, old runs or artifacts (a job upload is capped at a
few hundred MB, and peers' users hit that with checkpoints in the folder): model and data
paths are passed as absolute paths, so they must exist on the cluster's nodes (true on one
node or a shared file system).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from slime_rl.config import Config

EXCLUDES = [
    ".git", ".venv", "venv", "artifacts", "runs", "outputs", "wandb", "__pycache__", "*.safetensors", "*.bin",
    "*.pt", "*.pth", "*.ckpt", "*.parquet", ".pytest_cache", ".ruff_cache", "*.egg-info",
]
"""Never uploaded with the working directory."""

_PATH_KEYS = ("model.path", "model.tokenizer_path", "data.train_path", "data.eval_path", "run.output_dir", "run.train_only")


class SubmitError(RuntimeError):
    """Submission failed; the message says why and what to do."""


def dashboard_address(address: str | None, cfg: Config) -> str:
    """The job server address: --address, $RAY_ADDRESS, ray.address, or the local default."""
    address = address or os.environ.get("RAY_ADDRESS") or cfg.ray.address or "http://127.0.0.1:8265"
    if address.startswith("ray://"):
        host = address.removeprefix("ray://").split(":")[0]
        address = f"http://{host}:8265"
    if "://" not in address:
        address = f"http://{address}"
    return address


def _absolute_overrides(cfg: Config, overrides: list[str]) -> list[str]:
    out = list(overrides)
    for key in _PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            out.append(f"{key}={Path(value).expanduser().resolve()}")
    return out


def entrypoint(config_path: str, overrides: list[str], cfg: Config, python: str | None = None) -> str:
    """The job's command line: the same `train` with absolute paths (config file too when outside cwd)."""
    cfg_path = Path(config_path)
    cwd = Path.cwd().resolve()
    resolved = cfg_path.resolve()
    shown = str(resolved.relative_to(cwd)) if resolved.is_relative_to(cwd) else str(resolved)
    args = [python or sys.executable, "-m", "slime_rl.cli", "train", shown, *_absolute_overrides(cfg, overrides)]
    return " ".join(shlex.quote(a) for a in args)


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    from slime_rl.cluster import use_token_if_available

    use_token_if_available()
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        hint = "; set RAY_AUTH_MODE=token (the cluster uses token auth)" if "auth" in str(e).lower() else ""
        raise SubmitError(f"cannot reach the Ray job server at {address}: {e}{hint}") from None


def submit(config_path: str, overrides: list[str], cfg: Config, *, address: str | None = None,
           follow: bool = False, python: str | None = None, out=sys.stdout) -> int:
    """Submit the run; returns the process exit code (0, or the job's outcome with `follow`)."""
    url = dashboard_address(address, cfg)
    client = _client(url)
    job_id = f"slime-rl-{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    runtime_env = {"working_dir": str(Path.cwd()), "excludes": EXCLUDES, **{k: v for k, v in cfg.ray.runtime_env.items() if k != "working_dir"}}
    try:
        client.submit_job(entrypoint=entrypoint(config_path, overrides, cfg, python), runtime_env=runtime_env,
                          submission_id=job_id, metadata={"run": cfg.run.name})
    except Exception as e:
        raise SubmitError(f"submitting to {url} failed: {e}") from None
    print(f"submitted job {job_id} to {url}", file=out)
    if not follow:
        print(f"follow it with: ray job logs --follow {job_id}  (status: ray job status {job_id})", file=out)
        return 0
    return asyncio.run(_follow(client, job_id, out))


async def _follow(client: Any, job_id: str, out) -> int:
    from ray.job_submission import JobStatus

    async for lines in client.tail_job_logs(job_id):
        out.write(lines)
        out.flush()
    for _ in range(60):  # the log stream ends slightly before the status is final
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        await asyncio.sleep(0.5)
    print(f"job {job_id}: {status.value}", file=out)
    return 0 if status == JobStatus.SUCCEEDED else 1
