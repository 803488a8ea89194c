"""Torch backend of the log-prob ops: the readable specification, and the CPU path.

Formula (z = scaled logits, t = target id, T = temperature):

    z       = (hidden @ weight.T + bias) / T                       [N, V]
    lse     = log sum_j exp(z_j)
    logp_t  = z_t - lse
    entropy = -sum_j p_j log p_j ,  p = softmax(z)

Gradients with respect to the scaled logits z, for incoming g_logp and g_entropy:

    d logp_t  / d z_j = 1[j = t] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)

and d/d(raw logit) = d/dz / T. Positions whose target is `ignore_index` give logp = 0 and
entropy = 0 and pass no gradient.

The [N, V] logits are never held: tokens are processed in chunks whose row count comes from
a memory budget (`chunk_rows`), and backward recomputes each chunk's logits from the saved
per-token `lse` and `entropy` (as cut-cross-entropy does, https://arxiv.org/abs/2411.09009).
"""

from __future__ import annotations

import torch

# Chunk memory budget. The torch path's unavoidable extra memory is the fp32 gradient of
# the weight (V x H); [rows, V] chunk temporaries of the same size keep the peak within about
# twice that, and give chunks of about H/2 rows, enough for full-speed matmuls. Clamped so
# that tiny heads still get useful chunks and huge heads do not hold gigabytes.
# Tests may set CHUNK_BUDGET_BYTES to force a budget.
MIN_BUDGET_BYTES = 8 << 20
MAX_BUDGET_BYTES = 256 << 20
CHUNK_BUDGET_BYTES: int | None = None
# log p below this is treated as this (p = 0 there either way): masked -inf logits give
# 0 * LOG_P_FLOOR = 0 in the entropy and its gradient instead of 0 * -inf = NaN. Small enough
# in magnitude that g_entropy * LOG_P_FLOOR cannot overflow.
LOG_P_FLOOR = -1.0e30
# Live [rows, V] compute-dtype buffers per chunk (the logits, and p or the gradient).
_LIVE_BUFFERS = 2


