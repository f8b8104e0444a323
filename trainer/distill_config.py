"""Config section ``trainer.distill``: on-policy distillation from a teacher model.

    student samples (engines) ─► teacher scores every sampled token (rollout/teacher.py)
        ─► sample column ``teacher_logprobs`` ─► trainer: per-token advantage
           A_t = coef · (log p_teacher(y_t) − log p_student(y_t))   (only: true)
           A_t = A_reward + coef · (log p_teacher(y_t) − log p_student(y_t))   (only: false)

Off while ``teacher_path`` is null. The math is ``trainer/distill.py``; the user-facing page is
docs/distill.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DistillConfig:
    teacher_path: str | None = None
    """HF model folder of the teacher (must use the student's tokenizer). null = distillation off. The teacher scores every sampled response token on the rollout side (its own Ray actor) and the per-token reverse-KL term `log p_teacher - log p_student` joins the advantage."""
    coef: float = field(default=1.0, metadata={"ge": 0})
    """Weight of the per-token term `log p_teacher(y_t) - log p_student(y_t)` in the advantage (log p_student = the behaviour log-probs `response_logprobs`)."""
    only: bool = False
    """true: pure distillation, the advantage is the teacher term alone (rewards are still scored and logged, not trained on); false: the term is added to the reward's advantage (`trainer.advantage.estimator`)."""
    center: bool = True
    """Subtract the mean of the term over the rank's loss tokens before it joins the advantage: a
    constant baseline (Williams 1992), so the gradient's expectation is unchanged, that removes
    the push away from every sampled token an all-negative term gives a student far from its
    teacher (without it such a student first spreads out, then recovers)."""
    device: str = "cpu"
    """Where the teacher runs: `cpu`, or `cuda` (then give it `num_gpus`)."""
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})
    """Teacher weights' dtype (bfloat16 halves its memory on GPU; float32 on CPU)."""
    num_cpus: float = field(default=0.0, metadata={"ge": 0})
    """Ray CPUs the teacher actor reserves (0 on one small machine: it shares the cores, `num_threads` is what it uses)."""
    num_gpus: float = field(default=0.0, metadata={"ge": 0})
    """Ray GPUs the teacher actor reserves (device=cuda needs > 0)."""
    num_threads: int = field(default=1, metadata={"ge": 1})
    """torch CPU threads of the teacher actor."""
    max_tokens_per_batch: int = field(default=8192, metadata={"ge": 1})
    """Token budget of one teacher forward (rows x padded length); groups arriving together are scored in one batch up to this."""
    timeout_s: float = field(default=300.0, metadata={"gt": 0})
    """Limit for one group's teacher scoring; beyond it the rollout side fails naming the teacher and the group."""

    @property
    def enabled(self) -> bool:
        return self.teacher_path is not None

    def validate(self) -> None:
        """Rules across fields (the root loader prefixes messages with ``trainer.distill.``)."""
        if self.device.startswith("cuda") and self.num_gpus <= 0:
            raise ValueError(f"device={self.device!r} needs num_gpus > 0 (the teacher actor reserves its GPU); set num_gpus=1")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device={self.device!r} is not known; use cpu or cuda")
