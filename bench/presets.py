"""Sizes of each preset, and the plan (order, modes, contenders) the GPU preset runs them in.

- `cpu`: the CI smoke test. Small odd sizes, few runs; it must finish in about a minute on
  2 busy cores (Triton kernels run under the interpreter there). Nothing about its times
  means anything; it proves the whole pipeline runs and writes a complete result.
- `gpu`: the sizes the issue asks for, bf16: N = 4k..32k tokens at the headline H=4096,
  V=128256 (plots against N), plus the LM-head shapes of real models at N=16384:
  Qwen2.5-0.5B (H=896, V=151936), Llama-2-7B / Mistral-7B (H=4096, V=32000), Llama-3-70B
  (H=8192, V=128256); and Gemma-2-9B's soft-capped head (N=8192, H=3584, V=256000,
  softcap=30), where every contender applies the cap (alignfuse, Liger and CCE inside their
  kernels, eager as transformers does). It shares ONE device call (10 minutes) with the build and the GPU
  tests (bench/gpu_session.sh), which leaves it roughly 95-300 s, so it runs a PLAN
  (`GPU_PLAN`): what matters first, each stage given a weighted share of what is left;
  whatever does not fit is recorded as skipped with that reason, and the result says
  which stages ran (`plan`).
- `gpu-full`: the same sizes with no plan: every case in every mode with every contender.
  That is about 10-15 minutes on an H100, more than one device call (10 minutes), so its
  budget is 540 s and what does not fit is recorded as skipped for time; to get all of it,
  split it over calls with `--suites` (e.g. `--suites logprobs`, then
  `--suites losses,step`), each in a device call of its own, not the shared session.
- `headline`: only N=16384, H=4096, V=128256 (Llama-3-8B's LM head), bf16.

The `gpu` plan, with rough H100 estimates (time = first-call Triton compiles, 5-20 s per
kernel family, plus checks, 2 warm-ups, 5+ timed runs and a peak-memory run per mode):
  1. logprobs headline, every mode, every contender but alignfuse/torch (fp32 matmuls
     without tensor cores: ~27 s alone) and */cuda, torch-rowwise included (the careful
     eager baseline, timed here only): ~45-90 s.
  2. losses, the elementwise ops (12 tiny cases, every mode): ~15-30 s.
  3. logprobs N sweep (N = 4096, 8192, 32768; 16384 is the headline), fwd+bwd: ~30-50 s.
  4. logprobs model shapes (H=896/V=151936, V=32000, H=8192), fwd+bwd: ~30-50 s.
  5. losses, linear + GRPO/DPO (N=8192, H=4096, V=128256), fwd+bwd: ~40-80 s (Liger's
     chunked losses are torch.compile'd on their first call).
  6. step (DPO and GRPO), fwd+bwd: ~20-40 s.
  After 3: alignfuse/cuda (the compiled CUDA backend, never run on a GPU before) added to
     the headline's record, every mode (~10-20 s): the numbers that decide linear_logprobs'
     default and "auto". Not first, because a fault there (illegal memory access) breaks
     the CUDA context and stops the run; not last, because it matters more than 4-6.
  Then: alignfuse/triton with its logits block capped at 256 MiB, 512 MiB and 1 GiB
     (ALIGNFUSE_CHUNK_BUDGET_MIB) at the headline, fwd+bwd (~10 s): the first H100 run
     measured 2.2 GiB of extra memory at the 2 GiB default; these say what less costs.
  7. logprobs with Gemma-2-9B's soft-capped head, fwd+bwd (~20-40 s).
  8. the other */cuda contenders, added to the losses cases' records (~10-20 s).
  9. alignfuse/torch at the headline, fwd+bwd only (~13 s), if time is left.
No packing: it is host work, the same on any machine (19 s at these sizes), so it runs on
a CPU: `python -m bench run --preset cpu --suites packing`.
In all ~200-400 s: with a fast build and tests (~300 s left) stages 1-5 or 1-6 fit; with
the worst case (build 240 s, tests 120 s, preflight 60 s: ~95 s left) stages 1-2. Weights
below favour the early stages; a stage that finishes early passes its time on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .harness import TimingConfig

HEADLINE = {"N": 16384, "H": 4096, "V": 128256}
_HEADLINE_CASE = "N=16384,H=4096,V=128256,*"
GEMMA2_SOFTCAP = {"N": 8192, "H": 3584, "V": 256000, "softcap": 30.0}
_SOFTCAP_CASE = "N=8192,H=3584,V=256000,softcap=30,*"


@dataclass
class Stage:
    """One step of a preset's plan: which cases of a suite run, in which modes, with which
    contenders (fnmatch patterns on case and contender names). A case already recorded by
    an earlier stage gets the new contenders added to its record (modes: the union).
    `weight`: the stage's share of the budget left when it starts, against the weights of
    the stages after it."""

    suite: str
    cases: tuple[str, ...] | None = None      # None: every case of the suite
    modes: tuple[str, ...] | None = None      # None: every mode of each case
    only: tuple[str, ...] | None = None       # None: every contender ...
    exclude: tuple[str, ...] = ()             # ... but these
    weight: float = 1.0
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.suite


_SLOW_ON_GPU = ("alignfuse/torch", "*/cuda")   # see the module docstring
_BUDGETS = ("alignfuse/triton-budget=*",)       # the logits block's cap: the headline only
# a second eager baseline and the budget sweep: the headline only
_HEADLINE_ONLY = ("torch-rowwise", *_BUDGETS)
_LINEAR = ("linear_*",)
_OPS = ("policy_loss,*", "group_advantages,*", "dpo_loss,*", "kto_loss,*")
GPU_PLAN = [
    Stage("logprobs", cases=(_HEADLINE_CASE,), exclude=_SLOW_ON_GPU + _BUDGETS, weight=5.0,
          name="logprobs headline"),
    Stage("losses", cases=_OPS, exclude=("*/cuda",), weight=1.0, name="losses ops"),
    Stage("logprobs", cases=tuple(f"N={n},H=4096,V=128256,*" for n in (4096, 8192, 32768)),
          modes=("fwd+bwd",), exclude=_SLOW_ON_GPU + _HEADLINE_ONLY, weight=2.5,
          name="logprobs N sweep"),
    # The cuda backend at the headline, early enough to decide linear_logprobs' default
    # and "auto" (its kernels passed tests/cuda_emu on CPU and the session's GPU tests
    # just before, so a fault is unlikely; if one comes, what ran so far is kept).
    Stage("logprobs", cases=(_HEADLINE_CASE,), only=("*/cuda",), weight=1.0,
          name="logprobs headline */cuda"),
    # What a smaller logits block (less extra memory: 2.2 GiB at the default, measured)
    # costs the backward: decides CUDA_MAX_BUDGET_BYTES (~3 contenders x ~3 s).
    Stage("logprobs", cases=(_HEADLINE_CASE,), modes=("fwd+bwd",), only=_BUDGETS, weight=0.7,
          name="logprobs headline budgets"),
    Stage("logprobs", cases=("N=16384,H=896,V=151936,*", "N=16384,H=4096,V=32000,*",
                             "N=16384,H=8192,V=128256,*"),
          modes=("fwd+bwd",), exclude=_SLOW_ON_GPU + _HEADLINE_ONLY, weight=2.5,
          name="logprobs model shapes"),
    Stage("losses", cases=_LINEAR, modes=("fwd+bwd",), exclude=("*/cuda", "*/torch"),
          weight=2.0, name="losses linear"),
    Stage("step", weight=1.5),
    Stage("logprobs", cases=(_SOFTCAP_CASE,), modes=("fwd+bwd",),
          exclude=_SLOW_ON_GPU + _HEADLINE_ONLY, weight=1.0, name="logprobs softcap"),
    Stage("losses", cases=_OPS + _LINEAR, only=("*/cuda",), weight=1.0,
          name="losses */cuda"),
    Stage("logprobs", cases=(_HEADLINE_CASE,), modes=("fwd+bwd",), only=("alignfuse/torch",),
          weight=0.5, name="logprobs headline alignfuse/torch"),
]


@dataclass
class Preset:
    name: str
    device: str                      # "cpu" or "cuda"
    dtype: torch.dtype
    logprobs: list[dict]             # each {"N", "H", "V"} (and "softcap" for a capped head)
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
    # The order, modes and contenders to run (None: one stage per suite, everything).
    plan: list[Stage] | None = None


PRESETS: dict[str, Preset] = {
    "cpu": Preset(
        name="cpu", device="cpu", dtype=torch.float32,
        logprobs=[{"N": 19, "H": 16, "V": 131}, {"N": 41, "H": 16, "V": 131},
                  {"N": 19, "H": 16, "V": 131, "softcap": 3.0}],
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
           {"N": 16384, "H": 8192, "V": 128256}, dict(GEMMA2_SOFTCAP)],
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
        matmul_size=8192, copy_bytes=2 << 30, budget_s=330.0, plan=GPU_PLAN,
    ),
    "headline": Preset(
        name="headline", device="cuda", dtype=torch.bfloat16,
        logprobs=[dict(HEADLINE)], losses=[], linear_losses=[], packing={}, step={},
        timing=TimingConfig(warmup=3, min_reps=20, max_reps=50, target_s=1.0,
                            rotate_bytes=256 << 20, max_sets=3),
        matmul_size=8192, copy_bytes=2 << 30, budget_s=240.0,
    ),
}
# The same sizes without a plan: everything, for a device call of its own (600 s at most:
# 540 s leaves the start, the ceilings and the report their time; split it with --suites).
PRESETS["gpu-full"] = replace(PRESETS["gpu"], name="gpu-full", plan=None, budget_s=540.0)