def chunk_rows(num_rows: int, vocab: int, element_bytes: int, reference_bytes: int,
               max_bytes: int = MAX_BUDGET_BYTES) -> int:
    """Token rows per chunk (at least 1, at most `num_rows`) for a budget sized like
    `reference_bytes` (clamped to [MIN_BUDGET_BYTES, max_bytes]), unless CHUNK_BUDGET_BYTES
    forces one."""
    budget = CHUNK_BUDGET_BYTES
    if budget is None:
        budget = min(max(reference_bytes, MIN_BUDGET_BYTES), max_bytes)
    rows = budget // max(1, vocab * element_bytes * _LIVE_BUFFERS)
    return int(max(1, min(num_rows, rows)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Workspace:
    """The two [rows, V] buffers a chunk needs, allocated once and reused by every chunk.

    Reuse matters on CPU: a fresh [rows, V] tensor per chunk left glibc's heap growing to
    ~7x the chunk size (measured: 213 MiB of peak RSS for 16 MiB chunks); reused buffers
    keep the peak at the budget.
    """

    def __init__(self, rows: int, vocab: int, like: torch.Tensor, dtype: torch.dtype,
                 softcap: bool = False):
        self.z = torch.empty(rows, vocab, device=like.device, dtype=dtype)
        self.p = torch.empty(rows, vocab, device=like.device, dtype=dtype)
        # a soft-capped backward keeps tanh(raw / softcap) for its chain factor
        self.tanh = torch.empty(rows, vocab, device=like.device, dtype=dtype) if softcap else None

    def chunk(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z[:rows], self.p[:rows]


def token_stats(z: torch.Tensor, p: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token (logp, lse, entropy) of one chunk of scaled logits z `[C, V]`.

    targets `[C]` int64 (already clamped into [0, V)); valid `[C]` bool. z is consumed
    (overwritten with log p) and p `[C, V]` is scratch space.
    """
    m = z.max(dim=-1, keepdim=True).values
    shifted = z.sub_(m)                     # z - max: exp cannot overflow
    p = torch.exp(shifted, out=p)
    log_s = p.sum(-1, keepdim=True).log_()
    lse = (m + log_s).squeeze(1)
    logp = (shifted.gather(1, targets[:, None]) - log_s).squeeze(1)
    entropy = None
    if want_entropy:
        # -sum p log p (not lse - sum p z): no cancellation when |z| ~ 1e4. Masked (-inf)
        # logits have p = 0 and log p = -inf; the clamp makes their 0 * log p a 0, not NaN.
        log_p = shifted.sub_(log_s).clamp_(min=LOG_P_FLOOR)
        entropy = torch.where(valid, -p.div_(log_s.exp()).mul_(log_p).sum(-1), 0.0)
    return torch.where(valid, logp, 0.0), lse, entropy


def grad_scaled_logits(z: torch.Tensor, p: torch.Tensor, targets: torch.Tensor,
                       lse: torch.Tensor, entropy: torch.Tensor | None, g_logp: torch.Tensor,
                       g_entropy: torch.Tensor | None) -> torch.Tensor:
    """d loss / d z for one chunk, computed in place in z `[C, V]` (returned); p is scratch.

    g_logp, g_entropy `[C]` must already be 0 at ignored positions.
    dz_j = g_logp (1[j=t] - p_j) - g_entropy p_j (log p_j + entropy)
         = -p_j (g_logp + g_entropy (log p_j + entropy)) + g_logp 1[j=t]
    """
    log_p = z.sub_(lse[:, None])
    p = torch.exp(log_p, out=p)
    log_p.clamp_(min=LOG_P_FLOOR)  # -inf logits: p = 0 must give a 0 gradient, not NaN
    if g_entropy is not None:
        coef = log_p.add_(entropy[:, None]).mul_(g_entropy[:, None]).add_(g_logp[:, None])
        grad = coef.mul_(p).neg_()
    else:
        grad = torch.mul(p, g_logp.neg()[:, None], out=log_p)  # one pass: -p g_logp
    grad.scatter_add_(1, targets[:, None], g_logp[:, None])
    return grad


def _incoming(grad: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype,
              s: slice) -> torch.Tensor | None:
    if grad is None:
        return None
    return torch.where(valid[s], grad[s].to(dtype), 0.0)


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   temperature: float, out: torch.Tensor, softcap: float | None = None,
                   tanh_out: torch.Tensor | None = None) -> torch.Tensor:
    """z = softcap(h @ w.T + b) / temperature into `out`; with a softcap, tanh(raw / softcap)
    also goes to `tanh_out` when given (the backward's chain factor, `softcap_chain`)."""
    z = torch.mm(h, w.T, out=out) if b is None else torch.addmm(b, h, w.T, out=out)
    if softcap is not None:
        z = apply_softcap(z, softcap, tanh_out)
    return z.div_(temperature) if temperature != 1.0 else z


def apply_softcap(z: torch.Tensor, softcap: float,
                  tanh_out: torch.Tensor | None = None) -> torch.Tensor:
    """z <- softcap * tanh(z / softcap), in place (Gemma-2's final logit soft-capping); the
    tanh is also copied to `tanh_out` when given."""
    t = z.div_(softcap).tanh_()
    if tanh_out is not None:
        tanh_out.copy_(t)
    return t.mul_(softcap)


def softcap_chain(dz: torch.Tensor, tanh: torch.Tensor) -> torch.Tensor:
    """d/d(raw) from d/d(capped) in place in dz: d softcap tanh(x / softcap) / dx = 1 - tanh^2.
    `tanh` (tanh(raw / softcap), the same shape) is consumed."""
    return dz.mul_(tanh.square_().neg_().add_(1.0))


def _chunked_token_stats(work: Workspace, targets: torch.Tensor, valid: torch.Tensor,
                         want_entropy: bool, scaled_logits
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`token_stats` of all N = len(targets) rows, one workspace chunk at a time: `[N]` logp,
    lse and entropy (None unless wanted) in the workspace dtype. `scaled_logits(s, z)` fills
    the chunk buffer z with the scaled logits of rows s and returns it."""
    N, rows = targets.shape[0], work.z.shape[0]
    like = dict(device=work.z.device, dtype=work.z.dtype)
    logp, lse = torch.empty(N, **like), torch.empty(N, **like)
    entropy = torch.empty(N, **like) if want_entropy else None
    for start in range(0, N, rows):
        s = slice(start, min(start + rows, N))
        z, p = work.chunk(s.stop - s.start)
        logp[s], lse[s], ent = token_stats(scaled_logits(s, z), p, targets[s], valid[s],
                                           want_entropy)
        if want_entropy:
            entropy[s] = ent
    return logp, lse, entropy


def _chunked_grad_logits(work: Workspace, targets: torch.Tensor, valid: torch.Tensor,
                         lse: torch.Tensor, entropy: torch.Tensor | None,
                         g_logp: torch.Tensor, g_entropy: torch.Tensor | None,
                         temperature: float, scaled_logits):
    """Yield (rows s, d loss / d(raw logits) of rows s) one workspace chunk at a time: the
    backward twin of `_chunked_token_stats`, with the same `scaled_logits(s, z)`. The yielded
    chunk lives in the workspace and is overwritten by the next one."""
    N, rows, cdt = targets.shape[0], work.z.shape[0], work.z.dtype
    for start in range(0, N, rows):
        s = slice(start, min(start + rows, N))
        z, p = work.chunk(s.stop - s.start)
        dz = grad_scaled_logits(scaled_logits(s, z), p, targets[s], lse[s],
                                None if entropy is None else entropy[s],
                                _incoming(g_logp, valid, cdt, s),
                                _incoming(g_entropy, valid, cdt, s))
        yield s, dz.div_(temperature) if temperature != 1.0 else dz  # d/d(raw) = d/dz / T


class LinearLogprobs(torch.autograd.Function):
    """Chunked `logprobs(softmax(softcap(hidden @ weight.T + bias) / T))` with recompute in
    backward (softcap None: no cap)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy,
                softcap=None):
        N, V = hidden.shape[0], weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        # Upcast once: bf16/fp16 logits are accumulated and reduced in fp32, like the kernels.
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        rows = chunk_rows(N, V, w.element_size(), w.numel() * w.element_size())
        logp, lse, entropy = _chunked_token_stats(
            Workspace(rows, V, hidden, cdt), safe_targets, valid, want_entropy,
            lambda s, z: _scaled_logits(hidden[s].to(cdt), w, b, temperature, out=z,
                                        softcap=softcap))
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, entropy)
        ctx.temperature, ctx.softcap = temperature, softcap
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, softcap = ctx.temperature, ctx.softcap
        N, V = hidden.shape[0], weight.shape[0]
        cdt = lse.dtype
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(V, device=hidden.device, dtype=cdt) if need_b else None
        # a third [rows, V] buffer with a softcap (tanh), in the same budget
        element = w.element_size() * (3 if softcap is not None else 2) // 2
        rows = chunk_rows(N, V, element, w.numel() * w.element_size())
        work = Workspace(rows, V, hidden, cdt, softcap=softcap is not None)

        def scaled_logits(s, z):
            tanh = None if softcap is None else work.tanh[:z.shape[0]]
            return _scaled_logits(hidden[s].to(cdt), w, b, T, out=z, softcap=softcap,
                                  tanh_out=tanh)

        for s, dz in _chunked_grad_logits(work, targets, valid, lse, entropy, g_logp,
                                          g_entropy, T, scaled_logits):
            if softcap is not None:
                softcap_chain(dz, work.tanh[:dz.shape[0]])
            if need_h:
                grad_h[s] = dz @ w
            if need_w:
                grad_w.addmm_(dz.T, hidden[s].to(cdt))
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None, None, None)


class LogitsLogprobs(torch.autograd.Function):
    """Chunked `logprobs(softmax(logits / T))`: only one fp32 chunk of logits at a time."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_entropy):
        N, V = logits.shape
        cdt = compute_dtype(logits.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        logp, lse, entropy = _chunked_token_stats(
            Workspace(_logits_chunk_rows(logits, cdt), V, logits, cdt), safe_targets, valid,
            want_entropy, _copy_scaled(logits, temperature))
        ctx.save_for_backward(logits, safe_targets, valid, lse, entropy)
        ctx.temperature = temperature
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        logits, targets, valid, lse, entropy = ctx.saved_tensors
        T = ctx.temperature
        V = logits.shape[1]
        cdt = lse.dtype
        grad = torch.empty_like(logits)
        for s, dz in _chunked_grad_logits(
                Workspace(_logits_chunk_rows(logits, cdt), V, logits, cdt), targets, valid, lse,
                entropy, g_logp, g_entropy, T, _copy_scaled(logits, T)):
            grad[s] = dz
        return grad, None, None, None, None


def _copy_scaled(logits: torch.Tensor, temperature: float):
    """`scaled_logits(s, z)` of the logits ops: rows s of the caller's logits, / T, into z."""
    def scaled_logits(s: slice, z: torch.Tensor) -> torch.Tensor:
        z = z.copy_(logits[s])
        return z.div_(temperature) if temperature != 1.0 else z
    return scaled_logits


def _logits_chunk_rows(logits: torch.Tensor, cdt: torch.dtype) -> int:
    # Chunks are a small fraction (1/16) of the logits the caller already holds.
    N, V = logits.shape
    element = torch.finfo(cdt).bits // 8
    return chunk_rows(N, V, element, N * V * element // 16)


def linear_logprobs_torch(hidden, weight, bias, targets, temperature, ignore_index,
                          return_entropy, softcap=None):
    """hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None, targets `[N]` int64."""
    out = LinearLogprobs.apply(hidden, weight, bias, targets, temperature, ignore_index,
                               return_entropy, softcap)
    return out if return_entropy else (out, None)


def logprobs_from_logits_torch(logits, targets, temperature, ignore_index, return_entropy):
    """logits `[N, V]`, targets `[N]` int64."""
    out = LogitsLogprobs.apply(logits, targets, temperature, ignore_index, return_entropy)
    return out if return_entropy else (out, None)
