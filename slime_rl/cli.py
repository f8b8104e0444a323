"""The `slime-rl` command line.

    slime-rl train CONFIG [key=value ...]     run an RL job on this machine / cluster
    slime-rl submit CONFIG [key=value ...]    submit the same as a Ray job
    slime-rl scale RUN_DIR --engines N        change the number of rollout engines of a running run
    slime-rl config CONFIG [key=value ...]    print the resolved config (or --defaults)
    slime-rl make-tiny-model OUT_DIR          build the offline tiny model + `arith` data
    slime-rl trace RUN_DIR [--steps A:B]      where a run's time went (its trace.json)

Exit codes of `train`: 0 the run finished; 2 bad input (config, model, data, reward, filter,
cluster address), one line on stderr before anything starts; 1 the run failed (the line names
the actor, the step and the cause); 130 stopped by Ctrl-C (the first Ctrl-C finishes the step
and writes a checkpoint to resume from; a second one kills every actor at once); 143 stopped by
SIGTERM (the same as a first Ctrl-C).
`submit --follow` exits with the job's outcome (0 succeeded, 1 otherwise).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence

from slime_rl.config import Config, ConfigError, load_config, to_yaml
from slime_rl.preflight import PreflightError
from slime_rl.rewards import RewardLoadError
from slime_rl.submit import SubmitError

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="run config YAML (see configs/base.yaml for every key)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.temperature=0.7")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slime-rl",
        description="Asynchronous RL post-training for LLMs: rollout engines and trainer joined by an Arrow replay buffer.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="run an RL job", description="Validate the config, write it to the run directory and run the RL job.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("submit", help="submit an RL job to a Ray cluster", description="Submit `slime-rl train` with this config as a Ray job (Ray's job SDK; the working directory travels with it).")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray job server (default: $RAY_ADDRESS, ray.address, or http://127.0.0.1:8265)")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--python", default=None, help="Python of the cluster nodes (default: this one)")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("scale", help="change the number of rollout engines of a running run",
                       description="Change the number of rollout engines of a running run (new engines load the current "
                                   "weights before they take work; removed ones finish their groups first).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run's directory (holds actors.json)")
    p.add_argument("--engines", type=int, required=True, help="engines the run should have")
    p.set_defaults(func=_cmd_scale)

    p = sub.add_parser("config", help="print the resolved config", description="Print the config after YAML and overrides are applied and validated.")
    p.add_argument("config", nargs="?", help="run config YAML")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    p.add_argument("--defaults", action="store_true", help="print every key with its default and doc (configs/base.yaml)")
    p.add_argument("--no-check-paths", action="store_true", help="do not require model/data paths to exist")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "make-tiny-model",
        help="build the offline tiny model and its task data",
        description="Build a tokenizer, the `arith` train/eval data and a warm-started tiny Qwen2 model into OUT_DIR (an HF model folder; data under OUT_DIR/data). Prints its eval accuracy.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--task", default="arith", choices=["arith", "arith_agent", "longtail"],
                   help="synthetic task (default: arith; arith_agent: calculator/retrieval tool use and both modes, docs/agents.md; "
                        "longtail: many short answers and a few long worked chains, docs/BENCHMARKS.md)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, tokenizer and weights (default: 0)")
    p.add_argument("--arch", default="qwen2", choices=["qwen2", "glm5", "glm4_moe"],
                   help="model architecture (default: qwen2; glm5 = GlmMoeDsaForCausalLM, glm4_moe = Glm4MoeForCausalLM "
                        "stand-ins, docs/glm.md)")
    p.add_argument("--steps", type=int, default=None, help="supervised warm-start steps (default: the builder's)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--reuse", action="store_true",
                   help="keep OUT_DIR if it already holds a model built with the same arguments by this version")
    p.set_defaults(func=_cmd_make_tiny_model)

    p = sub.add_parser(
        "trace",
        help="where a run's time went, from its trace.json",
        description="Read RUN_DIR/trace.json (or a trace file) and print the split of wall time per side "
                    "(generation, scoring, filter, buffer wait, train step, weight sync, eval, idle) and the "
                    "slowest groups with their engine and tokens; --export writes the chosen steps as a trace "
                    "file of their own (open it in Perfetto).",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or a trace.json file)")
    p.add_argument("--steps", default=None, metavar="A:B", help="only steps A to B, inclusive (A: or :B for open ends)")
    p.add_argument("--export", default=None, metavar="OUT.json", help="write the selected steps' events to this trace file")
    p.add_argument("--top", type=int, default=10, metavar="N", help="slowest groups to list (default: 10)")
    p.set_defaults(func=_cmd_trace)
    return parser


def _load(args: argparse.Namespace) -> Config:
    """Load and validate everything that can be checked before an actor starts."""
    from slime_rl.rewards import resolve_config

    cfg = load_config(args.config, args.overrides)
    cfg.reward = resolve_config(cfg.reward)  # imports every reward fn, checks its signature
    return cfg


def _cmd_train(args: argparse.Namespace) -> int:
    from slime_rl import api

    cfg = api.prepare(args.config, args.overrides)
    print(f"slime-rl: run {cfg.run.name} ({cfg.run.mode}, {cfg.run.num_steps} steps) -> {cfg.run_dir} "
          f"(config: {cfg.run_dir / 'config.yaml'})", file=sys.stderr)
    from slime_rl.errors import RunError

    try:
        result = api.run(cfg)
    except RunError as e:
        print(f"slime-rl: run failed: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_FAILED
    print(result.table)
    if result.interrupted:
        by = "SIGTERM" if result.signal == "SIGTERM" else "Ctrl-C"
        print(f"slime-rl: stopped by {by} after step {result.last_step} (checkpoint written); continue with "
              "checkpoint.resume=auto", file=sys.stderr)
        return EXIT_TERMINATED if result.signal == "SIGTERM" else EXIT_INTERRUPTED
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from slime_rl.preflight import check_model, check_plugins, check_run_inputs
    from slime_rl.submit import submit

    cfg = _load(args)
    check_model(cfg.model.path, cfg.model.tokenizer_path, cfg.rollout.engine)
    check_run_inputs(cfg)
    check_plugins(cfg)
    return submit(args.config, list(args.overrides), cfg, address=args.address, follow=args.follow, python=args.python)


def _cmd_scale(args: argparse.Namespace) -> int:
    from slime_rl.api import ScaleError, scale

    try:
        fleet = scale(args.run_dir, args.engines)
    except (ScaleError, ValueError) as e:
        print(f"slime-rl scale: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"engines: target {fleet['target']}, serving {fleet['serving']}, starting {fleet['starting']}, "
          f"draining {fleet['draining']}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.defaults:
        from slime_rl.config_docs import render_defaults

        sys.stdout.write(render_defaults())
        return 0
    cfg = load_config(args.config, args.overrides, check_paths=not args.no_check_paths)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    if args.task == "arith_agent":
        return _make_agent_tiny_model(args)
    if args.task == "longtail":
        return _make_longtail_tiny_model(args)
    from slime_rl.tiny import build_tiny_model

    kwargs = {} if args.steps is None else {"steps": args.steps}
    if args.steps is None and args.arch != "qwen2":
        from slime_rl.tiny.glm import GLM_WARM_START_STEPS

        kwargs["steps"] = GLM_WARM_START_STEPS
    report = build_tiny_model(args.out_dir, task=args.task, seed=args.seed, progress=not args.no_progress,
                              arch=args.arch, reuse=args.reuse, **kwargs)
    by_mode = ", ".join(f"{m} {a:.1%}" for m, a in report.eval_accuracy_by_mode.items())
    kept = " (kept: built earlier with the same arguments)" if report.reused else ""
    print(f"tiny model: {report.model_dir}{kept} ({report.num_parameters / 1e6:.2f}M parameters, {report.train_steps} warm-start steps, loss {report.final_loss:.3f})")
    print(f"data: {report.train_path}, {report.eval_path}")
    print(f"eval accuracy (greedy): {report.eval_accuracy:.1%} ({by_mode}); replies with a readable answer "
          f"{report.format_rate:.1%}, guessed in the hasty solver's style {report.hasty_rate:.1%}")
    if not math.isnan(report.careful_accuracy):  # measured only when the task has a hasty solver
        print(f"with the careful solver's opening forced: {report.careful_accuracy:.1%} (the skill RL can bring out)")
    return 0


def _make_agent_tiny_model(args: argparse.Namespace) -> int:
    """`make-tiny-model --task arith_agent` (slime_rl/tiny/agent_task.py)."""
    from slime_rl.tiny.agent_task import build_agent_tiny_model

    kwargs = {} if args.steps is None else {"steps": args.steps}
    report = build_agent_tiny_model(args.out_dir, seed=args.seed, progress=not args.no_progress, **kwargs)
    print(f"tiny agent model: {report.model_dir} ({report.num_parameters / 1e6:.2f}M parameters, {report.train_steps} warm-start steps, loss {report.final_loss:.3f})")
    print("data: " + ", ".join(str(p) for p in report.files.values()))
    return 0


def _make_longtail_tiny_model(args: argparse.Namespace) -> int:
    """`make-tiny-model --task longtail` (slime_rl/tiny/longtail.py)."""
    from slime_rl.tiny.longtail import build_longtail_tiny_model

    kwargs = {} if args.steps is None else {"steps": args.steps}
    r = build_longtail_tiny_model(args.out_dir, seed=args.seed, progress=not args.no_progress, reuse=args.reuse, **kwargs)
    kept = " (kept: built earlier with the same arguments)" if r.reused else ""
    print(f"tiny longtail model: {r.model_dir}{kept} ({r.num_parameters / 1e6:.2f}M parameters, {r.train_steps} warm-start steps, loss {r.final_loss:.3f})")
    print(f"data: {r.train_path}, {r.eval_path}")
    by_kind = ", ".join(f"{k} {a:.1%}" for k, a in r.eval_accuracy_by_kind.items())
    print(f"eval accuracy (greedy): {r.eval_accuracy:.1%} ({by_kind}); guessed in the hasty solver's style {r.hasty_rate:.1%}")
    s = r.lengths_t1
    print(f"reply tokens at temperature 1: median {s['median']:.0f}, p95 {s['p95']:.0f} ({s['p95'] / max(s['median'], 1):.0f}x the median), max {s['max']:.0f}")
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    from slime_rl.tracing import analyze

    try:
        first, last = analyze.parse_steps(args.steps) if args.steps else (None, None)
        events, info = analyze.load_trace(args.run_dir)
    except analyze.TraceError as e:
        print(f"slime-rl trace: {e}", file=sys.stderr)
        return EXIT_USAGE
    events = analyze.window(events, first, last)
    sys.stdout.write(analyze.format_report(analyze.summarize(events, info), top=args.top))
    if args.export:
        out = analyze.export_trace(events, args.export, {**info, "window": args.steps or "all"})
        print(f"wrote {sum(e.get('ph') != 'M' for e in events)} events to {out} (open it in https://ui.perfetto.dev)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"slime-rl: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RewardLoadError as e:
        print(f"slime-rl: reward error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except PreflightError as e:
        print(f"slime-rl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SubmitError as e:
        print(f"slime-rl submit: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("slime-rl: aborted (second Ctrl-C): actors killed, no checkpoint of the step in progress", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
