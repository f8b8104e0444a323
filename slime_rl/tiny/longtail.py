"""The `longtail` tiny task: many short direct answers, a few long worked chains.

    make_longtail_dataset(seed) ─► train rows ─┬─ `arith` one/two-step problems, non-think mode
                                               │    replies of 6-12 tokens (`The answer is 7.`)
                                               └─ `chain` problems, think mode (`chain_frac`):
                                                    "Sam has 5 coins and gets 3 more every day for 27 days."
                                                    careful reply: one worked line per day
                                                    (`12: 38 + 3 = 41`), 20-40 lines, 280-560 tokens
    build_longtail_tiny_model ─► the `arith` tokenizer + tiny Qwen2 ─► warm start in length buckets
                              ─► greedy eval ─► reply lengths sampled at temperature 1 (the tail)

What it is for: the workload async RL exists for (docs/BENCHMARKS.md, "Async on long-tailed
generations"). At temperature 1 the base model answers most prompts in a few tokens and works a
chain problem out in hundreds of tokens only sometimes, so the 95th percentile of response length
is tens of times the median; a synchronous step waits for its slowest chain while the engine
decodes one or two sequences.

The warm-start replies come from the same two solvers as `arith` (slime_rl/tiny/task.py): a careful
one (works the problem: every day's addition in think mode) and a hasty one (`hasty_frac` of the
train rows) that guesses the last number of the question. Rows have the `arith` record format plus
``kind`` (`arith` | `chain`), so `task.render_response`, `model.evaluate` and the `math_answer`
reward read them unchanged. The tokenizer is the `arith` one (its corpus does not follow any task).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slime_rl.tiny.model import (
    BUILD_FILE,
    BUILD_THREADS,
    TinyModelSpec,
    _collate,
    _new_model,
    _save,
    _sft_example,
    evaluate,
    prompt_text,
)
from slime_rl.tiny.task import TaskSpec, make_problem, write_jsonl
from slime_rl.tiny.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

TASK = "longtail"
LONGTAIL_VERSION = 1
"""Bumped when the same arguments would build a different model or data."""
_NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Eva", "Ben", "Zoe")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "eggs")


@dataclasses.dataclass(frozen=True)
class LongtailSpec:
    """Knobs of the `longtail` data (the defaults build `configs/examples/longtail_tiny.yaml`'s task)."""

    chain_frac: float = 0.2
    """Fraction of rows that are chain problems (think mode); the rest are short `arith` problems
    answered directly (non-think mode)."""
    min_days: int = 20
    """Fewest worked lines of a chain problem."""
    max_days: int = 40
    """Most worked lines of a chain problem."""
    max_start: int = 9
    """A chain starts with 1..max_start items."""
    max_step: int = 4
    """A chain adds 1..max_step items a day."""
    hasty_frac: float = 0.6
    """Fraction of `arith` train rows whose warm-start reply is the hasty solver's guess (as in the
    demo's task: the behaviour RL flips within tens of steps)."""
    chain_hasty_frac: float = 0.5
    """Fraction of chain train rows whose warm-start reply is the hasty guess: most chains are worked
    out, so at temperature 1 the long replies are frequent enough to set the 95th percentile."""
    arith: TaskSpec = TaskSpec()
    """The short problems' spec (its `hasty_frac` and think/non-think choice are ignored)."""

    def __post_init__(self) -> None:
        for key in ("chain_frac", "hasty_frac", "chain_hasty_frac"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"LongtailSpec.{key}={getattr(self, key)} must be in [0, 1]")
        if not 1 <= self.min_days <= self.max_days:
            raise ValueError(f"min_days={self.min_days}, max_days={self.max_days}: need 1 <= min_days <= max_days")
        if self.max_start < 1 or self.max_step < 1:
            raise ValueError(f"max_start={self.max_start} and max_step={self.max_step} must be >= 1")


def chain_problem(rng: random.Random, spec: LongtailSpec) -> tuple[str, int, list[str]]:
    """A chain problem: its text, its answer and one worked line per day (`12: 38 + 3 = 41`: the day,
    the running total copied from the line before, the daily step, the new total)."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, step = rng.randint(1, spec.max_start), rng.randint(1, spec.max_step)
    days = rng.randint(spec.min_days, spec.max_days)
    text = (f"{name} has {start} {item} and gets {step} more every day for {days} days. "
            f"How many {item} does {name} have then?")
    lines, total = [], start
    for day in range(1, days + 1):
        lines.append(f"{day}: {total} + {step} = {total + step}")
        total += step
    return text, total, lines


def make_longtail_problem(rng: random.Random, spec: LongtailSpec = LongtailSpec()) -> dict[str, Any]:
    """One row: a chain problem (think mode) with probability `chain_frac`, else a short `arith`
    problem in non-think mode."""
    if rng.random() < spec.chain_frac:
        text, ans, steps = chain_problem(rng, spec)
        row = {"prompt": text, "label": str(ans), "mode": "think", "steps": steps, "kind": "chain"}
    else:
        row = dict(make_problem(rng, spec.arith), mode="non_think", kind="arith")
    hasty = spec.chain_hasty_frac if row["kind"] == "chain" else spec.hasty_frac
    row["solver"] = "hasty" if rng.random() < hasty else "careful"
    return row


def make_longtail_dataset(
    seed: int = 0, n_train: int = 5000, n_eval: int = 200, spec: LongtailSpec = LongtailSpec()
) -> dict[str, list[dict[str, Any]]]:
    """Train and eval splits; eval prompts never appear in train (eval rows are all `careful`)."""
    rng = random.Random(seed * 1000 + 11)
    train = [make_longtail_problem(rng, spec) for _ in range(n_train)]
    seen = {r["prompt"] for r in train}
    eval_rows: list[dict[str, Any]] = []
    rng = random.Random(seed * 1000 + 12)
    while len(eval_rows) < n_eval:
        row = dict(make_longtail_problem(rng, spec), solver="careful")
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            eval_rows.append(row)
    return {"train": train, "eval": eval_rows}


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """Median, 95th percentile (nearest rank), max and mean of response lengths in tokens."""
    if not lengths:
        return {"n": 0, "median": float("nan"), "p95": float("nan"), "max": float("nan"), "mean": float("nan")}
    ordered = sorted(lengths)
    p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
    return {"n": len(ordered), "median": float(statistics.median(ordered)), "p95": float(p95),
            "max": float(ordered[-1]), "mean": sum(ordered) / len(ordered)}


def _warm_start(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], steps: int, seed: int,
                progress: bool, lr: float = 3e-3, batch_short: int = 32, batch_long: int = 8) -> float:
    """Supervised warm start in two buckets: chain rows in batches of `batch_long`, `arith` rows in
    batches of `batch_short` (one padded batch of both would be ~90 % padding); each bucket is drawn
    in proportion to its share of batches, so every row is seen about equally often. Bucketing by
    kind, not length, keeps a chain's hasty and careful replies in the same batches: the token-mean
    loss then weighs the one token that picks the solver alike for both (with hasty chains among the
    short rows, the model learned ~12x more often to guess than the data says). Returns the mean
    loss of the last 10 steps."""
    from tqdm.auto import tqdm

    examples = [_sft_example(tokenizer, r) for r in rows]
    long_ex = [e for e, r in zip(examples, rows) if r["kind"] == "chain"]
    short_ex = [e for e, r in zip(examples, rows) if r["kind"] != "chain"]
    p_long = (len(long_ex) / batch_long) / max(1e-9, len(long_ex) / batch_long + len(short_ex) / batch_short)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    recent: list[float] = []
    bar = tqdm(range(steps), desc="warm start", disable=not progress)
    for _ in bar:
        pool, size = (long_ex, batch_long) if long_ex and rng.random() < p_long else (short_ex, batch_short)
        batch = _collate(rng.sample(pool, min(size, len(pool))), tokenizer.pad_token_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-10:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


@torch.no_grad()
def sample_lengths(model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], max_new_tokens: int,
                   temperature: float = 1.0, batch_size: int = 50, seed: int = 0) -> list[int]:
    """Response length in tokens (EOS counted, as an engine reports it) of one reply per row,
    sampled at `temperature` with transformers `generate`."""
    torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    lengths: list[int] = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            texts = [prompt_text(tokenizer, r["prompt"], r["mode"] == "think") for r in chunk]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_k=0, top_p=1.0, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            for ids in out[:, enc["input_ids"].shape[1] :].tolist():
                ends = [i for i, t in enumerate(ids) if t == tokenizer.eos_token_id]
                lengths.append(ends[0] + 1 if ends else len(ids))
    finally:
        tokenizer.padding_side = "right"
    return lengths


@dataclasses.dataclass(frozen=True)
class LongtailReport:
    """What `build_longtail_tiny_model` made."""

    model_dir: Path
    train_path: Path
    eval_path: Path
    num_parameters: int
    train_steps: int
    final_loss: float
    eval_accuracy: float
    """Greedy accuracy on the eval split."""
    eval_accuracy_by_kind: dict[str, float]
    """Greedy accuracy of the `arith` and the `chain` eval rows."""
    hasty_rate: float
    """Share of greedy eval replies in the hasty solver's style."""
    lengths_t1: dict[str, float]
    """Response lengths (tokens) of one reply per prompt at temperature 1 (the first `LENGTH_PROMPTS`
    train prompts: the mix RL samples): median, p95, max, mean."""
    lengths_t1_by_kind: dict[str, dict[str, float]]
    reused: bool = False


MAX_NEW_TOKENS = 640
"""Reply budget of the builder's evaluation (the longest careful chain is ~600 tokens)."""
LENGTH_PROMPTS = 400
"""Train prompts the builder samples one reply each for at temperature 1 (`lengths_t1`)."""


def build_longtail_tiny_model(
    out_dir: str | Path, seed: int = 0, steps: int = 2000, n_train: int = 5000, n_eval: int = 200,
    spec: LongtailSpec = LongtailSpec(), model_spec: TinyModelSpec = TinyModelSpec(), progress: bool = True,
    reuse: bool = False,
) -> LongtailReport:
    """Build the `longtail` data and a warm-started tiny model into ``out_dir`` (an HF model
    folder; data under ``out_dir/data``); returns what it made, with the sampled length tail."""
    out = Path(out_dir)
    args = {"task": TASK, "longtail_version": LONGTAIL_VERSION, "seed": seed, "steps": steps, "n_train": n_train,
            "n_eval": n_eval, "spec": dataclasses.asdict(spec), "model_spec": dataclasses.asdict(model_spec)}
    record = out / BUILD_FILE
    if reuse and record.exists() and (out / "config.json").exists():
        saved = json.loads(record.read_text())
        if saved.get("args") == args:
            r = saved["report"]
            return LongtailReport(**{**r, "model_dir": out, "train_path": Path(r["train_path"]),
                                     "eval_path": Path(r["eval_path"]), "reused": True})
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        report = _build(out, seed, steps, n_train, n_eval, spec, model_spec, progress)
    finally:
        torch.set_num_threads(threads)
    record.write_text(json.dumps({"args": args, "report": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(report).items()}}, indent=1))
    return report


