"""GRPO: group-relative policy optimisation, online (Shao et al. 2024,
https://arxiv.org/abs/2402.03300), with the variants of the later papers:

- advantages: every estimator and scale of `alignfuse.kernels.group_advantages`
  (grpo, Dr. GRPO https://arxiv.org/abs/2503.20783, RLOO, rank);
- loss: the fused `linear_policy_loss` (LM head -> log-probs -> `policy_loss` in one node,
  no `[N, V]` logits) on the decoder's hidden states, with every `loss_agg`, asymmetric clipping
  (DAPO's clip-higher, https://arxiv.org/abs/2503.14476), dual clip, KL to a reference with
  the k1/k2/k3 estimators when `beta > 0`, and GSPO's sequence-level importance ratio
  (https://arxiv.org/abs/2507.18071, `importance_level="sequence"`);
- truncated importance sampling (TIS, https://fengyao.notion.site/off-policy-rl): the
  sampler (vLLM) and the trainer compute slightly different log-probs, so the gradient of
  samples drawn from the sampler's distribution is re-weighted per token by
  `min(exp(old_logp - sampler_logp), tis_cap)`. The clipped surrogate is positively
  homogeneous in the advantage, so the weight is applied by scaling the advantage: the KL
  term is not re-weighted (as in verl).

One generation batch (`make_experience`) holds `len(prompts) * group_size` samples packed
into micro-batches of at most `max_tokens` tokens (`RolloutBatch`). `step(batch)` runs the
forward and backward of one micro-batch inside the caller's own loop; `train_iteration`
is the short ready-made version: generate, then `ppo_epochs` passes over `mini_batches`
optimizer steps.

`PPO` (engine/algorithms/ppo.py) reuses the experience machinery of this file.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from alignfuse.kernels import group_advantages, linear_policy_loss, policy_loss, segment_sum
from alignfuse.kernels.policy.aggregation import LOSS_AGG_MODES

from ..forward import lm_head_of, run_decoder, runs_padded, token_logprobs, unwrap_model
from ..packing import PackedBatch, pack
from ..rollout import Rollout, Sample, SamplingConfig
from .base import Algorithm, check_max_grad_norm, check_reference

# A per-sample reward: (prompt, completion, **fields) -> float. The prompt as the caller gave
# it when a string, else its token ids (decoded to text when the algorithm has a tokenizer);
# the completion as text with a tokenizer, else token ids. `fields`: the other keys of a
# prompt given as a mapping {"prompt": ..., "answer": ...} (e.g. the ground truth).
RewardFn = Callable[..., float]


@dataclass
class RolloutBatch:
    """One packed micro-batch of generated samples and what the losses need.

    Per-token tensors are `[N]`, aligned with `packed.targets`: the entry at position j is
    about the token `targets[j]` (a completion token where `packed.loss_mask[j]`, else 0).
    Per-sequence tensors are `[S]`, in the packed order.
    """

    packed: PackedBatch
    rewards: torch.Tensor                    # [S] scalar reward of each sample
    advantages: torch.Tensor                 # [S] (GRPO) or [N] (PPO)
    sampler_logps: torch.Tensor              # [N] log-probs the sampler reported
    old_logps: torch.Tensor                  # [N] trainer log-probs before any update
    ref_logps: torch.Tensor | None = None    # [N] reference model log-probs
    token_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # more [N] (PPO)
    mini_batch: int = 0                      # which optimizer step of the iteration

    @property
    def num_completion_tokens(self) -> int:
        return int(self.packed.loss_mask.sum())

    def to(self, device) -> "RolloutBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RolloutBatch(self.packed.to(device), move(self.rewards), move(self.advantages),
                            move(self.sampler_logps), move(self.old_logps), move(self.ref_logps),
                            {k: v.to(device) for k, v in self.token_tensors.items()},
                            self.mini_batch)


def completion_tensor(packed: PackedBatch, per_sample: Sequence[torch.Tensor]) -> torch.Tensor:
    """Scatter per-sample completion values (`per_sample[i]` is `[len(completion_i)]`, indexed
    by the sample's original index) onto the packed tokens: `[N]` float32, 0 off-completion.

    With prompt_lengths, a sequence's predicted positions are contiguous and in order, so the
    completions concatenated in packed order fill exactly the `loss_mask` positions.
    """
    values = torch.cat([per_sample[i].reshape(-1).float().cpu()
                        for i in packed.seq_index.tolist()])
    out = torch.zeros(packed.num_tokens, dtype=torch.float32)
    mask = packed.loss_mask.cpu()
    if int(mask.sum()) != values.numel():
        raise AssertionError(f"{int(mask.sum())} completion positions, {values.numel()} values")
    out[mask] = values
    return out.to(packed.loss_mask.device)


def pack_samples(samples: Sequence[Sample], max_tokens: int,
                 device: torch.device | str = "cpu", padded: bool = False) -> list[PackedBatch]:
    """Pack prompt + completion of each sample; the loss sees only completion tokens.

    `seq_index` is the sample's index in `samples`. Samples of one prompt may land in
    different micro-batches: their advantages are computed before packing. `padded`: budget
    the right-padded rows (for models that `runs_padded`).
    """
    sequences = [s.prompt_token_ids + s.completion_token_ids for s in samples]
    longest = max(len(s) for s in sequences)
    if longest > max_tokens:
        raise ValueError(f"max_tokens={max_tokens} is smaller than the longest prompt + "
                         f"completion ({longest} tokens); raise max_tokens")
    batches = pack(sequences, max_tokens=max_tokens,
                   prompt_lengths=[len(s.prompt_token_ids) for s in samples], padded=padded)
    return [b.to(device) for b in batches]


def unfinished(samples: Sequence[Sample]) -> torch.Tensor:
    """`[S]` float32: 1 for each sample that did not stop (cut at max_new_tokens), else 0."""
    return torch.tensor([float(s.finish_reason != "stop") for s in samples])


def checked_rewards(values, samples: Sequence[Sample]) -> torch.Tensor:
    """`[S]` float32 rewards from what a reward returned for `samples` (a sequence or a 1-D
    tensor of numbers, one per sample), or the error saying which sample is wrong: a wrong
    count, a value that is not a number, NaN or inf."""
    if isinstance(values, torch.Tensor) and values.dim() <= 1:
        values = values.reshape(-1).tolist()
    if not isinstance(values, Sequence) or len(values) != len(samples):
        raise ValueError(f"the reward returned {type(values).__name__} {values!r:.60}; "
                         f"expected {len(samples)} floats, one per sample")
    checked = []
    for k, (s, value) in enumerate(zip(samples, values)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real):  # bools and numpy scalars pass
            raise TypeError(f"the reward function returned {type(value).__name__} "
                            f"{value!r:.40} for sample {k} (prompt {s.prompt_index}); "
                            "expected a float")
        if not math.isfinite(value):
            raise ValueError(f"the reward function returned NaN or inf ({value}) for sample "
                             f"{k} (prompt {s.prompt_index})")
        checked.append(float(value))
    return torch.tensor(checked, dtype=torch.float32)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class OnlineAlgorithm(Algorithm):
    """What GRPO and PPO share: generation through a `Rollout`, rewards, packing, the
    old/reference log-probs, mini-batching and truncated importance sampling."""

    def __init__(self, model: nn.Module, rollout: Rollout, reward: RewardFn | nn.Module, *,
                 ref_model: nn.Module | None = None, tokenizer=None, group_size: int = 1,
                 sampling: SamplingConfig | None = None, clip_low: float = 0.2,
                 clip_high: float = 0.2, dual_clip: float | None = None,
                 loss_agg: str = "token-mean", tis_cap: float | None = None,
                 ppo_epochs: int = 1, mini_batches: int = 1, max_tokens: int = 4096,
                 missing_eos_penalty: float | None = None):
        sampling = sampling or SamplingConfig()
        super().__init__(model, temperature=sampling.temperature)
        # The options are checked by the subclass's `check_options` (which runs this class's
        # too), once, right after this constructor.
        if not isinstance(rollout, Rollout):
            raise TypeError(f"rollout must be a Rollout (VLLMRollout or HFRollout), got "
                            f"{type(rollout).__name__}")
        if not (callable(reward) or hasattr(reward, "scores")
                or hasattr(reward, "score_batch")):
            raise TypeError("reward must be a callable (prompt, completion) -> float, an "
                            "object with score_batch(prompts, completions, fields) or a "
                            f"RewardModel, got {type(reward).__name__}")
        self.rollout = rollout
        self.reward = reward
        check_reference(model, ref_model)
        self.ref_model = ref_model
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.sampling = sampling
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.loss_agg = loss_agg
        self.tis_cap = tis_cap
        self.ppo_epochs = ppo_epochs
        self.mini_batches = mini_batches
        self.max_tokens = max_tokens
        self.missing_eos_penalty = missing_eos_penalty

    @staticmethod
    def check_options(*, group_size: int = 1, clip_low: float = 0.2, clip_high: float = 0.2,
                      dual_clip: float | None = None, loss_agg: str = "token-mean",
                      tis_cap: float | None = None, ppo_epochs: int = 1, mini_batches: int = 1,
                      max_tokens: int = 4096, kl_estimator: str = "k3",
                      importance_level: str = "token",
                      missing_eos_penalty: float | None = None) -> None:
        """Raises what the constructor and the loss kernel (`policy_loss`'s own checks, run on
        one dummy sequence) raise for these options, without a model or a rollout: a bad
        value stops a config when it is read, not after warm-up and a first generation."""
        for name, value in (("group_size", group_size), ("ppo_epochs", ppo_epochs),
                            ("mini_batches", mini_batches), ("max_tokens", max_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
        if tis_cap is not None and not (isinstance(tis_cap, (int, float)) and tis_cap > 0):
            raise ValueError(f"tis_cap must be > 0 or None, got {tis_cap!r}")
        if missing_eos_penalty is not None and not (
                isinstance(missing_eos_penalty, (int, float))
                and not isinstance(missing_eos_penalty, bool)
                and 0 <= missing_eos_penalty < math.inf):
            raise ValueError(f"missing_eos_penalty must be a finite number >= 0 or None, got "
                             f"{missing_eos_penalty!r}")
        x = torch.zeros(2)
        policy_loss(x, x, x, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32),
                    clip_low=clip_low, clip_high=clip_high, dual_clip=dual_clip,
                    kl_estimator=kl_estimator, importance_level=importance_level,
                    loss_agg=loss_agg, backend="torch")

    def parameters(self) -> list[nn.Parameter]:
        """Everything this algorithm trains (build the optimizer from it): the policy's
        parameters (PPO adds its critic's)."""
        return list(self.model.parameters())

    def _check_optimizer(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None,
                         master_weights=None) -> list[nn.Parameter]:
        """The optimizer's parameters, after checking that it holds every trainable
        parameter the loss reaches (or, with `master_weights`, its fp32 master): one it
        lacks would get gradients that are never applied nor zeroed, summing up."""
        check_max_grad_norm(max_grad_norm)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        held = {id(p) for p in params}
        trained = {id(p): p for p in self.parameters() if p.requires_grad}
        if master_weights is not None:
            master_of = {id(p): m for p, m in zip(master_weights.params, master_weights.masters)}
            lacking = [p for key, p in trained.items() if key not in master_of]
            if lacking:
                raise ValueError(f"master_weights holds no master for {len(lacking)} of the "
                                 f"{len(trained)} trainable parameters of "
                                 f"{type(self).__name__}; build it from "
                                 "algorithm.parameters() that require grad")
            trained = {id(master_of[key]): master_of[key] for key in trained}
        missing = [p for key, p in trained.items() if key not in held]
        if missing:
            raise ValueError(
                f"optimizer holds {len(trained) - len(missing)} of the {len(trained)} trainable "
                f"parameters of {type(self).__name__} ({sum(p.numel() for p in missing):,} "
                "values missing); build it from algorithm.parameters() (PPO: the policy and "
                "the critic), or set requires_grad=False on what should stay frozen")
        return params

    # generation ---------------------------------------------------------------------------

    @staticmethod
    def _prompt_of(prompts: Sequence, i: int) -> tuple[object, dict]:
        """(the prompt, the reward's extra fields) of `prompts[i]`: a string, token ids, or a
        mapping with a "prompt" key whose other keys go to the reward function."""
        p = prompts[i]
        if isinstance(p, Mapping):
            if "prompt" not in p:
                raise ValueError(f"prompts[{i}] is a mapping without a 'prompt' key (the other "
                                 "keys go to the reward function); got keys "
                                 f"{sorted(map(str, p))}")
            return p["prompt"], {k: v for k, v in p.items() if k != "prompt"}
        return p, {}

    def encode_prompts(self, prompts: Sequence) -> list[list[int]]:
        """Token ids of each prompt: a string (encoded by the tokenizer, no special tokens
        added: a chat-templated prompt carries its own), token ids, or a mapping whose
        "prompt" is one of those (its other keys go to the reward function)."""
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise TypeError("prompts must be a list of strings, token id lists or mappings, "
                            f"got {type(prompts).__name__}")
        vocab = unwrap_model(self.model).get_input_embeddings().num_embeddings
        out = []
        for i in range(len(prompts)):
            p, _ = self._prompt_of(prompts, i)
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise TypeError(f"prompts[{i}] is a string; pass tokenizer= or token ids")
                p = self.tokenizer.encode(p, add_special_tokens=False)
            ids = [int(t) for t in p]
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}] holds token id {bad[0]}, outside the model's "
                                 f"vocabulary [0, {vocab})")
            out.append(ids)
        return out

    def generate(self, prompts: Sequence) -> tuple[list[Sample], dict[str, float]]:
        """Sync the trainer's weights into the rollout and sample `group_size` per prompt.

        Wakes the rollout's weights first, syncs, wakes the KV cache, generates, and puts it
        back to sleep (no-ops on CPU), so training never shares memory with the KV cache.
        """
        ids = self.encode_prompts(prompts)
        self.rollout.wake(["weights"])
        self.rollout.sync_weights(self.model)
        self.rollout.wake(["kv_cache"])
        start = time.perf_counter()
        samples = self.rollout.generate(ids, self.group_size, self.sampling)
        seconds = time.perf_counter() - start
        self.rollout.sleep()
        tokens = sum(len(s.completion_token_ids) for s in samples)
        stats = {"time/generate_s": seconds, "time/sync_s": self.rollout.stats.get("sync_s", 0.0),
                 "generate_tokens_per_s": tokens / max(seconds, 1e-9),
                 "completion_length": tokens / len(samples),
                 "stopped_fraction": sum(s.finish_reason == "stop" for s in samples) / len(samples)}
        return samples, stats

    @torch.no_grad()
    def score(self, samples: Sequence[Sample], prompts: Sequence | None = None) -> torch.Tensor:
        """`[S]` float32 rewards: the user's function per sample (given `prompts`, those
        `generate` was given: a string prompt reaches it as given, and a mapping's other
        keys as keywords), an object's `score_batch(prompts, completions, fields)` once for
        all samples (e.g. `TextRewardModel`), or a `RewardModel` on the token ids; less
        `missing_eos_penalty` for each sample that did not stop (cut at max_new_tokens)."""
        rewards = self._rewards(samples, prompts)
        if self.missing_eos_penalty:
            rewards = rewards - self.missing_eos_penalty * unfinished(samples)
        return rewards

    def _rewards(self, samples: Sequence[Sample], prompts: Sequence | None) -> torch.Tensor:
        if hasattr(self.reward, "scores"):
            scores = torch.zeros(len(samples))
            device = model_device(self.reward.model)
            for batch in pack_samples(samples, self.max_tokens, device,
                                      runs_padded(self.reward.model, device)):
                scores[batch.seq_index.cpu()] = self.reward.scores(batch).float().cpu()
            return scores
        texts, completions, fields = [], [], []
        for s in samples:
            given, extra = (self._prompt_of(prompts, s.prompt_index) if prompts is not None
                            else (None, {}))
            prompt, completion = s.prompt_token_ids, s.completion_token_ids
            if self.tokenizer is not None:
                prompt = self.tokenizer.decode(prompt, skip_special_tokens=True)
                completion = self.tokenizer.decode(completion, skip_special_tokens=True)
            texts.append(given if isinstance(given, str) else prompt)
            completions.append(completion)
            fields.append(extra)
        if hasattr(self.reward, "score_batch"):
            return checked_rewards(self.reward.score_batch(texts, completions, fields), samples)
        return checked_rewards([self.reward(p, c, **f)
                                for p, c, f in zip(texts, completions, fields)], samples)

    def packed_models(self) -> list[nn.Module]:
        """The models that run on the packed rollout batches: if one runs on padded rows
        (`runs_padded`), the batches budget their padded rows."""
        return [m for m in (self.model, self.ref_model) if m is not None]

    @torch.no_grad()
    def _token_logps(self, model: nn.Module, batch: PackedBatch) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return token_logprobs(model, batch, temperature=self.temperature).float()
        finally:
            model.train(was_training)

    def _batches(self, samples: Sequence[Sample], rewards: torch.Tensor,
                 advantages: torch.Tensor) -> list[RolloutBatch]:
        """Pack the samples; attach rewards, advantages (`[num_samples]` or per-sample
        `[len(completion)]` list), sampler / old / reference log-probs.

        The samples are first cut into `mini_batches` contiguous chunks (whole prompts'
        groups when the counts divide), packed separately: one optimizer step each.
        """
        batches = []
        chunks = torch.arange(len(samples)).tensor_split(min(self.mini_batches, len(samples)))
        device = model_device(self.model)
        padded = any(runs_padded(model, device) for model in self.packed_models())
        for mini_batch, chunk in enumerate(chunks):
            for packed in pack_samples([samples[i] for i in chunk.tolist()], self.max_tokens,
                                       device, padded):
                packed.seq_index = chunk.to(packed.seq_index.device)[packed.seq_index]
                batches.append(self._attach(packed, samples, rewards, advantages, mini_batch))
        return batches

    def _attach(self, packed: PackedBatch, samples: Sequence[Sample], rewards: torch.Tensor,
                advantages, mini_batch: int) -> RolloutBatch:
        index = packed.seq_index.cpu()
        if isinstance(advantages, torch.Tensor):
            adv = advantages[index].to(packed.input_ids.device)
        else:
            adv = completion_tensor(packed, advantages)
        # The trainer's own log-probs before any update (verl's old_log_prob): the ratio's
        # denominator. The sampler's log-probs differ from them by the engine mismatch
        # (bf16, kernels), which TIS corrects; they are not used as the denominator.
        batch = RolloutBatch(packed, rewards[index].to(adv.device), adv,
                             completion_tensor(packed, [s.logprobs for s in samples]),
                             self._token_logps(self.model, packed), mini_batch=mini_batch)
        if self.ref_model is not None:
            batch.ref_logps = self._token_logps(self.ref_model, packed)
        return batch

    # training -----------------------------------------------------------------------------

    def clipped_policy_loss(self, batch: RolloutBatch, advantages: torch.Tensor, *,
                            kl_coef: float, kl_estimator: str,
                            importance_level: str = "token"):
        """`(loss, metrics)` of the clipped policy-gradient loss on `batch`, through the fused
        `linear_policy_loss` (LM head, log-probs and loss in one node, no `[N, V]` logits)
        on the decoder's final hidden states. advantages: `[S]` or `[N]`."""
        packed = batch.packed
        lm_head_of(self.model).op_kwargs(self.temperature)  # refuse before running anything

        def on_hidden(hidden: torch.Tensor):
            head = lm_head_of(self.model)  # inside the forward: FSDP2 gathered it
            return linear_policy_loss(
                hidden, head.weight, packed.targets, batch.old_logps, advantages,
                mask=packed.loss_mask, cu_seqlens=packed.cu_seqlens,
                ref_logps=batch.ref_logps if kl_coef > 0 else None, clip_low=self.clip_low,
                clip_high=self.clip_high, dual_clip=self.dual_clip, kl_coef=kl_coef,
                kl_estimator=kl_estimator, importance_level=importance_level,
                loss_agg=self.loss_agg, horizon=float(self.sampling.max_new_tokens),
                **head.op_kwargs(self.temperature), ignore_index=packed.ignore_index)

        loss, stats = run_decoder(self.model, packed, on_hidden, lm_head=True)
        return loss, {k: float(v) for k, v in stats.items()}

    def tis_weights(self, batch: RolloutBatch, sequence_level: bool) -> torch.Tensor | None:
        """Truncated importance weights trainer/sampler: `[N]` per token, or `[S]` per
        sequence for sequence-level importance (GSPO); None when `tis_cap` is off."""
        if self.tis_cap is None:
            return None
        log_ratio = (batch.old_logps - batch.sampler_logps) * batch.packed.loss_mask
        if sequence_level:
            lengths = segment_sum(batch.packed.loss_mask.float(), batch.packed.cu_seqlens)
            mean = segment_sum(log_ratio, batch.packed.cu_seqlens) / lengths.clamp(min=1)
            return mean.exp().clamp(max=self.tis_cap)
        return log_ratio.exp().clamp(max=self.tis_cap)

    def num_units(self, batch: RolloutBatch) -> int:
        """Completion tokens for "token-mean", else sequences (see base.py: loss_scale)."""
        if self.loss_agg == "token-mean":
            return batch.num_completion_tokens
        return batch.packed.num_seqs

    def mini_batch_groups(self, batches: Sequence[RolloutBatch]) -> list[list[RolloutBatch]]:
        """The micro-batches of each optimizer step (`RolloutBatch.mini_batch`), in order."""
        groups: dict[int, list[RolloutBatch]] = {}
        for batch in batches:
            groups.setdefault(batch.mini_batch, []).append(batch)
        return [groups[k] for k in sorted(groups)]

    def train_iteration(self, prompts: Sequence, optimizer: torch.optim.Optimizer, *,
                        max_grad_norm: float | None = 1.0, scheduler=None,
                        master_weights=None) -> dict[str, float]:
        """One generation batch: `make_experience(prompts)`, then `ppo_epochs` passes over
        `mini_batches` optimizer steps. Returns averaged float metrics.

        master_weights: a `MasterWeights` of a bf16 model's parameters, whose fp32
        `masters` the optimizer holds (`alignfuse.engine.precision`): gradients go into the
        masters before each step, and the masters, rounded, into the model after it."""
        params = self._check_optimizer(optimizer, max_grad_norm, master_weights)
        batches, metrics = self.make_experience(prompts)
        start = time.perf_counter()
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(self.ppo_epochs):
            for group in self.mini_batch_groups(batches):
                total = sum(self.num_units(b) for b in group)
                for batch in group:
                    out = self.step(batch, loss_scale=self.num_units(batch) / max(total, 1))
                    for k, v in out.items():
                        sums[k] = sums.get(k, 0.0) + v
                    steps += 1
                if master_weights is not None:
                    master_weights.gradients_in()
                if max_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    sums["grad_norm"] = sums.get("grad_norm", 0.0) + float(norm) * len(group)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if master_weights is not None:
                    master_weights.weights_out()
                    master_weights.zero_grad()  # the model's bf16 gradients too
                if scheduler is not None:
                    scheduler.step()
        metrics.update({k: v / max(steps, 1) for k, v in sums.items() if k != "units"})
        metrics["time/train_s"] = time.perf_counter() - start
        return metrics

    def make_experience(self, prompts: Sequence) -> tuple[list[RolloutBatch], dict[str, float]]:
        raise NotImplementedError


