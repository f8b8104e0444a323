"""Resolve ``reward.fn`` references into checked, callable reward components at start-up.

    "math_answer"                      -> registry.BUILTINS -> module:attr
    "my_pkg.rewards:score"             -> importlib.import_module("my_pkg.rewards").score
    "examples/custom_reward/r.py:score" -> module loaded from that file, attribute `score`

Every failure raises :class:`RewardLoadError` (a ``ValueError``) naming the config key, the
reference and the reason: no such file, no such module, no such attribute, not callable,
or a signature that cannot take ``(sample, **kwargs)``. A class is instantiated once with
the kwargs and its instances are called per sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from slime_rl.rewards.protocol import is_batched, is_queued, kwargs_check
from slime_rl.rewards.registry import BUILTINS

logger = logging.getLogger(__name__)

_EXPECTED = "a reward is `def fn(sample, **kwargs) -> float | dict` (or a batched `fn(samples, **kwargs) -> list`)"


class RewardLoadError(ValueError):
    """A reward reference that cannot be used; the message names the key, reference and reason."""


@dataclasses.dataclass(frozen=True)
class RewardComponent:
    """One loaded, checked reward term."""

    name: str
    """Metric name of the term."""
    ref: str
    """The reference it was loaded from (file paths made absolute)."""
    fn: Callable[..., Any]
    """The function, or the instance built from a class reference."""
    kwargs: Mapping[str, Any]
    """Keyword arguments for each call (empty for class references: the constructor took them)."""
    weight: float = 1.0
    is_async: bool = False
    is_batched: bool = False
    is_queued: bool = False
    """Declared with ``@queued``: its timeout starts at ``work_started()``, not at the call."""
    load_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    """The kwargs it was loaded with (a worker process rebuilds it from ``ref`` and these)."""


def _fail(key: str, ref: str, reason: str) -> RewardLoadError:
    return RewardLoadError(f"{key}={ref!r}: {reason}")


def split_reference(ref: str, key: str = "reward.fn") -> tuple[str, str]:
    """Split ``target:attr`` (after expanding built-in names) into its two parts."""
    ref = ref.strip()
    if ":" not in ref:
        if ref in BUILTINS:
            ref = BUILTINS[ref]
        else:
            raise _fail(
                key,
                ref,
                "not a built-in reward name and not of the form `package.module:function` "
                f"or `path/to/file.py:function`; built-ins: {sorted(BUILTINS)}",
            )
    target, _, attr = ref.rpartition(":")
    if not target or not attr:
        raise _fail(key, ref, "expected `package.module:function` or `path/to/file.py:function`")
    return target, attr


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def resolve_reference(ref: str, base_dir: str | Path | None = None, key: str = "reward.fn") -> str:
    """The reference with a file path made absolute (against ``base_dir``, default the cwd).

    Use it on the driver before shipping the config to workers whose cwd may differ.
    """
    target, attr = split_reference(ref, key)
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        return f"{path.resolve()}:{attr}"
    return f"{target}:{attr}"


def _import_file(path: Path, key: str, ref: str) -> Any:
    if not path.is_file():
        raise _fail(key, ref, f"no such file: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_slime_rl_reward_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise _fail(key, ref, f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Siblings of the file (helper modules) are importable while the file itself is imported
    # (imports at its top); the folder is not left on the process-wide sys.path afterwards.
    folder = str(path.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:  # KeyboardInterrupt still stops the program
        del sys.modules[mod_name]
        raise _fail(key, ref, f"importing {path} failed: {type(e).__name__}: {e}") from e
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
    return module


def _import_module(target: str, key: str, ref: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise _fail(key, ref, f"no such module: {target!r} ({e})") from e
        raise _fail(key, ref, f"importing module {target!r} failed: {type(e).__name__}: {e}") from e
    except (Exception, SystemExit) as e:
        raise _fail(key, ref, f"importing module {target!r} failed: {type(e).__name__}: {e}") from e


def _check_call(fn: Callable[..., Any], kwargs: Mapping[str, Any], what: str, key: str, ref: str) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some C callables have no signature; nothing to check
    try:
        sig.bind(object(), **kwargs)
    except TypeError as e:
        shown = ", ".join(f"{k}=..." for k in kwargs)
        call = f"{what}(sample{', ' + shown if shown else ''})"
        raise _fail(key, ref, f"wrong signature {what}{sig}: cannot call {call}: {e}; {_EXPECTED}") from e


def _is_async(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004
    return not inspect.isfunction(fn) and inspect.iscoroutinefunction(call)


def load_reward(
    ref: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    weight: float = 1.0,
    name: str | None = None,
    base_dir: str | Path | None = None,
    key: str = "reward.fn",
) -> RewardComponent:
    """Import and check one reward reference; raise :class:`RewardLoadError` if unusable.

    >>> c = load_reward("exact_match")
    >>> c.name, c.is_async, c.is_batched
    ('exact_match', False, False)
    """
    kwargs = dict(kwargs or {})
    target, attr = split_reference(ref, key)
    default_name = ref.strip() if ref.strip() in BUILTINS else attr
    if _is_file_target(target):
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        path = path.resolve()
        module = _import_file(path, key, ref)
        resolved = f"{path}:{attr}"
        where = f"file {path}"
    else:
        module = _import_module(target, key, ref)
        resolved = f"{target}:{attr}"
        where = f"module {target!r}"
    if not hasattr(module, attr):
        public = sorted(n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n)))
        raise _fail(key, ref, f"no attribute {attr!r} in {where}; callables there: {public[:20]}")
    obj = getattr(module, attr)
    if not callable(obj):
        raise _fail(key, ref, f"{attr!r} in {where} is a {type(obj).__name__}, not callable")

    if inspect.isclass(obj):
        try:
            inspect.signature(obj).bind(**kwargs)
        except TypeError as e:
            raise _fail(key, ref, f"wrong constructor arguments for {attr}{inspect.signature(obj)}: {e}") from e
        except ValueError:
            pass
        try:
            fn: Callable[..., Any] = obj(**kwargs)
        except Exception as e:
            raise _fail(key, ref, f"constructing {attr}(**{kwargs}) failed: {type(e).__name__}: {e}") from e
        if not callable(fn):
            raise _fail(key, ref, f"instances of class {attr} are not callable; define __call__(self, sample)")
        _check_call(fn, {}, f"{attr}.__call__", key, ref)
        call_kwargs: dict[str, Any] = {}
    else:
        fn = obj
        _check_call(fn, kwargs, attr, key, ref)
        check = kwargs_check(fn)
        if check is not None:
            try:
                check(**kwargs)
            except (TypeError, ValueError) as e:
                raise _fail(key, ref, f"bad kwargs: {e}") from e
        call_kwargs = kwargs
    return RewardComponent(
        name=name or default_name,
        ref=resolved,
        fn=fn,
        kwargs=call_kwargs,
        weight=float(weight),
        is_async=_is_async(fn),
        is_batched=is_batched(fn) or is_batched(obj),
        is_queued=is_queued(fn) or is_queued(obj),
        load_kwargs=kwargs,
    )


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (kwargs must not carry DictConfig into user code)."""
    if hasattr(value, "_metadata") and hasattr(value, "_get_node"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _terms(cfg: Any) -> list[tuple[str, str, dict[str, Any], float, str | None]]:
    """``(config key, ref, kwargs, weight, name)`` of every term of a ``RewardConfig``."""
    combine = list(cfg.combine or [])
    if not combine:
        return [("reward.fn", cfg.fn, dict(_plain(cfg.kwargs) or {}), 1.0, None)]
    default_fn = type(cfg)().fn if dataclasses.is_dataclass(cfg) else None
    if cfg.fn != default_fn or cfg.kwargs:
        logger.warning("reward.combine is set, so reward.fn=%r and reward.kwargs are ignored", cfg.fn)
    return [
        (f"reward.combine[{i}].fn", t.fn, dict(_plain(t.kwargs) or {}), float(t.weight), t.name)
        for i, t in enumerate(combine)
    ]


def components_from_config(cfg: Any, base_dir: str | Path | None = None) -> list[RewardComponent]:
    """Load and check every term of a ``RewardConfig`` (``combine`` if set, else ``fn``)."""
    return [
        load_reward(ref, kwargs, weight=weight, name=name, base_dir=base_dir, key=key)
        for key, ref, kwargs, weight, name in _terms(cfg)
    ]


def resolve_config(cfg: Any, base_dir: str | Path | None = None) -> Any:
    """Check a ``RewardConfig`` at start-up and return a copy with absolute file references.

    The driver calls this before any generation, then ships the result to rollout managers
    (whose working directory may differ). Raises ``RewardLoadError`` on the first bad term.
    """
    components_from_config(cfg, base_dir)
    if cfg.combine:
        combine = [
            dataclasses.replace(t, fn=resolve_reference(t.fn, base_dir, f"reward.combine[{i}].fn"))
            for i, t in enumerate(cfg.combine)
        ]
        return dataclasses.replace(cfg, combine=combine)
    return dataclasses.replace(cfg, fn=resolve_reference(cfg.fn, base_dir))
