"""A reward model: a scalar head on a causal LM's final hidden state at each sequence's last
token, trained with the pointwise (MSE), pairwise (Bradley-Terry) or listwise ranking losses
of `alignfuse.kernels.reward_model`.

Data layout in a packed batch:
- pointwise: any sequences, with the target score in `extras["score"]`;
- pairwise: packed as for DPO (`[chosen0, rejected0, ...]`, groups `[0, 0, ...]`), with an
  optional per-pair `extras["margin"]` (read at the chosen rows);
- listwise: the K responses of each prompt contiguous and best first, one group each.

The head is attached to the model (`model.reward_head`, an `nn.Linear(H, 1)`) so that it
moves, saves, and is wrapped by DDP/FSDP2 with it: construct `RewardModel` BEFORE wrapping
the model and building the optimizer. It is evaluated inside the model's forward, where
FSDP2 has the root module's parameters gathered.
"""

from __future__ import annotations

import torch
from torch import nn

from alignfuse.kernels.reward_model import listwise_rm_loss, pairwise_rm_loss, pointwise_rm_loss

from ..forward import run_decoder, unwrap_model
from .base import Algorithm, split_pairs

KINDS = ("pointwise", "pairwise", "listwise")


def attach_reward_head(model: nn.Module) -> nn.Linear:
    """The model's `reward_head` (created, zero-initialised, if missing)."""
    inner = unwrap_model(model)
    head = getattr(inner, "reward_head", None)
    if head is None:
        hidden = inner.config.hidden_size
        param = next(inner.parameters())
        head = nn.Linear(hidden, 1, device=param.device, dtype=param.dtype)
        # Zero init: every response starts with the same score, so early steps are stable.
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        inner.reward_head = head
    return head


class RewardModel(Algorithm):
    """Reward-model step. `kind` picks the loss; `scores(batch)` gives `[S]` scores."""

    def __init__(self, model: nn.Module, *, kind: str = "pairwise"):
        super().__init__(model)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        attach_reward_head(model)

    def scores(self, batch) -> torch.Tensor:
        """`[S]` float32 score of each packed sequence (head on its last token's hidden)."""
        last = (batch.cu_seqlens[1:] - 1).to(torch.int64)
        head = unwrap_model(self.model).reward_head
        return run_decoder(self.model, batch,
                           lambda hidden: head(hidden[last]).squeeze(-1).float())

    def num_units(self, batch) -> int:
        if self.kind == "pointwise":
            return batch.num_seqs
        if self.kind == "pairwise":
            return batch.num_seqs // 2
        return int(torch.unique(batch.group_index).numel())

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        extras = getattr(batch, "extras", None) or {}
        if self.kind == "pointwise":
            if "score" not in extras:
                raise ValueError("pointwise reward-model batches need extras['score'] "
                                 "(the target score of each sequence)")
            scores = self.scores(batch)
            loss = pointwise_rm_loss(scores, extras["score"].to(scores))
            return loss, {"score_mean": float(scores.detach().mean())}
        if self.kind == "pairwise":
            chosen, rejected = split_pairs(batch, "the pairwise reward model")
            scores = self.scores(batch)
            margin = extras["margin"][chosen].to(scores) if "margin" in extras else None
            loss = pairwise_rm_loss(scores[chosen], scores[rejected], margin=margin)
            c, r = scores[chosen].detach(), scores[rejected].detach()
            return loss, {"rewards/accuracy": float((c > r).float().mean()),
                          "rewards/margin": float((c - r).mean())}
        groups = batch.group_index
        _, counts = torch.unique_consecutive(groups, return_counts=True)
        if counts.numel() == 0 or bool((counts != counts[0]).any()) or int(counts[0]) < 2:
            raise ValueError("listwise batches need every group (prompt) to hold the same "
                             f"number K >= 2 of responses, got group sizes {counts.tolist()}")
        scores = self.scores(batch).reshape(counts.numel(), int(counts[0]))
        # Responses of a group are packed best first, so the ranking is the identity.
        ranking = torch.arange(scores.shape[1], device=scores.device).expand_as(scores)
        loss = listwise_rm_loss(scores, ranking)
        # Strictly above every other response, as the pairwise accuracy counts chosen > rejected:
        # argmax breaks ties towards index 0, so equal scores (a fresh zero head) read as 1.0.
        scores = scores.detach()
        top1 = (scores[:, :1] > scores[:, 1:]).all(dim=1)
        return loss, {"rewards/top1_accuracy": float(top1.float().mean())}
