"""PPO for language models, online (Schulman et al. 2017, https://arxiv.org/abs/1707.06347;
the RLHF recipe of Ziegler et al. 2019, https://arxiv.org/abs/1909.08593, and InstructGPT,
https://arxiv.org/abs/2203.02155):

- a critic: a causal LM with a scalar `value_head` on its final hidden states (by default a
  copy of the policy), trained with the clipped value loss of `alignfuse.kernels.value_loss`;
- advantages and returns per token by `alignfuse.kernels.gae` over the completion tokens,
  whitened over the whole generation batch;
- the KL to a reference either in the reward (r_t = -kl_coef * KL_t, plus the sample's
  score at its last token; the classic RLHF form) or as a loss term (`kl_in_reward=False`,
  as GRPO does); the coefficient fixed, or adaptive (`target_kl`: Ziegler et al.'s
  proportional controller);
- PPO-ptx: `ptx_coef * NLL` of a pretraining batch added to each step's loss (InstructGPT
  eq. 2), from `ptx_batches` (PackedBatch, targets on every token to learn).

Value positions: the value at packed position j estimates the return after the prefix
ending at j, i.e. before the token `targets[j]` is generated, so values, log-probs and
rewards all live at the `loss_mask` positions.
"""

from __future__ import annotations

import copy
import itertools
from typing import Iterable, Sequence

import torch
from torch import nn

from alignfuse.kernels import gae, kl_penalty, value_loss
from alignfuse.kernels.policy.kl import kl_estimator_names

from ..forward import run_decoder, token_logprobs, unwrap_model
from ..packing import PackedBatch
from ..rollout import Rollout
from .grpo import OnlineAlgorithm, RewardFn, RolloutBatch


def attach_value_head(critic: nn.Module) -> nn.Linear:
    """The critic's `value_head` (created zero-initialised if missing: every state starts at
    value 0, so the first advantages are the rewards themselves)."""
    inner = unwrap_model(critic)
    head = getattr(inner, "value_head", None)
    if head is None:
        param = next(inner.parameters())
        head = nn.Linear(inner.config.hidden_size, 1, device=param.device, dtype=param.dtype)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        inner.value_head = head
    return head


def token_values(critic: nn.Module, packed: PackedBatch) -> torch.Tensor:
    """`[N]` float32 critic values at every packed position (documents isolated)."""
    head = unwrap_model(critic).value_head
    return run_decoder(critic, packed, lambda hidden: head(hidden).squeeze(-1).float())


