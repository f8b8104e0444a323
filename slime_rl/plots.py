"""The run's plots: which PNGs exist, what each draws, and drawing them (matplotlib, Agg, no pyplot).

`metrics.MetricsLogger` keeps the series in memory and calls `render` on its plot thread; every
plot is written atomically (`.name.tmp`, then renamed), and a plot that fails to draw is reported
back, never raised: the run goes on.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

REWARD_KEYS = ("rollout/reward_mean", "train/reward_mean")
EVAL_PREFIX = "eval/accuracy"
IDLE_KEYS = ("perf/trainer_idle_frac", "rollout/engine_idle_frac")
IDLE_LABELS = {"perf/trainer_idle_frac": "trainer idle", "rollout/engine_idle_frac": "engines idle"}

PLOTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "reward.png": REWARD_KEYS,
        "eval_accuracy.png": ("eval/accuracy", "eval/accuracy/<mode>"),
        "response_length.png": ("rollout/response_len_mean",),
        "throughput.png": ("perf/samples_per_s", "perf/tokens_per_s", *IDLE_KEYS),
        "engines.png": ("rollout/num_engines", "rollout/engines_target"),
        "distill.png": ("distill/reverse_kl", "distill/teacher_logprob", "distill/student_logprob"),
    }
)
"""Plot file name (under run_dir/plots) -> the metric keys it draws, in order of preference for
reward.png (the first key present is used). `<mode>` stands for any think/non_think mode."""


def _ema(y: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing), skipping NaN gaps."""
    out = np.full_like(y, np.nan)
    acc = norm = 0.0
    for i, v in enumerate(y):
        if not math.isnan(v):
            acc = weight * acc + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        if norm:
            out[i] = acc / norm
    return out


@dataclasses.dataclass(frozen=True, slots=True)
class PlotData:
    """A copy of the series the plots read, handed to the plot thread: key -> (steps, values)."""

    train: dict[str, tuple[np.ndarray, np.ndarray]]
    eval: dict[str, tuple[np.ndarray, np.ndarray]]


