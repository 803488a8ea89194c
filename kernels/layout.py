"""Token layouts and per-sequence reductions.

Token-level inputs arrive in one of two layouts (API.md), and every op gives the same result
for both:
- padded `[B, T]` with a `mask` (bool or 0/1): sequence b is row b, its tokens where mask=1;
- packed `[N]` with `cu_seqlens` (int32 `[S+1]`, as in flash-attn's varlen API), optionally
  with a `mask [N]` that excludes some tokens (e.g. prompt tokens).

`token_layout` turns either into one flat form: values `[N]`, a float mask `[N]` and
`cu_seqlens [S+1]` (a padded batch is S=B segments of length T). Kernels only ever see that
flat form, so the two layouts cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .backends import dispatch, register


@dataclass
class TokenLayout:
    """The flat form of a token-level batch. `shape` restores the caller's layout."""

    mask: torch.Tensor        # [N] float32, 1 where the token counts
    cu_seqlens: torch.Tensor  # [S+1] int32
    shape: torch.Size         # the caller's token shape: [B, T] or [N]
    seq_ids: torch.Tensor     # [N] int64, the segment of each token

    @property
    def num_tokens(self) -> int:
        return self.mask.numel()

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    def flat(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Flatten a per-token tensor of the caller's shape to `[N]`."""
        checks.tensor(name, value)
        if value.shape != self.shape:
            raise ValueError(f"{name} must have the token shape {tuple(self.shape)}, "
                             f"got {tuple(value.shape)}")
        return value.reshape(-1)

    def per_token(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A per-token `[B, T]`/`[N]` tensor, or a per-sequence `[S]` one broadcast to `[N]`."""
        checks.tensor(name, value)
        if value.shape == self.shape:
            return value.reshape(-1)
        if value.dim() == 1 and value.numel() == self.num_seqs:
            return value[self.seq_ids]
        raise ValueError(f"{name} must be per token {tuple(self.shape)} or per sequence "
                         f"[{self.num_seqs}], got {tuple(value.shape)}")

    def unflat(self, value: torch.Tensor) -> torch.Tensor:
        return value.reshape(self.shape)


def token_layout(like: torch.Tensor, *, mask: torch.Tensor | None = None,
                 cu_seqlens: torch.Tensor | None = None, name: str = "logps") -> TokenLayout:
    """Build the flat layout for a token tensor `like` (`[B, T]` padded or `[N]` packed)."""
    checks.tensor(name, like)
    device = like.device
    if cu_seqlens is not None:
        if like.dim() != 1:
            raise ValueError(f"with cu_seqlens, {name} must be packed 1-D [N], "
                             f"got shape {tuple(like.shape)}")
        checks.cu_seqlens("cu_seqlens", cu_seqlens, like.numel(), device)
        cu = cu_seqlens.to(torch.int32)
        lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    else:
        if like.dim() != 2:
            raise ValueError(f"without cu_seqlens, {name} must be padded 2-D [B, T] with a mask, "
                             f"got shape {tuple(like.shape)}; pass cu_seqlens for packed [N]")
        B, T = like.shape
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * T
        lengths = torch.full((B,), T, device=device, dtype=torch.int64)
    if mask is None:
        flat_mask = torch.ones(like.numel(), device=device, dtype=torch.float32)
    else:
        checks.tensor("mask", mask)
        checks.same_shape("mask", mask, name, like)
        checks.same_device("mask", mask, name, like)
        if mask.dtype != torch.bool and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must be bool or 0/1")
        flat_mask = mask.reshape(-1).to(torch.float32)
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    return TokenLayout(flat_mask, cu, like.shape, seq_ids)


# ---------------------------------------------------------------------------------------
# segment_sum / segment_mean


def _check_segments(values: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    checks.floating("values", values, ndim=1)
    checks.cu_seqlens("cu_seqlens", cu_seqlens, values.numel(), values.device)


@register("segment_sum", "torch")
def _segment_sum_torch(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """out[s] = sum(values[cu[s]:cu[s+1]]), differentiable, float32 (float64 stays float64)."""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths)
    out = torch.zeros(lengths.numel(), device=values.device, dtype=dtype)
    return out.index_add(0, seq_ids, values.to(dtype))


def _as_reference_dtype(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A kernel's float32 sums in the torch reference's dtype: float64 values stay float64."""
    return out.to(torch.float64) if dtype == torch.float64 else out


class _SegmentSumTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens):
        from .triton_segments import segment_sum_forward

        ctx.save_for_backward(cu_seqlens)
        ctx.dtype = values.dtype
        return _as_reference_dtype(segment_sum_forward(values, cu_seqlens), ctx.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (cu,) = ctx.saved_tensors
        lengths = (cu[1:] - cu[:-1]).to(torch.int64)
        # d out[s] / d values[i] = 1 for i in segment s: broadcast back over the segment.
        return torch.repeat_interleave(grad_out, lengths).to(ctx.dtype), None


@register("segment_sum", "triton")
def _segment_sum_triton(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return _SegmentSumTriton.apply(values, cu_seqlens)


@register("segment_sum", "cuda")
def _segment_sum_cuda(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    return _SegmentSumCuda.apply(values, cu_seqlens)


class _SegmentSumCuda(_SegmentSumTriton):
    @staticmethod
    def forward(ctx, values, cu_seqlens):
        from .backends import cuda_dtype_code, cuda_module, current_stream_handle

        ctx.save_for_backward(cu_seqlens)
        ctx.dtype = values.dtype
        values = values.contiguous()
        if values.dtype == torch.float64:
            values = values.float()
        cu = cu_seqlens.to(torch.int32).contiguous()
        out = torch.empty(cu.numel() - 1, device=values.device, dtype=torch.float32)
        cuda_module().segment_sum(values.data_ptr(), cuda_dtype_code(values), cu.data_ptr(),
                                  out.data_ptr(), out.numel(), current_stream_handle(values.device))
        return _as_reference_dtype(out, ctx.dtype)


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """Per-sequence sum over packed tokens.

    values: `[N]` floating; cu_seqlens: int32 `[S+1]`. Returns `[S]` float32 (float64 input
    stays float64). Empty sequences sum to 0.
    """
    _check_segments(values, cu_seqlens)
    return dispatch("segment_sum", backend, values.device, values, cu_seqlens)


def segment_mean(values: torch.Tensor, cu_seqlens: torch.Tensor, *,
                 backend: str = "auto") -> torch.Tensor:
    """Per-sequence mean over packed tokens: `segment_sum / length`. Empty sequences give 0.

    values: `[N]`; cu_seqlens: int32 `[S+1]`. Returns `[S]` float32 (float64 input stays
    float64).
    """
    total = segment_sum(values, cu_seqlens, backend=backend)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(total.dtype)
    return total / lengths.clamp(min=1)
