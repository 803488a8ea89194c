"""alignfuse benchmarks: throughput and memory against eager PyTorch, Liger-Kernel,
cut-cross-entropy and the physical floor measured in the same run.

Run from a checkout:

    python -m bench run --preset cpu            # CI smoke, about a minute on 2 cores
    python -m bench run --preset gpu            # on a GPU (bench/gpu_session.sh)
    python -m bench run --preset gpu-full       # everything, in device calls of its own
                                                # (540 s budget: split it with --suites)
    python -m bench run --preset cpu --exclude cce,liger   # leave contenders out
    python -m bench preflight --contender cce   # one family alone on a tiny case
    python -m bench report                      # Markdown table + PNG plots from results

Layout (one concern per file):
- `harness.py`: timing (device events on GPU, perf_counter on CPU), input rotation,
  correctness checks against a reference, peak memory, the per-case runner.
- `ceilings.py`: the matmul rate and copy bandwidth, measured in the same run.
- `environment.py`: device, versions, commit and command recorded in every result.
- `presets.py`: the sizes of each preset, and the GPU preset's plan (order, modes,
  contenders) that fits the one shared device call.
- `suites/`: `logprobs`, `losses`, `packing`, `step`; each lists its cases and contenders.
- `schema.py`: the fields every result file has (checked by the tests).
- `report.py`: results -> Markdown table and PNG plots.
"""
