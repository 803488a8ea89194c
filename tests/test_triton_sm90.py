"""Every Triton kernel under kernels/ compiles for Hopper (sm_90), proven without a GPU.

The CPU tests run the kernels under the Triton interpreter, which accepts code the real
compiler refuses. Here each public op with a triton backend runs (forward and backward) on
small CPU inputs across the variants that select different constexpr switches, in float32
and bfloat16 (the GPU path is bf16); `triton_capture.LaunchRecorder` records every launch
as the JIT would specialize it; then each distinct (kernel, signature, constexprs) is
compiled with `triton.compile(..., target=GPUTarget("cuda", 90, 32))` in subprocesses with
TRITON_INTERPRET=0, and must yield a cubin.

Nothing escapes silently:
- every module matching `kernels/**/triton_*.py` must contribute at least one compiled
  kernel (launched, or a device function called by a launched kernel);
- every op registered with a "triton" backend must have variants in `VARIANTS` below;
- the variant lists are built from the ops' own name tuples (LOSS_TYPES, estimators, ...),
  so a new loss type or estimator is exercised without editing this file.

Host code that picks launch parameters by device (tile sizes, num_warps, tl.dot precision)
would record its CPU choices here; such a module exposes `_interpreted(t)` and this test
patches it to answer False, so the recorded launches are the GPU ones
(`test_device_dependent_launches_are_emulated` enforces that convention).

Run: python -m pytest -q -s tests/test_triton_sm90.py   (-s shows the list of kernels)
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest
import torch
import triton
import triton.language as tl

import triton_capture

# recording launches runs the kernels under the interpreter, on CPU tensors
pytestmark = [pytest.mark.slow, pytest.mark.cpu_only]

ROOT = pathlib.Path(__file__).resolve().parents[1]
SM = 90

# The Triton kernel modules, by file: a new triton_*.py is required to compile from the
# moment it exists.
KERNEL_FILES = sorted(p.relative_to(ROOT).as_posix() for p in ROOT.glob("kernels/**/triton_*.py"))


def _module_name(path: str) -> str:
    return "alignfuse." + path.removesuffix(".py").replace("/", ".")


# Kernel modules known not to compile yet: {path: reason}. Each is xfail(strict=True), so
# the test turns red once the kernel is fixed and the entry must go.
KNOWN_COMPILE_FAILURES: dict[str, str] = {}

F32, BF16 = torch.float32, torch.bfloat16

# A variant: (label, dtype, run). `run(dtype)` calls the op with backend="triton", forward
# and backward. Each constexpr switch value is reached at least once; the full sweeps run in
# the dtype the GPU path sees most (float32 for sequence- and token-level losses, whose
# log-prob inputs are float32 by the API; bfloat16 for the LM-head ops), the other dtype
# covers each kernel once or twice. Compiling a cross product would take minutes (the tl.dot
# kernels take 5-12 s each on a busy 2-core machine).
Variant = tuple[str, torch.dtype, Callable[[torch.dtype], None]]


# ---------------------------------------------------------------------------------------
# Inputs: small, mostly odd sizes. Ints equal to 1 become constexprs and ints divisible by
# 16 get a divisibility hint, so both odd and 16-aligned sizes are used where it matters.

PADDED = (3, 7)                        # [B, T]
CU_SEQLENS = [0, 5, 12, 12, 19]        # packed N=19, S=4 with one empty sequence


def _leaf(shape, dtype, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(shape) * scale + offset).to(dtype).requires_grad_(True)


def _backward(*outputs) -> None:
    total = sum(o.float().sum() for o in outputs if o.requires_grad)
    total.backward()


def _token_inputs(layout: str):
    """(token shape, layout kwargs, number of sequences) for padded [B, T] or packed [N]."""
    if layout == "padded":
        mask = torch.ones(PADDED, dtype=torch.bool)
        mask[0, 5:] = False
        mask[2, 1:] = False
        return PADDED, {"mask": mask}, PADDED[0]
    cu = torch.tensor(CU_SEQLENS, dtype=torch.int32)
    return (CU_SEQLENS[-1],), {"cu_seqlens": cu}, len(CU_SEQLENS) - 1


def _segment_variants() -> Iterator[Variant]:
    from alignfuse.kernels import segment_mean, segment_sum

    def run(op, dtype):
        values = _leaf(CU_SEQLENS[-1], dtype)
        _backward(op(values, torch.tensor(CU_SEQLENS, dtype=torch.int32), backend="triton"))

    for dtype in (F32, BF16):
        yield "segment_sum", dtype, lambda d: run(segment_sum, d)
    yield "segment_mean", F32, lambda d: run(segment_mean, d)


def _logprobs_variants() -> Iterator[Variant]:
    from alignfuse.kernels import linear_logprobs, logprobs_from_logits

    def targets(n, V):
        t = torch.randint(0, V, (n,))
        t[1] = -100
        return t

    def logits_case(dtype, n, V, entropy):
        logits = _leaf((n, V), dtype, scale=3.0)
        out = logprobs_from_logits(logits, targets(n, V), temperature=0.7,
                                   return_entropy=entropy, backend="triton")
        _backward(*(out if entropy else (out,)))

    def linear_case(dtype, strategy, n, V, H, entropy, bias, grads, softcap=None):
        hidden = _leaf((n, H), dtype).requires_grad_("h" in grads)
        weight = _leaf((V, H), dtype, scale=0.2).requires_grad_("w" in grads)
        b = _leaf(V, dtype).requires_grad_("b" in grads) if bias else None
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ALIGNFUSE_LINEAR_STRATEGY", strategy)
            out = linear_logprobs(hidden, weight, targets(n, V), bias=b, temperature=0.7,
                                  return_entropy=entropy, softcap=softcap, backend="triton")
        _backward(*(out if entropy else (out,)))  # the strategy is kept for backward

    # (label, dtype, strategy, n, V, H, entropy, bias, grads wanted: h(idden) w(eight)
    # b(ias)). 144 rows are several row blocks (num_n_blocks = 1 would be specialized as a
    # constexpr). The chunked strategy runs the logits kernels on fp32 logits chunks, with a
    # bf16 gradient buffer for bf16 inputs and in place for fp32.
    for label, dtype, strategy, n, V, H, entropy, bias, grads in (
            ("aligned,entropy,bias", BF16, "fused", 144, 256, 64, True, True, "hwb"),
            ("odd,frozen head", BF16, "fused", 13, 301, 40, False, False, "h"),
            ("odd,bias,grad weight only", F32, "fused", 13, 301, 40, False, True, "w"),
            ("chunked,entropy,bias", BF16, "chunked", 144, 256, 64, True, True, "hwb"),
            ("chunked,odd", F32, "chunked", 13, 301, 40, False, False, "hw")):
        yield (f"linear_logprobs[{label}]", dtype,
               lambda d, a=(strategy, n, V, H, entropy, bias, grads): linear_case(d, *a))
    # softcap: the SOFTCAP specializations of the logits kernels (chunked), of the GEMM
    # kernels (fused), and of the fused forward in float32 before a chunked backward
    for label, dtype, strategy, n, V, H, entropy, bias, grads in (
            ("chunked,softcap,entropy", BF16, "chunked", 144, 256, 64, True, False, "hw"),
            ("fused,softcap,entropy,bias", BF16, "fused", 144, 256, 64, True, True, "hwb"),
            ("fused-forward,softcap,odd", F32, "fused-forward", 13, 301, 40, False, False,
             "hw")):
        yield (f"linear_logprobs[{label}]", dtype,
               lambda d, a=(strategy, n, V, H, entropy, bias, grads): linear_case(
                   d, *a, softcap=3.0))
    for label, dtype, n, V, entropy in (("aligned,entropy", BF16, 32, 1024, True),
                                        ("aligned", BF16, 32, 1024, False),
                                        ("odd", F32, 13, 301, False)):
        yield (f"logprobs_from_logits[{label}]", dtype,
               lambda d, a=(n, V, entropy): logits_case(d, *a))


def _preference_variants() -> Iterator[Variant]:
    from alignfuse.kernels import dpo_loss, kto_loss
    from alignfuse.kernels.preference.dpo import LENGTH_NORMALIZED, LOSS_TYPES

    S = 37

    def dpo(dtype, loss_type):
        inputs = [_leaf(S, dtype, scale=5.0, offset=-40.0) for _ in range(4)]
        kwargs = {}
        if loss_type in LENGTH_NORMALIZED:
            kwargs = dict(chosen_lengths=torch.randint(1, 50, (S,)),
                          rejected_lengths=torch.randint(1, 50, (S,)))
        _backward(dpo_loss(*inputs, loss_type=loss_type, backend="triton", **kwargs)[0])

    def kto(dtype, kl):
        policy, ref = _leaf(S, dtype, offset=-30.0), _leaf(S, dtype, offset=-30.0)
        desirable = torch.arange(S) % 3 == 0
        _backward(kto_loss(policy, ref, desirable, kl, backend="triton")[0])

    for loss_type in LOSS_TYPES:
        yield f"dpo_loss[{loss_type}]", F32, lambda d, t=loss_type: dpo(d, t)
    for loss_type in ("sigmoid", LENGTH_NORMALIZED[0]):
        yield f"dpo_loss[{loss_type}]", BF16, lambda d, t=loss_type: dpo(d, t)
    yield "kto_loss[kl=float]", F32, lambda d: kto(d, 0.3)
    yield "kto_loss[kl=tensor]", BF16, lambda d: kto(d, torch.tensor(0.3))


def _policy_variants() -> Iterator[Variant]:
    from alignfuse.kernels import kl_penalty, policy_loss, value_loss
    from alignfuse.kernels.policy.aggregation import LOSS_AGG_MODES
    from alignfuse.kernels.policy.kl import kl_estimator_names
    from alignfuse.kernels.policy.policy_loss import IMPORTANCE_LEVELS

    def policy(dtype, layout="packed", adv_per_seq=False, ref=False, **kwargs):
        shape, where, S = _token_inputs(layout)
        logps = _leaf(shape, dtype, scale=0.5, offset=-2.0)
        old = (logps.detach().float() + 0.2 * torch.randn(shape)).to(dtype)
        adv = torch.randn(S if adv_per_seq else shape).to(dtype)
        ref_logps = (logps.detach().float() + 0.3 * torch.randn(shape)).to(dtype) if ref else None
        loss, _ = policy_loss(logps, old, adv, ref_logps=ref_logps, backend="triton",
                              **where, **kwargs)
        _backward(loss)

    def value(dtype, layout="packed", **kwargs):
        shape, where, _ = _token_inputs(layout)
        values = _leaf(shape, dtype)
        old = (values.detach().float() + 0.3 * torch.randn(shape)).to(dtype)
        loss, _ = value_loss(values, old, torch.randn(shape).to(dtype), backend="triton",
                             **where, **kwargs)
        _backward(loss)

    def kl(dtype, estimator):
        logps = _leaf(41, dtype, offset=-2.0)
        _backward(kl_penalty(logps, torch.randn(41).to(dtype) - 2.0, estimator,
                             backend="triton"))

    for layout in ("padded", "packed"):
        yield f"policy_loss[{layout}]", F32, lambda d, l=layout: policy(d, l)
        yield f"value_loss[{layout}]", F32, lambda d, l=layout: value(d, l)
    yield "value_loss[clip]", F32, lambda d: value(d, clip=0.2)
    yield "policy_loss[adv_per_seq]", F32, lambda d: policy(d, adv_per_seq=True)
    yield "policy_loss[dual_clip]", F32, lambda d: policy(d, dual_clip=3.0)
    yield "policy_loss[ref,kl_coef=0]", F32, lambda d: policy(d, ref=True)
    for estimator in kl_estimator_names():
        yield (f"policy_loss[kl_estimator={estimator}]", F32,
               lambda d, e=estimator: policy(d, ref=True, kl_coef=0.1, kl_estimator=e))
        yield f"kl_penalty[{estimator}]", F32, lambda d, e=estimator: kl(d, e)
    for level in IMPORTANCE_LEVELS:
        yield (f"policy_loss[importance_level={level}]", F32,
               lambda d, lv=level: policy(d, importance_level=lv, dual_clip=3.0, ref=True,
                                          kl_coef=0.1))
    for agg in LOSS_AGG_MODES:  # aggregation is host-side weights: these must not add kernels
        yield f"policy_loss[loss_agg={agg}]", F32, lambda d, a=agg: policy(d, "padded", loss_agg=a)
        yield f"value_loss[loss_agg={agg}]", F32, lambda d, a=agg: value(d, "padded", loss_agg=a)
    yield ("policy_loss[sequence,ref,dual_clip]", BF16,
           lambda d: policy(d, importance_level="sequence", dual_clip=3.0, ref=True, kl_coef=0.1))
    yield "value_loss[clip]", BF16, lambda d: value(d, clip=0.2)
    yield "kl_penalty[k3]", BF16, lambda d: kl(d, "k3")


def _advantage_variants() -> Iterator[Variant]:
    from alignfuse.kernels import gae, group_advantages
    from alignfuse.kernels.advantages.group import ESTIMATORS, SCALES

    def group(dtype, estimator, scale, group_size):
        group_advantages(torch.randn(3 * group_size).to(dtype), group_size,
                         estimator=estimator, scale=scale, backend="triton")

    def gae_case(dtype, layout, **kwargs):
        shape, where, _ = _token_inputs(layout)
        gae(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype), backend="triton",
            **where, **kwargs)

    for estimator in ESTIMATORS:
        for scale in SCALES:
            yield (f"group_advantages[{estimator},{scale}]", F32,
                   lambda d, e=estimator, s=scale: group(d, e, s, 5))
        yield (f"group_advantages[{estimator},group]", BF16,
               lambda d, e=estimator: group(d, e, "group", 5))
    # BLOCK follows the group size
    yield "group_advantages[grpo,group,G=24]", F32, lambda d: group(d, "grpo", "group", 24)
    # float64 rewards: the kernel takes the group differences, and ranks, in float64
    for estimator in ("grpo", "rank"):
        yield (f"group_advantages[{estimator},group,float64]", torch.float64,
               lambda d, e=estimator: group(d, e, "group", 5))
    for layout in ("padded", "packed"):
        yield f"gae[{layout}]", F32, lambda d, l=layout: gae_case(d, l, gamma=0.99, lam=0.95)
    yield "gae[packed,whiten]", BF16, lambda d: gae_case(d, "packed", whiten=True)


def _fused_variants() -> Iterator[Variant]:
    from alignfuse.kernels import linear_cross_entropy, linear_policy_loss
    from alignfuse.kernels.policy.kl import kl_estimator_names

    n, V, H = 19, 301, 40

    def lm_head(dtype, bias, frozen_head=False):
        hidden = _leaf((n, H), dtype)
        weight = _leaf((V, H), dtype, scale=0.2).requires_grad_(not frozen_head)
        return hidden, weight, (_leaf(V, dtype) if bias else None)

    def policy(dtype, bias=False, ref=False, **kwargs):
        hidden, weight, b = lm_head(dtype, bias)
        shape, where, _ = _token_inputs("packed")
        targets = torch.randint(0, V, shape)
        old = -4.0 - torch.rand(shape)
        ref_logps = old + 0.1 * torch.randn(shape) if ref else None
        loss, _ = linear_policy_loss(hidden, weight, targets, old, torch.randn(shape),
                                     ref_logps=ref_logps, bias=b, backend="triton", **where,
                                     **kwargs)
        _backward(loss)

    def cross_entropy(dtype, bias=False, grad=True, frozen_head=False, **kwargs):
        hidden, weight, b = lm_head(dtype, bias, frozen_head)
        targets = torch.randint(0, V, (n,))
        targets[2] = -100
        with torch.set_grad_enabled(grad):
            loss = linear_cross_entropy(hidden, weight, targets, bias=b, backend="triton",
                                        **kwargs)
        if grad:
            _backward(loss)

    yield ("linear_policy_loss[bias,ref,entropy_coef]", BF16,
           lambda d: policy(d, bias=True, ref=True, kl_coef=0.1, entropy_coef=0.01))
    yield ("linear_policy_loss[sequence,dual_clip]", BF16,
           lambda d: policy(d, importance_level="sequence", dual_clip=3.0))
    for estimator in kl_estimator_names():
        yield (f"linear_policy_loss[kl_estimator={estimator}]", F32,
               lambda d, e=estimator: policy(d, ref=True, kl_coef=0.1, kl_estimator=e))
    yield "linear_cross_entropy[mean]", BF16, lambda d: cross_entropy(d)
    yield ("linear_cross_entropy[sum,bias,label_smoothing]", BF16,
           lambda d: cross_entropy(d, bias=True, reduction="sum", label_smoothing=0.1))
    yield "linear_cross_entropy[no grad]", F32, lambda d: cross_entropy(d, grad=False)
    yield ("linear_policy_loss[softcap,sequence]", BF16,
           lambda d: policy(d, importance_level="sequence", softcap=3.0))
    yield ("linear_cross_entropy[softcap,label_smoothing]", BF16,
           lambda d: cross_entropy(d, label_smoothing=0.1, softcap=3.0))
    # reduction="none" runs linear_logprobs' kernels (the frozen-head case above)
    yield ("linear_cross_entropy[none,frozen head]", BF16,
           lambda d: cross_entropy(d, reduction="none", frozen_head=True))


# op registered with a triton backend -> the variant generator that exercises it
VARIANTS: dict[str, Callable[[], Iterator[Variant]]] = {
    "segment_sum": _segment_variants,
    "linear_logprobs": _logprobs_variants,
    "logprobs_from_logits": _logprobs_variants,
    "dpo_loss": _preference_variants,
    "kto_loss": _preference_variants,
    "policy_loss": _policy_variants,
    "value_loss": _policy_variants,
    "kl_penalty": _policy_variants,
    "group_advantages": _advantage_variants,
    "gae": _advantage_variants,
    "linear_policy_loss": _fused_variants,
    "linear_cross_entropy": _fused_variants,
}


# ---------------------------------------------------------------------------------------
# Capture once, compile once, per test session.


@dataclass
class Compiled:
    launches: list[triton_capture.Launch]
    results: list[dict]
    variant_errors: list[str] = field(default_factory=list)

    def of_module(self, module: str) -> list[tuple[triton_capture.Launch, dict]]:
        """Launches of `module`'s kernels, or of kernels that call its device functions."""
        return [(launch, result) for launch, result in zip(self.launches, self.results)
                if launch.module == module
                or any(f.startswith(module + ":") for f in launch.device_functions)]


