"""The teacher of on-policy distillation: scores every sampled response token on the rollout side.

    GroupRunner.run (one group task per group, many at once)
        build_sample ─► TeacherClient.fill(samples) ─┐   (beside RewardRunner.score)
                                                     ▼
    TeacherScorer (its own Ray actor, `<run>-teacher`; or in-process)
        score(seqs) ─► pending queue ─► _batch_loop: every request waiting now, cut by
        `max_tokens_per_batch` ─► TeacherModel.score (a worker thread: the actor keeps
        queueing while torch runs) ─► per-token log p_teacher(y_t) back to each caller
                                                     │
        sample.teacher_logprobs (one per response token) ─► buffer ─► trainer/distill.py

Only the group that waits for its scores waits: other groups keep generating, scoring rewards
and going to the buffer. The model loads lazily (first `load` or `score`), placed by its own
resources (`trainer.distill.num_cpus` / `num_gpus`) beside the engines. Log-probs are of the
teacher's distribution at the sampling temperature, like the behaviour log-probs they are
compared with. Teacher and student must share the tokenizer (`check_same_tokenizer`, at start-up).

>>> client = start_teacher(TeacherSpec("artifacts/tiny"), name=None)      # doctest: +SKIP
>>> await client.fill(samples)   # sets s.teacher_logprobs                 # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

KEY = "trainer.distill.teacher_path"


@dataclasses.dataclass
class TeacherSpec:
    """What the rollout side needs to run the teacher (built from `trainer.distill` by the driver)."""

    path: str
    device: str = "cpu"
    dtype: str = "float32"
    temperature: float = 1.0
    """The sampling temperature: logits are divided by it before the log-softmax."""
    num_threads: int = 1
    num_cpus: float = 0.0
    num_gpus: float = 0.0
    max_tokens_per_batch: int = 8192
    timeout_s: float = 300.0


def check_same_tokenizer(teacher_path: str, student_path: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's (token ids would mean other
    text) or whose embedding cannot take every student token id; the message names the key."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        t_tok = AutoTokenizer.from_pretrained(teacher_path)
        t_cfg = AutoConfig.from_pretrained(teacher_path)
    except Exception as e:
        raise ValueError(f"{KEY}={teacher_path!r} is not a loadable HF model folder with a tokenizer: {e}") from e
    s_tok = AutoTokenizer.from_pretrained(student_path)
    if t_tok.get_vocab() != s_tok.get_vocab():
        t_vocab, s_vocab = t_tok.get_vocab(), s_tok.get_vocab()
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()))[:3]
        raise ValueError(
            f"{KEY}={teacher_path!r} has another tokenizer than the student {student_path!r} ({len(t_vocab)} vs "
            f"{len(s_vocab)} tokens; differing entries e.g. {diff}); on-policy distillation scores the student's token "
            "ids with the teacher, so both must share one tokenizer"
        )
    if int(t_cfg.vocab_size) < len(s_tok):
        raise ValueError(
            f"{KEY}={teacher_path!r} has vocab_size {t_cfg.vocab_size} but the student's tokenizer ({student_path!r}) "
            f"has {len(s_tok)} tokens; the teacher's embedding must cover every student token id"
        )


class TeacherModel:
    """A causal LM that returns its log-prob of each response token (no Ray here)."""

    def __init__(self, spec: TeacherSpec, set_threads: bool = False) -> None:
        self.spec = spec
        self.set_threads = set_threads
        self.model: Any = None

    def load(self) -> dict[str, Any]:
        """Load the weights once (later calls return at once); returns what was loaded."""
        import torch
        from transformers import AutoModelForCausalLM

        if self.model is None:
            if self.set_threads and self.spec.device == "cpu":
                torch._C.set_num_threads(int(self.spec.num_threads))  # see trainer.core.set_torch_threads
            dtype = getattr(torch, self.spec.dtype)
            model = AutoModelForCausalLM.from_pretrained(self.spec.path, dtype=dtype)
            self.model = model.to(self.spec.device).eval()
            logger.info("teacher %s loaded on %s (%s)", self.spec.path, self.spec.device, self.spec.dtype)
        return {"path": self.spec.path, "device": self.spec.device,
                "parameters": sum(p.numel() for p in self.model.parameters())}

    def batches(self, seqs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[int]]:
        """Indices of ``seqs`` per forward: by length, each within ``max_tokens_per_batch`` (rows x
        padded length; a longer single sequence goes alone)."""
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]) + len(seqs[i][1]))
        out: list[list[int]] = []
        for i in order:
            length = len(seqs[i][0]) + len(seqs[i][1])
            if out and (len(out[-1]) + 1) * length <= self.spec.max_tokens_per_batch:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def score(self, seqs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[list[float]]:
        """Per sequence (prompt_ids, response_ids): log p_teacher of each response token given
        everything before it, at ``spec.temperature``."""
        import torch

        self.load()
        if any(not prompt for prompt, _ in seqs):
            raise ValueError("the teacher needs a non-empty prompt before each response (the first response token's context)")
        out: list[list[float]] = [[] for _ in seqs]
        for rows in self.batches(seqs):
            rows = [i for i in rows if len(seqs[i][1])]
            if not rows:
                continue
            ids = [list(seqs[i][0]) + list(seqs[i][1]) for i in rows]
            width = max(len(x) for x in ids)
            input_ids_BT = torch.zeros(len(ids), width, dtype=torch.long)
            attn_BT = torch.zeros(len(ids), width, dtype=torch.long)
            for b, x in enumerate(ids):  # right padding: positions of real tokens stay 0..len-1
                input_ids_BT[b, : len(x)] = torch.tensor(x)
                attn_BT[b, : len(x)] = 1
            dev = self.spec.device
            with torch.no_grad():
                logits_BTV = self.model(input_ids=input_ids_BT.to(dev), attention_mask=attn_BT.to(dev)).logits
                logp_BTV = torch.log_softmax(logits_BTV.float() / self.spec.temperature, dim=-1)
                # token t+1 is predicted at position t
                next_BT = logp_BTV[:, :-1].gather(-1, input_ids_BT[:, 1:].to(dev)[..., None])[..., 0].cpu()
            for b, i in enumerate(rows):
                p, r = len(seqs[i][0]), len(seqs[i][1])
                out[i] = next_BT[b, p - 1 : p - 1 + r].tolist()
        return out


class TeacherScorer:
    """Batches concurrent ``score`` calls into teacher forwards (the Ray actor body; also usable
    in-process). One forward runs at a time, in a worker thread."""

    def __init__(self, spec: TeacherSpec, set_threads: bool = True) -> None:
        self.teacher = TeacherModel(spec, set_threads=set_threads)
        self._pending: list[tuple[list[tuple[list[int], list[int]]], asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self.forwards = 0
        self.seconds = 0.0

    async def load(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.teacher.load)

    def node_info(self) -> dict[str, Any]:
        import os

        import ray

        return {"node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def score(self, seqs: list[tuple[list[int], list[int]]]) -> tuple[list[list[float]], float]:
        """Teacher log-probs of each sequence's response tokens, and the forward seconds of the
        batch(es) this call rode in (shared with the calls batched with it)."""
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._batch_loop())
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((seqs, fut))
        self._wake.set()
        return await fut

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            taken, self._pending = self._pending, []
            if not taken:
                continue
            flat = [s for seqs, _ in taken for s in seqs]
            t0 = time.perf_counter()
            try:
                scores = await asyncio.to_thread(self.teacher.score, flat)
            except Exception as e:
                for _, fut in taken:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            secs = time.perf_counter() - t0
            self.forwards += 1
            self.seconds += secs
            k = 0
            for seqs, fut in taken:
                if not fut.done():
                    fut.set_result((scores[k : k + len(seqs)], secs))
                k += len(seqs)

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()


class TeacherClient:
    """The rollout manager's handle on the teacher: fills ``teacher_logprobs`` of samples and keeps
    the window's ``distill/*`` metrics."""

    def __init__(self, scorer: Any, spec: TeacherSpec, handle: Any = None, name: str = "teacher") -> None:
        self.scorer = scorer
        """A TeacherScorer (in-process) or its Ray actor handle."""
        self.spec = spec
        self.handle = handle
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self.seconds = self.wait_seconds = self.logprob_sum = 0.0
        self.tokens = self.groups = 0
        self.kl_by_mode: dict[str, list[float]] = {}
        """mode -> [sum of log p_student - log p_teacher, loss tokens] over the window."""

    def _call(self, method: str, *args: Any) -> Any:
        fn = getattr(self.scorer, method)
        return fn.remote(*args) if self.handle is not None else fn(*args)

    async def load(self) -> dict[str, Any]:
        """Load the teacher now (start-up errors surface here, not in the first group)."""
        try:
            return await asyncio.wait_for(self._call("load"), self.spec.timeout_s)
        except Exception as e:
            raise RuntimeError(f"{self.name} could not load {KEY}={self.spec.path!r}: {getattr(e, 'cause', None) or e}") from e

    async def fill(self, samples: Sequence[Any], group_id: str = "?") -> None:
        """Set ``s.teacher_logprobs`` of every sample (one teacher call for the group)."""
        seqs = [(list(s.prompt_ids), list(s.response_ids)) for s in samples]
        t0 = time.monotonic()
        try:
            scores, secs = await asyncio.wait_for(self._call("score", seqs), self.spec.timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self.name} did not score group {group_id} within trainer.distill.timeout_s="
                               f"{self.spec.timeout_s}s") from None
        for s, lp in zip(samples, scores, strict=True):
            s.teacher_logprobs = [float(x) for x in lp]
            self.logprob_sum += sum(s.teacher_logprobs)
            self.tokens += len(lp)
            acc = self.kl_by_mode.setdefault(str(getattr(s, "mode", "") or "default"), [0.0, 0.0])
            for student, teacher, m in zip(s.response_logprobs or [], s.teacher_logprobs, s.loss_mask or [], strict=False):
                if m:
                    acc[0] += float(student) - teacher
                    acc[1] += 1
        self.seconds += secs
        self.wait_seconds += time.monotonic() - t0
        self.groups += 1

    def metrics(self) -> dict[str, float]:
        """The window's teacher metrics (resets the window): forward seconds, per-group wait, tokens
        scored, mean teacher log-prob of the sampled tokens (all response tokens, masked or not),
        and `distill/reverse_kl/<mode>`: mean log p_student - log p_teacher over the loss tokens
        of each mode's samples scored in the window (think / non_think / ...)."""
        out = {
            "distill/teacher_seconds": self.seconds,
            "distill/teacher_wait_s_mean": self.wait_seconds / self.groups if self.groups else 0.0,
            "distill/teacher_tokens": float(self.tokens),
        }
        if self.tokens:
            out["distill/teacher_logprob_sampled"] = self.logprob_sum / self.tokens
        for mode, (kl, n) in self.kl_by_mode.items():  # the trainer's distill/reverse_kl, per mode
            if n:
                out[f"distill/reverse_kl/{mode}"] = kl / n
        self._reset()
        return out

    async def close(self) -> None:
        if self.handle is None:
            self.scorer.shutdown()
            return
        import ray

        try:
            ray.kill(self.handle, no_restart=True)
        except Exception:  # gone already
            pass


def start_teacher(spec: TeacherSpec, name: str | None, use_ray: bool = True) -> TeacherClient:
    """The teacher as a Ray actor named ``name`` with its own resources (``use_ray``), else in-process."""
    if not use_ray:
        return TeacherClient(TeacherScorer(spec, set_threads=False), spec, name=name or "teacher")
    import ray

    opts: dict[str, Any] = {"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "max_restarts": 0,
                            "max_concurrency": 64}
    if name:
        opts["name"] = name
    handle = ray.remote(TeacherScorer).options(**opts).remote(spec)
    return TeacherClient(handle, spec, handle=handle, name=name or "teacher")
