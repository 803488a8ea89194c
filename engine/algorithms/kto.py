"""Kahneman-Tversky Optimization on unpaired binary feedback (Ethayarajh et al. 2024,
https://arxiv.org/abs/2402.01306).

The reference point z0 is estimated in-batch, as TRL does, from *mismatched* (prompt,
completion) pairs: `kto_sequences` lays out every example i as two sequences,
`[prompt_i + completion_i, prompt_i + completion_{i+1}]` (a group), so that each packed
micro-batch holds both the matched sequences (the loss) and the mismatched ones (z0 =
`kto_kl(policy - ref)` over them). Both run in the same packed forward.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from alignfuse.kernels.preference import kto_kl, kto_loss

from .base import Algorithm, check_reference, reference_sequence_logps, split_pairs


def kto_sequences(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  desirable: Sequence[bool]) -> dict:
    """The arguments of `pack(**...)` for a KTO dataset of n examples (n >= 2).

    Returns `sequences` (2n: matched, mismatched per example), `prompt_lengths`, `groups`
    (one per example) and `extras={"desirable": bool [2n]}` (the matched label, repeated).
    """
    n = len(prompts)
    if len(completions) != n or len(desirable) != n:
        raise ValueError(f"prompts, completions and desirable must have the same length, got "
                         f"{n}, {len(completions)}, {len(desirable)}")
    if n < 2:
        raise ValueError(f"KTO needs at least 2 examples to form mismatched pairs, got {n}")
    sequences, prompt_lengths = [], []
    for i in range(n):
        prompt = list(prompts[i])
        for completion in (completions[i], completions[(i + 1) % n]):
            sequences.append(prompt + list(completion))
            prompt_lengths.append(len(prompt))
    labels = torch.tensor([bool(d) for d in desirable for _ in range(2)])
    return {"sequences": sequences, "prompt_lengths": prompt_lengths,
            "groups": [i for i in range(n) for _ in range(2)], "extras": {"desirable": labels}}


def kto_dataset(tokenized):
    """The `kto_sequences` layout for a tokenized KTO dataset (`engine/data.py`): each record
    becomes a group of its matched sequence and a mismatched one (the next record's
    completion), with `extras["desirable"]` on both."""
    from ..data import DataError, TokenizedDataset

    n = len(tokenized)
    if n < 2 or "desirable" not in tokenized.extras:  # data, not a bug: one line in the CLI
        raise DataError("a KTO dataset needs >= 2 records with a 'desirable' label each")
    out = TokenizedDataset([], [], [], {"desirable": []})
    for i in range(n):
        for completion in (tokenized.completion_ids[i], tokenized.completion_ids[(i + 1) % n]):
            out.prompt_ids.append(tokenized.prompt_ids[i])
            out.completion_ids.append(completion)
            out.record_index.append(i)
            out.extras["desirable"].append(bool(tokenized.extras["desirable"][i]))
    return out


class KTO(Algorithm):
    """KTO step: loss = mean over the batch's examples of `kto_loss(...)`, with z0 from
    `kto_kl` on the batch's mismatched sequences. Units are examples."""

    def __init__(self, model: nn.Module, ref_model: nn.Module | None = None, *,
                 beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0, temperature: float = 1.0):
        self.check_options(beta=beta, desirable_weight=desirable_weight,
                           undesirable_weight=undesirable_weight)
        check_reference(model, ref_model)
        super().__init__(model, temperature=temperature)
        self.ref_model = ref_model
        self.beta = beta
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    @staticmethod
    def check_options(*, beta, desirable_weight, undesirable_weight) -> None:
        """Raises what `kto_loss` raises for these options (as `DPO.check_options`)."""
        logps = torch.full((1,), -1.0)
        kto_loss(logps, logps, torch.ones(1, dtype=torch.bool), 0.0, beta=beta,
                 desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                 backend="torch")

    def num_units(self, batch) -> int:
        return batch.num_seqs // 2

    def loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        if "desirable" not in (getattr(batch, "extras", None) or {}):
            raise ValueError("KTO batches need extras['desirable'] (bool per sequence); "
                             "build them with kto_sequences(...)")
        if batch.extras["desirable"].dtype != torch.bool:  # 0.3 would silently mean True
            raise TypeError(f"extras['desirable'] must be bool per sequence, got "
                            f"{batch.extras['desirable'].dtype}; build it with kto_sequences")
        matched, mismatched = split_pairs(batch, "KTO")
        policy = self.policy_sequence_logps(batch)
        ref = reference_sequence_logps(batch, self.ref_model, self.temperature, "KTO")
        z0 = kto_kl(gather_ranks(policy[mismatched].detach()), gather_ranks(ref[mismatched]))
        desirable = batch.extras["desirable"][matched].to(torch.bool)
        losses, rewards = kto_loss(policy[matched], ref[matched], desirable, z0,
                                   beta=self.beta, desirable_weight=self.desirable_weight,
                                   undesirable_weight=self.undesirable_weight)
        metrics = {"kl": float(z0)}
        if bool(desirable.any()):
            metrics["rewards/chosen"] = float(rewards[desirable].mean())
        if bool((~desirable).any()):
            metrics["rewards/rejected"] = float(rewards[~desirable].mean())
        return losses.mean(), metrics


def gather_ranks(values: torch.Tensor) -> torch.Tensor:
    """`[k]` per rank -> `[sum of k]` on every rank (ranks may hold different k); the values
    themselves outside a process group. No gradient flows through it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    world = dist.get_world_size()
    count = torch.tensor([values.numel()], device=values.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    longest = int(max(int(c) for c in counts))
    padded = values.new_zeros(longest)
    padded[:values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(c)] for part, c in zip(parts, counts)])
