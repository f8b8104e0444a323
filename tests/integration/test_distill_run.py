"""On-policy distillation end to end: a real async run (Ray actors: hf engine, teacher actor,
buffer, trainer worker) where an untrained student learns from a teacher's per-token log-probs
alone (`trainer.distill.only=true`) and the reverse KL to the teacher falls.

The teacher is the tiny model warm-started for 60 steps on the `arith` task (~15 s on 2 cores);
the student is an untrained tiny model with the same tokenizer. Reverse KL here is the
sampled-token estimate `log p_student - log p_teacher` averaged over loss tokens
(`distill/reverse_kl`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slime_rl.config import load_config
from slime_rl.driver import Driver

pytestmark = [pytest.mark.timeout(400), pytest.mark.slow]

STEPS = 30


def test_distillation_alone_lowers_the_reverse_kl_to_the_teacher(ray_cluster, tmp_path: Path) -> None:
    from slime_rl.tiny import build_tiny_model

    teacher = build_tiny_model(tmp_path / "teacher", steps=60, n_train=500, n_eval=20, progress=False)
    student = build_tiny_model(tmp_path / "student", steps=15, n_train=500, n_eval=20, progress=False).model_dir
    cfg = load_config(None, [
        f"model.path={student}", f"data.train_path={teacher.train_path}", f"run.output_dir={tmp_path}",
        "run.name=distill", f"run.num_steps={STEPS}", "rollout.engine=hf", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=16", "rollout.cpu_threads=1", "trainer.global_batch_groups=4", "trainer.lr=5e-4",
        f"trainer.distill.teacher_path={teacher.model_dir}", "trainer.distill.only=true", "eval.interval=0",
        "checkpoint.save_hf=false", "logging.progress=false", "logging.wandb_mode=disabled", "logging.save_samples=true",
    ])
    result = Driver(cfg).run()
    run_dir = Path(result["run_dir"])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") != "eval"]
    assert len(steps) == STEPS
    kl = [r["distill/reverse_kl"] for r in steps]
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.85 * first, f"reverse KL to the teacher {first:.3f} (steps 1-5) -> {last:.3f} (last 5 steps)"
    teacher_lp = [r["distill/teacher_logprob"] for r in steps]
    assert sum(teacher_lp[-5:]) / 5 > sum(teacher_lp[:5]) / 5  # the student samples what the teacher likes
    # the rollout side scored every sample with the teacher, and said how long it took
    assert sum(r.get("distill/teacher_tokens", 0) for r in steps) > 0
    assert any(r.get("distill/teacher_seconds", 0) > 0 for r in steps)
    saved = __import__("pyarrow.parquet", fromlist=["x"]).read_table(run_dir / "samples" / "step_000001.parquet")
    assert all(len(t) == len(r) for t, r in zip(saved.column("teacher_logprobs").to_pylist(),
                                                 saved.column("response_ids").to_pylist(), strict=True))
    with open(run_dir / "distill_kl.json", "w") as f:  # the numbers docs/distill.md quotes
        json.dump({"reverse_kl": kl, "teacher_logprob": teacher_lp}, f)
