"""The one piece of autograd plumbing shared by the fused loss kernels.

A fused kernel computes, in the same launch, the loss and the loss's gradient with respect
to each differentiable input ("local gradients"). This works whenever the output is either
elementwise in the rows (`out[i]` depends only on row `i` of every input: DPO, KTO, ...) or
a scalar that is a sum over rows (a token-mean policy loss). Then backward is just

    grad_input_k = grad_output * local_grad_k        (grad_output broadcasts)

and no kernel runs in backward. Liger-Kernel repeats this forward/backward pair in every
loss file with a dozen positional arguments; here each loss only supplies a kernel.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


class _FusedLocalGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernel: Callable, extra_outputs: int, *inputs: torch.Tensor):
        # kernel(*inputs) -> (loss, [local_grad per input or None], *extra detached outputs)
        loss, local_grads, *extras = kernel(*inputs)
        if len(extras) != extra_outputs:
            raise AssertionError(f"kernel returned {len(extras)} extra outputs, "
                                 f"expected {extra_outputs}")
        ctx.has_grad = [g is not None for g in local_grads]
        ctx.save_for_backward(*[g for g in local_grads if g is not None])
        ctx.input_dtypes = [x.dtype for x in inputs]
        # one call with all of them: each call replaces the previous set
        ctx.mark_non_differentiable(*extras)
        return (loss, *extras)

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, *unused):
        saved = iter(ctx.saved_tensors)
        grads = []
        for has, dtype in zip(ctx.has_grad, ctx.input_dtypes):
            if has and ctx.needs_input_grad[len(grads) + 2]:
                grads.append((grad_loss.to(torch.float32) * next(saved)).to(dtype))
            else:
                if has:
                    next(saved)
                grads.append(None)
        return (None, None, *grads)


def fused_local_grad(kernel: Callable, inputs: Sequence[torch.Tensor], extra_outputs: int = 0):
    """Run `kernel` under autograd with the local-gradient rule above.

    `kernel(*inputs)` must return `(loss, local_grads, *extras)` where `local_grads` has one
    entry per input (a tensor shaped like the input, or None where no gradient flows) and
    `extras` are extra outputs that get no gradient (metrics, detached rewards).
    Returns `loss` alone when there are no extras, else `(loss, *extras)`.
    """
    out = _FusedLocalGrad.apply(kernel, extra_outputs, *inputs)
    return out[0] if extra_outputs == 0 else out
