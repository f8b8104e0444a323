"""Tiny stand-ins of the GLM-5 family, built offline: GLM-5 (`GlmMoeDsaForCausalLM`: MoE +
MLA + DeepSeek sparse attention) and GLM-4.5 (`Glm4MoeForCausalLM`: MoE + GQA).

    build_tokenizer (the project's) ─► GLM config scaled down (a few million parameters)
        ─► GlmMoeDsaForCausalLM | Glm4MoeForCausalLM (random init) ─► warm start (tiny.model)

The real models and the stand-ins share what the trainer, the engines and the weight sync
must get right: the first layer dense and the rest MoE (routed experts with a sigmoid router,
a score-correction bias, normalised top-k weights, a routed scaling factor, one shared
expert), fused expert tensors in transformers (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)) saved per expert on disk, and for GLM-5 MLA attention
(low-rank q / kv with a decoupled rotary part, a compressed KV cache) and the DSA indexer
that picks `index_topk` keys per query. Sizes are scaled down (GLM-5: 78 layers, 256
experts x 8 per token, hidden 6144; here 3 layers, 8 experts x 2, hidden 256).

Tokenizer and chat template are the project's (`tiny.tokenizer`): GLM's own template
(`[gMASK]<sop><|user|>...<|assistant|>`, `/nothink`, `<arg_key>` tool calls) would need
special tokens the tiny tokenizer does not have, and what RL depends on is the same in
both: `enable_thinking` switches a `<think>...</think>` block on or off, a non-think
generation prompt already holds the empty think block, and `</think>` is one special token.

>>> out = random_glm_model("/tmp/glm5-tiny", "glm5")           # doctest: +SKIP
>>> AutoModelForCausalLM.from_pretrained(out).config.model_type  # doctest: +SKIP
'glm_moe_dsa'
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

GLM_ARCHS = ("glm5", "glm4_moe")
"""Architectures this module builds (`make-tiny-model --arch`)."""

GLM_WARM_START_STEPS = 400
"""`make-tiny-model --arch glm5|glm4_moe` warm-start steps unless `--steps` says otherwise
(the MoE forward loops over experts in python: ~2x the tiny Qwen2's time per step)."""


@dataclasses.dataclass(frozen=True)
class TinyGlmSpec:
    """Sizes of a tiny GLM stand-in (shared by both architectures where they apply)."""

    hidden_size: int = 256
    num_hidden_layers: int = 3
    first_k_dense_replace: int = 1
    """Leading dense layers (GLM-5: 3 of 78; GLM-4.5: 3 of 92); the rest are MoE."""
    intermediate_size: int = 512
    """MLP width of the dense layers."""
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 1
    moe_intermediate_size: int = 128
    routed_scaling_factor: float = 2.5
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    """GLM-4.5 only (GQA); MLA has one latent KV."""
    head_dim: int = 64
    """GLM-4.5 only."""
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    index_topk: int = 32
    """DSA: keys each query attends to (GLM-5: 2048); sequences longer than this are sparse."""
    index_n_heads: int = 16
    """DSA indexer heads (GLM-5: 32). A key scores exactly 0 when its ReLU'd dot product is 0
    in every head (probability 2^-heads at random init): with 4 heads such exact ties were
    common and broke differently under the engine's left padding than in the trainer."""
    index_head_dim: int = 32
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    """Untied, like the real GLMs (vLLM's `Glm4MoeForCausalLM` always keeps its own `lm_head`:
    a tied checkpoint would leave it unloaded there)."""


def _common(tokenizer: PreTrainedTokenizerFast, spec: TinyGlmSpec) -> dict[str, Any]:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        n_routed_experts=spec.n_routed_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        n_shared_experts=spec.n_shared_experts,
        first_k_dense_replace=spec.first_k_dense_replace,
        routed_scaling_factor=spec.routed_scaling_factor,
        norm_topk_prob=True,
        n_group=1,
        topk_group=1,
        num_attention_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def glm_config(arch: str, tokenizer: PreTrainedTokenizerFast, spec: TinyGlmSpec = TinyGlmSpec()):
    """The transformers config of a tiny `arch` (``glm5`` or ``glm4_moe``).

    Raises:
        ValueError: an unknown ``arch`` (naming the choices).
    """
    common = _common(tokenizer, spec)
    if arch == "glm5":
        from transformers import GlmMoeDsaConfig

        return GlmMoeDsaConfig(
            **common,
            num_key_value_heads=spec.num_attention_heads,  # MLA: every head reads the latent KV
            q_lora_rank=spec.q_lora_rank,
            kv_lora_rank=spec.kv_lora_rank,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            index_topk=spec.index_topk,
            index_n_heads=spec.index_n_heads,
            index_head_dim=spec.index_head_dim,
        )
    if arch == "glm4_moe":
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(
            **common,
            num_key_value_heads=spec.num_key_value_heads,
            head_dim=spec.head_dim,
            partial_rotary_factor=0.5,  # GLM-4.5 rotates half of each head
            use_qk_norm=True,
            attention_bias=True,
            num_nextn_predict_layers=0,  # no MTP layer in the stand-in
        )
    raise ValueError(f"arch={arch!r} is not a tiny GLM architecture; choose one of {list(GLM_ARCHS)}")


def new_glm_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0, spec: TinyGlmSpec = TinyGlmSpec()
) -> PreTrainedModel:
    """A randomly initialised tiny GLM causal LM (fp32, eval mode) with a greedy generation config."""
    from transformers import AutoModelForCausalLM

    config = glm_config(arch, tokenizer, spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model.eval()


def random_glm_model(
    out_dir: str | Path, arch: str, seed: int = 0, spec: TinyGlmSpec = TinyGlmSpec()
) -> Path:
    """An untrained tiny GLM + the project tokenizer in HF format (a second or two). For tests."""
    from slime_rl.tiny.tokenizer import build_tokenizer, save_tokenizer

    tokenizer = build_tokenizer()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    new_glm_model(arch, tokenizer, seed, spec).save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return out
