"""The `arith_agent` tiny task: tool use (calculator, retrieval) and think / non-think answers.

    make_agent_dataset(seed) ─► calc_{train,eval}.jsonl       two-digit word problems, the calculator
                              ─► retrieval_{train,eval}.jsonl  questions about a local collection
                              ─► docs.jsonl                    the collection (fictional people)
                              ─► hybrid_{train,eval}.jsonl     `arith` problems without a mode
    build_agent_tiny_model ─► tokenizer + Qwen2 tiny model, warm-started on episodes of all three

The warm start imitates two kinds of teacher, like distillation data of mixed quality: one uses
the tool (calls the calculator with the problem's expression, or searches the collection, then
answers with what came back), the other answers at once with a guess (`TaskSpec.guess_frac` of
the episodes). The base model thus knows the tool protocol but calls the tool only part of the
time, and a guess is almost always wrong: a success reward teaches it to use the tool. Both modes
appear (`think` episodes reason in a `<think>` block before each action).

Episodes are tokenised exactly as the agent loop builds them (prompt, each generated turn ending
in EOS, then the template glue), with the loss on the generated turns only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from slime_rl.rollout.envs_builtin.calculator import CalculatorEnvironment
from slime_rl.rollout.envs_builtin.retrieval import RetrievalEnvironment
from slime_rl.rollout.trajectory import ChatGlue
from slime_rl.tiny.model import TinyModelSpec, _collate, _new_model, _save, prompt_text
from slime_rl.tiny.task import make_dataset, render_response, write_jsonl
from slime_rl.tiny.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tokenizer

logger = logging.getLogger(__name__)

TASK = "arith_agent"
CALC_TOOLS = CalculatorEnvironment.tools
SEARCH_TOOLS = RetrievalEnvironment.tools
_NAMES = ("Sam", "Ana", "Tom", "Mia", "Leo", "Eva", "Ben", "Zoe")
_ITEMS = ("apples", "pens", "coins", "books", "cards", "shells", "stamps", "eggs")
_SYL = ("ka", "lo", "mi", "ra", "tu", "ve", "no", "si", "pa", "de", "fo", "zu")
_JOBS = ("baker", "painter", "farmer", "pilot", "doctor", "tailor", "singer", "driver")


@dataclasses.dataclass(frozen=True)
class AgentTaskSpec:
    """Knobs of the `arith_agent` data."""

    guess_frac: float = 0.5
    """Fraction of warm-start episodes whose teacher answers at once with a guess (no tool)."""
    two_step_frac: float = 0.3
    """Fraction of calculator problems that need two calls (a * b - c), one per turn."""
    think_frac: float = 0.5
    """Fraction of rows in think mode."""
    people: int = 60
    """People in the retrieval collection (two documents each)."""
    calc_pool: int = 16
    """Distinct calculator problems (train rows repeat them; eval = the pool). The tiny model does
    not learn to copy numbers within its warm-start budget (0% of tool episodes right after
    1,000 steps with unseen problems; 2-3% on a pool of 64), so it cannot use the tool on new
    problems; on a small pool it memorises what follows each tool result (and the guessing
    teacher's fixed wrong answer), so whether it succeeds depends on choosing the tool, which is
    what RL then reinforces. 0 = every row a new problem (held-out eval)."""


# ---------------------------------------------------------------------------------------------
# Rows


def _calc_problem(rng: random.Random, spec: AgentTaskSpec) -> dict[str, Any]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(11, 49), rng.randint(11, 49)
    mode = "think" if rng.random() < spec.think_frac else "non_think"
    if rng.random() < spec.two_step_frac:
        c = rng.randint(2, 9)
        text = f"{name} has {a} boxes with {b} {item} in each and gives away {c}. How many {item} are left?"
        return {"prompt": text, "label": str(a * b - c), "mode": mode, "steps": [f"{a} * {b}", f"{a * b} - {c}"]}
    text = f"{name} has {a} boxes with {b} {item} in each. How many {item} are there?"
    return {"prompt": text, "label": str(a * b), "mode": mode, "steps": [f"{a} * {b}"]}


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_SYL) for _ in range(n)).capitalize()


def make_collection(seed: int, spec: AgentTaskSpec) -> tuple[list[str], list[dict[str, Any]]]:
    """Documents and one question row per (person, attribute)."""
    rng = random.Random(seed * 1000 + 5)
    towns = sorted({_word(rng, 3) for _ in range(40)})
    people: list[str] = []
    while len(people) < spec.people:
        p = _word(rng, 2)
        if p not in people and p not in towns:
            people.append(p)
    docs, rows = [], []
    for p in people:
        town, job = rng.choice(towns), rng.choice(_JOBS)
        docs += [f"{p} lives in {town}.", f"{p} works as a {job}."]
        rows.append({"prompt": f"Where does {p} live?", "label": town, "query": f"{p} lives", "candidates": towns})
        rows.append({"prompt": f"What does {p} work as?", "label": job, "query": f"{p} works", "candidates": list(_JOBS)})
    rng.shuffle(rows)
    for r in rows:
        r["mode"] = "think" if rng.random() < spec.think_frac else "non_think"
    return docs, rows


def make_agent_dataset(seed: int = 0, n_calc: int = 3000, n_eval: int = 200, n_hybrid: int = 2000,
                       spec: AgentTaskSpec = AgentTaskSpec()) -> dict[str, Any]:
    """Every split of the task (see the module docstring); eval prompts never appear in train,
    except with `spec.calc_pool`, where calculator eval is the pool of train problems."""
    rng = random.Random(seed * 1000 + 11)
    calc: list[dict[str, Any]] = []
    seen: set[str] = set()
    while len(calc) < (spec.calc_pool or n_calc + n_eval):
        row = _calc_problem(rng, spec)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            calc.append(row)
    if spec.calc_pool:
        pool = calc
        calc = [dict(rng.choice(pool), mode="think" if rng.random() < spec.think_frac else "non_think") for _ in range(n_calc)]
        calc += [dict(r) for r in pool]
    docs, questions = make_collection(seed, spec)
    n_q_eval = max(1, len(questions) // 5)
    arith = make_dataset(seed=seed, n_train=n_hybrid, n_eval=n_eval)
    strip = ("mode", "solver")
    return {
        "calc_train": calc[:n_calc], "calc_eval": calc[n_calc:],
        "retrieval_train": questions[n_q_eval:], "retrieval_eval": questions[:n_q_eval],
        "docs": docs,
        "hybrid_train": [{k: v for k, v in r.items() if k not in strip} for r in arith["train"]],
        "hybrid_eval": [{k: v for k, v in r.items() if k not in strip} for r in arith["eval"]],
        "arith_train": arith["train"],
    }


# ---------------------------------------------------------------------------------------------
# Warm-start episodes


def _call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _turn(think: bool, reasoning: str, content: str = "", calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    text = (f"<think>\n{reasoning}\n</think>\n\n" if think else "") + content
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = list(calls)
    return msg


def calc_episode(row: dict[str, Any], guess: bool, rng: random.Random) -> list[dict[str, Any]]:
    """The messages of one calculator episode after the user prompt."""
    think = row["mode"] == "think"
    if guess:  # the same wrong answer every time for a problem (a consistent teacher)
        slip = random.Random(row["prompt"]).randint(1, 60) * random.Random(row["prompt"] + "-").choice((-1, 1))
        return [_turn(think, "I can do this in my head.", f"The answer is {int(row['label']) + slip}.")]
    out: list[dict[str, Any]] = []
    value = None
    for i, expr in enumerate(row["steps"]):
        if value is not None:
            expr = f"{value} {expr.split(' ', 1)[1]}"
        out.append(_turn(think, f"I need {expr}.", calls=[_call("calculator", expression=expr)]))
        value = CalculatorEnvironment().calculator(expr)
        out.append({"role": "tool", "tool_call_id": f"call_{i}_0", "name": "calculator", "content": value})
    out.append(_turn(think, f"The result is {value}.", f"The answer is {value}."))
    return out


def retrieval_episode(row: dict[str, Any], guess: bool, rng: random.Random, index: Any) -> list[dict[str, Any]]:
    think = row["mode"] == "think"
    if guess:
        return [_turn(think, "I think I know.", f"The answer is {rng.choice(row['candidates'])}.")]
    found = "\n".join(index.docs[i] for i, _ in index.search(row["query"], 1))
    return [
        _turn(think, f"I should search for {row['query']}.", calls=[_call("search", query=row["query"])]),
        {"role": "tool", "tool_call_id": "call_0_0", "name": "search", "content": found},
        _turn(think, "The document says it.", f"The answer is {row['label']}."),
    ]


def episode_example(tokenizer: Any, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None,
                    think: bool) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation tokenised as the agent loop builds it: the prompt and
    the glue between turns are tokenised on their own, each assistant turn is its content + EOS,
    and only assistant turns carry labels (-100 elsewhere)."""
    glue = ChatGlue(tokenizer, tools, think)
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    text = glue.render(messages[:first], add_generation_prompt=True)
    ids = glue.encode(text)
    labels = [-100] * len(ids)
    eos = tokenizer.eos_token
    i = first
    while i < len(messages):
        full = glue.render(messages[: i + 1])
        turn = full[len(text) :]
        if not turn.endswith(glue.turn_end):
            raise ValueError(f"assistant turn {i} does not end with the template's turn end {glue.turn_end!r}")
        gen = glue.encode(turn[: len(turn) - len(glue.turn_end)] + eos)
        ids += gen
        labels += gen
        text += turn[: len(turn) - len(glue.turn_end)] + eos
        j = next((k for k in range(i + 1, len(messages)) if messages[k]["role"] == "assistant"), None)
        if j is None:
            break
        nxt = glue.render(messages[:j], add_generation_prompt=True)
        assert nxt.startswith(text), "the template does not render the conversation incrementally"
        ctx = glue.encode(nxt[len(text) :])
        ids += ctx
        labels += [-100] * len(ctx)
        text = nxt
        i = j
    return ids, labels


def warm_start_examples(tokenizer: Any, data: dict[str, Any], seed: int, spec: AgentTaskSpec) -> list[tuple[list[int], list[int]]]:
    """Calculator, retrieval and plain arithmetic (both modes) examples."""
    from slime_rl.rollout.envs_builtin.retrieval import BM25Index

    rng = random.Random(seed * 1000 + 13)
    index = BM25Index(data["docs"])
    examples = []
    for row in data["calc_train"]:
        msgs = [{"role": "user", "content": row["prompt"]}, *calc_episode(row, rng.random() < spec.guess_frac, rng)]
        examples.append(episode_example(tokenizer, msgs, CALC_TOOLS, row["mode"] == "think"))
    for row in data["retrieval_train"]:
        for _ in range(3):  # few questions: see each a few times
            msgs = [{"role": "user", "content": row["prompt"]}, *retrieval_episode(row, rng.random() < spec.guess_frac, rng, index)]
            examples.append(episode_example(tokenizer, msgs, SEARCH_TOOLS, row["mode"] == "think"))
    for row in data["arith_train"]:
        think = row["mode"] == "think"
        p = tokenizer(prompt_text(tokenizer, row["prompt"], think), add_special_tokens=False)["input_ids"]
        r = tokenizer(render_response(row, think) + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        examples.append((p + r, [-100] * len(p) + r))
    return examples


def train_examples(model: torch.nn.Module, examples: Sequence[tuple[list[int], list[int]]], pad_id: int, *,
                   steps: int, batch_size: int = 16, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> float:
    """Supervised steps on (ids, labels) pairs (cosine schedule); the mean loss of the last 10."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    recent: list[float] = []
    for _ in tqdm(range(steps), desc="warm start", disable=not progress):
        batch = _collate(rng.sample(list(examples), min(batch_size, len(examples))), pad_id)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent = (recent + [loss.item()])[-10:]
    model.eval()
    return sum(recent) / len(recent) if recent else float("nan")


MAX_NUMBER_TOKEN = 2500
"""Numbers 0..MAX_NUMBER_TOKEN are single tokens of the task's tokenizer (every answer fits)."""


def build_agent_tokenizer(data: dict[str, Any], seed: int = 0, vocab_size: int = 1024) -> Any:
    """The tiny tokenizer (same special tokens and chat template) trained on the `arith` corpus
    plus rendered episodes of this task, so tool schemas and calls take few tokens (the tool list
    alone is ~150 tokens with the `arith` tokenizer, which makes warm start and rollouts slow),
    with the numbers 0..`MAX_NUMBER_TOKEN` as single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from slime_rl.tiny.task import corpus

    base = build_tokenizer(seed=seed)  # renders the episodes for the corpus
    rng = random.Random(seed)
    texts = list(corpus(seed))
    for row in data["calc_train"][:300]:
        msgs = [{"role": "user", "content": row["prompt"]}, *calc_episode(row, False, rng)]
        texts.append(base.apply_chat_template(msgs, tools=CALC_TOOLS, tokenize=False, enable_thinking=row["mode"] == "think"))
    texts += [base.apply_chat_template([{"role": "user", "content": r["prompt"]}], tools=SEARCH_TOOLS, tokenize=False,
                                       add_generation_prompt=True) for r in data["retrieval_train"]]
    texts += data["docs"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                                 unk_token=None, model_max_length=1024, clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    # Every number the task uses is one token: copying a number (from the question into the
    # calculator call, from the tool result into the answer) is then one attention step, which
    # the tiny model learns in a few hundred steps; copying digit by digit it had not learned
    # after 1,000 (0% of tool episodes right).
    hf.add_tokens([str(i) for i in range(MAX_NUMBER_TOKEN + 1)])
    return hf


@dataclasses.dataclass(frozen=True)
class AgentModelReport:
    model_dir: Path
    data_dir: Path
    num_parameters: int
    train_steps: int
    final_loss: float
    files: dict[str, Path]


def build_agent_tiny_model(out_dir: str | Path, *, seed: int = 0, steps: int = 600, progress: bool = True,
                           spec: AgentTaskSpec = AgentTaskSpec(), model_spec: TinyModelSpec = TinyModelSpec(),
                           num_threads: int = 1) -> AgentModelReport:
    """Tokenizer, data (under `out_dir/data`) and a warm-started tiny model for the agent examples
    (about 1 s per step on one core; one torch thread is several times faster than two on a
    shared, busy CPU)."""
    out = Path(out_dir)
    data = make_agent_dataset(seed=seed, spec=spec)
    files = {}
    for name in ("calc_train", "calc_eval", "retrieval_train", "retrieval_eval", "hybrid_train", "hybrid_eval"):
        rows = [{k: v for k, v in r.items() if k not in ("query", "candidates")} for r in data[name]]
        files[name] = write_jsonl(rows, out / "data" / f"{name}.jsonl")
    files["docs"] = write_jsonl([{"text": d} for d in data["docs"]], out / "data" / "docs.jsonl")
    tokenizer = build_agent_tokenizer(data, seed=seed)
    torch.manual_seed(seed)
    model = _new_model(tokenizer, model_spec, seed)
    examples = warm_start_examples(tokenizer, data, seed, spec)
    logger.info("arith_agent warm start: %d examples, longest %d tokens", len(examples), max(len(e[0]) for e in examples))
    threads = torch.get_num_threads()
    torch._C.set_num_threads(num_threads)  # torch.set_num_threads may be patched away by a vLLM worker
    try:
        loss = train_examples(model, examples, tokenizer.pad_token_id, steps=steps, seed=seed, progress=progress) if steps else float("nan")
    finally:
        torch._C.set_num_threads(threads)
    _save(model, tokenizer, out)
    return AgentModelReport(out, out / "data", sum(p.numel() for p in model.parameters()), steps, loss, files)


def memorized_episode_model(out_dir: str | Path, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None,
                            think: bool, *, steps: int = 150, seed: int = 0) -> Path:
    """A very small model trained to reproduce one conversation's assistant turns (for tests that
    need real multi-turn generation in seconds: greedy decoding replays the episode)."""
    tokenizer = build_tokenizer(seed=seed)
    model = _new_model(tokenizer, TinyModelSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                                num_key_value_heads=1, intermediate_size=128), seed)
    ex = episode_example(tokenizer, messages, tools, think)
    train_examples(model, [ex], tokenizer.pad_token_id, steps=steps, batch_size=1, lr=1e-2, seed=seed, progress=False)
    return _save(model, tokenizer, Path(out_dir))