def _emulate_gpu_host_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    for path in KERNEL_FILES:
        module = importlib.import_module(_module_name(path))
        if hasattr(module, "_interpreted"):
            monkeypatch.setattr(module, "_interpreted", lambda t: False)


def _run_variants(recorder: triton_capture.LaunchRecorder, compiled: Compiled) -> None:
    for generator in dict.fromkeys(VARIANTS.values()):  # several ops share one generator
        for label, dtype, run in generator():
            label = f"{label}[{str(dtype).removeprefix('torch.')}]"
            try:
                with recorder.labelled(label):
                    run(dtype)
            except Exception as exc:
                compiled.variant_errors.append(f"{label}: {type(exc).__name__}: {exc}")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Compiled:
    from alignfuse.kernels.backends import triton_interpreter_on

    if not triton_interpreter_on():
        pytest.skip("the capture runs kernels under the Triton interpreter (CPU machines); "
                    "on a GPU the GPU tests compile and run every kernel themselves")
    torch.manual_seed(0)
    recorder = triton_capture.LaunchRecorder()
    result = Compiled([], [])
    with pytest.MonkeyPatch.context() as monkeypatch, recorder:
        _emulate_gpu_host_choices(monkeypatch)
        _run_variants(recorder, result)
    result.launches = recorder.launches
    workdir = tmp_path_factory.mktemp("sm90")
    (workdir / "launches.json").write_text(
        json.dumps([launch.__dict__ for launch in result.launches], indent=1))
    result.results = triton_capture.compile_in_subprocesses(result.launches, str(workdir),
                                                            arch=SM, processes=2)
    print(f"\nTriton kernels compiled for sm_{SM} ({len(result.launches)} distinct launches, "
          f"recorded in {workdir / 'launches.json'}):")
    for launch, res in zip(result.launches, result.results):
        state = "ok  " if res["ok"] else "FAIL"
        module = launch.module.removeprefix("alignfuse.kernels.")
        more = f" (+{len(launch.labels) - 1} more)" if len(launch.labels) > 1 else ""
        print(f"  {state} {res['seconds']:5.1f}s {module}.{launch.describe()}  "
              f"<- {launch.labels[0]}{more}")
    return result