def sorted_series(steps: list[int], values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) as float arrays in step order (a step logged twice keeps both points)."""
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def render(names: Iterable[str], data: PlotData, plots_dir: Path) -> tuple[set[str], dict[str, str]]:
    """Draw each named plot into plots_dir atomically; return (written names, {name: error})."""
    written: set[str] = set()
    errors: dict[str, str] = {}
    for name in names:
        try:
            fig = DRAW[name](data)
            if fig is None:  # none of its series logged yet
                continue
            tmp = plots_dir / f".{name}.tmp"
            fig.savefig(tmp, format="png", dpi=80)
            os.replace(tmp, plots_dir / name)
            written.add(name)
        except Exception as e:  # a plot is a convenience; the run goes on
            errors[name] = f"{type(e).__name__}: {e}"
    return written, errors


def _plot_reward(data: PlotData) -> Any:
    key = next((k for k in REWARD_KEYS if k in data.train), None)
    if key is None:
        return None
    x, y = data.train[key]
    fig, (ax,) = _figure()
    ax.plot(x, y, color="tab:blue", alpha=0.3, lw=1, label=key)
    ax.plot(x, _ema(y), color="tab:blue", lw=2, label="smoothed (EMA 0.9)")
    _decorate(ax, "reward", "mean reward")
    return fig


def _plot_eval(data: PlotData) -> Any:
    if not data.eval:
        return None
    fig, (ax,) = _figure()
    for key in sorted(data.eval, key=lambda k: (k != EVAL_PREFIX, k)):
        main = key == EVAL_PREFIX
        label = key if main else key.removeprefix(EVAL_PREFIX + "/")
        ax.plot(*data.eval[key], marker="o", ms=4 if main else 3, lw=2 if main else 1, label=label)
    _decorate(ax, "eval accuracy", "accuracy")
    return fig


def _plot_response_length(data: PlotData) -> Any:
    if "rollout/response_len_mean" not in data.train:
        return None
    fig, (ax,) = _figure()
    ax.plot(*data.train["rollout/response_len_mean"], color="tab:green", lw=1)
    _decorate(ax, "response length", "tokens (mean)", legend=False)
    return fig


def _plot_engines(data: PlotData) -> Any:
    """Engines serving per step (and the target), with samples/s: how capacity moved the run."""
    serving = data.train.get("rollout/num_engines")
    if serving is None:
        return None
    fig, (ax,) = _figure()
    lines = ax.step(*serving, where="post", color="tab:purple", lw=1.5, label="engines serving")
    if "rollout/engines_target" in data.train:
        lines += ax.step(*data.train["rollout/engines_target"], where="post", color="tab:gray", lw=1, ls="--", label="target")
    ax.set_ylabel("engines")
    if "perf/samples_per_s" in data.train:
        top = ax.twinx()
        lines += top.plot(*data.train["perf/samples_per_s"], color="tab:blue", lw=1, alpha=0.7, label="samples/s")
        top.set_ylabel("samples/s")
    ax.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)
    ax.set_title("rollout capacity")
    ax.grid(alpha=0.3)
    ax.set_xlabel("step")
    return fig


def _plot_throughput(data: PlotData) -> Any:
    samples, tokens = data.train.get("perf/samples_per_s"), data.train.get("perf/tokens_per_s")
    idle = [k for k in IDLE_KEYS if k in data.train]
    rates = samples is not None or tokens is not None
    if not rates and not idle:
        return None
    fig, axes = _figure(int(rates) + int(bool(idle)))
    if rates:
        ax = top = axes[0]
        lines = []
        if samples is not None:
            lines += ax.plot(*samples, color="tab:blue", lw=1, label="samples/s")
            ax.set_ylabel("samples/s")
        if tokens is not None:
            top = ax.twinx() if samples is not None else ax  # tokens/s is ~1000x samples/s
            lines += top.plot(*tokens, color="tab:orange", lw=1, label="tokens/s")
            top.set_ylabel("tokens/s")
        top.legend(lines, [ln.get_label() for ln in lines], loc="best", fontsize=8)  # on the axes drawn last
        ax.set_title("throughput")
        ax.grid(alpha=0.3)
    if idle:
        ax = axes[-1]
        for key in idle:
            ax.plot(*data.train[key], lw=1, label=IDLE_LABELS[key])
        ax.set_ylim(-0.02, 1.02)
        _decorate(ax, "idle fraction (which side limits the run)", "fraction idle")
    axes[-1].set_xlabel("step")
    return fig


def _plot_distill(data: PlotData) -> Any:
    """On-policy distillation (trainer.distill): reverse KL to the teacher, and the two log-probs."""
    if "distill/reverse_kl" not in data.train:
        return None
    fig, (ax, lp) = _figure(2)
    x, y = data.train["distill/reverse_kl"]
    ax.plot(x, y, color="tab:red", alpha=0.3, lw=1, label="distill/reverse_kl")
    ax.plot(x, _ema(y), color="tab:red", lw=2, label="smoothed (EMA 0.9)")
    _decorate(ax, "reverse KL to the teacher (per token)", "nats")
    for key, label in (("distill/teacher_logprob", "teacher"), ("distill/student_logprob", "student")):
        if key in data.train:
            lp.plot(*data.train[key], lw=1, label=label)
    _decorate(lp, "log-prob of the sampled tokens", "mean log-prob")
    return fig


DRAW = {
    "reward.png": _plot_reward,
    "eval_accuracy.png": _plot_eval,
    "response_length.png": _plot_response_length,
    "throughput.png": _plot_throughput,
    "engines.png": _plot_engines,
    "distill.png": _plot_distill,
}
assert set(DRAW) == set(PLOTS)


def _figure(rows: int = 1) -> tuple[Any, list[Any]]:
    """A pyplot-free Agg figure with `rows` stacked axes sharing x (no global figure registry)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 1.6 + 2.4 * rows))
    axes = list(fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    fig.subplots_adjust(left=0.1, right=0.89, top=0.93, bottom=0.16 if rows == 1 else 0.09, hspace=0.35)
    return fig, axes


def _decorate(ax: Any, title: str, ylabel: str, *, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(loc="best", fontsize=8)
