"""A byte-level BPE tokenizer built locally with `tokenizers`, saved in HF format.

Digits are split one per token (small models learn arithmetic far better that way).
The chat template follows the Qwen3 conventions that RL recipes rely on:

- ``<|im_start|>role\\n ... <|im_end|>`` turns, an optional system message;
- ``enable_thinking``: the model reasons inside ``<think>...</think>`` before answering;
  with ``enable_thinking=False`` the generation prompt already holds an empty think block,
  so a non-think reply is the answer alone;
- every assistant turn renders exactly as it was generated, so the tokens of a rollout
  (prompt + reply) are a prefix of the conversation re-rendered with that reply, in both
  modes (multi-turn and agentic RL rely on it): non-think turns keep the empty
  ``<think>\n\n</think>\n\n`` block (as Qwen3 does for the last turn; here for every turn),
  ``reasoning_content`` renders as ``<think>\n{reasoning}\n</think>\n\n``, and earlier turns'
  reasoning is kept, not stripped;
- tool use: ``tools=[...]`` lists the tools in the system turn, an assistant's
  ``tool_calls`` render as ``<tool_call>{json}</tool_call>`` (``arguments`` as an object or,
  OpenAI-style, as a JSON string, which is written as given rather than encoded again),
  and ``tool`` messages as ``<tool_response>...</tool_response>`` inside a user turn.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slime_rl.tiny.task import corpus

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
]

CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\nCall a tool with <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>. Tools:\n"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}"
    "<|im_end|>\n"
    "{% elif messages[0].role == 'system' %}"
    "<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'user' %}"
    "<|im_start|>user\n{{ message.content }}<|im_end|>\n"
    "{% elif message.role == 'assistant' %}"
    "<|im_start|>assistant\n"
    "{% if message.reasoning_content %}<think>\n{{ message.reasoning_content }}\n</think>\n\n"
    "{% elif enable_thinking is defined and enable_thinking is false"
    " and not (message.content or '').startswith('<think>') %}<think>\n\n</think>\n\n"
    "{% endif %}"
    "{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for call in message.tool_calls %}"
    "{% set fn = call.function if call.function is defined else call %}"
    "<tool_call>\n{\"name\": \"{{ fn.name }}\", \"arguments\": "
    "{% if fn.arguments is string %}{{ fn.arguments }}{% else %}{{ fn.arguments | tojson }}{% endif %}"
    "}\n</tool_call>"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% elif message.role == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_tokenizer(vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the task corpus and wrap it as an HF fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    return out
