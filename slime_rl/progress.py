"""What a person watching a run sees: the progress bar on stderr and the end-of-run summary.

Presentation only, kept apart from the records (`metrics.py` writes the JSONL file, plots and
wandb): the bar and the summary read the series `MetricsLogger` keeps and never change them, so
how they look can change without touching what a run records.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from slime_rl.plots import EVAL_PREFIX, REWARD_KEYS


class _LineStream:
    """A stream for tqdm when stderr is not a terminal: each refresh becomes one plain line
    instead of carriage-return overwrites, so log files stay readable."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, s: str) -> int:
        text = s.replace("\r", "").rstrip()
        if text:
            self._stream.write(text + "\n")
        return len(s)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class ProgressBar:
    """A tqdm bar on stderr: `step n/N`, ETA, and the latest reward, staleness, throughput and
    eval accuracy. Without a terminal it writes plain lines, 30 s apart.

    Example:
        >>> bar = ProgressBar(total_steps=100, start_step=0)
        >>> bar.show(reward=0.5, staleness=1.0, samples_per_s=12.0, eval_accuracy=None, refresh=False)
        >>> bar.advance(1)
        >>> bar.close()
    """

    def __init__(self, total_steps: int, start_step: int) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="step",
            unit="step",
            file=sys.stderr if tty else _LineStream(sys.stderr),
            mininterval=0.5 if tty else 30.0,
            dynamic_ncols=tty,
            ncols=None if tty else 120,
        )

    def advance(self, step: int) -> None:
        """Move the bar to `step` (a step at or before the bar's position leaves it)."""
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)

    def show(
        self,
        *,
        reward: float | None,
        staleness: float | None,
        samples_per_s: float | None,
        eval_accuracy: float | None,
        engines: float | None = None,
        note: str | None = None,
        refresh: bool = True,
    ) -> None:
        """Set the numbers after the bar (None or non-finite ones are left out); `note` (e.g.
        "waiting: 0 engines") goes first while it is set."""
        parts = [note] if note else []
        for label, value, fmt in (
            ("reward", reward, ".3f"),
            ("stale", staleness, ".2f"),
            ("samples/s", samples_per_s, ".1f"),
            ("eval", eval_accuracy, ".3f"),
            ("engines", engines, ".0f"),
        ):
            if value is not None and math.isfinite(value):
                parts.append(f"{label}={value:{fmt}}")
        self._bar.set_postfix_str(" ".join(parts), refresh=refresh)

    def close(self) -> None:
        self._bar.close()


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    """End-of-run numbers. Accuracies are fractions in [0, 1]; `None` where a series never appeared."""

    steps: int
    """Distinct train steps logged (including those kept from before a resume)."""
    last_step: int | None
    wall_s: float
    """Wall seconds since the run started, summed over resumed sessions."""
    eval_accuracy_first: float | None
    eval_accuracy_first_step: int | None
    eval_accuracy_last: float | None
    eval_accuracy_last_step: int | None
    eval_accuracy_best: float | None
    eval_accuracy_best_step: int | None
    reward_first10_mean: float | None
    """Mean reward (rollout/reward_mean, else train/reward_mean) over the first 10 logged steps."""
    reward_last10_mean: float | None
    samples_per_s_mean: float | None
    """Mean of perf/samples_per_s over the steps that logged it."""
    metrics_path: Path
    plots_dir: Path
    plots: tuple[str, ...]
    """Plot files written so far (names under plots_dir)."""


def summarize(
    *,
    train: Mapping[str, tuple[list[int], list[float]]],
    evals: Mapping[str, Mapping[int, float]],
    steps: Collection[int],
    wall_s: float,
    metrics_path: Path,
    plots_dir: Path,
    plots: Iterable[str],
) -> Summary:
    """The summary of the series a `MetricsLogger` keeps: train key -> (steps, values) in
    arrival order, eval key -> {step: value}, and the distinct train steps logged."""
    accuracy = sorted(evals.get(EVAL_PREFIX, {}).items())
    best = max(accuracy, key=lambda p: p[1], default=None)  # earliest step on ties
    reward_key = next((k for k in REWARD_KEYS if k in train), None)
    rewards = [v for _, v in sorted(zip(*train[reward_key]))] if reward_key else []
    sps = train.get("perf/samples_per_s", ([], []))[1]
    return Summary(
        steps=len(steps),
        last_step=max(steps, default=None),
        wall_s=wall_s,
        eval_accuracy_first=accuracy[0][1] if accuracy else None,
        eval_accuracy_first_step=accuracy[0][0] if accuracy else None,
        eval_accuracy_last=accuracy[-1][1] if accuracy else None,
        eval_accuracy_last_step=accuracy[-1][0] if accuracy else None,
        eval_accuracy_best=best[1] if best else None,
        eval_accuracy_best_step=best[0] if best else None,
        reward_first10_mean=float(np.mean(rewards[:10])) if rewards else None,
        reward_last10_mean=float(np.mean(rewards[-10:])) if rewards else None,
        samples_per_s_mean=float(np.mean(sps)) if sps else None,
        metrics_path=metrics_path,
        plots_dir=plots_dir,
        plots=tuple(sorted(plots)),
    )


def summary_table(s: Summary) -> str:
    """The summary as an aligned two-column text table naming the metrics and plot paths."""

    def num(v: float | None, fmt: str = ".3f") -> str:
        return "-" if v is None else format(v, fmt)

    def at(v: float | None, step: int | None) -> str:
        return "-" if v is None else f"{v:.3f} (step {step})"

    rows = [
        ("steps", f"{s.steps}" + (f" (last {s.last_step})" if s.last_step is not None else "")),
        ("wall time", _hms(s.wall_s)),
        ("eval accuracy first", at(s.eval_accuracy_first, s.eval_accuracy_first_step)),
        ("eval accuracy last", at(s.eval_accuracy_last, s.eval_accuracy_last_step)),
        ("eval accuracy best", at(s.eval_accuracy_best, s.eval_accuracy_best_step)),
        ("reward first 10 steps", num(s.reward_first10_mean)),
        ("reward last 10 steps", num(s.reward_last10_mean)),
        ("samples/s (mean)", num(s.samples_per_s_mean, ".2f")),
        ("metrics", str(s.metrics_path)),
        ("plots", f"{s.plots_dir}/ ({', '.join(s.plots) or 'none yet'})"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["run summary", *(f"  {k.ljust(width)}  {v}" for k, v in rows)])


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"