def _build(out: Path, seed: int, steps: int, n_train: int, n_eval: int, spec: LongtailSpec,
           model_spec: TinyModelSpec, progress: bool) -> LongtailReport:
    torch.manual_seed(seed)
    data = make_longtail_dataset(seed=seed, n_train=n_train, n_eval=n_eval, spec=spec)
    train_path = write_jsonl(data["train"], out / "data" / "train.jsonl")
    eval_path = write_jsonl(data["eval"], out / "data" / "eval.jsonl")
    tokenizer = build_tokenizer(seed=seed)
    model = _new_model(tokenizer, model_spec, seed)
    loss = _warm_start(model, tokenizer, data["train"], steps, seed, progress) if steps else float("nan")
    rows = data["eval"]
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("arith", "chain")}
    greedy = {k: evaluate(model, tokenizer, rs, max_new_tokens=MAX_NEW_TOKENS) for k, rs in by_kind.items() if rs}
    # Lengths on train prompts, the mix RL samples from (the eval split holds more chains: most short
    # `arith` prompts also occur in train and are skipped there).
    mix = data["train"][:LENGTH_PROMPTS]
    lengths = {k: sample_lengths(model, tokenizer, [r for r in mix if r["kind"] == k], MAX_NEW_TOKENS, seed=seed)
               for k in ("arith", "chain")}
    every = [n for ls in lengths.values() for n in ls]
    _save(model, tokenizer, out)
    return LongtailReport(
        model_dir=out, train_path=train_path, eval_path=eval_path,
        num_parameters=sum(p.numel() for p in model.parameters()), train_steps=steps, final_loss=loss,
        eval_accuracy=sum(g["accuracy"] * len(by_kind[k]) for k, g in greedy.items()) / max(1, len(rows)),
        eval_accuracy_by_kind={k: g["accuracy"] for k, g in greedy.items()},
        hasty_rate=sum(g["hasty"] * len(by_kind[k]) for k, g in greedy.items()) / max(1, len(rows)),
        lengths_t1=length_stats(every), lengths_t1_by_kind={k: length_stats(v) for k, v in lengths.items()},
    )
