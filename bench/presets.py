"""Sizes of each preset.

- `cpu`: the CI smoke test. Small odd sizes, few runs; it must finish in about a minute on
  2 busy cores (Triton kernels run under the interpreter there). Nothing about its times
  means anything; it proves the whole pipeline runs and writes a complete result.
- `gpu`: N = 4k..32k tokens at the headline H=4096, V=128256 (plots against N), plus the
  LM-head shapes of real models at N=16384: Qwen2.5-0.5B (H=896, V=151936), Llama-2-7B /
  Mistral-7B (H=4096, V=32000), Llama-3-70B (H=8192, V=128256). bf16. It shares one
  device call with the build and the GPU tests (bench/gpu_session.sh), under a time budget
  split across suites; whatever does not fit is recorded as skipped, with that reason.
- `headline`: only N=16384, H=4096, V=128256 (Llama-3-8B's LM head), bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .harness import TimingConfig

HEADLINE = {"N": 16384, "H": 4096, "V": 128256}


@dataclass
class Preset:
    name: str
    device: str                      # "cpu" or "cuda"
    dtype: torch.dtype
    logprobs: list[dict]             # each {"N", "H", "V"}
    losses: list[dict]               # each {"S", "T"} (sequences, tokens per sequence), "G"
    linear_losses: list[dict]        # each {"S", "T", "H", "V"} for the linear + loss cases
    packing: dict                    # {"sequences", "max_tokens", "mean_log", "sigma_log", ...}
    step: dict                       # {"family", "hidden", "layers", "vocab", "batch", "T"}
    timing: TimingConfig = field(default_factory=TimingConfig)
    matmul_size: int = 8192
    copy_bytes: int = 2 << 30
    budget_s: float = 600.0          # nothing new starts after this many seconds
    # Modes to time where a case has them (None: all). The CPU smoke times fwd+bwd only:
    # interpreted Triton is slow, and the unit tests cover every mode.
    modes: tuple[str, ...] | None = None


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu", device="cpu", dtype=torch.float32,
        logprobs=[{"N": 19, "H": 16, "V": 131}, {"N": 41, "H": 16, "V": 131}],
        losses=[{"S": 6, "T": 19, "G": 4}],
        linear_losses=[{"S": 3, "T": 7, "H": 16, "V": 131}],
        packing={"sequences": 2000, "max_tokens": 2048, "median_len": 180, "sigma_log": 1.0,
                 "max_len": 2048, "reps": 3},
        step={"family": "llama", "hidden": 64, "layers": 2, "vocab": 257, "batch": 4,
              "T": 24, "group": 4},
                # The check run before timing is the warm-up (it compiles); the interpreter is slow.
        timing=TimingConfig(warmup=0, min_reps=2, max_reps=3, target_s=0.01,
                            rotate_bytes=1 << 20, max_sets=2),
        matmul_size=256, copy_bytes=32 << 20, budget_s=150.0, modes=("fwd+bwd",),
    ),
    "gpu": Preset(
        name="gpu", device="cuda", dtype=torch.bfloat16,
        # The headline first: a run cut short by its budget still has it.
        logprobs=[dict(HEADLINE)]
        + [{"N": n, "H": 4096, "V": 128256} for n in (4096, 8192, 32768)]
        + [{"N": 16384, "H": 896, "V": 151936}, {"N": 16384, "H": 4096, "V": 32000},
           {"N": 16384, "H": 8192, "V": 128256}],
        losses=[{"S": s, "T": 1024, "G": 8} for s in (4, 16, 32)],
        linear_losses=[{"S": 8, "T": 1024, "H": 4096, "V": 128256}],
        packing={"sequences": 20_000, "max_tokens": 16384, "median_len": 600,
                 "sigma_log": 1.0, "max_len": 16384, "reps": 5},
        step={"family": "qwen2", "hidden": 896, "layers": 8, "vocab": 151936, "batch": 16,
              "T": 512, "group": 8},
        # Few, long runs: the whole preset shares one device call with the build and the
        # GPU tests (bench/gpu_session.sh). Spread is still recorded (p10/p90, IQR).
        timing=TimingConfig(warmup=2, min_reps=5, max_reps=20, target_s=0.3,
                            rotate_bytes=256 << 20, max_sets=2),
        matmul_size=8192, copy_bytes=2 << 30, budget_s=330.0,
    ),
    "headline": Preset(
        name="headline", device="cuda", dtype=torch.bfloat16,
        logprobs=[dict(HEADLINE)], losses=[], linear_losses=[], packing={}, step={},
        timing=TimingConfig(warmup=3, min_reps=20, max_reps=50, target_s=1.0,
                            rotate_bytes=256 << 20, max_sets=3),
        matmul_size=8192, copy_bytes=2 << 30, budget_s=240.0,
    ),
}
