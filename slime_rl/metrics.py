"""The run's metrics sink: one place fans each step's metrics out to every destination.

    driver ── log(step, {...}) ───────┐
    eval   ── log_eval(step, {...}) ──┴─► MetricsLogger ─┬─► run_dir/metrics.jsonl   one line per call, flushed
                                                         ├─► run_dir/plots/*.png      every `plot_every` steps, atomic
                                                         ├─► wandb (run_dir/wandb)    wandb_sink.WandbSink: a failure costs one warning
                                                         └─► tqdm bar on stderr       progress.ProgressBar: step n/N, reward, staleness, ETA
    close() ──► Summary  (progress.summarize; summary_table() renders it for the console)

Metrics arrive already reduced (one float per slash-namespaced key per step); this module only
records and draws them. Nothing here may stop a run: wandb and plot failures are logged once and
the JSONL file keeps going.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from slime_rl.plots import (
    EVAL_PREFIX,
    PLOTS,
    REWARD_KEYS,
    PlotData,
    render,
    sorted_series,
)
from slime_rl.progress import ProgressBar, Summary, summarize, summary_table
from slime_rl.wandb_sink import WANDB_MODES, WandbSink

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOTS_DIR = "plots"
_RESERVED = frozenset({"step", "time", "kind"})
# Keys the logger keeps in memory (plots, summary, progress bar); everything else goes to disk only,
# so a 100k-step run with hundreds of keys does not hold them all.
_KEPT = frozenset(k for keys in PLOTS.values() for k in keys if "<" not in k) | {"buffer/staleness_mean"}


def _plots_of(key: str) -> Iterable[str]:
    for name, keys in PLOTS.items():
        if key in keys or (name == "eval_accuracy.png" and key.startswith(EVAL_PREFIX + "/")):
            yield name


def _clean(metrics: Mapping[str, Any]) -> dict[str, int | float | None]:
    """Metric values as JSON-safe numbers: ints stay ints, non-finite floats become None.

    Raises TypeError naming the key for a non-string key or a value that is not a number/None,
    and ValueError for the reserved keys `step`, `time` and `kind`.
    """
    out: dict[str, int | float | None] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric key {key!r} is a {type(key).__name__}; expected a str like 'train/loss'")
        if key in _RESERVED:
            raise ValueError(f"metric key {key!r} is reserved by the metrics file; rename it (e.g. 'train/{key}')")
        if hasattr(value, "item") and not isinstance(value, numbers.Number):
            try:
                value = value.item()  # 0-d tensors / arrays
            except (ValueError, RuntimeError) as e:
                raise TypeError(f"metric {key!r} is an array of shape {getattr(value, 'shape', '?')}; "
                                "expected one number (reduce it before logging)") from e
        if value is None:
            out[key] = None
        elif isinstance(value, numbers.Integral):
            out[key] = int(value)
        elif isinstance(value, numbers.Real):
            f = float(value)
            out[key] = f if math.isfinite(f) else None
        else:
            raise TypeError(f"metric {key!r} is {value!r} ({type(value).__name__}); expected a number or None")
    return out


def _read_kept(path: Path, start_step: int) -> tuple[list[str], int, int]:
    """Lines of an existing metrics file with step <= start_step, and counts of dropped later / bad lines."""
    kept: list[str] = []
    dropped = bad = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                step = obj["step"]
                if not isinstance(step, int):
                    raise TypeError(f"step is {step!r}")
            except (ValueError, KeyError, TypeError) as e:
                # A run killed mid-write leaves a partial last line; anything else is worth a look.
                logger.warning("%s line %d is not a metrics record (%s); dropped on resume", path, lineno, e)
                bad += 1
                continue
            if step <= start_step:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    return kept, dropped, bad


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class MetricsLogger:
    """Record a run's metrics to JSONL, PNG plots, wandb and a progress bar.

    Args:
        run_dir: run directory; writes `metrics.jsonl`, `plots/*.png` and `wandb/` there.
        total_steps: train steps of the run (progress bar total).
        start_step: last step completed before this session (resume); the bar starts there.
        wandb_mode: "offline" | "online" | "disabled".
        progress: show a tqdm bar on stderr (plain lines, 30 s apart, when stderr is not a TTY).
        plot_every: redraw plots every this many `log` calls (0 = only at `close`).
        resume: keep the metrics lines with step <= start_step and drop the rest; without it an
            existing metrics file is replaced.

    Steps are 1-based counts of completed train steps (the bar shows `step/total_steps`).
    `time` in each line is wall seconds since the run started; a resumed run continues from the
    last kept line's time.

    Raises ValueError for a bad wandb_mode, negative total_steps/start_step or plot_every.

    Example:
        >>> log = MetricsLogger(Path(run_dir), total_steps=2, wandb_mode="disabled", progress=False)
        >>> log.log(1, {"train/loss": 0.5, "rollout/reward_mean": 0.1})
        >>> log.log_eval(1, {"eval/accuracy": 0.4})
        >>> summary = log.close()   # summary.eval_accuracy_last == 0.4
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        start_step: int = 0,
        wandb_mode: str = "offline",
        wandb_project: str = "slime-rl",
        run_name: str = "run",
        config: dict | None = None,
        progress: bool = True,
        plot_every: int = 5,
        resume: bool = False,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode={wandb_mode!r}; expected one of {WANDB_MODES}")
        for name, value in (("total_steps", total_steps), ("start_step", start_step), ("plot_every", plot_every)):
            if value < 0:
                raise ValueError(f"{name}={value}; expected an integer >= 0")
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.plots_dir = self.run_dir / PLOTS_DIR
        self.total_steps = total_steps
        self.plot_every = plot_every
        self._lock = threading.Lock()
        self._closed = False
        self._summary: Summary | None = None
        self._warned: set[str] = set()
        # In-memory series: train (step, value) lists for _KEPT keys, eval {step: value} per key.
        self._train: dict[str, tuple[list[int], list[float]]] = {}
        self._eval: dict[str, dict[int, float]] = {}
        self._steps: set[int] = set()
        self._dirty: set[str] = set()
        self._plots_written: set[str] = set()
        self._since_plot = 0
        self._plot_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-plots")
        self._plot_job: Future[tuple[set[str], dict[str, str]]] | None = None
        self._last: dict[str, float] = {}

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.plots_dir.mkdir(exist_ok=True)
        self._time_offset = self._prepare_file(start_step, resume)
        self._t0 = time.monotonic()
        self._file = self.metrics_path.open("a", encoding="utf-8")
        self._wandb = WandbSink(
            self.run_dir,
            wandb_mode,
            project=wandb_project,
            name=run_name,
            config=config,
            resume=resume,
            start_step=start_step,
            metrics_path=self.metrics_path,
        )
        self._bar = ProgressBar(total_steps, start_step) if progress else None
        self._note: str | None = None

    # ---------------------------------------------------------------- public API

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one train step's metrics (slash-namespaced numbers; non-finite -> null).

        Writes and flushes one JSONL line `{"step", "time", **metrics}`, logs to wandb at `step`,
        advances the progress bar and redraws plots every `plot_every` calls.
        Raises TypeError/ValueError naming a bad key or value (see `_clean`), RuntimeError after close.
        """
        clean = _clean(metrics)
        with self._lock:
            self._check_open()
            self._write({"step": int(step), "time": self._elapsed(), **clean})
            self._remember(int(step), clean, kind="train")
            self._wandb.log(int(step), clean, kind="train")
            if self._bar is not None:
                self._refresh_postfix(refresh=False)
                self._bar.advance(int(step))
            self._since_plot += 1
            if self.plot_every and self._since_plot >= self.plot_every:
                self._maybe_draw()

    def log_eval(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record eval results of the policy at train step `step` (may arrive steps later).

        Appends their own line `{"step", "time", "kind": "eval", **metrics}`; in wandb they are
        plotted against `eval/step`, so a late result never rewrites an earlier train step.
        """
        clean = _clean(metrics)
        with self._lock:
            self._check_open()
            self._write({"step": int(step), "time": self._elapsed(), "kind": "eval", **clean})
            self._remember(int(step), clean, kind="eval")
            self._wandb.log(int(step), clean, kind="eval")
            self._refresh_postfix()

    def summary(self) -> Summary:
        """The run's summary so far (the final one after `close`)."""
        with self._lock:
            return self._summary or self._make_summary()

    def summary_table(self) -> str:
        """The summary as an aligned two-column text table naming the metrics and plot paths."""
        return summary_table(self.summary())

    def close(self, exit_code: int = 0) -> Summary:
        """Draw the final plots, finish wandb (with `exit_code`), close the bar and file. Idempotent."""
        with self._lock:
            if self._summary is not None:
                return self._summary
            # A close interrupted part-way (a second Ctrl-C while the final plots draw) is finished
            # by the next call without waiting for plots again: the JSONL file is what must survive.
            interrupted = self._closed
            self._closed = True
            if not interrupted:
                self._maybe_draw(wait=True)
            self._plot_pool.shutdown(wait=not interrupted, cancel_futures=interrupted)
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self._wandb.finish(exit_code=exit_code)
            self._file.close()
            self._summary = self._make_summary()
            return self._summary

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.close(exit_code=0 if exc_type is None else 1)

    # ---------------------------------------------------------------- JSONL

    def _prepare_file(self, start_step: int, resume: bool) -> float:
        """Truncate (fresh run) or filter (resume) the metrics file; return the resumed wall time."""
        path = self.metrics_path
        if not path.exists():
            return 0.0
        if not resume:
            if path.stat().st_size:
                logger.warning("%s exists and resume is off: starting a new metrics file", path)
            _atomic_write_text(path, "")
            return 0.0
        kept, dropped, bad = _read_kept(path, start_step)
        if dropped or bad:
            logger.info("resume at step %d: dropped %d later and %d unreadable lines of %s", start_step, dropped, bad, path)
            _atomic_write_text(path, "".join(kept))
        offset = 0.0
        for line in kept:
            obj = json.loads(line)
            metrics = {k: v for k, v in obj.items() if k not in _RESERVED}
            kind = "eval" if obj.get("kind") == "eval" else "train"
            self._remember(obj["step"], metrics, kind=kind)
            if isinstance(obj.get("time"), (int, float)):
                offset = max(offset, float(obj["time"]))
        return offset

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()  # a SIGKILLed run keeps every line written so far

    def _elapsed(self) -> float:
        return round(self._time_offset + time.monotonic() - self._t0, 3)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricsLogger for {self.run_dir} is closed")

    def _remember(self, step: int, metrics: Mapping[str, Any], *, kind: str) -> None:
        if kind == "train":
            self._steps.add(step)
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith(EVAL_PREFIX):
                self._eval.setdefault(key, {})[step] = float(value)
                self._dirty.add("eval_accuracy.png")
            elif kind == "train" and key in _KEPT:
                steps, values = self._train.setdefault(key, ([], []))
                steps.append(step)
                values.append(float(value))
                self._last[key] = float(value)
                self._dirty.update(_plots_of(key))

    # ---------------------------------------------------------------- progress bar

    def _refresh_postfix(self, refresh: bool = True) -> None:
        if self._bar is None:
            return
        evals = self._eval.get(EVAL_PREFIX)
        self._bar.show(
            reward=next((self._last[k] for k in REWARD_KEYS if k in self._last), None),
            staleness=self._last.get("buffer/staleness_mean"),
            samples_per_s=self._last.get("perf/samples_per_s"),
            eval_accuracy=evals[max(evals)] if evals else None,  # the latest evaluated step, not the latest to arrive
            engines=self._last.get("rollout/num_engines"),
            note=self._note,
            refresh=refresh,
        )

    def set_note(self, note: str | None) -> None:
        """A transient remark shown first in the progress bar (e.g. "waiting: 0 engines"); None
        clears it."""
        if note != self._note:
            self._note = note
            self._refresh_postfix()

    # ---------------------------------------------------------------- plots

    def _maybe_draw(self, *, wait: bool = False) -> None:
        """Redraw the plots whose data changed, on the plot thread so `log` never waits for
        matplotlib (a redraw still in progress postpones this one); `wait` draws and returns."""
        self._since_plot = 0
        if self._plot_job is not None:
            if not (wait or self._plot_job.done()):
                return
            self._collect(self._plot_job.result())
            self._plot_job = None
        if not self._dirty:
            return
        data = PlotData(
            train={k: sorted_series(x, y) for k, (x, y) in self._train.items()},
            eval={k: sorted_series(list(v), list(v.values())) for k, v in self._eval.items()},
        )
        names, self._dirty = sorted(self._dirty), set()
        if wait:
            self._collect(render(names, data, self.plots_dir))
        else:
            self._plot_job = self._plot_pool.submit(render, names, data, self.plots_dir)

    def _warn_once(self, topic: str, msg: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(msg, *args)

    def _collect(self, result: tuple[set[str], dict[str, str]]) -> None:
        written, errors = result
        self._plots_written |= written
        for name, error in errors.items():
            self._warn_once(f"plot:{name}", "could not draw %s (%s); metrics are in %s", name, error, self.metrics_path)

    # ---------------------------------------------------------------- summary

    def _make_summary(self) -> Summary:
        return summarize(
            train=self._train,
            evals=self._eval,
            steps=self._steps,
            wall_s=self._elapsed(),
            metrics_path=self.metrics_path,
            plots_dir=self.plots_dir,
            plots=self._plots_written,
        )