# ---------------------------------------------------------------------------------------
# Tests


def test_kernel_files_are_discovered():
    # A broken glob would make the per-module test below vacuous.
    assert len(KERNEL_FILES) >= 10, KERNEL_FILES
    assert "kernels/policy/triton_kl.py" in KERNEL_FILES


def test_every_triton_op_is_exercised(compiled):
    from alignfuse.kernels import backends

    with_triton = sorted(op for op, impls in backends._REGISTRY.items() if "triton" in impls)
    missing = [op for op in with_triton if op not in VARIANTS]
    assert not missing, (f"ops with a triton backend but no variants in "
                         f"tests/test_triton_sm90.py VARIANTS: {missing}")
    assert not compiled.variant_errors, "variants that failed to run:\n" + "\n".join(
        compiled.variant_errors)
    exercised = {label.split("[")[0] for launch in compiled.launches for label in launch.labels}
    assert set(with_triton) <= exercised, f"never launched a kernel: {set(with_triton) - exercised}"


def test_device_dependent_launches_are_emulated():
    """A kernel module whose host code decides by device must route that through
    `_interpreted(t)`, else this test would compile its CPU choices, not the GPU ones."""
    offenders = []
    for path in KERNEL_FILES:
        source = (ROOT / path).read_text()
        decides_by_device = any(s in source for s in ("device.type", ".is_cuda", "torch.cuda."))
        if decides_by_device and "def _interpreted(" not in source:
            offenders.append(path)
    assert not offenders, (f"{offenders} choose launch parameters by device without an "
                           "`_interpreted(t)` function to patch (see this file's docstring)")


