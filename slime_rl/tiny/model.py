"""The offline tiny "base" model: a small Qwen2 causal LM with a short supervised warm start.

    build_tokenizer ─► Qwen2ForCausalLM(random init) ─► SFT on `arith` train ─► eval accuracy
                                                             (a few hundred steps)

The warm start teaches the chat format and some arithmetic, so the model solves part of
the eval split but far from all of it: RL has room to climb. Everything is built locally;
nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from slime_rl.tiny.task import (
    TaskSpec,
    careful_opening,
    is_hasty_reply,
    make_dataset,
    render_response,
    write_jsonl,
)
from slime_rl.tiny.tokenizer import build_tokenizer, save_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TinyModelSpec:
    """Architecture of the tiny model (about 2.5M parameters)."""

    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = True


@dataclasses.dataclass(frozen=True)
class TinyModelReport:
    """What `build_tiny_model` made."""

    model_dir: Path
    train_path: Path
    eval_path: Path
    num_parameters: int
    train_steps: int
    final_loss: float
    eval_accuracy: float
    eval_accuracy_by_mode: dict[str, float]
    format_rate: float = float("nan")
    """Share of greedy eval replies with an answer the reward can read (format compliance)."""
    hasty_rate: float = float("nan")
    """Share of greedy eval replies in the hasty solver's style."""
    careful_accuracy: float = float("nan")
    """Greedy eval accuracy with the careful solver's opening forced (`task.careful_opening`): the
    skill the model holds, roughly the ceiling a run reaches by learning to work problems out."""
    reused: bool = False
    """True when an identical earlier build was found and kept (`reuse=True`)."""


