"""slime-rl (async) against TRL's GRPOTrainer on the same job, side by side, on this machine.

The job: the project's tiny model (`artifacts/tiny`, `slime-rl make-tiny-model`) and its `arith`
train split, groups of 8 samples, 32 samples per optimizer step (4 prompts), responses of at most
48 tokens, temperature 1, lr 5e-5, the same answer check (`math_answer` on the response text with
special tokens kept, run by the project's own code), no eval and no checkpoints on either side.

    slime-rl side: `slime-rl train configs/examples/arith_tiny.yaml trainer.global_batch_groups=4 ...`
                   (one vLLM-cpu engine + one trainer worker, async), samples/s from metrics.jsonl
    TRL side:      this file under `--trl-python` (a separate venv with torch + trl; nothing is
                   downloaded: the model and data are local), GRPOTrainer with its defaults
                   otherwise (both cores, transformers generation, gradient checkpointing on),
                   samples/s from the optimizer-step times; rewards come from a pipe to this file
                   running under the project's python (`--reward-server`)

Steady state = the steps after the first `--warmup`. Sides alternate round by round (slime-rl,
TRL, slime-rl, TRL, ...) so both see the same machine load.

    python benchmarks/trl_compare.py --trl-python /tmp/trl-venv/bin/python --steps 60 --rounds 2
    python -m benchmarks.trl_compare --quick --json /tmp/trl_compare.json           # CI smoke

The TRL venv: `python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 trl`
(CPU torch). Prints a table and writes benchmarks/results/trl_compare.json. `--quick` runs 8 steps,
1 round, on a random tiny model when `--model` holds none, and only the slime-rl side when the
TRL venv is missing (the JSON says why); it writes JSON only where `--json` says.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SAMPLES_PER_STEP = 32
GROUP_SIZE = 8
MAX_NEW_TOKENS = 48
LR = 5e-5


# ---- the reward, shared by both sides (project python) ------------------------------------------
def reward_server() -> None:
    """Read JSON lines {"responses", "labels", "modes"} on stdin, write {"scores"} lines: the
    project's `math_answer` on each response (the rollout manager's check)."""
    from slime_rl.buffers.schema import Sample
    from slime_rl.rewards.builtin import math_answer

    for line in sys.stdin:
        req = json.loads(line)
        scores = [
            float(math_answer(Sample("s", "g", [0], [0], response=r, label=lab, mode=m))["score"])
            for r, lab, m in zip(req["responses"], req["labels"], req["modes"], strict=True)
        ]
        sys.stdout.write(json.dumps({"scores": scores}) + "\n")
        sys.stdout.flush()


# ---- TRL side (runs under --trl-python) --------------------------------------------------------
def trl_side(args: argparse.Namespace) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    model_dir = Path(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(x) for x in (model_dir / "data" / "train.jsonl").read_text().splitlines() if x.strip()]
    data = Dataset.from_list([
        {
            "prompt": tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                              add_generation_prompt=True, enable_thinking=r["mode"] == "think"),
            "label": str(r["label"]),
            "mode": r["mode"],
        }
        for r in rows
    ])
    server = subprocess.Popen([args.reward_python, __file__, "--reward-server"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    lengths: list[float] = []
    rewards: list[float] = []

    def answer_check(prompts: list[str], completions: list[str], completion_ids: list[list[int]],
                     label: list[str], mode: list[str], **_: Any) -> list[float]:
        texts = []
        for ids in completion_ids:  # special tokens kept (TRL's `completions` drop </think>)
            text = tok.decode(ids, skip_special_tokens=False)
            texts.append(text[: -len(tok.eos_token)] if text.endswith(tok.eos_token) else text)
        server.stdin.write(json.dumps({"responses": texts, "labels": label, "modes": mode}) + "\n")
        server.stdin.flush()
        scores = json.loads(server.stdout.readline())["scores"]
        lengths.append(sum(len(x) for x in completion_ids) / len(completion_ids))
        rewards.append(sum(scores) / len(scores))
        return scores

    step_ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # after each optimizer step
            step_ends.append(time.perf_counter())

    per_device = args.trl_per_device_batch
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-compare-"), use_cpu=True, bf16=False, max_steps=args.steps,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=SAMPLES_PER_STEP // per_device,
        num_generations=GROUP_SIZE, max_completion_length=MAX_NEW_TOKENS, learning_rate=LR, temperature=1.0,
        save_strategy="no", report_to=[], logging_steps=10**6, seed=0,
        gradient_checkpointing=not args.trl_no_gradient_checkpointing,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=answer_check, args=cfg, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    start = time.perf_counter()
    trainer.train()
    server.stdin.close()
    server.wait(timeout=30)
    step_s = [b - a for a, b in zip([start, *step_ends[:-1]], step_ends)]
    Path(args.trl_out).write_text(json.dumps({
        "step_s": step_s, "response_len": lengths, "reward": rewards, "threads": torch.get_num_threads(),
        "per_device_batch": per_device, "gradient_checkpointing": cfg.gradient_checkpointing,
        "torch": torch.__version__, "trl": __import__("trl").__version__,
    }))


# ---- the two sides, from the project venv -------------------------------------------------------
def run_slime(args: argparse.Namespace, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    name = f"trl-compare-{int(time.time())}"
    cmd = [
        sys.executable, "-m", "slime_rl.cli", "train", args.config, "run.mode=async", f"run.num_steps={args.steps}",
        f"run.name={name}", f"run.output_dir={out_dir}", f"model.path={args.model}",
        f"data.train_path={args.model}/data/train.jsonl", "data.eval_path=null", "eval.interval=0",
        "checkpoint.interval=0", "checkpoint.save_hf=false", "logging.save_samples=false",
        "logging.progress=false", "logging.wandb_mode=disabled",
        f"trainer.global_batch_groups={SAMPLES_PER_STEP // GROUP_SIZE}", f"rollout.n_samples_per_prompt={GROUP_SIZE}",
        f"rollout.max_new_tokens={MAX_NEW_TOKENS}", f"trainer.lr={LR}", *overrides,
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lines = [json.loads(x) for x in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("kind") != "eval"]
    steady = [x for x in steps if x["step"] > args.warmup]
    wall = sum(x["step_time_s"] for x in steady)
    return {
        "samples_per_s": sum(x["samples"] for x in steady) / wall,
        "step_s_median": statistics.median(x["step_time_s"] for x in steady),
        "train_step_s_median": statistics.median(x["train/step_seconds"] for x in steady),
        "response_len_mean": statistics.mean(x["train/response_len"] for x in steady),
        "reward_first10": statistics.mean(x["train/reward_mean"] for x in steps[:10]),
        "reward_last10": statistics.mean(x["train/reward_mean"] for x in steps[-10:]),
        "steps": len(steady),
        "command": " ".join(cmd[2:]),
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "trl.json"
        cmd = [args.trl_python, __file__, "--trl-side", "--model", args.model, "--steps", str(args.steps),
               "--trl-out", str(out), "--reward-python", sys.executable,
               "--trl-per-device-batch", str(args.trl_per_device_batch)]
        if args.trl_no_gradient_checkpointing:
            cmd.append("--trl-no-gradient-checkpointing")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        subprocess.run(cmd, cwd=ROOT, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = json.loads(out.read_text())
    steady = r["step_s"][args.warmup:]
    return {
        "samples_per_s": SAMPLES_PER_STEP * len(steady) / sum(steady),
        "step_s_median": statistics.median(steady),
        "response_len_mean": statistics.mean(r["response_len"][args.warmup:]),
        "reward_first10": statistics.mean(r["reward"][:10]),
        "reward_last10": statistics.mean(r["reward"][-10:]),
        "steps": len(steady),
        "threads": r["threads"],
        "versions": {"torch": r["torch"], "trl": r["trl"]},
        "per_device_batch": r["per_device_batch"],
        "gradient_checkpointing": r["gradient_checkpointing"],
        "command": " ".join(cmd[1:]).replace(str(out), "<tmp>/trl.json"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl-python", default="/tmp/trl-venv/bin/python", help="python of a venv with torch + trl")
    p.add_argument("--config", default="configs/examples/arith_tiny.yaml")
    p.add_argument("--model", default="artifacts/tiny")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 1 round (see above)")
    p.add_argument("--skip-trl", action="store_true", help="only the slime-rl side (no TRL venv needed)")
    p.add_argument("--trl-per-device-batch", type=int, default=8, help="TRL micro-batch (its default 8; x4 accumulation)")
    p.add_argument("--trl-no-gradient-checkpointing", action="store_true", help="TRL's default is on")
    p.add_argument("--json", "--out", dest="out", default=None,
                   help="results JSON (default benchmarks/results/trl_compare.json; with --quick none)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for the slime-rl side")
    # internal
    p.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--reward-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--trl-out", help=argparse.SUPPRESS)
    p.add_argument("--reward-python", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.reward_server:
        return reward_server()
    if args.trl_side:
        return trl_side(args)
    out_dir = Path(tempfile.mkdtemp(prefix="trl-compare-runs-"))
    if args.quick:
        args.steps, args.warmup, args.rounds = 8, 2, 1
        if not (Path(args.model) / "config.json").exists():
            args.model = str(_random_model(out_dir / "model"))
    elif args.out is None:
        args.out = "benchmarks/results/trl_compare.json"
    if not (Path(args.model) / "data" / "train.jsonl").exists():
        raise SystemExit(f"--model {args.model} holds no model with data/train.jsonl; "
                         f"build it with `slime-rl make-tiny-model {args.model}`")
    trl_skipped = "--skip-trl" if args.skip_trl else _trl_missing(args.trl_python)
    if trl_skipped and not args.skip_trl:
        if not args.quick:
            raise SystemExit(f"{trl_skipped}; make a venv with torch + trl (see --help), or pass --skip-trl")
        print(f"TRL side skipped: {trl_skipped}; --quick runs the slime-rl side only", flush=True)
        args.skip_trl = True
    results: dict[str, list[dict]] = {"slime-rl": [], "trl": []}
    for r in range(args.rounds):
        results["slime-rl"].append(run_slime(args, out_dir, args.overrides))
        print(f"round {r + 1} slime-rl: {results['slime-rl'][-1]['samples_per_s']:.1f} samples/s", flush=True)
        if not args.skip_trl:
            results["trl"].append(run_trl(args))
            print(f"round {r + 1} trl:      {results['trl'][-1]['samples_per_s']:.1f} samples/s", flush=True)
    print()
    print(f"{'side':9s} {'samples/s':>10s} {'step s':>7s} {'train s':>8s} {'resp len':>9s} {'reward first10 -> last10':>25s}")
    for side, rows in results.items():
        if not rows:
            continue
        m = lambda k, rows=rows: statistics.median(x[k] for x in rows) if k in rows[0] else float("nan")  # noqa: E731
        print(f"{side:9s} {m('samples_per_s'):10.1f} {m('step_s_median'):7.2f} {m('train_step_s_median'):8.2f} "
              f"{m('response_len_mean'):9.1f} {m('reward_first10'):12.3f} -> {m('reward_last10'):.3f}")
    ratios = [s["samples_per_s"] / t["samples_per_s"] for s, t in zip(results["slime-rl"], results["trl"])]
    if ratios:
        print(f"\nslime-rl / TRL samples/s per round: {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f})")
    if args.out is None:
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "steps": args.steps, "warmup": args.warmup, "samples_per_step": SAMPLES_PER_STEP, "group_size": GROUP_SIZE,
        "max_new_tokens": MAX_NEW_TOKENS, "lr": LR, "overrides": args.overrides, "results": results,
        "ratios": ratios, "trl_skipped": trl_skipped, "model": args.model, "cpu": _cpu_name(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }, indent=1))
    print(f"wrote {args.out}")


def _trl_missing(python: str) -> str | None:
    """Why the TRL side cannot run under `python` (None when it can)."""
    if not Path(python).exists():
        return f"--trl-python {python} does not exist"
    try:
        ok = subprocess.run([python, "-c", "import trl"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"--trl-python {python} does not run ({e})"
    return None if ok else f"--trl-python {python} cannot import trl"


def _random_model(folder: Path) -> Path:
    """A random tiny model with `arith` train rows in data/train.jsonl (the smoke run measures nothing)."""
    from slime_rl.tiny import make_dataset, random_tiny_model
    from slime_rl.tiny.task import write_jsonl

    random_tiny_model(folder, seed=0)
    write_jsonl(make_dataset(seed=0, n_train=200, n_eval=8)["train"], folder / "data" / "train.jsonl")
    return folder


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return f"unknown x {os.cpu_count()}"


if __name__ == "__main__":
    main()