# ---------------------------------------------------------------------------------------
# The capture and the compile step themselves: the JIT's typing rules, and a bug that only
# the compiler sees.

@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, scale, flag, bias, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0) * scale
    if flag:
        total += 1.0
    if bias is not None:
        total += tl.load(bias)
    tl.store(out_ptr, total)


@triton.jit
def _sum_kernel_int_accumulator(x_ptr, out_ptr, n, scale, flag, bias, BLOCK: tl.constexpr):
    # The bug: an int32 accumulator that float adds turn into fp32 inside the loop. numpy
    # (the interpreter) promotes silently; the compiler refuses the loop-carried type change.
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
    tl.store(out_ptr, tl.sum(acc, axis=0) * scale)


@triton.jit
def _store_kernel(out_ptr, value):
    tl.store(out_ptr, (value % 7).to(tl.float32))


def _launch(kernel, x, n, *, flag=False, bias=None) -> torch.Tensor:
    out = torch.zeros(1, dtype=torch.float32)
    kernel[(1,)](x, out, n, 0.5, flag, bias, BLOCK=32)
    return out


def test_recorder_types_arguments_like_the_jit():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("needs the Triton interpreter (CPU machines)")
    x = torch.randn(100).to(torch.bfloat16)
    recorder = triton_capture.LaunchRecorder()
    with recorder:
        out = _launch(_sum_kernel, x, 37, flag=True)
        _launch(_sum_kernel, x, 32, bias=torch.ones(1))          # 16-divisible int: "D"
        _launch(_sum_kernel, x, 1)                                # 1: a constexpr
        _store_kernel[(1,)](torch.zeros(1), 2**40 + 3)            # past int32: i64
        _launch(_sum_kernel, x, 37, flag=True)                    # a duplicate
    assert out.item() == pytest.approx(0.5 * x[:37].float().sum().item() + 1.0, rel=1e-5)
    first, aligned, one, huge = recorder.launches  # the duplicate was merged
    assert first.signature == {"x_ptr": "*bf16", "out_ptr": "*fp32", "n": "i32",
                               "scale": "fp32", "flag": "u1", "bias": "constexpr",
                               "BLOCK": "constexpr"}
    assert first.constexprs == {"bias": None, "BLOCK": 32} and "n" not in first.attrs
    assert first.labels == ["unlabelled"] and first.qualname == "_sum_kernel"
    assert aligned.signature["bias"] == "*fp32" and aligned.attrs["n"] == "D"
    assert one.signature["n"] == "constexpr" and one.constexprs["n"] == 1
    assert huge.signature == {"out_ptr": "*fp32", "value": "i64"}
    # the patch is undone on exit
    _launch(_sum_kernel, x, 37)
    assert len(recorder.launches) == 4


