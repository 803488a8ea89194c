"""The chunk loop of the fused LM-head losses: logits once per chunk, gradients in the forward.

For a loss that is a weighted sum of per-token terms, each token's d loss / d logits is known
as soon as its logits are, so the forward pass can finish the job:

    for each chunk of C counted tokens:
        z   = h_chunk @ W.T (+ b)                    [C, V] fp32     2 C H V FLOPs
        the Triton kernel (triton_fused_loss.py):    lse, loss, dz = d loss / d z (in place)
        grad_hidden[chunk] = dz @ W                  [C, H]          2 C H V
        grad_weight       += dz.T @ h_chunk          [V, H] fp32     2 C H V

6 N H V FLOPs in all, against 8 for a log-prob op that recomputes its logits in backward
(cut-cross-entropy, linear_logprobs) followed by a separate loss. The autograd backward is a
multiply of the stored gradients by the (scalar) incoming gradient (`autograd.fused_local_grad`).

- The matmuls are torch's (cuBLAS on GPU, fp32 accumulation); the elementwise work over the
  chunk is one Triton kernel. The chunk buffer is the only `[C, V]` memory, never `[N, V]`;
  C comes from the same memory budget as linear_logprobs' torch path (`reference.chunk_rows`,
  which tests can force through `reference.CHUNK_BUDGET_BYTES`).
- Logits are fp32 even for bf16 inputs: a bf16 logit carries an error of |z| 2^-9, which
  an importance ratio exp(logp - old_logp) would amplify. On CUDA the bf16 GEMM writes fp32
  directly (`torch.mm(..., out_dtype=torch.float32)`); on CPU the operands are upcast.
- dz goes back into the logits buffer when the inputs are fp32; for bf16/fp16 inputs it is
  written in the input dtype to a second buffer (tensor cores take bf16), so a chunk holds
  6 bytes per logit.
- A `softcap` (Gemma-2's final logit soft-capping) is the chunk kernel's: it caps each
  logit as it reads it and chains dz through the cap (`ChunkLoss.softcap`); no extra pass.
- Only the tokens that count (mask and target not ignore_index) are sent through the LM
  head: prompt and padding tokens cost nothing. Their gradient rows are zero.
- The weight gradient accumulates in fp32 ([V, H]), cast to the weight's dtype at the end,
  like linear_logprobs.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..logprobs.reference import MAX_BUDGET_BYTES, chunk_rows

# the gradients to compute: (hidden, weight, bias)
Need = tuple[bool, bool, bool]


# Rows of the weight gradient per fp32 GEMM result when the inputs are bf16/fp16: bounds
# the temporary to WEIGHT_GRAD_ROWS x H fp32 instead of a second [V, H].
WEIGHT_GRAD_ROWS = 16384

# The chunk budget's cap on CUDA. Each chunk of C tokens reads and writes the fp32 [V, H]
# weight gradient once (8 V H bytes) next to its 6 C H V GEMM FLOPs, 0.75 C FLOPs per byte:
# the accumulation stays under ~10% of the GEMM time on an H100 (~240 FLOPs per byte of
# HBM bandwidth) only from C ~ 3000 rows, i.e. a chunk about as large as that fp32
# gradient (the reference_bytes the loop passes). The CPU cap (reference.MAX_BUDGET_BYTES,
# 256 MiB) would give ~350 rows at V = 128k, and the accumulation would cost as much as the
# GEMMs. Reasoned from the roofline, not measured.
CUDA_MAX_BUDGET_BYTES = 2 << 30


# The user's cap on the logits block, in MiB, on any device: less memory for more, smaller
# GEMMs (measured on an H100 at the defaults: 2.2 GiB extra for linear_logprobs' backward at
# N=16384, V=128256, 56% of the bf16 logits; bench/'s budget contenders time smaller caps).
BUDGET_ENV = "ALIGNFUSE_CHUNK_BUDGET_MIB"


def budget_cap(device: torch.device) -> int:
    """Bytes a fused LM-head op may spend on its logits block: ALIGNFUSE_CHUNK_BUDGET_MIB when
    set, else CUDA_MAX_BUDGET_BYTES on CUDA and MAX_BUDGET_BYTES elsewhere."""
    raw = os.environ.get(BUDGET_ENV, "").strip()
    if raw:
        mib = int(raw) if raw.isdigit() else 0
        if mib < 1:
            raise ValueError(f"{BUDGET_ENV} must be a whole number of MiB, at least 1; "
                             f"got {raw!r}")
        return mib << 20
    return CUDA_MAX_BUDGET_BYTES if device.type == "cuda" else MAX_BUDGET_BYTES


def logits_into(z: torch.Tensor, h: torch.Tensor, w: torch.Tensor,
                b: torch.Tensor | None) -> torch.Tensor:
    """z (fp32, [C, V']) = h @ w.T (+ b): on CUDA a half-precision GEMM writes its fp32
    result straight into z; elsewhere the operands are upcast (pass w upcast already to do
    that once for many chunks)."""
    if h.dtype != torch.float32 and h.is_cuda:
        try:
            torch.mm(h, w.T, out_dtype=torch.float32, out=z)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            z.copy_(mm_fp32(h, w.T))
    else:
        torch.mm(h.float(), w.float().T, out=z)
    if b is not None:
        z += b.float()
    return z


def mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result and fp32 accumulation, whatever the (common) input dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): round once
            return (a @ b).float()
    return a.float() @ b.float()


# Whether torch.addmm takes an fp32 accumulator with bf16/fp16 matrices (out_dtype=): it
# depends on the torch version; asked once, on the first CUDA call.
_ADDMM_INTO_FP32: bool | None = None


def accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b for an fp32 `acc` and half-precision a, b.

    On CUDA, one cuBLAS GEMM with beta = 1 where torch allows it: no temporary, and acc is
    read and written once. Otherwise the product is made in fp32 WEIGHT_GRAD_ROWS rows at a
    time and added, which moves each block of acc three more times."""
    global _ADDMM_INTO_FP32
    if a.is_cuda and _ADDMM_INTO_FP32 is not False:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            _ADDMM_INTO_FP32 = True
            return
        except (TypeError, RuntimeError):
            if _ADDMM_INTO_FP32:  # it worked before: this failure is real
                raise
            _ADDMM_INTO_FP32 = False
    for v in range(0, acc.shape[0], WEIGHT_GRAD_ROWS):
        rows = slice(v, min(v + WEIGHT_GRAD_ROWS, acc.shape[0]))
        acc[rows] += mm_fp32(a[rows], b)


class FusedLinearLoss:
    """Runs the chunk loop over `rows` of hidden for one fused loss (and for each phase of
    linear_logprobs' chunked strategy, `logprobs/linear_chunked.py`: its forward needs no
    gradient, its backward launches the log-prob gradient kernel).

    hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None (one floating dtype; float64 is
    computed in float32), rows: int64 `[M]` indices of the counted tokens or None (all).
    `launch(z, dz, chunk)` runs the Triton kernel on one chunk of raw logits z (`chunk` a
    slice of [0, M)); it applies the temperature and writes d loss / d(raw logits) into dz
    when dz is not None.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 rows: torch.Tensor | None):
        if hidden.dtype == torch.float64:  # gradcheck inputs: no fp64 tensor-core path
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        self.hidden, self.weight, self.bias, self.rows = hidden, weight, bias, rows
        self.num_rows = hidden.shape[0] if rows is None else rows.numel()

    def _hidden_rows(self, chunk: slice) -> torch.Tensor:
        if self.rows is None:
            return self.hidden[chunk]
        return self.hidden.index_select(0, self.rows[chunk])

    def run(self, launch: Callable[[torch.Tensor, torch.Tensor | None, slice], None],
            need: Need) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns the local gradients (grad_hidden `[N, H]`, grad_weight `[V, H]`,
        grad_bias `[V]`), None where not needed, in the inputs' dtypes."""

        h_all, w, b = self.hidden, self.weight, self.bias
        N, H = h_all.shape
        V = w.shape[0]
        device, dtype = h_all.device, h_all.dtype
        need_h, need_w, need_b = need
        need_grad = any(need)
        half = dtype != torch.float32
        # fp32 weight copy only where the matmul cannot take bf16 with fp32 output (CPU)
        w_mm = w.float() if (half and not w.is_cuda) else w
        f32 = dict(device=device, dtype=torch.float32)
        grad_h = torch.zeros(N, H, device=device, dtype=dtype) if need_h else None
        grad_w = torch.zeros(V, H, **f32) if need_w else None
        grad_b = torch.zeros(V, **f32) if need_b else None
        # fp32 logits, plus the half-precision gradient buffer; chunk_rows budgets two
        # buffers of element_bytes each, hence the half
        bytes_per_logit = 4 + (w.element_size() if half and need_grad else 0)
        # The CUDA cap pays for the fp32 [V, H] weight-gradient accumulation (see
        # CUDA_MAX_BUDGET_BYTES). Without it (linear_logprobs' forward, a loss without a
        # weight gradient) MAX_BUDGET_BYTES suffices: ~500 rows at V = 128k, and a chunk's
        # GEMM does C FLOPs per byte of W it reads, past an H100's ~240. Reasoned, not measured.
        cap = budget_cap(device)
        if not need_w:
            cap = min(cap, MAX_BUDGET_BYTES)
        rows_per_chunk = chunk_rows(max(self.num_rows, 1), V, bytes_per_logit // 2,
                                    V * H * 4, cap)
        z_buf = torch.empty(rows_per_chunk, V, **f32)
        dz_buf = (torch.empty(rows_per_chunk, V, device=device, dtype=dtype)
                  if half and need_grad else z_buf)
        for start in range(0, self.num_rows, rows_per_chunk):
            chunk = slice(start, min(start + rows_per_chunk, self.num_rows))
            C = chunk.stop - chunk.start
            h = self._hidden_rows(chunk)
            z = logits_into(z_buf[:C], h, w_mm, b)
            dz = dz_buf[:C] if need_grad else None
            launch(z, dz, chunk)
            if not need_grad:
                continue
            if need_h:
                gh = dz @ w  # [C, H], fp32 accumulation inside the GEMM
                if self.rows is None:
                    grad_h[chunk] = gh
                else:
                    grad_h.index_copy_(0, self.rows[chunk], gh.to(dtype))
            if need_w:
                if half:
                    accumulate_fp32(grad_w, dz.T, h)
                else:
                    grad_w.addmm_(dz.T, h)
            if need_b:
                grad_b += dz.sum(0, dtype=torch.float32)
        return (grad_h,
                None if grad_w is None else grad_w.to(w.dtype),
                None if grad_b is None else grad_b.to(w.dtype))