def _new_model(tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_theta=10000.0,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


# --- architecture hook: the model class the builder makes (the GLM stand-ins: tiny/glm.py) ---
ARCHS = ("qwen2", "glm5", "glm4_moe")
"""Architectures `build_tiny_model(arch=...)` / `make-tiny-model --arch` make (qwen2 is the default)."""


def _new_model_for(arch: str, tokenizer: PreTrainedTokenizerFast, spec: TinyModelSpec, seed: int):
    """An untrained model of ``arch``: the tiny Qwen2 of ``spec``, or a tiny GLM of its own sizes."""
    if arch == "qwen2":
        return _new_model(tokenizer, spec, seed)
    from slime_rl.tiny.glm import new_glm_model

    return new_glm_model(arch, tokenizer, seed)


def _save(model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def random_tiny_model(out_dir: str | Path, seed: int = 0, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """An untrained tiny model + tokenizer in HF format (about a second). For tests."""
    tokenizer = build_tokenizer()
    return _save(_new_model(tokenizer, spec, seed), tokenizer, Path(out_dir))


def prompt_text(tokenizer: PreTrainedTokenizerFast, prompt: str, think: bool) -> str:
    """The chat-formatted generation prompt of one problem."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=think
    )


def _sft_example(tokenizer: PreTrainedTokenizerFast, row: dict[str, Any], task_spec: TaskSpec = TaskSpec()) -> tuple[list[int], list[int]]:
    think = row["mode"] == "think"
    prompt_ids = tokenizer(prompt_text(tokenizer, row["prompt"], think), add_special_tokens=False)["input_ids"]
    reply = render_response(row, think, task_spec)
    resp_ids = tokenizer(reply + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + resp_ids, [-100] * len(prompt_ids) + resp_ids


def _collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids_BT = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(examples), width), -100, dtype=torch.long)
    mask_BT = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        input_ids_BT[i, : len(ids)] = torch.tensor(ids)
        labels_BT[i, : len(ids)] = torch.tensor(labels)
        mask_BT[i, : len(ids)] = 1
    return {"input_ids": input_ids_BT, "labels": labels_BT, "attention_mask": mask_BT}


def warm_start(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, Any]],
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    task_spec: TaskSpec = TaskSpec(),
) -> float:
    """Supervised warm start on reference replies; returns the mean loss of the last 10 steps."""
    from tqdm.auto import tqdm

    examples = [_sft_example(tokenizer, r, task_spec) for r in rows]
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    recent: list[float] = []
    bar = tqdm(range(steps), desc="warm start", disable=not progress)
    for _ in bar:
        batch = _collate(rng.sample(examples, batch_size), tokenizer.pad_token_id)
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


_ANSWER = re.compile(r"-?\d+")


def extract_answer(response: str) -> str | None:
    """The last integer after any reasoning block, or None."""
    tail = response.split("</think>")[-1]
    found = _ANSWER.findall(tail)
    return found[-1] if found else None


@torch.no_grad()
def evaluate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int = 48,
    batch_size: int = 64,
    force_careful: bool = False,
) -> dict[str, float]:
    """Greedy accuracy overall and per mode (`accuracy`, `accuracy/think`, `accuracy/non_think`),
    the share of replies with an answer at all (`format`: the format-compliance rate) and of
    replies in the hasty solver's style (`hasty`). `force_careful`: every reply starts with the
    careful solver's opening (`task.careful_opening`, part of the reply that is scored)."""
    model.eval()
    tokenizer.padding_side = "left"
    hits: dict[str, list[bool]] = {"think": [], "non_think": []}
    formatted: list[bool] = []
    hasty: list[bool] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        openings = [careful_opening(r, r["mode"] == "think") if force_careful else "" for r in chunk]
        texts = [prompt_text(tokenizer, r["prompt"], r["mode"] == "think") + o for r, o in zip(chunk, openings)]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        replies = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False)
        for row, opening, reply in zip(chunk, openings, replies):
            reply = opening + reply.split(tokenizer.eos_token)[0]
            answer = extract_answer(reply)
            hits[row["mode"]].append(answer == row["label"])
            formatted.append(answer is not None)
            hasty.append(is_hasty_reply(reply))
    tokenizer.padding_side = "right"
    every = hits["think"] + hits["non_think"]
    result = {"accuracy": sum(every) / max(1, len(every))}
    for mode, h in hits.items():
        result[f"accuracy/{mode}"] = sum(h) / max(1, len(h))
    result["format"] = sum(formatted) / max(1, len(formatted))
    result["hasty"] = sum(hasty) / max(1, len(hasty))
    return result


BUILD_FILE = "build.json"
"""What `build_tiny_model` made, with the arguments it was made from (`reuse` compares them)."""
BUILDER_VERSION = 3  # 3: the tokenizer corpus no longer follows the TaskSpec defaults
"""Bumped when the same arguments would build a different model (task, warm start, template)."""
BUILD_THREADS = 2
"""Torch threads of the warm start: fixed, so the same seed gives the same model on any machine
of the same CPU family (reductions are split per thread)."""


def _build_args(task: str, seed: int, steps: int, spec: TinyModelSpec, n_train: int, n_eval: int,
                arch: str, task_spec: TaskSpec) -> dict[str, Any]:
    return {
        "builder_version": BUILDER_VERSION, "task": task, "seed": seed, "steps": steps, "arch": arch,
        "n_train": n_train, "n_eval": n_eval, "spec": dataclasses.asdict(spec), "task_spec": dataclasses.asdict(task_spec),
    }


def _reusable(out: Path, args: dict[str, Any]) -> TinyModelReport | None:
    record = out / BUILD_FILE
    if not record.exists():
        return None
    try:
        saved = json.loads(record.read_text())
    except ValueError:
        return None
    if saved.get("args") != args or not (out / "config.json").exists():
        return None
    r = saved["report"]
    return TinyModelReport(
        model_dir=out, train_path=out / "data" / "train.jsonl", eval_path=out / "data" / "eval.jsonl",
        num_parameters=r["num_parameters"], train_steps=r["train_steps"], final_loss=r["final_loss"],
        eval_accuracy=r["eval_accuracy"], eval_accuracy_by_mode=r["eval_accuracy_by_mode"],
        format_rate=r.get("format_rate", float("nan")), hasty_rate=r.get("hasty_rate", float("nan")),
        careful_accuracy=r.get("careful_accuracy", float("nan")), reused=True,
    )


def build_tiny_model(
    out_dir: str | Path,
    task: str = "arith",
    seed: int = 0,
    steps: int = 800,
    spec: TinyModelSpec = TinyModelSpec(),
    progress: bool = True,
    n_train: int = 5000,
    n_eval: int = 200,
    arch: str = "qwen2",
    task_spec: TaskSpec = TaskSpec(),
    reuse: bool = False,
) -> TinyModelReport:
    """Build tokenizer, data and a warm-started tiny model into ``out_dir``.

    Writes an HF model folder (config, safetensors, tokenizer with chat template) and
    ``out_dir/data/{train,eval}.jsonl``; returns what it made, with the eval accuracy.
    ``arch`` (``ARCHS``) picks the model: the tiny Qwen2 (``spec``) or a GLM-5 / GLM-4.5
    stand-in (``tiny.glm``), warm-started the same way on the same data.
    """
    if task != "arith":
        raise ValueError(f"task={task!r} is not known; available: ['arith']")
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not known; available: {list(ARCHS)}")
    out = Path(out_dir)
    args = _build_args(task, seed, steps, spec, n_train, n_eval, arch, task_spec)
    if reuse and (found := _reusable(out, args)) is not None:
        return found
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        report = _build(out, seed, steps, spec, progress, n_train, n_eval, arch, task_spec)
    finally:
        torch.set_num_threads(threads)
    (out / BUILD_FILE).write_text(json.dumps({"args": args, "report": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(report).items()}}, indent=1))
    return report


def _build(out: Path, seed: int, steps: int, spec: TinyModelSpec, progress: bool, n_train: int, n_eval: int,
           arch: str, task_spec: TaskSpec) -> TinyModelReport:
    torch.manual_seed(seed)
    data = make_dataset(seed=seed, n_train=n_train, n_eval=n_eval, spec=task_spec)
    train_path = write_jsonl(data["train"], out / "data" / "train.jsonl")
    eval_path = write_jsonl(data["eval"], out / "data" / "eval.jsonl")
    tokenizer = build_tokenizer(seed=seed)
    model = _new_model_for(arch, tokenizer, spec, seed)
    loss = warm_start(model, tokenizer, data["train"], steps=steps, seed=seed, progress=progress,
                      task_spec=task_spec) if steps else float("nan")
    metrics = evaluate(model, tokenizer, data["eval"])
    careful = evaluate(model, tokenizer, data["eval"], force_careful=True)["accuracy"] if task_spec.hasty_frac else float("nan")
    _save(model, tokenizer, out)
    return TinyModelReport(
        model_dir=out,
        train_path=train_path,
        eval_path=eval_path,
        num_parameters=sum(p.numel() for p in model.parameters()),
        train_steps=steps,
        final_loss=loss,
        eval_accuracy=metrics["accuracy"],
        eval_accuracy_by_mode={k.split("/")[1]: v for k, v in metrics.items() if "/" in k},
        format_rate=metrics["format"],
        hasty_rate=metrics["hasty"],
        careful_accuracy=careful,
    )
