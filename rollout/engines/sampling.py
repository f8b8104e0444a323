"""Torch sampling for the `hf` engine: temperature, top-k, top-p, per-request seeds, stops.

    logits_BV ──► /temperature ──► log_softmax (full vocab) ──► log-prob of the chosen token
                       └──► top-k mask ► top-p mask ► softmax ► multinomial(row generator)

The reported log-prob is `log_softmax(logits / T)` over the full vocabulary (T = 1 for greedy,
temperature 0), not renormalised by top-k/top-p: exactly what the trainer recomputes with
`trainer.batching.temperature == rollout.temperature`. Everything is created on the logits'
device (CUDA included); each row's generator must live on that device too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from slime_rl.rollout.engines.base import SamplingParams


def filter_logits(logits_V: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits with the tokens outside top-k / top-p set to -inf."""
    logits_V = logits_V / params.temperature
    vocab = logits_V.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits_V, params.top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = sorted_V.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop_V = (probs_V.cumsum(-1) - probs_V) >= params.top_p
        logits_V = logits_V.scatter(0, order_V, sorted_V.masked_fill(drop_V, float("-inf")))
    return logits_V


def logprob_temperature(params: SamplingParams) -> float:
    """Temperature of the reported log-probs: the sampling one, 1 for greedy (temperature 0)."""
    return params.temperature if params.temperature > 0 else 1.0


def sample_next(
    logits_BV: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row; returns `(token_ids_B, logprobs_B)` on the logits' device,
    `logprobs_B[i] = log_softmax(logits_BV[i] / T_i)[token_i]` (full vocabulary)."""
    logits_BV = logits_BV.float()
    device = logits_BV.device
    temps_B1 = torch.tensor([[logprob_temperature(p)] for p in params], device=device)
    logprobs_BV = torch.log_softmax(logits_BV / temps_B1, dim=-1)
    tokens_B = torch.empty(logits_BV.shape[0], dtype=torch.long, device=device)
    for i, (p, gen) in enumerate(zip(params, generators)):
        if p.greedy:
            tokens_B[i] = torch.argmax(logits_BV[i])
        else:
            probs_V = filter_logits(logits_BV[i], p).softmax(-1)
            tokens_B[i] = torch.multinomial(probs_V, 1, generator=gen)[0]
    logprobs_B = logprobs_BV.gather(1, tokens_B[:, None]).squeeze(1)
    return tokens_B, logprobs_B


class StopChecker:
    """Decides whether a request ends after its latest token (EOS, stop ids, stop strings)."""

    def __init__(self, params: SamplingParams, eos_token_ids: Sequence[int], tokenizer) -> None:
        self._eos = frozenset(() if params.ignore_eos else eos_token_ids)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._stop = params.stop
        self._tokenizer = tokenizer
        # Enough trailing tokens to contain any stop string: a token decodes to at least one
        # *byte* (byte-level BPE splits a CJK character into 3 tokens; byte-fallback pieces
        # are one byte), so count UTF-8 bytes, not characters; +8 for tokens that decode to
        # nothing (skipped special tokens).
        self._window = max((len(s.encode("utf-8")) for s in self._stop), default=0) + 8
        if self._stop and tokenizer is None:
            raise ValueError(
                "stop strings need a tokenizer; load the engine with one or use stop_token_ids"
            )

    def check(self, generated: Sequence[int]) -> tuple[bool, str | int | None]:
        """(finished, stop_reason) after `generated[-1]` was appended."""
        last = generated[-1]
        if last in self._stop_ids:
            return True, last
        if last in self._eos:
            return True, None
        if self._stop:
            tail = self._tokenizer.decode(
                list(generated[-self._window :]), skip_special_tokens=True
            )
            for s in self._stop:
                if s in tail:
                    return True, s
        return False, None