class GRPO(OnlineAlgorithm):
    """Online GRPO (and Dr. GRPO, RLOO, GSPO, DAPO clip-higher by their options).

    model: the policy (HF causal LM, optionally wrapped); the caller owns the optimizer.
    rollout: a `VLLMRollout` or `HFRollout` built on the same model.
    reward: `reward(prompt, completion) -> float` (texts when `tokenizer` is given, else
        token-id lists); an object with `score_batch(prompts, completions, fields)`, called
        once per batch of samples (`load_reward_model(folder)`: a trained reward model on
        the texts, through its own tokenizer); or a `RewardModel` whose `scores` rate
        prompt + completion token ids (the policy's tokenizer).
    ref_model: frozen reference for the KL term; needed when `beta > 0`. For a PEFT policy,
        `BaseReference(model)` (its base, adapters off) needs no copy.
    group_size: samples per prompt (G).
    estimator, scale: as in `alignfuse.kernels.group_advantages`.
    beta, kl_estimator: coefficient and estimator of the KL-to-reference loss term.
    clip_low, clip_high, dual_clip, importance_level, loss_agg: as in
        `alignfuse.kernels.policy_loss` ("sequence" importance = GSPO).
        The ratio's denominator is the trainer's own log-probs before the update
        (`make_experience` runs one no-grad forward for them).
    tis_cap: truncated importance sampling cap C (e.g. 2.0); None = off.
    missing_eos_penalty: subtracted from the reward of each sample cut at max_new_tokens
        (a reward model scores a cut completion as if it had ended); None = off.
    ppo_epochs, mini_batches: optimizer passes per generation batch (`train_iteration`).
    max_tokens: token budget of one packed micro-batch.
    """

    def __init__(self, model: nn.Module, rollout: Rollout, reward: RewardFn | nn.Module, *,
                 ref_model: nn.Module | None = None, tokenizer=None, group_size: int = 4,
                 sampling: SamplingConfig | None = None, estimator: str = "grpo",
                 scale: str = "group", beta: float = 0.0, kl_estimator: str = "k3",
                 importance_level: str = "token", **options):
        super().__init__(model, rollout, reward, ref_model=ref_model, tokenizer=tokenizer,
                         group_size=group_size, sampling=sampling, **options)
        self.check_options(group_size=group_size, estimator=estimator, scale=scale, beta=beta,
                           kl_estimator=kl_estimator, importance_level=importance_level,
                           **options)
        if beta > 0 and ref_model is None:
            raise ValueError("beta > 0 needs ref_model= (the KL is to a reference policy)")
        self.estimator, self.scale = estimator, scale
        self.beta, self.kl_estimator = beta, kl_estimator
        self.importance_level = importance_level

    @staticmethod
    def check_options(*, group_size: int = 4, estimator: str = "grpo", scale: str = "group",
                      beta: float = 0.0, kl_estimator: str = "k3",
                      importance_level: str = "token", **options) -> None:
        """`OnlineAlgorithm.check_options` and GRPO's own: group_size >= 2, beta >= 0, and
        `group_advantages`' checks of estimator and scale (run on one dummy group)."""
        OnlineAlgorithm.check_options(group_size=group_size, kl_estimator=kl_estimator,
                                      importance_level=importance_level, **options)
        if group_size < 2:
            raise ValueError(f"GRPO needs group_size >= 2 (advantages are relative to the "
                             f"group), got {group_size}")
        if not (isinstance(beta, (int, float)) and beta >= 0):
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        group_advantages(torch.arange(group_size, dtype=torch.float32), group_size,
                         estimator=estimator, scale=scale, backend="torch")

    def make_experience(self, prompts: Sequence) -> tuple[list[RolloutBatch], dict[str, float]]:
        """Generate `group_size` samples per prompt, score them, compute group advantages
        and pack them. Returns `(micro-batches, metrics)`."""
        samples, metrics = self.generate(prompts)
        rewards = self.score(samples, prompts)
        advantages = group_advantages(rewards, self.group_size, estimator=self.estimator,
                                      scale=self.scale)
        grouped = rewards.reshape(-1, self.group_size)
        metrics.update({"reward": float(rewards.mean()),
                        "reward_std": float(rewards.std(correction=0)),
                        "reward_max": float(rewards.max()),
                        # Groups whose rewards are all equal give no learning signal.
                        "zero_std_groups": float((grouped.std(1) == 0).float().mean())})
        return self._batches(samples, rewards, advantages), metrics

    def loss(self, batch: RolloutBatch) -> tuple[torch.Tensor, dict[str, float]]:
        packed = batch.packed
        sequence_level = self.importance_level == "sequence"
        advantages = batch.advantages.float()
        weights = self.tis_weights(batch, sequence_level)
        if weights is not None:
            if not sequence_level:
                advantages = advantages[_seq_ids(packed)]
            advantages = advantages * weights
        loss, metrics = self.clipped_policy_loss(batch, advantages, kl_coef=self.beta,
                                                 kl_estimator=self.kl_estimator,
                                                 importance_level=self.importance_level)
        if weights is not None:
            metrics["tis_weight_mean"] = float(_masked_mean(weights, packed, sequence_level))
        return loss, metrics


def _seq_ids(packed: PackedBatch) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(packed.num_seqs, device=packed.input_ids.device),
                                   packed.seq_lengths.to(packed.input_ids.device))


def _masked_mean(values: torch.Tensor, packed: PackedBatch, sequence_level: bool) -> torch.Tensor:
    if sequence_level:
        return values.mean()
    mask = packed.loss_mask.float()
    return (values * mask).sum() / mask.sum().clamp(min=1)

