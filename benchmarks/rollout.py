"""Rollout engine throughput: generated tokens/s of vllm (eager and compiled) vs hf vs plain `transformers.generate`.

    same prompts (random ids, fixed length), same sampling (temperature 1, ignore EOS, fixed
    seeds), several batch sizes ──► one warm-up batch per engine, then `--repeats` timed runs
    ──► best run per cell ──► table on stdout + JSON file

Usage:
    python benchmarks/rollout.py                                  # tiny random model, all engines
    python benchmarks/rollout.py --engines hf generate --batch-sizes 1 8 --threads 1
    python benchmarks/rollout.py --engines vllm vllm-compiled --max-new-tokens 400 --batch-sizes 8 24
    python benchmarks/rollout.py --model-dir /path/to/hf_model --json out.json
    python -m benchmarks.rollout --quick --json /tmp/rollout.json   # CI smoke: tiny batches, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def make_requests(batch: int, prompt_len: int, vocab: int, max_new: int, tag: str):
    from slime_rl.rollout.engines import GenerateRequest, SamplingParams

    g = torch.Generator().manual_seed(batch)
    return [
        GenerateRequest(
            f"{tag}-{batch}-{i}",
            torch.randint(3, vocab, (prompt_len,), generator=g).tolist(),
            SamplingParams(temperature=1.0, max_new_tokens=max_new, seed=i, ignore_eos=True),
        )
        for i in range(batch)
    ]


def bench_engine(kind: str, model_dir: Path, args, vocab: int) -> dict[int, dict]:
    from slime_rl.rollout.engines.sync import EngineRunner

    params: dict = {"num_threads": args.threads}
    if kind.startswith("vllm"):  # vllm-compiled: torch.compile instead of eager (the demo's setting)
        params |= {"kv_cache_gb": 0.5, "max_model_len": args.prompt_len + args.max_new_tokens,
                   "engine_kwargs": {"max_num_seqs": max(args.batch_sizes), "enforce_eager": kind == "vllm"}}
    else:
        params |= {"max_batch_size": max(args.batch_sizes)}
    t0 = time.perf_counter()
    runner = EngineRunner(kind.split("-")[0], model_dir, **params)
    start_s = time.perf_counter() - t0
    out: dict[int, dict] = {}
    try:
        runner.generate_many(
            make_requests(
                max(args.batch_sizes), args.prompt_len, vocab, args.max_new_tokens, "warm"
            )
        )
        for bs in args.batch_sizes:
            best = float("inf")
            for r in range(args.repeats):
                reqs = make_requests(bs, args.prompt_len, vocab, args.max_new_tokens, f"r{r}")
                t = time.perf_counter()
                res = runner.generate_many(reqs)
                best = min(best, time.perf_counter() - t)
                tokens = sum(len(x.token_ids) for x in res)
            out[bs] = {
                "tokens": tokens,
                "seconds": best,
                "tokens_per_s": tokens / best,
                "start_s": start_s,
            }
    finally:
        runner.close()
    return out


@torch.no_grad()
def bench_generate(model_dir: Path, args, vocab: int) -> dict[int, dict]:
    """Plain `model.generate` on the same prompts (one left-padded batch, sampling on)."""
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch._C.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(reqs) -> int:
        ids_BT = torch.tensor([list(r.prompt_token_ids) for r in reqs])  # equal lengths: no padding
        out_BT = model.generate(
            input_ids=ids_BT,
            attention_mask=torch.ones_like(ids_BT),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.max_new_tokens,
            pad_token_id=0,
        )
        return int((out_BT.shape[1] - ids_BT.shape[1]) * ids_BT.shape[0])

    run(make_requests(max(args.batch_sizes), args.prompt_len, vocab, args.max_new_tokens, "warm"))
    out: dict[int, dict] = {}
    for bs in args.batch_sizes:
        best, tokens = float("inf"), 0
        for r in range(args.repeats):
            reqs = make_requests(bs, args.prompt_len, vocab, args.max_new_tokens, f"r{r}")
            t = time.perf_counter()
            tokens = run(reqs)
            best = min(best, time.perf_counter() - t)
        out[bs] = {"tokens": tokens, "seconds": best, "tokens_per_s": tokens / best, "start_s": 0.0}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="HF model folder (default: a random tiny model)",
    )
    ap.add_argument(
        "--engines",
        nargs="+",
        default=["hf", "generate", "vllm", "vllm-compiled"],
        choices=["hf", "generate", "vllm", "vllm-compiled"],
    )
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32, 64])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per engine (0 = torch default)"
    )
    ap.add_argument("--json", "--out", type=Path, default=None,
                    help="results JSON (default benchmarks/results/rollout.json; with --quick none)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch sizes 1 and 8, 8 new tokens, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.batch_sizes, args.prompt_len, args.max_new_tokens, args.repeats = [1, 8], 8, 8, 1
    elif args.json is None:
        args.json = Path("benchmarks/results/rollout.json")
    if min(args.batch_sizes) < 1 or min(args.prompt_len, args.max_new_tokens, args.repeats) < 1:
        raise SystemExit("--batch-sizes, --prompt-len, --max-new-tokens and --repeats must be at least 1")
    args.threads = args.threads or None

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            from slime_rl.tiny import random_tiny_model

            model_dir = random_tiny_model(Path(tmp) / "tiny", seed=0)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(model_dir).vocab_size
        results: dict[str, dict[int, dict]] = {}
        # vllm last: its CPU worker changes process-wide torch settings.
        for kind in sorted(args.engines, key=lambda k: k.startswith("vllm")):
            print(f"running {kind} ...", flush=True)
            results[kind] = (
                bench_generate(model_dir, args, vocab)
                if kind == "generate"
                else bench_engine(kind, model_dir, args, vocab)
            )

    header = (
        f"{'engine':<14}"
        + "".join(f"{'bs=' + str(b):>12}" for b in args.batch_sizes)
        + f"{'start s':>10}"
    )
    print(
        f"\ngenerated tokens/s (prompt {args.prompt_len}, {args.max_new_tokens} new tokens, threads={args.threads})"
    )
    print(header)
    for kind, cells in results.items():
        row = "".join(f"{cells[b]['tokens_per_s']:>12.0f}" for b in args.batch_sizes)
        print(f"{kind:<14}{row}{cells[args.batch_sizes[0]]['start_s']:>10.1f}")
    if args.json is None:
        return
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    meta |= {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_count": torch.get_num_threads(),
    }
    args.json.write_text(json.dumps({"args": meta, "results": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
