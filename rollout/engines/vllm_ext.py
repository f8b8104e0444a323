"""vLLM worker extension: in-place weight reload, called through `collective_rpc`.

    VLLMEngine.backend_load ──collective_rpc("slime_load_weights", payload)──► every worker:
        payload = [(name, tensor), ...]  (in-process executor: tensors passed by reference)
               or safetensors bytes      (worker processes: tensors do not survive the RPC)
        worker.reload_weights(weights_iterator)   # vLLM's layerwise in-place reload
        tied lm_head: repack from the new embedding (else it keeps the OLD packed weights)

`slime_install_logprob_sampler` (called once after start) switches the worker's sampler to
report `log_softmax(logits / T)` over the full vocabulary (see `TemperatureLogprobSampler`).

Loaded by vLLM by dotted path (`worker_extension_cls`); imports vllm only inside methods so
the module itself imports without vllm installed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

EXTENSION_PATH = "slime_rl.rollout.engines.vllm_ext.WeightSyncExtension"


def pack_weights(named_tensors: list[tuple[str, torch.Tensor]]) -> bytes:
    """One safetensors blob for RPCs that cross a process boundary (names must be unique)."""
    from safetensors.torch import save

    return save({name: t.detach().contiguous().cpu() for name, t in named_tensors})


def _unpack(payload: Any) -> list[tuple[str, torch.Tensor]]:
    if isinstance(payload, (bytes, bytearray)):
        from safetensors.torch import load

        return list(load(bytes(payload)).items())
    return list(payload)


def _temperature_logprob_sampler_cls():
    """vLLM's V1 `Sampler` reporting log-probs of the temperature-scaled, unfiltered
    distribution. None of vLLM 0.32's `logprobs_mode`s gives that: `raw_logprobs` ignores the
    temperature, `processed_logprobs` is also renormalised over the top-k/top-p survivors,
    `processed_logits`/`raw_logits` are unnormalised. So keep `raw_logprobs` (computed on
    the raw logits before penalties and temperature) and divide by each row's temperature
    first (rows with temperature < 1e-5, i.e. greedy, use 1)."""
    from vllm.v1.sample.sampler import Sampler

    class TemperatureLogprobSampler(Sampler):
        _slime_temperature = None

        def forward(self, logits, sampling_metadata, *args, **kwargs):
            self._slime_temperature = sampling_metadata.temperature  # None when all greedy
            try:
                return super().forward(logits, sampling_metadata, *args, **kwargs)
            finally:
                self._slime_temperature = None

        def compute_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
            temp = self._slime_temperature
            logits = logits.to(torch.float32)
            if temp is not None:
                temp_B1 = torch.where(temp < 1e-5, 1.0, temp).to(logits)[:, None]
                logits = logits / temp_B1
            return logits.log_softmax(dim=-1)

    return Sampler, TemperatureLogprobSampler


class WeightSyncExtension:
    """Mixed into vLLM's worker class; `self` is the worker (has `model_runner`, `reload_weights`)."""

    def slime_load_weights(self, payload: Any) -> int:
        """Reload the full state dict in place; returns the number of tensors received."""
        weights = _unpack(payload)
        model = self.model_runner.get_model()
        device = next(model.parameters()).device
        config = getattr(model, "config", None)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        if tied:  # vLLM ties lm_head to embed_tokens itself and ignores a separate copy
            weights = [(n, t) for n, t in weights if n != "lm_head.weight"]
        self.reload_weights(weights_iterator=((n, t.to(device)) for n, t in weights))
        lm_head = getattr(model, "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if tied and method is not None and hasattr(method, "process_weights_after_loading"):
            # On CPU the logits GEMM uses a packed copy made at load time; re-pack it from the
            # freshly loaded (shared) embedding, or log-probs come from the old weights.
            method.process_weights_after_loading(lm_head)
        return len(weights)

    def slime_install_logprob_sampler(self) -> str:
        """Make the worker report `log_softmax(logits / T)` log-probs (the trainer's view);
        returns the logprobs mode in effect. Refuses a sampler it does not know."""
        base, scaled = _temperature_logprob_sampler_cls()
        runner = self.model_runner
        sampler = getattr(runner, "sampler", None)
        if type(sampler) is not base or sampler.logprobs_mode != "raw_logprobs":
            raise RuntimeError(
                f"vllm engine: cannot report temperature-scaled log-probs with sampler "
                f"{type(sampler).__name__} (logprobs_mode="
                f"{getattr(sampler, 'logprobs_mode', None)!r}); use vLLM's V1 model runner "
                "(VLLM_USE_V2_MODEL_RUNNER=0) and the default logprobs_mode=raw_logprobs"
            )
        sampler.__class__ = scaled  # same state, temperature-aware compute_logprobs
        return "temperature_scaled_raw_logprobs"

    def slime_param_checksum(self) -> float:
        """Sum of all parameters (float64): lets tests see that weights really changed."""
        model = self.model_runner.get_model()
        return float(sum(p.detach().double().sum() for p in model.parameters()))
