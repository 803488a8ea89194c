"""`logprobs`: per-token log-probs of the targets straight from the LM head.

    logp[i] = (h_i · w_{t_i}) - logsumexp_v(h_i · w_v)        h: [N, H], W: [V, H], t: [N]

Contenders, each in its own documented form:
- alignfuse/<backend>: `alignfuse.kernels.linear_logprobs(hidden, weight, targets, backend=)`
  for every backend (triton, cuda, torch); one that cannot run here is skipped with why.
  alignfuse/triton-fused is the triton backend with ALIGNFUSE_LINEAR_STRATEGY=fused (GEMMs
  inside Triton kernels) beside the default chunked strategy (cuBLAS GEMMs), so that one
  run says which to keep as the default; alignfuse/triton-fused-forward is the fused
  forward with the chunked backward (the least extra memory in the forward). alignfuse/cuda
  is the same chunked loop around the compiled CUDA logits kernels instead of the Triton
  ones.
- linear_cross_entropy/triton: alignfuse's SFT op with reduction="none", negated: the
  same computation as the two cross-entropy baselines below.
- torch-eager: naive eager: bf16 logits (h @ W.T in the model dtype), a float32
  log_softmax of all of them, gather. At the backward's peak it holds about 12 B x N x V
  (bf16 logits and their gradient, the float32 log-softmax and its float32 gradient).
- torch-rowwise: a careful eager version (in the spirit of TRL's `selective_log_softmax`,
  written here from its description): for half-precision logits, log_softmax in the logits'
  own dtype one chunk of rows at a time (a sequence's worth, `ROWWISE_ROWS`), then gather;
  for float32 logits, logit - logsumexp. No float32 copy of the [N, V] logits. Timed in the
  headline case only in the `gpu` plan.
- liger: Liger-Kernel's `LigerFusedLinearCrossEntropyLoss(reduction="none")`, which gives
  -logp per token (negated here). With reduction="none" (0.8.5) it defers the gradient work
  to its backward (ctx.defer_grads: the logits are recomputed there), and it accumulates
  grad_weight in the weight's dtype (bf16 here; alignfuse accumulates in float32).
- cce: cut-cross-entropy's `linear_cross_entropy(e, c, targets, reduction="none")`
  (impl "cce", its defaults), negated. Its backward skips gradient tiles whose values are
  all below a threshold (filter_eps="high": bf16 eps / 32), so its backward time depends on
  the logit distribution (here: unit-scale random logits, softmax spread thin over V).

Reference: float32 on GPU (float64 on CPU) of the same inputs, in row chunks so that the
largest sizes fit, with the analytic gradient dL/dz = g · (onehot(t) - softmax(z)).

Least work (the floor): forward 2NHV FLOPs; backward 4NHV (dL/dh and dL/dW); fwd+bwd 6NHV.
A kernel that never holds the logits must recompute them in backward (8NHV in all), so it
can reach at most 75% of the fwd+bwd floor; eager stores them instead and pays in memory.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from ..harness import Case, Contender, InputSet
from .common import (alignfuse_op, backend_unavailable, dtype_name, generator,
                     randn, reference_dtype, tolerance, triton_baseline_unavailable)

SUITE = "logprobs"


# Caps (MiB) on the chunked backward's logits block timed beside the default (2 GiB on
# CUDA) at the headline: what a smaller, cheaper-in-memory block costs in time.
BUDGETS_MIB = (256, 512, 1024)


def _alignfuse(backend: str, strategy: str | None = None, softcap: float | None = None,
               budget_mib: int | None = None) -> Contender:
    """`strategy` (triton only): ALIGNFUSE_LINEAR_STRATEGY for the call; `budget_mib`:
    ALIGNFUSE_CHUNK_BUDGET_MIB; None: the defaults. The forward records both for its
    backward, so only the forward call needs them set."""
    settings = {"ALIGNFUSE_LINEAR_STRATEGY": strategy,
                "ALIGNFUSE_CHUNK_BUDGET_MIB": None if budget_mib is None else str(budget_mib)}

    def run(t):
        fn = alignfuse_op("kernels", "linear_logprobs")
        with _environment(settings):
            return {"logps": fn(t["hidden"], t["weight"], t["targets"], backend=backend,
                                **_cap(softcap))}

    name = (f"alignfuse/{backend}" + (f"-{strategy}" if strategy else "")
            + (f"-budget={budget_mib}MiB" if budget_mib else ""))
    notes = {"triton": "default strategy (chunked: cuBLAS GEMMs + Triton logits kernels)",
             "cuda": "cuBLAS GEMMs + CUDA logits kernels (csrc/cuda/logprobs.cu)"}
    note = ", ".join(f"{k}={v}" for k, v in settings.items() if v) or notes.get(backend, "")
    return Contender(name, "subject", run,
                     lambda device: backend_unavailable("linear_logprobs", backend, device),
                     note=note)


@contextlib.contextmanager
def _environment(settings: dict[str, str | None]):
    """Set the variables whose value is not None for the block, then restore them."""
    before = {k: os.environ.get(k) for k, v in settings.items() if v is not None}
    os.environ.update({k: v for k, v in settings.items() if v is not None})
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _cap(softcap: float | None) -> dict:
    """The softcap keyword of the ops (none at all without one: older builds lack it)."""
    return {} if softcap is None else {"softcap": softcap}


def _cross_entropy(backend: str, softcap: float | None = None) -> Contender:
    def run(t):
        fn = alignfuse_op("kernels", "linear_cross_entropy")
        return {"logps": -fn(t["hidden"], t["weight"], t["targets"], reduction="none",
                             backend=backend, **_cap(softcap))}

    return Contender(f"linear_cross_entropy/{backend}", "subject", run,
                     lambda device: backend_unavailable("linear_cross_entropy", backend, device),
                     note="alignfuse.kernels.linear_cross_entropy(reduction='none'), negated: "
                          "the SFT op, the same computation as Liger's and CCE's")


def _eager(t, softcap: float | None = None):
    logits = t["hidden"] @ t["weight"].T
    if softcap is not None:  # as transformers' Gemma-2 does, in the model dtype
        logits = torch.tanh(logits / softcap) * softcap
    logps = logits.float().log_softmax(-1).gather(-1, t["targets"][:, None]).squeeze(-1)
    return {"logps": logps}


ROWWISE_ROWS = 1024  # rows per log_softmax in torch-rowwise: one sequence of ~1k tokens


def _rowwise(t, softcap: float | None = None):
    """Half precision: log_softmax in the logits' dtype, `ROWWISE_ROWS` rows at a time, then
    gather (no float32 copy of the [N, V] logits); float32: the target's logit minus the
    row's logsumexp."""
    logits = t["hidden"] @ t["weight"].T
    if softcap is not None:  # as transformers' Gemma-2 does, in the model dtype
        logits = torch.tanh(logits / softcap) * softcap
    targets = t["targets"][:, None]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logps = torch.cat([chunk.log_softmax(-1).gather(-1, rows).squeeze(-1) for chunk, rows in
                           zip(logits.split(ROWWISE_ROWS), targets.split(ROWWISE_ROWS))])
    else:
        logps = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, -1)
    return {"logps": logps}


