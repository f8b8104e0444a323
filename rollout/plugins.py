"""Load user plug-ins of the rollout side by reference: `package.module:name` or `path/to/file.py:name`.

Used for `rollout.filter`, `rollout.generate_fn`, `rollout.agent_fn` and environment classes.
Imports go through the reward loader's importer (same rules: a file's folder is importable while
it loads, errors name the config key, the reference and the cause).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from slime_rl.rewards.loader import RewardLoadError, resolve_reference


class PluginLoadError(RewardLoadError):
    """A plug-in reference that cannot be used (a `ValueError`; the CLI prints it in one line)."""


def load_object(
    ref: str,
    *,
    key: str,
    base_dir: str | Path | None = None,
    callable_with: int | None = None,
) -> Any:
    """Import `ref` and return the named object.

    Args:
        ref: `package.module:name` or `path/to/file.py:name` (relative to `base_dir`, default cwd).
        key: the config key, named in errors.
        callable_with: if set, the object must be callable with this many positional arguments.

    Raises:
        PluginLoadError: bad reference, missing file/module/attribute, import error, wrong signature.
    """
    from slime_rl.rewards import loader as _loader

    if ":" not in ref:
        raise PluginLoadError(f"{key}={ref!r}: expected `package.module:name` or `path/to/file.py:name`")
    try:
        resolved = resolve_reference(ref, base_dir, key)
    except RewardLoadError as e:
        raise PluginLoadError(str(e)) from None
    target, _, attr = resolved.rpartition(":")
    try:
        if target.endswith(".py") or "/" in target:
            module = _loader._import_file(Path(target), key, ref)
        else:
            module = _loader._import_module(target, key, ref)
    except RewardLoadError as e:
        raise PluginLoadError(str(e)) from None
    if not hasattr(module, attr):
        raise PluginLoadError(f"{key}={ref!r}: no attribute {attr!r} in {target}")
    obj = getattr(module, attr)
    if callable_with is not None:
        if not callable(obj):
            raise PluginLoadError(f"{key}={ref!r}: {attr!r} is a {type(obj).__name__}, not callable")
        try:
            inspect.signature(obj).bind(*([None] * callable_with))
        except TypeError as e:
            raise PluginLoadError(
                f"{key}={ref!r}: {attr}{inspect.signature(obj)} cannot be called with {callable_with} argument(s): {e}"
            ) from None
        except ValueError:
            pass
    return obj