def test_compile_step_catches_an_interpreter_only_bug(tmp_path):
    """The bad kernel runs under the interpreter and gives the right sum; only the compile
    step sees the bug, and it must say what it is."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("needs the Triton interpreter (CPU machines)")
    x = torch.randn(100)
    recorder = triton_capture.LaunchRecorder()
    with recorder:
        good = _launch(_sum_kernel, x, 37)
        bad = _launch(_sum_kernel_int_accumulator, x, 37)
    assert bad.item() == pytest.approx(good.item(), rel=1e-6)
    results = triton_capture.compile_in_subprocesses(recorder.launches, str(tmp_path),
                                                     arch=SM, processes=1)
    assert results[0]["ok"], results[0]["error"]
    assert not results[1]["ok"] and "Loop-carried variable acc" in results[1]["error"]


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_COMPILE_FAILURES[p]))
    if p in KNOWN_COMPILE_FAILURES else p for p in KERNEL_FILES])
def test_kernel_module_compiles_for_sm90(path, compiled):
    module = _module_name(path)
    cases = compiled.of_module(module)
    assert cases, (f"{path}: no kernel of this module (or calling its device functions) was "
                   f"launched; add variants that reach it to VARIANTS in {__file__}")
    failures = [f"{launch.describe()} <- {', '.join(launch.labels)}\n    {result['error'][-3000:]}"
                for launch, result in cases if not result["ok"]]
    assert not failures, f"{path}: {len(failures)} of {len(cases)} launches did not compile " \
                         f"for sm_{SM}:\n" + "\n".join(failures)
