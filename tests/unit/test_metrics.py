"""The metrics sink (slime_rl.metrics) with its wandb sink (slime_rl.wandb_sink) and progress bar and
summary (slime_rl.progress): JSONL lines and flush, resume truncation, plots, wandb fallbacks,
progress bar, summary."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest

from slime_rl.metrics import PLOTS, MetricsLogger

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _logger(run_dir: Path, total: int = 10, **kw) -> MetricsLogger:
    kw.setdefault("wandb_mode", "disabled")
    kw.setdefault("progress", False)
    return MetricsLogger(run_dir, total, **kw)


def _assert_png(path: Path) -> None:
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as im:
        im.verify()


def test_jsonl_lines_are_flushed_and_sorted_while_open(tmp_path: Path) -> None:
    log = _logger(tmp_path)
    log.log(1, {"train/loss": 0.5, "rollout/reward_mean": 0.25, "eval/version": np.int64(3)})
    log.log(2, {"train/loss": np.float32(0.25)})
    log.log_eval(1, {"eval/accuracy": 0.4, "eval/accuracy/think": 0.3})

    # Read back while the logger is still open: every call is already on disk.
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in raw]
    assert [r["step"] for r in rows] == [1, 2, 1]
    assert rows[0]["train/loss"] == 0.5 and rows[0]["rollout/reward_mean"] == 0.25
    assert rows[0]["eval/version"] == 3 and isinstance(rows[0]["eval/version"], int)
    assert rows[1]["train/loss"] == 0.25
    assert "kind" not in rows[0] and rows[2]["kind"] == "eval" and rows[2]["eval/accuracy/think"] == 0.3
    for row in rows:
        assert list(row) == sorted(row)  # keys sorted in the file itself
        assert row["time"] >= 0
    assert rows[0]["time"] <= rows[1]["time"] <= rows[2]["time"]
    log.close()


def test_non_finite_values_become_null(tmp_path: Path) -> None:
    with _logger(tmp_path) as log:
        log.log(1, {"a/nan": float("nan"), "a/inf": math.inf, "a/ninf": -math.inf,
                    "a/np_nan": np.float32("nan"), "a/none": None, "a/ok": 1.5, "a/arr": np.array(2.0)})
    (row,) = _lines(tmp_path / "metrics.jsonl")
    assert row["a/nan"] is None and row["a/inf"] is None and row["a/ninf"] is None
    assert row["a/np_nan"] is None and row["a/none"] is None
    assert row["a/ok"] == 1.5 and row["a/arr"] == 2.0
    assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_bad_keys_and_values_are_refused_and_nothing_written(tmp_path: Path) -> None:
    log = _logger(tmp_path)
    with pytest.raises(TypeError, match="train/name"):
        log.log(1, {"train/loss": 1.0, "train/name": "abc"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        log.log(1, {"step": 3.0})
    with pytest.raises(TypeError, match="expected a str"):
        log.log(1, {7: 1.0})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"'train/per_token' is an array of shape \(3,\)"):
        log.log(1, {"train/per_token": np.ones(3)})
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    log.close()
    with pytest.raises(RuntimeError, match="closed"):
        log.log(2, {"train/loss": 1.0})


def test_bad_arguments_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="wandb_mode='cloud'"):
        _logger(tmp_path, wandb_mode="cloud")
    with pytest.raises(ValueError, match="plot_every=-1"):
        _logger(tmp_path, plot_every=-1)


def test_resume_keeps_lines_up_to_start_step_and_drops_the_rest(tmp_path: Path) -> None:
    with _logger(tmp_path) as log:
        for step in range(1, 11):
            log.log(step, {"rollout/reward_mean": float(step)})
            if step in (4, 8):
                log.log_eval(step, {"eval/accuracy": step / 10})
    path = tmp_path / "metrics.jsonl"
    last_time = _lines(path)[5]["time"]  # step 6
    with path.open("a") as f:
        f.write('{"step": 11, "rollout/rew')  # a line cut off by SIGKILL

    log = _logger(tmp_path, start_step=6, resume=True)
    rows = _lines(path)  # rewritten before the first new step
    assert [(r["step"], r.get("kind")) for r in rows] == [(1, None), (2, None), (3, None), (4, None),
                                                         (4, "eval"), (5, None), (6, None)]
    log.log(7, {"rollout/reward_mean": 7.0})
    summary = log.close()
    rows = _lines(path)
    assert [r["step"] for r in rows if r.get("kind") != "eval"] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[-1]["time"] >= last_time  # wall time continues across the resume
    assert summary.steps == 7 and summary.last_step == 7
    assert summary.eval_accuracy_last == 0.4 and summary.eval_accuracy_last_step == 4
    assert summary.reward_first10_mean == pytest.approx(4.0)  # mean of 1..7: kept lines count
    assert not list(tmp_path.glob(".*.tmp"))


def test_fresh_run_replaces_an_old_metrics_file(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 0.0}\n{"step": 2, "time": 1.0}\n')
    with _logger(tmp_path) as log:
        log.log(1, {"train/loss": 1.0})
    assert [r["train/loss"] for r in _lines(tmp_path / "metrics.jsonl")] == [1.0]


def test_plots_written_at_close_are_valid_pngs(tmp_path: Path) -> None:
    log = _logger(tmp_path, total=40, plot_every=0)
    for step in range(1, 41):
        log.log(step, {"rollout/reward_mean": step / 40, "rollout/response_len_mean": 30.0 + step,
                       "perf/samples_per_s": 8.0, "perf/tokens_per_s": 800.0,
                       "perf/trainer_idle_frac": 0.1, "rollout/engine_idle_frac": 0.3,
                       "rollout/num_engines": 1.0 + (step > 20), "rollout/engines_target": 2.0,
                       "distill/reverse_kl": 3.0 - step / 20, "distill/teacher_logprob": -5.0 + step / 20,
                       "distill/student_logprob": -2.0})
        if step % 10 == 0:
            log.log_eval(step, {"eval/accuracy": step / 50, "eval/accuracy/think": step / 60,
                                "eval/accuracy/non_think": step / 45})
    assert not list((tmp_path / "plots").iterdir())  # plot_every=0: nothing before close
    summary = log.close()
    assert set(summary.plots) == set(PLOTS)
    for name in PLOTS:
        _assert_png(tmp_path / "plots" / name)
    assert not list((tmp_path / "plots").glob(".*"))  # no temp files left


def test_plot_points_are_drawn_in_step_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slime_rl.plots as plots

    drawn: list[np.ndarray] = []
    real = plots.DRAW["reward.png"]
    monkeypatch.setitem(plots.DRAW, "reward.png",
                        lambda data: drawn.append(data.train["rollout/reward_mean"][1]) or real(data))
    log = _logger(tmp_path)
    for step in (1, 3, 2):  # e.g. a step re-logged after an out-of-order report
        log.log(step, {"rollout/reward_mean": float(step)})
    log.close()
    np.testing.assert_array_equal(drawn[0], [1.0, 2.0, 3.0])


def test_a_failing_plot_warns_once_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import slime_rl.plots as plots

    def broken(data: object) -> None:
        raise ValueError("bad axis")

    monkeypatch.setitem(plots.DRAW, "reward.png", broken)
    with caplog.at_level(logging.WARNING, logger="slime_rl.metrics"):
        log = _logger(tmp_path, plot_every=1)
        for step in range(1, 4):
            log.log(step, {"rollout/reward_mean": 0.5, "rollout/response_len_mean": 10.0})
        summary = log.close()
    assert summary.plots == ("response_length.png",)
    assert [r.getMessage() for r in caplog.records if "could not draw" in r.getMessage()] == [
        f"could not draw reward.png (ValueError: bad axis); metrics are in {tmp_path / 'metrics.jsonl'}"
    ]
    assert len(_lines(tmp_path / "metrics.jsonl")) == 3


def test_missing_series_are_skipped_and_plots_redraw_during_the_run(tmp_path: Path) -> None:
    log = _logger(tmp_path, total=10, plot_every=2)
    log.log(1, {"train/reward_mean": 0.1})
    log.log(2, {"train/reward_mean": 0.2})  # second call: redraw on the plot thread
    reward = tmp_path / "plots" / "reward.png"
    deadline = time.monotonic() + 30
    while not reward.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _assert_png(reward)
    summary = log.close()
    assert summary.plots == ("reward.png",)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["reward.png"]


def test_redraw_of_1000_steps_is_fast(tmp_path: Path) -> None:
    log = _logger(tmp_path, total=1000, plot_every=0)
    rng = np.random.default_rng(0)
    for step in range(1, 1001):
        log.log(step, {"rollout/reward_mean": rng.random(), "rollout/response_len_mean": 50 + rng.random(),
                       "perf/samples_per_s": 10 + rng.random(), "perf/tokens_per_s": 900 + rng.random(),
                       "perf/trainer_idle_frac": rng.random(), "rollout/engine_idle_frac": rng.random()})
        if step % 50 == 0:
            log.log_eval(step, {"eval/accuracy": rng.random(), "eval/accuracy/think": rng.random()})
    log.close()  # first draw pays matplotlib's import and font cache
    log._dirty.update(PLOTS)
    start = time.perf_counter()
    log._maybe_draw(wait=True)
    elapsed = time.perf_counter() - start
    # ~0.3 s on an idle core; the bound leaves room for a shared, loaded CI machine.
    assert elapsed < 2.0, f"redrawing 4 plots of 1,000 steps took {elapsed:.2f} s"


def test_summary_numbers_and_table(tmp_path: Path) -> None:
    log = _logger(tmp_path, total=30)
    for step in range(1, 31):
        log.log(step, {"rollout/reward_mean": float(step), "perf/samples_per_s": 2.0 if step % 2 else 4.0})
        if step == 10:
            log.log_eval(10, {"eval/accuracy": 0.2})
    log.log_eval(30, {"eval/accuracy": 0.4})
    log.log_eval(20, {"eval/accuracy": 0.5})  # late result for an earlier step
    summary = log.close()
    assert summary.steps == 30 and summary.last_step == 30
    assert (summary.eval_accuracy_first, summary.eval_accuracy_first_step) == (0.2, 10)
    assert (summary.eval_accuracy_last, summary.eval_accuracy_last_step) == (0.4, 30)
    assert (summary.eval_accuracy_best, summary.eval_accuracy_best_step) == (0.5, 20)
    assert summary.reward_first10_mean == pytest.approx(5.5)
    assert summary.reward_last10_mean == pytest.approx(25.5)
    assert summary.samples_per_s_mean == pytest.approx(3.0)
    assert summary.metrics_path == tmp_path / "metrics.jsonl" and summary.plots_dir == tmp_path / "plots"
    assert log.close() is summary  # idempotent

    table = log.summary_table()
    assert str(tmp_path / "metrics.jsonl") in table and "reward.png" in table
    assert "0.500 (step 20)" in table and "25.500" in table
    rows = [re.match(r"  (\S.*?) {2,}(\S)", row) for row in table.splitlines()[1:]]
    assert len(rows) >= 8 and all(rows)
    assert len({m.start(2) for m in rows}) == 1  # values aligned in one column


def test_empty_run_summary(tmp_path: Path) -> None:
    summary = _logger(tmp_path).close()
    assert summary.steps == 0 and summary.last_step is None
    assert summary.eval_accuracy_best is None and summary.reward_first10_mean is None
    assert summary.plots == ()


def test_progress_bar_without_tty_writes_plain_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = _logger(tmp_path, total=10, start_step=2, progress=True)
    for step in range(3, 11):
        log.log(step, {"rollout/reward_mean": 0.5, "buffer/staleness_mean": 1.25, "perf/samples_per_s": 12.0})
    log.log_eval(10, {"eval/accuracy": 0.75})
    log.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    last = err.strip().splitlines()[-1]
    assert "10/10" in last
    assert "reward=0.500" in last and "stale=1.25" in last and "samples/s=12.0" in last and "eval=0.750" in last
    assert len(err.splitlines()) <= 4  # mininterval keeps a non-TTY log small


def test_wandb_offline_writes_a_run_and_resume_reuses_its_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    run_dir = tmp_path / "run"
    log = MetricsLogger(run_dir, 3, wandb_mode="offline", progress=False, config={"lr": 1e-6})
    assert log._wandb.run is not None
    log.log(1, {"train/loss": 1.0})
    log.log_eval(1, {"eval/accuracy": 0.5})
    log.log(2, {"train/loss": 0.5})
    log.close()
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0

    resumed = MetricsLogger(run_dir, 3, start_step=2, resume=True, wandb_mode="offline", progress=False)
    assert resumed._wandb.run is not None and resumed._wandb.run.id == run_id
    resumed.log(3, {"train/loss": 0.25})
    resumed.close()
    assert [r["step"] for r in _lines(run_dir / "metrics.jsonl")] == [1, 1, 2, 3]


def test_wandb_online_without_key_warns_once_and_keeps_logging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no.netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    with caplog.at_level(logging.WARNING, logger="slime_rl.wandb_sink"):
        with _logger(tmp_path / "run", wandb_mode="online") as log:
            log.log(1, {"train/loss": 1.0})
            log.log(2, {"train/loss": 0.5})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "wandb (online) unavailable" in warnings[0].getMessage()
    assert [r["step"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


class _BrokenRun:
    id = "broken"

    def define_metric(self, *args: object, **kw: object) -> None:
        pass

    def log(self, *args: object, **kw: object) -> None:
        raise ConnectionError("wandb backend gone")

    def finish(self, **kw: object) -> None:
        raise AssertionError("finish must not be called on a run that was dropped")


def test_wandb_errors_never_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **kw: _BrokenRun())
    with caplog.at_level(logging.WARNING, logger="slime_rl.wandb_sink"):
        with _logger(tmp_path / "a", wandb_mode="offline") as log:
            for step in range(1, 4):
                log.log(step, {"train/loss": 1.0})
    assert sum("wandb log failed" in r.getMessage() for r in caplog.records) == 1
    assert len(_lines(tmp_path / "a" / "metrics.jsonl")) == 3

    def refuse(**kw: object) -> None:
        raise RuntimeError("init timed out")

    monkeypatch.setattr(wandb, "init", refuse)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slime_rl.wandb_sink"):
        with _logger(tmp_path / "b", wandb_mode="offline") as log:
            log.log(1, {"train/loss": 1.0})
    assert [r.getMessage() for r in caplog.records if "wandb" in r.getMessage()] == [
        f"wandb (offline) unavailable, logging to {tmp_path / 'b' / 'metrics.jsonl'} only: init timed out"
    ]


def test_context_manager_finishes_wandb_with_error_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    finished: list[int] = []

    class Run(_BrokenRun):
        def log(self, *args: object, **kw: object) -> None:
            pass

        def finish(self, exit_code: int = 0, **kw: object) -> None:
            finished.append(exit_code)

    monkeypatch.setattr(wandb, "init", lambda **kw: Run())
    with pytest.raises(KeyError):
        with _logger(tmp_path, wandb_mode="offline") as log:
            log.log(1, {"train/loss": 1.0})
            raise KeyError("driver crashed")
    assert finished == [1]
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1
