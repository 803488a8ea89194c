"""`python -m bench`: run presets, measure ceilings, render reports. See bench/__init__.py."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

# Without a GPU, Triton kernels (alignfuse's and Liger's) run under the interpreter; it must
# be switched on before anything imports triton, as in tests/conftest.py.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def main(argv: list[str] | None = None) -> int:
    from .presets import PRESETS
    from .runner import RESULTS, SUITES

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a preset's suites and write a result JSON")
    run.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    run.add_argument("--suites", default=",".join(SUITES),
                     help=f"comma-separated subset of {','.join(SUITES)}")
    run.add_argument("--out", type=Path, default=None,
                     help="folder for the result file (default: bench/results for GPU "
                          "presets, bench/results/local, not committed, for the CPU one)")
    run.add_argument("--budget-s", type=float, default=None,
                     help="start nothing new after this many seconds (default: the preset's)")
    run.add_argument("--exclude", default="",
                     help="comma-separated contender names, name prefixes or fnmatch patterns "
                          "(e.g. cce,liger,*/cuda), or CASES:CONTENDER for some cases only "
                          "(linear_*:liger) never to run; recorded as skipped, "
                          "'excluded by --exclude'")

    pre = sub.add_parser("preflight", help="a tiny check and timing of the contenders a "
                         "name matches, alone (bench/gpu_session.sh runs it under a timeout "
                         "before the main run); exit 1 if one raised")
    pre.add_argument("--contender", required=True,
                     help="a contender name, prefix or pattern (cce, liger, alignfuse/cuda)")
    pre.add_argument("--suite", default="logprobs", choices=("logprobs", "losses"),
                     help="logprobs: a linear_logprobs case; losses: the linear GRPO and DPO "
                          "cases (Liger's chunked losses)")

    report = sub.add_parser("report", help="Markdown table and PNG plots from result files")
    report.add_argument("results", nargs="*", type=Path,
                        help="result files or folders (default: bench/results)")
    report.add_argument("--out", type=Path, default=None,
                        help="folder for report.md and the plots (default: bench/results/report)")
    report.add_argument("--readme", action="store_true",
                        help="also put the latest GPU logprobs table into README.md")

    args = parser.parse_args(argv)
    if args.command == "preflight":
        from .runner import preflight

        return preflight(args.contender, suite=args.suite)
    if args.command == "run":
        from .runner import run as run_preset

        suites = tuple(s.strip() for s in args.suites.split(",") if s.strip())
        if not suites:
            parser.error(f"--suites names no suite; choose from {','.join(SUITES)}")
        if args.budget_s is not None and not args.budget_s > 0:
            parser.error(f"--budget-s must be > 0 seconds, got {args.budget_s}")
        exclude = tuple(p.strip() for p in args.exclude.split(",") if p.strip())
        out = args.out or (RESULTS if PRESETS[args.preset].device == "cuda" else RESULTS / "local")
        try:
            path = run_preset(args.preset, suites, out, args.budget_s, argv=["bench", *argv],
                              exclude=exclude)
        except (ValueError, RuntimeError) as exc:  # bad arguments, or no GPU for a GPU preset
            print(f"bench run: {exc}", file=sys.stderr)
            return 2
        import json

        from .runner import EXIT_STOPPED

        # Stopped by a CUDA fault: the file is written (complete: false, with the reason).
        return 0 if json.loads(path.read_text())["complete"] else EXIT_STOPPED
    from .report import render

    out = args.out or RESULTS / "report"
    try:
        paths = render(args.results or [RESULTS], out)
    except FileNotFoundError as exc:
        print(f"bench report: {exc}; run `python -m bench run --preset ...` first, or name "
              "result files (CPU runs are in bench/results/local)", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    if args.readme:
        from .report import update_readme

        readme = Path(__file__).resolve().parents[1] / "README.md"
        if not update_readme(readme, args.results or [RESULTS]):
            print("bench report: no GPU result, README.md left as it is", file=sys.stderr)
            return 1
        print(readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
