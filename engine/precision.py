"""fp32 master weights for a bf16 model, in the ready loop and in your own.

AdamW on bf16 weights loses every update smaller than half a bf16 step of the weight (8
significant bits: next to 1.0 the steps are 2^-7 and 2^-8, so at lr 1e-4 the norm weights
never move). Mixed-precision trainers compute in bf16 and update fp32 copies instead:

    master = MasterWeights([p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(master.masters, lr=1e-5)   # the optimizer sees fp32
    grpo.train_iteration(prompts, optimizer, master_weights=master)

In a hand-written loop: `master.zero_grad()`, backward, `master.gradients_in()`, clip and
`optimizer.step()`, then `master.weights_out()`. The ready loop (`dtype=bfloat16`) does this,
and checkpoints `master.state_dict()` so that a resume is exact.
"""

from __future__ import annotations

import torch


class MasterWeights:
    """fp32 master copies of half-precision parameters, for the optimizer (see the module
    docstring): gradients are copied into the masters before the step and the masters
    rounded into the model after it. fp32 parameters are their own masters."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.masters = [p if p.dtype == torch.float32
                        else p.detach().float().requires_grad_(True) for p in params]

    def zero_grad(self) -> None:
        for p, m in zip(self.params, self.masters):
            p.grad = m.grad = None

    def gradients_in(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)

    def state_dict(self) -> list[torch.Tensor]:
        return [m.detach() for p, m in zip(self.params, self.masters) if m is not p]

    @torch.no_grad()
    def load_state_dict(self, tensors: list[torch.Tensor] | None) -> None:
        """Restore the masters a checkpoint saved (None: a checkpoint without them, of a
        run whose parameters were all fp32)."""
        own = [m for p, m in zip(self.params, self.masters) if m is not p]
        if len(tensors or []) != len(own):
            raise ValueError(f"the checkpoint holds {len(tensors or [])} fp32 master weights, "
                             f"this model needs {len(own)}")
        for m, t in zip(own, tensors or []):
            m.copy_(t)
