"""`hf` engine: transformers + torch, batched sampling with a KV cache; the reference backend.

    waiting requests ──► wave (≤ max_batch_size, prompts left-padded) ──► prefill ─► sample
                                    ▲                                       │
                                    └──── next wave when all rows ended ◄── decode step ◄┘
                                          (finished/aborted rows are pruned from the cache)

A wave admits no newcomers (static batching), which keeps the code small and the numerics
simple; the vllm backend is the one with continuous batching. Works wherever torch works.

LoRA (`lora=`, set by the driver when `trainer.lora.publish` resolves to `adapter`): the model
is wrapped by peft (the adapter applied unmerged, base weights untouched) and each weight
update copies the adapter's lora_A / lora_B tensors in (`set_peft_model_state_dict`).

The cache is the model's own `DynamicCache(config=...)`, so each architecture gets the one it
needs (GQA keys/values; GLM-5's compressed MLA latents plus the DSA indexer's key cache).
With `record_routed_experts=True` an MoE model's routers are hooked (`moe.RoutingRecorder`)
and each result carries the experts every computed position was routed to.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import torch
from slime_rl.rollout.engines.base import FinishReason, GenerateRequest, check_adapter_only
from slime_rl.rollout.engines.core import StepDelta, SteppedEngine
from slime_rl.rollout.engines.moe import RoutingRecorder, fuse_per_expert
from slime_rl.rollout.engines.sampling import StopChecker, sample_next

logger = logging.getLogger(__name__)

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclasses.dataclass(slots=True)
class _Row:
    request: GenerateRequest
    generator: torch.Generator
    stop: StopChecker
    generated: list[int] = dataclasses.field(default_factory=list)


class HFEngine(SteppedEngine):
    """Rollout engine on a transformers causal LM.

    Example:
        >>> engine = HFEngine("/path/to/model")                       # doctest: +SKIP
        >>> res = await engine.generate(GenerateRequest("r0", [5, 6, 7]))  # doctest: +SKIP
        >>> res.token_ids, res.logprobs, res.finish_reason            # doctest: +SKIP
    """

    backend = "hf"

    def __init__(
        self,
        model_path: str | Path,
        *,
        dtype: str = "auto",
        device: str | None = None,
        max_batch_size: int = 64,
        seed: int = 0,
        attn_implementation: str = "eager",
        num_threads: int | None = None,
        record_routed_experts: bool = False,
        lora: dict[str, Any] | None = None,
        recompute_kv_on_update: bool = True,
    ) -> None:
        """`recompute_kv_on_update=False`: rows kept across a weight update keep the KV cache
        of the old weights (True recomputes it with the new ones). `lora`: serve a LoRA adapter
        (keys of a PEFT `adapter_config.json`: `r`, `lora_alpha`, `target_modules`): the model
        is wrapped by peft with a zero adapter (= the base) and weight updates carry the
        adapter tensors only."""
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        super().__init__()
        if num_threads is not None:
            # On a busy CPU, torch's default of one OpenMP thread per core can be >10x slower
            # for a tiny model than one thread (spin-waiting on descheduled threads). Set on
            # the engine thread, where the model runs, and here (loading runs on this thread).
            torch._C.set_num_threads(num_threads)
            self._set_engine_threads(num_threads)
        if dtype not in _DTYPES:
            raise ValueError(f"hf engine: dtype={dtype!r}; choose one of {sorted(_DTYPES)}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = _DTYPES[dtype] or (
            torch.float32 if self.device.type == "cpu" else torch.bfloat16
        )
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, attn_implementation=attn_implementation
        ).to(self.device)
        self.lora = dict(lora) if lora else None
        self._recompute_kv_on_update = bool(recompute_kv_on_update)
        if self.lora:
            self.model = _wrap_lora(self.model, self.lora)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        eos: set[int] = set()
        try:
            gen_eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        except OSError:
            gen_eos = None
        for e in (gen_eos, self.model.config.eos_token_id, self.tokenizer.eos_token_id):
            eos.update([e] if isinstance(e, int) else (e or []))
        self.eos_token_ids = sorted(eos)
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        )
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.max_batch_size = max_batch_size
        self._rng = random.Random(seed)
        self._waiting: collections.deque[GenerateRequest] = collections.deque()
        self._rows: list[_Row] = []
        self._seq_BT: torch.Tensor | None = (
            None  # every token so far; the last one not yet in the cache
        )
        self._mask_BT: torch.Tensor | None = None
        self._cache = None
        self._recorder: RoutingRecorder | None = None
        if record_routed_experts:
            self._recorder = RoutingRecorder(self.model)
            if not self._recorder.num_layers:
                logger.warning("hf engine: record_routed_experts=True but %s has no MoE router; nothing is recorded",
                               type(self.model).__name__)
                self._recorder.remove()
                self._recorder = None

    def tokenizer_info(self) -> dict[str, Any]:
        """`{"max_model_len": max_position_embeddings, "eos_token_id": [ids]}` (EOS ids from
        the generation config, the model config and the tokenizer together)."""
        return {"max_model_len": self.max_model_len, "eos_token_id": list(self.eos_token_ids)}

    # ---- backend hooks ------------------------------------------------------------------------
    def backend_add(self, requests: list[GenerateRequest]) -> None:
        for r in requests:
            if len(r.prompt_token_ids) >= self.max_model_len:
                raise ValueError(
                    f"prompt of {len(r.prompt_token_ids)} tokens does not fit the model's "
                    f"{self.max_model_len} positions"
                )
        self._waiting.extend(requests)

    def backend_abort(self, request_ids: list[str]) -> None:
        ids = set(request_ids)
        self._waiting = collections.deque(r for r in self._waiting if r.request_id not in ids)
        keep = [i for i, row in enumerate(self._rows) if row.request.request_id not in ids]
        if len(keep) != len(self._rows):
            self._select(keep)

    @torch.no_grad()
    def backend_step(self) -> list[StepDelta]:
        prefill = not self._rows
        if prefill and not self._waiting:
            return []
        if self._recorder is not None:  # only these passes: a re-prefill after an update is not recorded
            self._recorder.active = True
        try:
            logits_BV = self._start_wave() if prefill else self._forward_last()
            routing = self._routing(prefill)
        finally:
            if self._recorder is not None:
                self._recorder.active = False
        tokens_B, logprobs_B = sample_next(
            logits_BV, [r.request.sampling for r in self._rows], [r.generator for r in self._rows]
        )
        self._seq_BT = torch.cat([self._seq_BT, tokens_B[:, None]], dim=1)
        self._mask_BT = torch.cat([self._mask_BT, torch.ones_like(self._mask_BT[:, :1])], dim=1)
        tokens, logprobs = tokens_B.tolist(), logprobs_B.tolist()  # one device sync per step
        deltas, keep = [], []
        for i, row in enumerate(self._rows):
            tok = tokens[i]
            row.generated.append(tok)
            done, stop_reason = row.stop.check(row.generated)
            reason = FinishReason.STOP if done else None
            total = len(row.request.prompt_token_ids) + len(row.generated)
            if reason is None and (
                len(row.generated) >= row.request.sampling.max_new_tokens
                or total >= self.max_model_len
            ):
                reason = FinishReason.LENGTH
            delta = StepDelta(row.request.request_id, [tok], [logprobs[i]], reason, stop_reason)
            if routing is not None:
                delta.routing = (routing[i],)
            deltas.append(delta)
            if reason is None:
                keep.append(i)
        if len(keep) != len(self._rows):
            self._select(keep)
        return deltas

    def backend_update_weights(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        if self.lora:
            self._load_adapter(named_tensors)
        else:
            self._load_full(named_tensors)
        if self._rows and self._recompute_kv_on_update:  # rows kept across the update: new weights' KV
            self._cache = self._prefill(self._seq_BT[:, :-1], self._mask_BT[:, :-1])[1]

    def _load_adapter(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Copy adapter tensors (PEFT saved names, `...q_proj.lora_A.weight`) into the model's
        adapter; every adapter tensor must be in the update."""
        from peft import set_peft_model_state_dict

        check_adapter_only("hf", named_tensors)
        want = {n for n in self.model.state_dict() if ".lora_" in n}
        result = set_peft_model_state_dict(self.model, dict(named_tensors))
        if result.unexpected_keys:
            raise ValueError(f"hf engine: adapter tensors {list(result.unexpected_keys)[:3]} do not fit the served adapter")
        missing = sorted(want & set(result.missing_keys))
        if missing:
            raise ValueError(f"hf engine: the adapter update misses {missing[:3]}; send every lora_A / lora_B tensor")

    def _load_full(self, named_tensors: list[tuple[str, torch.Tensor]]) -> None:
        targets = self.model.state_dict(keep_vars=True)
        # per-expert names (HF checkpoints, Megatron-style trainers) -> this model's fused experts
        named_tensors = fuse_per_expert(named_tensors, targets)
        unknown = [n for n, _ in named_tensors if n not in targets]
        if unknown:
            raise ValueError(f"hf engine: weights {unknown[:5]} are not parameters of the model")
        covered: set[int] = set()
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = targets[name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ValueError(
                        f"hf engine: weight {name!r} has shape {tuple(tensor.shape)}, model has {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)  # casts and moves in the one copy (no temporary)
                covered.add(id(param))
        missing = sorted({n for n, p in targets.items() if id(p) not in covered})
        if missing:
            raise ValueError(
                f"hf engine: the update misses {missing[:5]}...; send the full state dict "
                "(partial updates are refused, as on vllm)"
            )

    def backend_close(self) -> None:
        self._rows, self._waiting, self._cache = [], collections.deque(), None
        self._seq_BT = self._mask_BT = None
        del self.model
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- internals ----------------------------------------------------------------------------
    def _routing(self, prefill: bool) -> list[tuple[int, object]] | None:
        """Per row: (first position, int16 (n, L, K) routing of the positions this pass computed).
        Prefill: the prompt's positions (left padding cut off); decode: the position of the
        token fed, i.e. prompt + tokens generated before this step - 1."""
        if self._recorder is None:
            return None
        B, T = (self._seq_BT.shape if prefill else (self._seq_BT.shape[0], 1))
        rec_BTLK = self._recorder.take(B, T)
        out = []
        for i, row in enumerate(self._rows):
            n = len(row.request.prompt_token_ids)
            if prefill:
                out.append((0, rec_BTLK[i, T - n :]))
            else:
                out.append((n + len(row.generated) - 1, rec_BTLK[i]))
        return out

    def _prefill(self, seq_BT: torch.Tensor, mask_BT: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=seq_BT,
            attention_mask=mask_BT,
            position_ids=pos_BT,
            past_key_values=cache,
            use_cache=True,
        )
        return out.logits[:, -1, :], out.past_key_values

    def _start_wave(self) -> torch.Tensor:
        batch = [
            self._waiting.popleft() for _ in range(min(self.max_batch_size, len(self._waiting)))
        ]
        width = max(len(r.prompt_token_ids) for r in batch)
        seq_BT = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        mask_BT = torch.zeros((len(batch), width), dtype=torch.long)
        self._rows = []
        for i, r in enumerate(batch):
            n = len(r.prompt_token_ids)
            seq_BT[i, width - n :] = torch.tensor(r.prompt_token_ids)
            mask_BT[i, width - n :] = 1
            seed = r.sampling.seed if r.sampling.seed is not None else self._rng.getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)  # on the logits' device
            self._rows.append(
                _Row(r, gen, StopChecker(r.sampling, self.eos_token_ids, self.tokenizer))
            )
        self._seq_BT, self._mask_BT = seq_BT.to(self.device), mask_BT.to(self.device)
        logits_BV, self._cache = self._prefill(self._seq_BT, self._mask_BT)
        return logits_BV

    def _forward_last(self) -> torch.Tensor:
        pos_B1 = self._mask_BT.sum(-1, keepdim=True) - 1
        out = self.model(
            input_ids=self._seq_BT[:, -1:],
            attention_mask=self._mask_BT,
            position_ids=pos_B1,
            past_key_values=self._cache,
            use_cache=True,
        )
        self._cache = out.past_key_values
        return out.logits[:, -1, :]

    def _select(self, keep: list[int]) -> None:
        self._rows = [self._rows[i] for i in keep]
        if not keep:
            self._seq_BT = self._mask_BT = self._cache = None
            return
        idx = torch.tensor(keep, device=self.device)
        self._seq_BT, self._mask_BT = self._seq_BT[idx], self._mask_BT[idx]
        self._cache.batch_select_indices(idx)


def _wrap_lora(model: torch.nn.Module, lora: dict[str, Any]) -> torch.nn.Module:
    """`model` behind a peft LoRA adapter with lora_B = 0 (serves the base until the first update)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as e:
        raise ImportError("install slime-rl[lora] (peft) to serve LoRA adapters on rollout.engine=hf") from e
    config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["lora_alpha"]), lora_dropout=0.0,
                        target_modules=list(lora["target_modules"]), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)
