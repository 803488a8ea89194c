"""The `alignfuse` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    import torch

    from alignfuse.kernels import available, segment_sum

    values = torch.randn(1000)
    cu = torch.tensor([0, 10, 500, 1000], dtype=torch.int32)
    for backend in ("torch", "triton", "cuda"):
        ok = available("segment_sum", backend, values.device)
        msg = segment_sum(values, cu, backend=backend).tolist() if ok else "unavailable here"
        print(f"segment_sum[{backend}]: {msg}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alignfuse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded default")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