class AdaptiveKLController:
    """Ziegler et al. 2019, sec. 2.2: keep the measured KL near `target`.

    e = clip(KL / target - 1, -0.2, 0.2);  coef <- coef * (1 + e * n_steps / horizon)
    """

    def __init__(self, init: float, target: float, horizon: float = 10_000):
        if not target > 0 or not horizon > 0:
            raise ValueError(f"target_kl and kl_horizon must be > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        """What an exact resume needs (the coefficient evolves; target and horizon are
        configuration)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class PPO(OnlineAlgorithm):
    """Online PPO with a critic.

    model: the policy; critic: a causal LM to put a `value_head` on (default: a deep copy of
        the policy). The caller's optimizer must cover `ppo.parameters()` (policy + critic).
    reward: `reward(prompt, completion) -> float`, an object with `score_batch` (e.g.
        `load_reward_model(folder)`) or a `RewardModel` (the sample's score; see `GRPO`).
    ref_model: frozen reference; needed when `kl_coef > 0` (`BaseReference(model)` for a
        PEFT policy's base).
    gamma, lam: GAE discount and lambda; whiten: standardise the advantages over the batch.
    vf_coef, value_clip: weight and clip range of the value loss.
    kl_coef, kl_estimator, kl_in_reward: the KL penalty (see the module docstring);
        target_kl, kl_horizon: adaptive coefficient when target_kl is set.
    ptx_coef, ptx_batches: PPO-ptx pretraining mix (gamma in InstructGPT).
    Other options (clip_low/high, dual_clip, loss_agg, tis_cap, ppo_epochs, mini_batches,
    group_size, max_tokens, sampling) as in GRPO.
    """

    def __init__(self, model: nn.Module, rollout: Rollout, reward: RewardFn | nn.Module, *,
                 critic: nn.Module | None = None, ref_model: nn.Module | None = None,
                 tokenizer=None, gamma: float = 1.0, lam: float = 0.95, whiten: bool = True,
                 vf_coef: float = 0.5, value_clip: float | None = 0.2, kl_coef: float = 0.05,
                 kl_estimator: str = "k1", kl_in_reward: bool = True,
                 target_kl: float | None = None, kl_horizon: float = 10_000,
                 ptx_coef: float = 0.0, ptx_batches: Iterable[PackedBatch] | None = None,
                 **options):
        super().__init__(model, rollout, reward, ref_model=ref_model, tokenizer=tokenizer,
                         **options)
        self.check_options(gamma=gamma, lam=lam, vf_coef=vf_coef, value_clip=value_clip,
                           kl_coef=kl_coef, kl_estimator=kl_estimator, target_kl=target_kl,
                           kl_horizon=kl_horizon, ptx_coef=ptx_coef,
                           **{k: v for k, v in options.items() if k != "sampling"})
        if kl_coef > 0 and ref_model is None:
            raise ValueError("kl_coef > 0 needs ref_model= (the KL is to a reference policy); "
                             "pass kl_coef=0.0 to train without it")
        if ptx_coef > 0 and ptx_batches is None:
            raise ValueError("ptx_coef > 0 needs ptx_batches= (pretraining PackedBatches)")
        self.critic = critic if critic is not None else copy.deepcopy(unwrap_model(model))
        attach_value_head(self.critic)
        self.gamma, self.lam, self.whiten = gamma, lam, whiten
        self.vf_coef, self.value_clip = vf_coef, value_clip
        self.kl_coef, self.kl_estimator, self.kl_in_reward = kl_coef, kl_estimator, kl_in_reward
        self.kl_controller = (AdaptiveKLController(kl_coef, target_kl, kl_horizon)
                              if target_kl is not None else None)
        self.ptx_coef = ptx_coef
        self._ptx = itertools.cycle(list(ptx_batches)) if ptx_batches is not None else None

    @staticmethod
    def check_options(*, gamma: float = 1.0, lam: float = 0.95, vf_coef: float = 0.5,
                      value_clip: float | None = 0.2, kl_coef: float = 0.05,
                      kl_estimator: str = "k1", target_kl: float | None = None,
                      kl_horizon: float = 10_000, ptx_coef: float = 0.0, **options) -> None:
        """`OnlineAlgorithm.check_options` and PPO's own (gamma and lam by `gae`'s own check
        on dummy tokens): no model or rollout needed."""
        OnlineAlgorithm.check_options(**options)
        for name, value in (("kl_coef", kl_coef), ("ptx_coef", ptx_coef), ("vf_coef", vf_coef)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if target_kl is not None:
            AdaptiveKLController(kl_coef, target_kl, kl_horizon)
            if not kl_coef > 0:  # the controller scales kl_coef: from 0 it stays 0
                raise ValueError(f"target_kl={target_kl} adapts kl_coef, which is 0 here: "
                                 "give kl_coef > 0 (the starting coefficient)")
        if value_clip is not None and not (isinstance(value_clip, (int, float))
                                           and value_clip >= 0):
            raise ValueError(f"value_clip must be >= 0 or None, got {value_clip!r}")
        if kl_estimator not in kl_estimator_names():
            raise ValueError(f"kl_estimator must be one of {kl_estimator_names()}, "
                             f"got {kl_estimator!r}")
        x = torch.zeros(2)
        gae(x, x, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32), gamma=gamma, lam=lam,
            backend="torch")

    def parameters(self) -> list[nn.Parameter]:
        """Everything this algorithm trains: the policy's and the critic's parameters."""
        return [*self.model.parameters(), *self.critic.parameters()]

    def packed_models(self) -> list[nn.Module]:
        return [*super().packed_models(), self.critic]

    @torch.no_grad()
    def make_experience(self, prompts: Sequence) -> tuple[list[RolloutBatch], dict[str, float]]:
        """Generate, score, and compute per-token rewards, values, GAE advantages, returns."""
        samples, metrics = self.generate(prompts)
        scores = self.score(samples, prompts)
        # Token rewards are built per batch below; `_batches` takes per-sample advantages,
        # filled in afterwards (zeros for now).
        zeros = [torch.zeros(len(s.completion_token_ids)) for s in samples]
        batches = self._batches(samples, scores, zeros)
        kl_sum, kl_tokens = 0.0, 0
        for batch in batches:
            packed = batch.packed
            mask = packed.loss_mask
            # The score arrives at each sample's last completion token.
            last = torch.zeros(packed.num_tokens, dtype=torch.float32, device=mask.device)
            ends = _last_completion_position(packed)
            last[ends] = batch.rewards.float()
            rewards = last
            if batch.ref_logps is not None:
                kl = kl_penalty(batch.old_logps, batch.ref_logps, self.kl_estimator) * mask
                kl_sum += float(kl.sum())
                kl_tokens += int(mask.sum())
                if self.kl_in_reward and self.kl_coef > 0:
                    rewards = rewards - self.kl_coef * kl
            was_training = self.critic.training
            self.critic.eval()
            try:
                values = token_values(self.critic, packed) * mask
            finally:
                self.critic.train(was_training)
            advantages, returns = gae(rewards, values, mask=mask, cu_seqlens=packed.cu_seqlens,
                                      gamma=self.gamma, lam=self.lam)
            batch.advantages = advantages
            batch.token_tensors = {"values": values, "returns": returns,
                                   "token_rewards": rewards}
        if self.whiten:
            _whiten_over_batches(batches)
        mean_kl_per_seq = kl_sum / max(len(samples), 1)
        metrics.update({"reward": float(scores.mean()),
                        "reward_std": float(scores.std(correction=0)),
                        "kl_per_token": kl_sum / max(kl_tokens, 1), "kl_coef": self.kl_coef})
        if self.kl_controller is not None and self.ref_model is not None:
            self.kl_coef = self.kl_controller.update(mean_kl_per_seq, len(samples))
        return batches, metrics

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        packed = batch.packed
        mask = packed.loss_mask
        advantages = batch.advantages.float()
        weights = self.tis_weights(batch, sequence_level=False)
        if weights is not None:
            advantages = advantages * weights
        kl_as_loss = not self.kl_in_reward and self.kl_coef > 0
        pg, stats = self.clipped_policy_loss(batch, advantages,
                                             kl_coef=self.kl_coef if kl_as_loss else 0.0,
                                             kl_estimator=self.kl_estimator)
        values = token_values(self.critic, packed)
        vl, vstats = value_loss(values, batch.token_tensors["values"],
                                batch.token_tensors["returns"], mask=mask,
                                cu_seqlens=packed.cu_seqlens, clip=self.value_clip,
                                loss_agg=self.loss_agg, horizon=float(self.sampling.max_new_tokens))
        loss = pg + self.vf_coef * vl
        metrics = {**stats, **{k: float(v) for k, v in vstats.items()}}
        metrics["value_loss"] = float(vl.detach())
        if self.ptx_coef > 0:
            ptx = next(self._ptx)
            ptx_logps = token_logprobs(self.model, ptx, temperature=1.0)
            nll = -ptx_logps.sum() / ptx.loss_mask.sum().clamp(min=1)
            loss = loss + self.ptx_coef * nll
            metrics["ptx_nll"] = float(nll.detach())
        return loss, metrics


def _last_completion_position(packed: PackedBatch) -> torch.Tensor:
    """`[S]` packed position of each sequence's last completion token's log-prob (the last
    `loss_mask` position of the sequence)."""
    positions = torch.arange(packed.num_tokens, device=packed.loss_mask.device)
    seq = torch.repeat_interleave(torch.arange(packed.num_seqs, device=positions.device),
                                  packed.seq_lengths.to(positions.device))
    last = torch.full((packed.num_seqs,), -1, dtype=torch.long, device=positions.device)
    masked = packed.loss_mask.bool()
    last.scatter_reduce_(0, seq[masked], positions[masked], reduce="amax")
    return last


def _whiten_over_batches(batches: Sequence[RolloutBatch], eps: float = 1e-8) -> None:
    """Standardise the advantages over the completion tokens of ALL micro-batches (verl's
    masked_whiten over the batch; per micro-batch would depend on how the batch was packed)."""
    values = torch.cat([b.advantages[b.packed.loss_mask.bool()] for b in batches]).double()
    mean, std = values.mean(), values.std() if values.numel() > 1 else values.new_tensor(1.0)
    for b in batches:
        mask = b.packed.loss_mask.bool()
        b.advantages = torch.where(mask, (b.advantages - mean) / (std + eps), 0.0).float()


__all__ = ["PPO", "AdaptiveKLController", "attach_value_head", "token_values"]
