"""Sequence-level preference losses: one file per family, formula and paper in each docstring.

- `dpo.py`: `dpo_loss` and its 14 TRL variants (torch, triton, cuda).
- `kto.py`: `kto_loss` (torch, triton, cuda) and `kto_kl`.
- `reference_free.py`: `orpo_loss`, `simpo_loss` (torch).
- `triton_preference.py`, `cuda.py`: the fused kernels (loss and local gradients in one
  launch, through `kernels.autograd.fused_local_grad`).
"""

from .dpo import LOSS_TYPES, dpo_loss
from .kto import kto_kl, kto_loss
from .reference_free import orpo_loss, simpo_loss

__all__ = ["LOSS_TYPES", "dpo_loss", "kto_loss", "kto_kl", "orpo_loss", "simpo_loss"]
