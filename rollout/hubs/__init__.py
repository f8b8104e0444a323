"""Environments from the hubs users already write for: `verifiers` and OpenEnv, trained unchanged.

    rollout.environment: verifiers:<name> | verifiers:path/to/env.py   ─► verifiers_env.VerifiersEpisodes
    rollout.environment: openenv:<module:Class> | openenv:<file.py:Class> | openenv:http://host:port
                                                                       ─► openenv_env.OpenEnvEpisodes
    both ─► episode.HubEpisodes: one AgentEndpoint episode per sample (every model call recorded at
            token level) ─► Sample (loss mask 1 on the engine's tokens only) ─► reward runner
            (`env_reward`: the environment's own reward and each of its terms)

The hub packages come from the `envs` extra (`pip install slime-rl[envs]`) and are imported only
when a run names a hub environment; nothing here imports them at module level. `load_hub` is the
one entry point (`rollout/episodes.py` and `slime_rl/preflight.py` call it); a missing package, an
unknown environment or bad `rollout.environment_kwargs` raise `HubLoadError` with one line.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from slime_rl.rollout.plugins import PluginLoadError

HUB_KINDS = ("verifiers", "openenv")
"""Prefixes of `rollout.environment` that name a hub environment (`verifiers:...`, `openenv:...`)."""
ENV_REWARD = "slime_rl.rollout.hubs.episode:env_reward"
"""The reward term that scores hub episodes with the environment's own reward."""
_PACKAGES = {"verifiers": ("verifiers", "verifiers"), "openenv": ("openenv.core", "openenv-core")}


class HubLoadError(PluginLoadError):
    """A hub environment that cannot be used (missing package, unknown environment, bad kwargs)."""


def hub_kind(ref: str | None) -> str | None:
    """`verifiers` / `openenv` when `ref` names a hub environment, else None."""
    if not ref:
        return None
    kind = ref.split(":", 1)[0]
    return kind if kind in HUB_KINDS and ":" in ref else None


def split_ref(ref: str) -> tuple[str, str]:
    """`("verifiers", "tiny-arith")` from `"verifiers:tiny-arith"`.

    Raises:
        HubLoadError: nothing after the prefix.
    """
    kind, _, target = ref.partition(":")
    if kind not in HUB_KINDS or not target.strip():
        raise HubLoadError(f"rollout.environment={ref!r}: expected verifiers:<name or path/to/env.py> or "
                           "openenv:<module:Class, path/to/file.py:Class or http://host:port>")
    return kind, target.strip()


def require(kind: str, ref: str) -> Any:
    """Import the hub's package (`verifiers`, `openenv.core`), or raise one line naming the extra."""
    module, dist = _PACKAGES[kind]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise HubLoadError(
            f"rollout.environment={ref!r} needs the {dist!r} package, which does not import here ({e}); "
            "install it with `pip install 'slime-rl[envs]'` (docs/agents.md lists the tested versions)"
        ) from None


def load_hub(ref: str, kwargs: dict[str, Any], *, base_dir: str | Path | None = None) -> Any:
    """The loaded hub environment (`VerifiersHub` / `OpenEnvHub`), checked.

    Raises:
        HubLoadError: missing package, unknown environment, kwargs its loader does not take, or an
            object that is not an environment of that hub.
    """
    kind, target = split_ref(ref)
    require(kind, ref)
    if kind == "verifiers":
        from slime_rl.rollout.hubs.verifiers_env import VerifiersHub

        return VerifiersHub.load(ref, target, dict(kwargs), base_dir=base_dir)
    from slime_rl.rollout.hubs.openenv_env import OpenEnvHub

    return OpenEnvHub.load(ref, target, dict(kwargs), base_dir=base_dir)


__all__ = ["ENV_REWARD", "HUB_KINDS", "HubLoadError", "hub_kind", "load_hub", "require", "split_ref"]
