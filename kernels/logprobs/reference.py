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

# Bytes of [rows, V] temporaries one chunk may hold at once. Peak extra memory of the torch
# path is about this plus the fp32 gradient of the weight, whatever N is.
CHUNK_BUDGET_BYTES = 64 << 20
# Live [rows, V] compute-dtype buffers per chunk: the logits, and p (or the gradient) beside them.
_LIVE_BUFFERS = 2


def chunk_rows(num_rows: int, vocab: int, element_bytes: int,
               budget_bytes: int | None = None) -> int:
    """How many token rows fit the chunk budget (at least 1, at most `num_rows`)."""
    budget = CHUNK_BUDGET_BYTES if budget_bytes is None else budget_bytes
    rows = budget // max(1, vocab * element_bytes * _LIVE_BUFFERS)
    return int(max(1, min(num_rows, rows)))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_stats(z: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                want_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-token (logp, lse, entropy) of one chunk of scaled logits z `[C, V]`.

    targets `[C]` int64 (already clamped into [0, V)); valid `[C]` bool. z is consumed
    (overwritten with log p) to avoid another [C, V] buffer.
    """
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = None
    if want_entropy:
        log_p = z.sub_(lse[:, None])
        # -sum p log p (not lse - sum p z): no cancellation when |z| ~ 1e4.
        entropy = -(log_p.exp() * log_p).sum(-1)
        entropy = torch.where(valid, entropy, 0.0)
    return torch.where(valid, logp, 0.0), lse, entropy


def grad_scaled_logits(z: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                       entropy: torch.Tensor | None, g_logp: torch.Tensor,
                       g_entropy: torch.Tensor | None) -> torch.Tensor:
    """d loss / d z for one chunk, computed in place in z `[C, V]` (returned).

    g_logp, g_entropy `[C]` must already be 0 at ignored positions.
    dz_j = g_logp (1[j=t] - p_j) - g_entropy p_j (log p_j + entropy)
         = -p_j (g_logp + g_entropy (log p_j + entropy)) + g_logp 1[j=t]
    """
    log_p = z.sub_(lse[:, None])
    p = log_p.exp()
    if g_entropy is not None:
        coef = log_p.add_(entropy[:, None]).mul_(g_entropy[:, None]).add_(g_logp[:, None])
    else:
        coef = log_p.copy_(g_logp[:, None].expand_as(log_p))
    grad = coef.mul_(p).neg_()
    grad.scatter_add_(1, targets[:, None], g_logp[:, None])
    return grad


def _incoming(grad: torch.Tensor | None, valid: torch.Tensor, dtype: torch.dtype,
              s: slice) -> torch.Tensor | None:
    if grad is None:
        return None
    return torch.where(valid[s], grad[s].to(dtype), 0.0)


class LinearLogprobs(torch.autograd.Function):
    """Chunked `logprobs(softmax((hidden @ weight.T + bias) / T))` with recompute in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, want_entropy):
        N, V = hidden.shape[0], weight.shape[0]
        cdt = compute_dtype(hidden.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        # Upcast once: bf16/fp16 logits are accumulated and reduced in fp32, like the kernels.
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        logp = torch.empty(N, device=hidden.device, dtype=cdt)
        lse = torch.empty(N, device=hidden.device, dtype=cdt)
        entropy = torch.empty(N, device=hidden.device, dtype=cdt) if want_entropy else None
        rows = chunk_rows(N, V, torch.finfo(cdt).bits // 8)
        for start in range(0, N, rows):
            s = slice(start, start + rows)
            z = _scaled_logits(hidden[s].to(cdt), w, b, temperature)
            lp, ls, ent = token_stats(z, safe_targets[s], valid[s], want_entropy)
            logp[s], lse[s] = lp, ls
            if want_entropy:
                entropy[s] = ent
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, entropy)
        ctx.temperature = temperature
        if want_entropy:
            return logp, entropy
        return logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy=None):
        hidden, weight, bias, targets, valid, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T = ctx.temperature
        N, V = hidden.shape[0], weight.shape[0]
        cdt = lse.dtype
        w = weight.to(cdt)
        b = None if bias is None else bias.to(cdt)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(w) if need_w else None
        grad_b = torch.zeros(V, device=hidden.device, dtype=cdt) if need_b else None
        rows = chunk_rows(N, V, torch.finfo(cdt).bits // 8)
        for start in range(0, N, rows):
            s = slice(start, start + rows)
            h = hidden[s].to(cdt)
            z = _scaled_logits(h, w, b, T)
            dz = grad_scaled_logits(z, targets[s], lse[s], None if entropy is None else entropy[s],
                                    _incoming(g_logp, valid, cdt, s),
                                    _incoming(g_entropy, valid, cdt, s))
            dz.div_(T)  # d/d(raw logit) = d/dz / T
            if need_h:
                grad_h[s] = dz @ w
            if need_w:
                grad_w.addmm_(dz.T, h)
            if need_b:
                grad_b += dz.sum(0)
        return (grad_h,
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype),
                None, None, None, None)


class LogitsLogprobs(torch.autograd.Function):
    """Chunked `logprobs(softmax(logits / T))`: only one fp32 chunk of logits at a time."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, want_entropy):
        N, V = logits.shape
        cdt = compute_dtype(logits.dtype)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        logp = torch.empty(N, device=logits.device, dtype=cdt)
        lse = torch.empty(N, device=logits.device, dtype=cdt)
        entropy = torch.empty(N, device=logits.device, dtype=cdt) if want_entropy else None
        rows = chunk_rows(N, V, torch.finfo(cdt).bits // 8)
        for start in range(0, N, rows):
            s = slice(start, start + rows)
            # to() copies for bf16/fp16; for fp32/fp64 copy explicitly since z is consumed.
            z = logits[s].to(cdt, copy=True).div_(temperature)
            lp, ls, ent = token_stats(z, safe_targets[s], valid[s], want_entropy)
            logp[s], lse[s] = lp, ls
            if want_entropy:
                entropy[s] = ent
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
        N, V = logits.shape
        cdt = lse.dtype
        grad = torch.empty_like(logits)
        rows = chunk_rows(N, V, torch.finfo(cdt).bits // 8)
        for start in range(0, N, rows):
            s = slice(start, start + rows)
            z = logits[s].to(cdt, copy=True).div_(T)
            dz = grad_scaled_logits(z, targets[s], lse[s], None if entropy is None else entropy[s],
                                    _incoming(g_logp, valid, cdt, s),
                                    _incoming(g_entropy, valid, cdt, s))
            grad[s] = dz.div_(T)
        return grad, None, None, None, None


def _scaled_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    z = h @ w.T if b is None else torch.addmm(b, h, w.T)
    return z.div_(temperature) if temperature != 1.0 else z


def linear_logprobs_torch(hidden, weight, bias, targets, temperature, ignore_index,
                          return_entropy):
    """hidden `[N, H]`, weight `[V, H]`, bias `[V]` or None, targets `[N]` int64."""
    out = LinearLogprobs.apply(hidden, weight, bias, targets, temperature, ignore_index,
                               return_entropy)
    return out if return_entropy else (out, None)


def logprobs_from_logits_torch(logits, targets, temperature, ignore_index, return_entropy):
    """logits `[N, V]`, targets `[N]` int64."""
    out = LogitsLogprobs.apply(logits, targets, temperature, ignore_index, return_entropy)
    return out if return_entropy else (out, None)