def _liger(softcap: float | None = None):
    loss_fn = {}

    def run(t):
        if "fn" not in loss_fn:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            loss_fn["fn"] = LigerFusedLinearCrossEntropyLoss(reduction="none", softcap=softcap)
        return {"logps": -loss_fn["fn"](t["weight"], t["hidden"], t["targets"])}

    def unavailable(device: torch.device) -> str | None:
        why = triton_baseline_unavailable("liger_kernel", "liger-kernel", device)
        if why or softcap is None or device.type == "cuda":
            return why
        return ("Liger's softcap path fails under the Triton interpreter (InterpreterError: "
                "'float' object has no attribute 'to', seen with liger-kernel 0.8.5 on CPU)")

    return Contender("liger", "baseline", run, unavailable,
                     note="LigerFusedLinearCrossEntropyLoss(reduction='none'"
                          + (", softcap=)" if softcap is not None else ")")
                          + ", negated; it defers its gradient work to the backward "
                          "(reduction='none': the logits are recomputed there) and "
                          "accumulates grad_weight in the weight's dtype (bf16 on GPU; "
                          "alignfuse: float32)")


def _cce_unavailable(device: torch.device) -> str | None:
    why = triton_baseline_unavailable("cut_cross_entropy", "cut-cross-entropy", device)
    if why or device.type == "cuda":
        return why
    return ("cut-cross-entropy's impl='cce' kernels need CUDA: under the Triton interpreter "
            "they raise InterpreterError (seen with 25.1.1 on CPU), and its "
            "impl='torch_compile' path spends ~17 s compiling on 2 CPU cores")


