"""A user-written reward for the `arith` task: correct answers, with a bonus for brevity.

slime-rl loads this file by path (see config.yaml next to it); nothing else is needed.
A reward takes one sample and returns a float or a dict with ``score`` plus extra numbers,
which are logged as metrics (``reward/correct_and_concise/correct_mean`` ...).
"""

import re

_NUMBER = re.compile(r"-?\d+")


def correct_and_concise(sample, max_chars=200, brevity_weight=0.2):
    """1.0 for a correct, short answer; less for a correct, long one; 0.0 when wrong."""
    answer_text = sample.response.split("</think>")[-1]
    numbers = _NUMBER.findall(answer_text)
    correct = bool(numbers) and numbers[-1] == sample.label.strip()
    too_long = max(0, len(answer_text) - max_chars) / max_chars
    brevity = max(0.0, 1.0 - too_long)
    score = float(correct) * ((1.0 - brevity_weight) + brevity_weight * brevity)
    return {"score": score, "correct": float(correct), "answer_chars": float(len(answer_text))}
