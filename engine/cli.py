"""The `alignfuse` command line.

    alignfuse train {sft,rm,dpo,kto,orpo,simpo} --config file.yaml [key=value ...] [--resume]
    alignfuse demo [key=value ...]      the main job: DPO on the embedded default
    alignfuse train {grpo,ppo} [--config file.yaml] [key=value ...] [--resume]
    alignfuse demo --task grpo [key=value ...]   GRPO main job (engine/online_loop.py)

Every key of `engine/loop.py::TrainConfig` (`engine/online_loop.py::OnlineConfig` for
grpo/ppo) may be set in the YAML file or as `key=value` (the command line wins). A bad key or
value stops the run with a message naming the key (exit status 2), and so does an algorithm
knob the chosen algorithm does not read (`ALGORITHM_KNOBS`, `ONLINE_ALGORITHM_KNOBS`: e.g.
`loss_type` with kto): it is refused, never silently ignored. Unusable data (a malformed
record, an empty file, a tokenizer that cannot encode it: `engine/data.py::DataError`) stops
it the same way, one line naming the file, line and field (exit status 2). Records dropped
at load (preference ties, `ties=drop`) are reported in one line too, and the run goes on.
"""

from __future__ import annotations

import argparse
import sys
import warnings

# The main job: DPO on the built-in addition preferences with the embedded tiny model.
# A fresh model is briefly SFT-warmed on the right answers (it knows no answer format yet),
# that model becomes the reference, then DPO. Sized for a few minutes on 2 CPU cores.
DEMO_CONFIG = {
    "algorithm": "dpo", "model": "tiny-llama", "data": "builtin:addition",
    "num_examples": 1024, "steps": 150, "batch_size": 32, "max_tokens": 4096,
    "lr": 1e-3, "beta": 0.1, "sft_warmup_steps": 100, "sft_lr": 3e-3, "warmup_steps": 10,
    "eval_every": 25, "out_dir": "runs/demo", "seed": 0,
    # One torch thread: the model is tiny, and on a shared 2-core machine two threads
    # oversubscribe (measured 5-15x slower per forward under load).
    "num_threads": 1,
}
DEMO_METRICS = (("rewards/accuracy", "reward accuracy"), ("rewards/margin", "reward margin"),
                ("policy/accuracy", "right answer preferred"), ("loss", "DPO loss"))


def _train(args: argparse.Namespace) -> int:
    from .loop import ConfigError, load_config_file, make_config, train
    from .online_loop import ONLINE_ALGORITHMS, make_online_config, train_online

    values = load_config_file(args.config) if args.config else {}
    file_algorithm = values.get("algorithm") if isinstance(values, dict) else None
    _check_algorithm(args.algorithm, f"train {args.algorithm}", args.overrides,
                     (f"the config file {args.config}", file_algorithm))
    if args.algorithm in ONLINE_ALGORITHMS:  # GRPO/PPO: OnlineConfig keys (engine/online_loop.py)
        train_online(make_online_config(values, args.overrides, algorithm=args.algorithm),
                     resume=args.resume)
        return 0
    cfg = make_config(values, args.overrides, algorithm=args.algorithm)
    summary = train(cfg, resume=args.resume)
    _print_summary(summary, cfg.algorithm)
    return 0


def _check_algorithm(algorithm: str, command: str, overrides: list[str],
                     *given: tuple[str, str | None]) -> None:
    """The command names the algorithm; a config file or override naming another one is a
    mistake to report, not a value to silently overrule (or to run under the wrong name)."""
    from .loop import ConfigError

    given += tuple(("the command line", item.split("=", 1)[1].strip()) for item in overrides
                   if "=" in item and item.split("=", 1)[0].strip() == "algorithm")
    for where, named in given:
        if named is not None and named != algorithm:
            raise ConfigError(f"{where} says algorithm={named!r} but the command is `{command}`")


def _demo(args: argparse.Namespace) -> int:
    from .loop import make_config, train

    _check_algorithm(args.task, f"demo --task {args.task}", args.overrides)
    if args.task == "grpo":
        from .online_loop import run_grpo_demo

        run_grpo_demo(args.overrides, resume=args.resume)
        return 0
    cfg = make_config(DEMO_CONFIG, args.overrides)
    print(f"alignfuse demo: DPO on the built-in addition task ({cfg.num_examples} pairs, "
          f"{cfg.sft_warmup_steps} SFT warm-up steps, {cfg.steps} DPO steps, model "
          f"{cfg.model}); held-out prompts are evaluated before and after.", flush=True)
    summary = train(cfg, resume=args.resume)
    _print_summary(summary, "dpo")
    return 0


def _print_summary(summary: dict, algorithm: str) -> None:
    before, after = summary.get("before"), summary.get("after")
    if before and after:
        print(f"\nheld-out evaluation, before -> after {algorithm}:")
        names = {**dict(DEMO_METRICS), "loss": f"{algorithm.upper()} loss"}
        for key in sorted(set(before) & set(after)):
            if key in ("tokens",):
                continue
            print(f"  {names.get(key, key):28s} {before[key]:+.4f} -> {after[key]:+.4f}")
    print(f"metrics: {summary['metrics']}")
    if summary.get("plot"):
        print(f"plot:    {summary['plot']}")
    if summary.get("export"):
        print(f"model:   {summary['export']} (Hugging Face folder: from_pretrained, or model=)")
    if summary.get("adapter"):
        print(f"adapter: {summary['adapter']} (LoRA: peft.PeftModel.from_pretrained(base, path))")


def _one_line_data_warnings() -> None:
    """Print a DataWarning (records dropped at load) as one line, like a data error; inside
    `warnings.catch_warnings()`, which restores the default."""
    from .data import DataWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DataWarning):
            print(f"alignfuse: data warning: {message}", file=file or sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    from .data import DataError
    from .loop import ALGORITHMS, ConfigError

    parser = argparse.ArgumentParser(prog="alignfuse", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train with one algorithm from a config")
    train.add_argument("algorithm", choices=(*ALGORITHMS, "grpo", "ppo"))
    train.add_argument("--config", help="YAML file of TrainConfig keys")
    train.add_argument("--resume", action="store_true",
                       help="continue exactly from the latest checkpoint in out_dir")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    train.set_defaults(func=_train)
    demo = sub.add_parser("demo", help="run the main job (DPO) on the embedded default")
    demo.add_argument("--resume", action="store_true")
    demo.add_argument("--task", choices=("dpo", "grpo"), default="dpo",
                      help="dpo (default) or grpo: the GRPO main job (verifiable reward)")
    demo.add_argument("overrides", nargs="*", metavar="key=value",
                      help="change the demo's config, e.g. steps=20")
    demo.set_defaults(func=_demo)
    # parse_known_args: `key=value` overrides may also come after `--resume` (argparse has
    # already closed the positional list by then).
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    try:
        with warnings.catch_warnings():
            _one_line_data_warnings()
            return args.func(args)
    except ConfigError as exc:
        print(f"alignfuse: config error: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # unusable data or tokenizer; any other error is a bug: traceback
        print(f"alignfuse: data error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