def _cce(t, softcap: float | None = None):
    from cut_cross_entropy import linear_cross_entropy

    return {"logps": -linear_cross_entropy(t["hidden"], t["weight"], t["targets"],
                                           reduction="none", softcap=softcap)}


def reference(s: InputSet, budget_bytes: int = 1 << 30,
              softcap: float | None = None) -> dict[str, torch.Tensor]:
    """logps and the gradients of sum(logps · upstream) in higher precision, in row chunks
    (with `softcap`, of the soft-capped logits c tanh(z / c))."""
    h0, w0, t = s.tensors["hidden"], s.tensors["weight"], s.tensors["targets"]
    dt = reference_dtype(h0.device)
    w = w0.detach().to(dt)
    N, V = h0.shape[0], w.shape[0]
    g = s.upstream.to(dt)
    logps = torch.empty(N, device=h0.device, dtype=dt)
    grad_h = torch.empty(h0.shape, device=h0.device, dtype=dt)
    grad_w = torch.zeros(w.shape, device=h0.device, dtype=dt)
    rows = max(1, budget_bytes // (V * w.element_size() * 2))
    for lo in range(0, N, rows):
        hi = min(N, lo + rows)
        h = h0[lo:hi].detach().to(dt)
        z = h @ w.T
        tanh = None
        if softcap is not None:
            tanh = torch.tanh(z / softcap)
            z = tanh * softcap
        lse = torch.logsumexp(z, dim=-1)
        idx = torch.arange(hi - lo, device=z.device)
        logps[lo:hi] = z[idx, t[lo:hi]] - lse
        dz = torch.softmax(z, dim=-1).mul_(-g[lo:hi, None])
        dz[idx, t[lo:hi]] += g[lo:hi]
        if tanh is not None:
            dz.mul_(1 - tanh.square_())  # d(c tanh(x / c)) / dx
        grad_h[lo:hi] = dz @ w
        grad_w += dz.T @ h
        del z, dz
    return {"logps": logps, "grad_hidden": grad_h, "grad_weight": grad_w}


def case(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device,
         softcap: float | None = None) -> Case:
    """One size; `softcap` (Gemma-2's final logit soft-capping, e.g. 30) gives the capped
    variant: logits of std ~softcap / 2 so that the cap matters, every contender applying
    the cap."""
    size = torch.tensor([], dtype=dtype).element_size()
    # Logits of unit scale, as a trained LM head gives: W ~ N(0, 1/H); soft-capped models
    # have raw logits of tens (the cap exists for them).
    logit_scale = 1.0 if softcap is None else softcap / 2

    def make_inputs(seed: int) -> InputSet:
        gen = generator(device, seed)
        hidden = randn((N, H), device=device, dtype=dtype, gen=gen, requires_grad=True)
        weight = randn((V, H), device=device, dtype=dtype, gen=gen,
                       scale=logit_scale * H ** -0.5, requires_grad=True)
        targets = torch.randint(0, V, (N,), device=device, generator=gen)
        upstream = randn((N,), device=device, dtype=torch.float32, gen=gen)
        return InputSet({"hidden": hidden, "weight": weight, "targets": targets}, upstream)

    def work(mode: str) -> dict:
        # out_bytes: what every implementation leaves allocated after the mode (the [N]
        # float32 log-probs, and for a backward the model-dtype gradients of hidden and
        # weight); the peak above it is the extra memory the "under 1% of the logits" goal
        # is about
        read = N * H * size + V * H * size + N * 8
        if mode == "fwd":
            return {"flops": 2 * N * H * V, "bytes": read + N * 4, "out_bytes": N * 4}
        grads_out = N * H * size + V * H * size
        if mode == "bwd":
            return {"flops": 4 * N * H * V, "bytes": read + N * 4 + grads_out,
                    "out_bytes": N * 4 + grads_out}
        return {"flops": 6 * N * H * V, "bytes": read + N * 4 + N * 4 + grads_out,
                "out_bytes": N * 4 + grads_out}

    # Order = priority when the time budget runs out (a contender that does not start in
    # time is recorded as skipped): the default path and the baselines (eager, Liger, CCE,
    # row-wise eager) first, then the alternatives that decide defaults, the torch backend
    # (chunked, not meant to be fast on GPU), and the compiled CUDA backend last: a fault
    # there (illegal memory access) breaks the CUDA context for every contender after it.
    capping = ("" if softcap is None else
               ", then softcap * tanh(logits / softcap) in the model dtype (as transformers' "
               "Gemma-2)")
    eager_note = (f"naive eager: logits = h @ W.T (model dtype){capping}, float32 "
                  "log_softmax, gather")
    rowwise_note = (f"logits = h @ W.T (model dtype){capping}; half precision: log_softmax in "
                    f"that dtype, {ROWWISE_ROWS} rows at a time, gather; float32: logit - "
                    "logsumexp")
    cce_note = ("cut_cross_entropy.linear_cross_entropy(reduction='none'"
                + (", softcap=" if softcap is not None else "") + "), negated; its backward "
                "skips gradient tiles below filter_eps (bf16 eps / 32), so its speed depends "
                "on the logit distribution")
    contenders = [_alignfuse("triton", softcap=softcap),
                  Contender("torch-eager", "baseline",
                            functools.partial(_eager, softcap=softcap), note=eager_note),
                  _liger(softcap),
                  Contender("cce", "baseline", functools.partial(_cce, softcap=softcap),
                            _cce_unavailable, note=cce_note),
                  Contender("torch-rowwise", "baseline",
                            functools.partial(_rowwise, softcap=softcap), note=rowwise_note)]
    contenders += [_alignfuse("triton", "fused", softcap), _alignfuse("triton", "fused-forward",
                                                                       softcap)]
    contenders += [_cross_entropy("triton", softcap), _alignfuse("torch", softcap=softcap),
                   _alignfuse("cuda", softcap=softcap)]
    if device.type == "cuda":  # the budget changes nothing at the CPU preset's sizes
        contenders += [_alignfuse("triton", softcap=softcap, budget_mib=mib)
                       for mib in BUDGETS_MIB]
    tol = tolerance(dtype)
    capped = "" if softcap is None else f"softcap={softcap:g},"
    sizes = {"N": N, "H": H, "V": V, "dtype": dtype_name(dtype), "logits_bytes": N * V * size}
    if softcap is not None:
        sizes["softcap"] = softcap
    # logits_bytes: the [N, V] logits in the model dtype, the report's yardstick for memory
    return Case(SUITE, f"N={N},H={H},V={V},{capped}{dtype_name(dtype)}", sizes,
                make_inputs, functools.partial(reference, softcap=softcap), contenders,
                tolerances={"logps": tol, "grad_hidden": tol, "grad_weight": tol},
                grad_inputs=("hidden", "weight"), grad_output="logps", work=work,
                notes="floor: fwd 2NHV, bwd 4NHV, fwd+bwd 6NHV FLOPs; a kernel that "
                      "recomputes logits in backward reaches at most 75% in fwd+bwd")


def cases(preset, device: torch.device) -> list[Case]:
    return [case(s["N"], s["H"], s["V"], preset.dtype, device, softcap=s.get("softcap"))
            for s in preset.logprobs]
