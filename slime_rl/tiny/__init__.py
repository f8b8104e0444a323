"""Offline tiny model, tokenizer and `arith` task, built locally (nothing is downloaded)."""

from slime_rl.tiny.longtail import LongtailSpec, build_longtail_tiny_model
from slime_rl.tiny.model import (
    TinyModelReport,
    TinyModelSpec,
    build_tiny_model,
    evaluate,
    extract_answer,
    random_tiny_model,
)
from slime_rl.tiny.task import TASKS, make_dataset
from slime_rl.tiny.tokenizer import CHAT_TEMPLATE, build_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "LongtailSpec",
    "TASKS",
    "TinyModelReport",
    "TinyModelSpec",
    "build_longtail_tiny_model",
    "build_tiny_model",
    "build_tokenizer",
    "evaluate",
    "extract_answer",
    "make_dataset",
    "random_tiny_model",
]
