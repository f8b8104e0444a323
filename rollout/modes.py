"""Think / non-think format checks shared by rollout metrics, evaluation and the agent loop.

A think response holds one well-formed `<think>…</think>` with non-empty reasoning, then a
non-empty answer; a non-think response holds no reasoning (an empty block is allowed). The rule
is `think_format`'s (the built-in reward); here it only decides the `format_violation` metrics:

    rollout/format_violation_frac[/<mode>]   share of samples whose format is wrong for their mode
    eval/format_violation_frac[/<mode>]

Multi-turn samples are judged per turn by the agent loop (`metadata["agent"]["format_violations"]`
counts the turns that broke the rule); their whole response also holds tool results and template
glue, which the single-response rule would misread.
"""

from __future__ import annotations

from slime_rl.buffers.schema import Sample
from slime_rl.rewards.builtin.formats import think_format


def turn_format_problem(mode: str, text: str, prompt_tail: str = "") -> str | None:
    """Why one generated turn is malformed for `mode` (None when fine). `text` is the turn's
    decoded text; `prompt_tail` the end of what preceded it (a template may open `<think>` there)."""
    probe = Sample(sample_id="", group_id="", prompt_ids=[], response_ids=[], mode=mode, prompt=prompt_tail, response=text)
    out = think_format(probe)
    return out.get("format_error")


def format_violation(sample: Sample) -> bool:
    """The sample's format is wrong for its mode (any turn, for an agent episode)."""
    agent = sample.metadata.get("agent") if isinstance(sample.metadata, dict) else None
    if isinstance(agent, dict) and "format_violations" in agent:
        return int(agent["format_violations"]) > 0
    return turn_format_problem(sample.mode, sample.response, sample.prompt[-64:]) is not None
