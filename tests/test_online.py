"""Online GRPO and PPO: the losses against an unfused float64 computation from the same
samples, inside a plain user loop, with the real vLLM CPU build, and the GRPO main job.

The unfused references below re-derive everything from the samples alone (prompt and
completion ids recovered from the packed batch, rewards from the reward function, log-probs
from a plain per-sequence HF forward, advantages/GAE/whitening written out), so the tests
check the packing, the alignment of per-token tensors and the kernels' use together.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from alignfuse.engine.algorithms.grpo import GRPO, completion_tensor
from alignfuse.engine.algorithms.ppo import PPO, AdaptiveKLController
from alignfuse.engine.packing import pack
from alignfuse.engine.rollout import HFRollout, SamplingConfig, VLLMRollout, vllm_available
from alignfuse.engine.tiny import tiny_model

from helpers import assert_rel_close, hybrid_model

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")
PROMPTS = [[1, 5, 9, 14], [1, 33, 7], [1, 40, 41, 42, 43]]
G = 4


def parity_reward(prompt, completion) -> float:
    """A deterministic token-level reward: the fraction of even completion tokens."""
    return sum(t % 2 == 0 for t in completion) / len(completion)


def sampling(seed=0, max_new_tokens=5):
    return SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.9, seed=seed,
                          stop_token_ids=list(range(3, 12)))


def recover_samples(batch):
    """(prompt ids, completion ids) of each packed sequence, from the packed tensors alone."""
    packed = batch.packed
    out = []
    for ids, mask in zip(packed.unpack(packed.input_ids), packed.unpack(packed.loss_mask)):
        first = int(mask.nonzero()[0])  # predicts the first completion token
        out.append((ids[:first + 1].tolist(), ids[first + 1:].tolist()))
    return out


def plain_logps(model, prompt, completion, temperature=0.9):
    """log p(completion_i | prefix) by a plain forward of one sequence, float64, with grad."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)


def per_sequence(batch, name):
    values = getattr(batch, name) if hasattr(batch, name) else batch.token_tensors[name]
    masks = batch.packed.unpack(batch.packed.loss_mask)
    return [v[m].double() for v, m in zip(batch.packed.unpack(values), masks)]


def aggregate(per_token: list[torch.Tensor], loss_agg: str, horizon: float) -> torch.Tensor:
    if loss_agg == "token-mean":
        return torch.cat(per_token).sum() / sum(t.numel() for t in per_token)
    if loss_agg == "seq-mean-token-mean":
        return torch.stack([t.mean() for t in per_token]).mean()
    if loss_agg == "seq-mean-token-sum":
        return torch.stack([t.sum() for t in per_token]).mean()
    return torch.stack([t.sum() / horizon for t in per_token]).mean()


def clipped_surrogate(ratio, adv, clip_low, clip_high):
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_low, 1 + clip_high))


def move_weights(model, lr=0.02, seed=0):
    """Perturb the policy so that the ratio new/old is not 1 (an 'earlier epoch' update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * lr)


def grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


# ---------------------------------------------------------------------------------------
# GRPO


GRPO_CASES = [
    dict(loss_agg="token-mean", importance_level="token", beta=0.0, tis_cap=None),
    dict(loss_agg="seq-mean-token-mean", importance_level="token", beta=0.1, tis_cap=1.5),
    dict(loss_agg="seq-mean-token-sum-norm", importance_level="token", beta=0.1,
         tis_cap=None, estimator="dr_grpo", clip_high=0.28),
    dict(loss_agg="seq-mean-token-sum", importance_level="sequence", beta=0.05, tis_cap=2.0,
         estimator="rloo"),
]


@pytest.mark.parametrize("case", GRPO_CASES, ids=lambda c: f"{c['loss_agg']}-{c['importance_level']}")
def test_grpo_loss_matches_unfused(case):
    case = dict(case)
    estimator = case.pop("estimator", "grpo")
    clip_high = case.pop("clip_high", 0.2)
    model = tiny_model("llama", 128, seed=1)
    ref = tiny_model("llama", 128, seed=2)
    grpo = GRPO(model, HFRollout(model), parity_reward, ref_model=ref, group_size=G,
                sampling=sampling(seed=3), estimator=estimator, ppo_epochs=2, clip_high=clip_high,
                **case)
    batches, metrics = grpo.make_experience(PROMPTS)
    assert len(batches) == 1
    batch = batches[0]
    pairs = recover_samples(batch)
    # The experience, re-derived independently: old log-probs, rewards, advantages.
    old = [plain_logps(model, p, c).detach() for p, c in pairs]
    for got, want in zip(per_sequence(batch, "old_logps"), old):
        assert_rel_close(got, want, 1e-5, "old log-probs")
    rewards = torch.tensor([parity_reward(p, c) for p, c in pairs], dtype=torch.float64)
    assert torch.allclose(batch.rewards.double(), rewards)
    order = batch.packed.seq_index.argsort()  # back to sample order: groups of G
    r = rewards[order].reshape(-1, G)
    if estimator == "grpo":
        adv = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)
    elif estimator == "dr_grpo":
        adv = r - r.mean(1, keepdim=True)
    else:  # rloo
        adv = r - (r.sum(1, keepdim=True) - r) / (G - 1)
    adv = torch.empty_like(rewards).index_copy_(0, order, adv.reshape(-1))
    assert_rel_close(batch.advantages, adv, 1e-5, "advantages")
    # The vLLM/HF sampler log-probs were taken with the same weights: they match old.
    for got, want in zip(per_sequence(batch, "sampler_logps"), old):
        assert (got - want).abs().max() < 1e-5

    move_weights(model)
    model.zero_grad()
    metrics = grpo.step(batch)
    fused_grad = grads(model)

    model.zero_grad()
    ref_lp = per_sequence(batch, "ref_logps")
    sampler = per_sequence(batch, "sampler_logps")
    terms = []
    for s, (p, c) in enumerate(pairs):
        logp = plain_logps(model, p, c)
        A = adv[s]
        if grpo.tis_cap is not None:
            log_w = old[s] - sampler[s]
            w = (log_w.mean().exp() if grpo.importance_level == "sequence"
                 else log_w.exp()).clamp(max=grpo.tis_cap)
            A = A * w
        if grpo.importance_level == "sequence":
            seq_log_ratio = (logp - old[s]).mean()
            ratio = torch.exp(logp - logp.detach() + seq_log_ratio.detach())
        else:
            ratio = torch.exp(logp - old[s])
        loss_t = clipped_surrogate(ratio, A, 0.2, clip_high)
        if grpo.beta > 0:
            d = ref_lp[s] - logp
            loss_t = loss_t + grpo.beta * (d.exp() - d - 1)
        terms.append(loss_t)
    loss = aggregate(terms, grpo.loss_agg, horizon=5.0)
    loss.backward()
    assert math.isclose(metrics["loss"], float(loss.detach()), rel_tol=1e-5, abs_tol=1e-7)
    assert_rel_close(fused_grad, grads(model), 1e-4, "gradient")
    assert metrics["ratio_max"] != 1.0


def test_grpo_in_a_plain_user_loop_with_gradient_accumulation():
    """The caller owns the loop: make_experience, step(loss_scale) per micro-batch, optimizer.
    Micro-batches of a small token budget accumulate the gradient of one big batch."""
    model = tiny_model("llama", 128, seed=4)
    grpo = GRPO(model, HFRollout(model), parity_reward, group_size=G,
                sampling=sampling(seed=5), max_tokens=32)
    batches, _ = grpo.make_experience(PROMPTS)
    assert len(batches) > 1
    total = sum(grpo.num_units(b) for b in batches)
    model.zero_grad()
    for b in batches:
        grpo.step(b, loss_scale=grpo.num_units(b) / total)
    accumulated = grads(model)
    # One big batch of the same samples.
    grpo.max_tokens = 4096
    merged = _merge(batches, grpo)
    model.zero_grad()
    grpo.step(merged)
    assert_rel_close(accumulated, grads(model), 1e-4, "accumulated gradient")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def _merge(batches, grpo):
    """The micro-batches' sequences packed into one batch, tensors carried over."""
    from alignfuse.engine.algorithms.grpo import RolloutBatch

    seqs, plens, adv, rew, samp, old = [], [], [], [], [], []
    for b in batches:
        for (p, c), a, r, s, o in zip(recover_samples(b), b.advantages, b.rewards,
                                      per_sequence(b, "sampler_logps"),
                                      per_sequence(b, "old_logps")):
            seqs.append(p + c)
            plens.append(len(p))
            adv.append(a)
            rew.append(r)
            samp.append(s)
            old.append(o)
    (packed,) = pack(seqs, max_tokens=4096, prompt_lengths=plens)
    idx = packed.seq_index
    return RolloutBatch(packed, torch.stack(rew)[idx], torch.stack(adv)[idx],
                        completion_tensor(packed, samp), completion_tensor(packed, old))


def test_grpo_scores_with_a_reward_model():
    """A `RewardModel` as the reward: each sample's score equals the reward model's score of
    its prompt + completion alone (packing does not leak between samples)."""
    from alignfuse.engine.algorithms import RewardModel

    policy = tiny_model("llama", 128, seed=10)
    scorer = RewardModel(tiny_model("llama", 128, seed=11), kind="pointwise")
    torch.nn.init.normal_(scorer.model.reward_head.weight, std=0.5)
    grpo = GRPO(policy, HFRollout(policy), scorer, group_size=2, sampling=sampling(seed=4))
    samples, _ = grpo.generate(PROMPTS)
    scores = grpo.score(samples)
    for s, score in zip(samples, scores):
        (alone,) = pack([s.prompt_token_ids + s.completion_token_ids], max_tokens=64)
        with torch.no_grad():
            assert abs(float(scorer.scores(alone)[0]) - float(score)) < 1e-5
    assert scores.std() > 0


def test_a_batched_reward_is_called_once_per_batch_and_checked():
    """An object with `score_batch(prompts, completions, fields)` is called once for all the
    samples (a reward model or a remote verifier batches), with what a function would get;
    a wrong count or a NaN is refused."""
    calls = []

    class Batched:
        def __init__(self, result=None):
            self.result = result

        def score_batch(self, prompts, completions, fields):
            calls.append((list(prompts), list(completions), list(fields)))
            if self.result is not None:
                return self.result
            return torch.tensor([float(len(c)) + (f["bonus"] if f else 0.0)
                                 for c, f in zip(completions, fields)])

    policy = tiny_model("llama", 128, seed=10)
    prompts = [{"prompt": PROMPTS[0], "bonus": 10.0}, PROMPTS[1]]
    grpo = GRPO(policy, HFRollout(policy), Batched(), group_size=2, sampling=sampling(seed=4))
    samples, _ = grpo.generate(prompts)
    scores = grpo.score(samples, prompts)
    assert len(calls) == 1 and len(calls[0][0]) == len(samples) == 4
    for s, score, fields in zip(samples, scores, calls[0][2]):
        bonus = 10.0 if s.prompt_index == 0 else 0.0
        assert fields == ({"bonus": 10.0} if s.prompt_index == 0 else {})
        assert float(score) == len(s.completion_token_ids) + bonus
    for bad, message in (([1.0], "expected 4 floats, one per sample"),
                         ([1.0, 2.0, float("nan"), 0.0], "NaN or inf"),
                         (["a", "b", "c", "d"], "returned str")):
        grpo.reward = Batched(bad)
        with pytest.raises((ValueError, TypeError), match=message):
            grpo.score(samples, prompts)


def test_missing_eos_penalty_lowers_the_reward_of_cut_completions_only():
    policy = tiny_model("llama", 128, seed=10)
    grpo = GRPO(policy, HFRollout(policy), parity_reward, group_size=4,
                sampling=sampling(seed=4, max_new_tokens=3), missing_eos_penalty=0.75)
    samples, _ = grpo.generate(PROMPTS)
    cut = [s.finish_reason != "stop" for s in samples]
    assert any(cut) and not all(cut)  # this draw (fixed seeds) has both kinds
    penalised = grpo.score(samples, PROMPTS)
    grpo.missing_eos_penalty = None
    plain = grpo.score(samples, PROMPTS)
    assert torch.equal(penalised, plain - 0.75 * torch.tensor(cut, dtype=torch.float32))


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_reward_gets_the_prompt_as_given_and_its_fields(algorithm):
    """A string prompt reaches the reward function as the caller wrote it (not decoded back
    from ids: characters the tokenizer drops, here '%', would change it), and the other keys
    of a mapping prompt arrive as keywords, e.g. the ground-truth answer."""
    from alignfuse.engine.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    assert tokenizer.decode(tokenizer.encode("50% of 8=", add_special_tokens=False),
                            skip_special_tokens=True) != "50% of 8="
    model = tiny_model("llama", len(tokenizer), seed=0)
    seen = []

    def reward(prompt, completion, **fields):
        seen.append((prompt, fields))
        return completion.startswith(fields.get("answer", "?"))  # a bool is a reward too

    cls, extra = (GRPO, {}) if algorithm == "grpo" else (PPO, {"kl_coef": 0.0})
    algo = cls(model, HFRollout(model), reward, tokenizer=tokenizer, group_size=2,
               sampling=sampling(max_new_tokens=2), **extra)
    prompts = ["50% of 8=", {"prompt": "2+2=", "answer": "4", "id": 7},
               {"prompt": tokenizer.encode("1+1=", add_special_tokens=False), "answer": "2"}]
    batches, metrics = algo.make_experience(prompts)
    assert seen == [("50% of 8=", {})] * 2 + [("2+2=", {"answer": "4", "id": 7})] * 2 + [
        ("1+1=", {"answer": "2"})] * 2  # token ids: decoded (there is no other text)
    assert math.isfinite(metrics["reward_std"])
    with pytest.raises(ValueError, match=r"prompts\[1\] is a mapping without a 'prompt' key"):
        algo.make_experience(["1+1=", {"text": "2+2="}])
    with pytest.raises(ValueError, match=r"prompts\[0\] holds token id 10000, outside the "
                                         rf"model's vocabulary \[0, {len(tokenizer)}\)"):
        algo.make_experience([[5, 6, 10_000]])
    algo.reward = lambda prompt, completion: None
    with pytest.raises(TypeError, match=r"the reward function returned NoneType None for "
                                        r"sample 0 \(prompt 0\); expected a float"):
        algo.make_experience(["1+1="])


def test_a_nan_loss_is_refused_before_the_optimizer_steps():
    """policy_loss does not scan its per-token inputs for NaN (that would cost a device
    sync per call); `step` reads the loss after backward anyway and raises on a NaN, naming
    the algorithm, so a loop never applies those gradients."""
    model = tiny_model("llama", 128, seed=0)
    grpo = GRPO(model, HFRollout(model), parity_reward, group_size=G, sampling=sampling())
    batches, _ = grpo.make_experience(PROMPTS)
    batches[0].advantages[0] = float("nan")
    with pytest.raises(FloatingPointError, match="GRPO loss is nan on this micro-batch"):
        grpo.step(batches[0])
    for batch in batches[1:]:
        assert math.isfinite(grpo.step(batch)["loss"])


def test_grpo_updates_a_bf16_model_through_fp32_master_weights():
    """`train_iteration(..., master_weights=)`: AdamW steps the fp32 masters (at lr 1e-4 the
    bf16 norm weights, next to 1.0, cannot move by themselves), and the model is its masters
    rounded after every step; an optimizer over the bf16 parameters instead is refused."""
    from alignfuse.engine import MasterWeights

    model = tiny_model("llama", 128, seed=0).to(torch.bfloat16)
    grpo = GRPO(model, HFRollout(model), parity_reward, group_size=G, sampling=sampling())
    master = MasterWeights([p for p in grpo.parameters() if p.requires_grad])
    with pytest.raises(ValueError, match=r"optimizer holds 0 of the \d+ trainable"):
        grpo.train_iteration(PROMPTS, torch.optim.AdamW(model.parameters()),
                             master_weights=master)
    with pytest.raises(ValueError, match="master_weights holds no master for 1 of"):
        grpo.train_iteration(PROMPTS, torch.optim.AdamW(master.masters[1:]),
                             master_weights=MasterWeights(master.params[1:]))
    optimizer = torch.optim.AdamW(master.masters, lr=1e-4, weight_decay=0.0)
    norms = [i for i, (name, _) in enumerate(model.named_parameters()) if "norm" in name]
    before = [master.masters[i].detach().clone() for i in norms]
    metrics = grpo.train_iteration(PROMPTS, optimizer, master_weights=master)
    assert math.isfinite(metrics["loss"])
    moved = [not torch.equal(master.masters[i], b) for i, b in zip(norms, before)]
    assert sum(moved) >= len(norms) // 2, moved  # the fp32 masters took the small steps
    assert all(torch.equal(master.params[i].float(), b) for i, b in zip(norms, before))
    for p, m in zip(master.params, master.masters):
        assert p.dtype == torch.bfloat16 and m.dtype == torch.float32
        assert torch.equal(p, m.to(torch.bfloat16)) and p.grad is None and m.grad is None


def test_one_sample_has_a_zero_reward_std():
    model = tiny_model("llama", 128, seed=0)
    ppo = PPO(model, HFRollout(model), parity_reward, kl_coef=0.0, group_size=1,
              sampling=sampling())
    assert ppo.make_experience(PROMPTS[:1])[1]["reward_std"] == 0.0


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_rollouts_of_a_model_that_runs_padded_budget_its_padded_rows(algorithm, monkeypatch):
    """An LFM2 policy (short convolutions: packed documents are not isolated) runs on padded
    rows, and so do PPO's critic (its copy) and a reference: the rollout batches budget
    sequences x the longest within max_tokens, and training on them works."""
    from alignfuse.engine.algorithms import grpo as grpo_module

    calls = []
    real_pack = grpo_module.pack
    monkeypatch.setattr(grpo_module, "pack", lambda *a, **k: calls.append(k) or real_pack(*a, **k))
    model = hybrid_model("lfm2", vocab=128)
    ref = hybrid_model("lfm2", vocab=128).eval()
    kind = GRPO if algorithm == "grpo" else PPO
    with pytest.warns(UserWarning, match="not isolated"):
        algo = kind(model, HFRollout(model), parity_reward, ref_model=ref, group_size=G,
                    sampling=sampling(seed=6), max_tokens=24,
                    **({"beta": 0.01} if algorithm == "grpo" else {"kl_coef": 0.01}))
        batches, _ = algo.make_experience(PROMPTS)
    assert calls and all(k.get("padded") is True for k in calls)
    assert len(batches) > 1
    assert max(b.packed.num_seqs * b.packed.max_seqlen for b in batches) <= 24
    metrics = algo.step(batches[0])
    assert math.isfinite(metrics["loss"])


def test_online_sft_warmup_packs_padded_for_a_model_that_runs_padded(monkeypatch):
    from alignfuse.engine import online_loop
    from alignfuse.engine.tiny import tiny_tokenizer

    calls = []
    real_pack = online_loop.pack
    monkeypatch.setattr(online_loop, "pack", lambda *a, **k: calls.append(k) or real_pack(*a, **k))
    tokenizer = tiny_tokenizer()
    model = hybrid_model("lfm2", vocab=len(tokenizer))
    cfg = online_loop.make_online_config(None, ["sft_warmup_steps=1", "sft_examples=4"])
    with pytest.warns(UserWarning, match="not isolated"):
        losses = online_loop.sft_warmup(model, tokenizer, cfg)
    assert calls and all(k.get("padded") is True for k in calls) and losses


def test_grpo_rejects_bad_options():
    model = tiny_model("llama", 128, seed=0)
    rollout = HFRollout(model)
    with pytest.raises(ValueError, match="ref_model"):
        GRPO(model, rollout, parity_reward, beta=0.1)
    with pytest.raises(ValueError, match="group_size"):
        GRPO(model, rollout, parity_reward, group_size=1)
    with pytest.raises(ValueError, match="loss_agg"):
        GRPO(model, rollout, parity_reward, loss_agg="mean")
    with pytest.raises(ValueError, match="importance_level"):
        GRPO(model, rollout, parity_reward, importance_level="seq")
    with pytest.raises(TypeError, match="rollout"):
        GRPO(model, object(), parity_reward)
    # The kernels' own option checks, at construction rather than after a first generation.
    for options, message in [({"estimator": "ppo"}, "estimator must be one of"),
                             ({"scale": "std"}, "scale must be one of"),
                             ({"clip_low": 1.5}, "clip_low must be in"),
                             ({"dual_clip": 0.5}, "dual_clip must be"),
                             ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
                             ({"tis_cap": 0.0}, "tis_cap must be > 0"),
                             ({"beta": -0.1}, "beta must be >= 0"),
                             ({"max_tokens": 0}, "max_tokens must be an int >= 1")]:
        with pytest.raises(ValueError, match=message):
            GRPO(model, rollout, parity_reward, **options)
        with pytest.raises(ValueError, match=message):
            GRPO.check_options(**options)
    grpo = GRPO(model, rollout, lambda p, c: float("nan"), sampling=sampling())
    with pytest.raises(ValueError, match="NaN"):
        grpo.make_experience(PROMPTS[:1])


# ---------------------------------------------------------------------------------------
# PPO


def plain_values(ppo, prompt, completion):
    """Critic values before each completion token, by a plain forward (float64)."""
    ids = torch.tensor([prompt + completion])
    critic = ppo.critic
    hidden = critic.model(input_ids=ids).last_hidden_state[0]
    values = critic.value_head(hidden).squeeze(-1).double()
    return values[len(prompt) - 1:-1]


def value_terms_size(ppo, prompt, completion):
    """Σ|w_i h_i| of the value head's dot product at each position `plain_values` returns:
    the scale its float32 rounding errors follow (however much the sum cancels)."""
    ids = torch.tensor([prompt + completion])
    hidden = ppo.critic.model(input_ids=ids).last_hidden_state[0].double()
    weight = ppo.critic.value_head.weight.double().reshape(-1)
    return (hidden.abs() * weight.abs()).sum(-1)[len(prompt) - 1:-1]


def reference_gae(rewards, values, gamma, lam):
    adv = torch.zeros_like(rewards)
    running = 0.0
    for t in reversed(range(rewards.numel())):
        next_value = values[t + 1] if t + 1 < values.numel() else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + values


@pytest.mark.parametrize("kl_in_reward", [True, False])
def test_ppo_loss_matches_unfused(kl_in_reward):
    model = tiny_model("llama", 128, seed=6)
    ref = tiny_model("llama", 128, seed=7)
    gamma, lam, kl_coef, vf_coef = 0.99, 0.9, 0.1, 0.5
    ptx_seq = [[1, 20, 21, 22, 23, 24, 2]]
    (ptx_batch,) = pack(ptx_seq, max_tokens=64)
    ppo = PPO(model, HFRollout(model), parity_reward, ref_model=ref, group_size=2,
              sampling=sampling(seed=8), gamma=gamma, lam=lam, kl_coef=kl_coef,
              kl_estimator="k1" if kl_in_reward else "k3", kl_in_reward=kl_in_reward,
              vf_coef=vf_coef, value_clip=0.2, ppo_epochs=2, ptx_coef=0.3,
              ptx_batches=[ptx_batch])
    # A critic whose values are not all 0, so that GAE and the value clip are exercised.
    torch.nn.init.normal_(ppo.critic.value_head.weight, std=0.3)
    batches, _ = ppo.make_experience(PROMPTS)
    (batch,) = batches
    pairs = recover_samples(batch)
    old = [plain_logps(model, p, c).detach() for p, c in pairs]
    ref_lp = [plain_logps(ref, p, c).detach() for p, c in pairs]
    for got, (p, c) in zip(per_sequence(batch, "values"), pairs):
        # Bounded by the size of the value head's terms, not by the values' norm: a value
        # is a dot product that may nearly cancel (the norm bound failed on 1 in ~100 draws;
        # this ratio was at most 1.5e-7 over 150).
        error = (got.double() - plain_values(ppo, p, c)).abs()
        assert bool((error <= 1e-6 * value_terms_size(ppo, p, c)).all()), "values"
    # From here on the batch's own values (packed and unpacked fp32 forwards differ by
    # ~1e-6, which whitening by a small std can amplify past any tight tolerance).
    old_values = per_sequence(batch, "values")
    advs, rets = [], []
    for (p, c), o, r_, v in zip(pairs, old, ref_lp, old_values):
        rewards = torch.zeros(len(c), dtype=torch.float64)
        rewards[-1] = parity_reward(p, c)
        if kl_in_reward:
            rewards = rewards - kl_coef * (o - r_)  # k1
        a, ret = reference_gae(rewards, v, gamma, lam)
        advs.append(a)
        rets.append(ret)
    flat = torch.cat(advs)
    mean, std = flat.mean(), flat.std()
    advs = [(a - mean) / (std + 1e-8) for a in advs]
    for got, want in zip(per_sequence(batch, "advantages"), advs):
        assert_rel_close(got, want, 1e-4, "whitened advantages")
    for got, want in zip(per_sequence(batch, "returns"), rets):
        assert_rel_close(got, want, 1e-4, "returns")

    move_weights(model, seed=1)
    move_weights(ppo.critic, lr=0.05, seed=2)
    for p in ppo.parameters():
        p.grad = None
    metrics = ppo.step(batch)
    fused_grad = torch.cat([p.grad.reshape(-1) for p in ppo.parameters() if p.grad is not None])
    for p in ppo.parameters():
        p.grad = None
    pg_terms, v_terms = [], []
    for s, (p, c) in enumerate(pairs):
        logp = plain_logps(model, p, c)
        t = clipped_surrogate(torch.exp(logp - old[s]), advs[s], 0.2, 0.2)
        if not kl_in_reward:
            d = ref_lp[s] - logp
            t = t + kl_coef * (d.exp() - d - 1)
        pg_terms.append(t)
        v = plain_values(ppo, p, c)
        v_clip = old_values[s] + (v - old_values[s]).clamp(-0.2, 0.2)
        v_terms.append(torch.maximum((v - rets[s]) ** 2, (v_clip - rets[s]) ** 2))
    ptx_logp = plain_logps(model, [1], ptx_seq[0][1:], temperature=1.0)
    loss = (aggregate(pg_terms, "token-mean", 5.0) + vf_coef * 0.5 * aggregate(v_terms, "token-mean", 5.0)
            + 0.3 * -ptx_logp.mean())
    loss.backward()
    unfused_grad = torch.cat([p.grad.reshape(-1) for p in ppo.parameters() if p.grad is not None])
    assert math.isclose(metrics["loss"], float(loss.detach()), rel_tol=1e-5, abs_tol=1e-7)
    assert_rel_close(fused_grad, unfused_grad, 1e-4, "gradient")
    assert metrics["ptx_nll"] > 0


def test_adaptive_kl_controller_follows_ziegler():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert math.isclose(ctl.update(12.0, 100), 0.1 * (1 + 0.2 * 100 / 10_000))  # clipped +0.2
    value = ctl.value
    assert math.isclose(ctl.update(3.0, 100), value * (1 - 0.2 * 100 / 10_000))  # clipped -0.2
    value = ctl.value
    assert math.isclose(ctl.update(6.6, 1000), value * (1 + 0.1 * 1000 / 10_000))


def test_ppo_rejects_bad_options():
    model = tiny_model("llama", 128, seed=0)
    with pytest.raises(ValueError, match="ref_model"):
        PPO(model, HFRollout(model), parity_reward, kl_coef=0.1)
    with pytest.raises(ValueError, match="ptx_batches"):
        PPO(model, HFRollout(model), parity_reward, kl_coef=0.0, ptx_coef=0.1)
    for options, message in [({"gamma": 1.5}, r"gamma must be a number in \[0, 1\]"),
                             ({"lam": -0.1}, r"lam must be a number in \[0, 1\]"),
                             ({"value_clip": -1.0}, "value_clip must be >= 0 or None"),
                             ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
                             ({"target_kl": 0.0}, "target_kl and kl_horizon must be > 0"),
                             ({"vf_coef": -1.0}, "vf_coef must be >= 0"),
                             ({"loss_agg": "sum"}, "loss_agg must be one of")]:
        with pytest.raises(ValueError, match=message):
            PPO(model, HFRollout(model), parity_reward, kl_coef=0.0, **options)
        with pytest.raises(ValueError, match=message):
            PPO.check_options(kl_coef=0.0, **options)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_train_iteration_refuses_an_optimizer_missing_parameters_and_bad_clipping(algorithm):
    """An optimizer over the policy alone (PPO's critic left out) would leave gradients that
    are never applied nor zeroed; a max_grad_norm <= 0 flips or kills the update. Both are
    refused before generating anything."""
    model = tiny_model("llama", 128, seed=0)
    cls, extra = (GRPO, {}) if algorithm == "grpo" else (PPO, {"kl_coef": 0.0})
    algo = cls(model, HFRollout(model), parity_reward, group_size=2, sampling=sampling(),
               **extra)
    full = torch.optim.SGD(algo.parameters(), lr=0.0)
    for bad in (-1.0, 0.0):
        with pytest.raises(ValueError, match="max_grad_norm must be > 0 or None"):
            algo.train_iteration(PROMPTS[:1], full, max_grad_norm=bad)
    partial = torch.optim.SGD(list(model.parameters())[1:], lr=0.0)
    with pytest.raises(ValueError, match=r"optimizer holds \d+ of the \d+ trainable parameters "
                                         rf"of {cls.__name__} .*algorithm.parameters\(\)"):
        algo.train_iteration(PROMPTS[:1], partial)
    if algorithm == "ppo":  # the README's GRPO pattern, reused for PPO: the critic is missed
        with pytest.raises(ValueError, match=r"\(PPO: the policy and the critic\)"):
            algo.train_iteration(PROMPTS[:1], torch.optim.SGD(model.parameters(), lr=0.0))
    model.model.embed_tokens.requires_grad_(False)  # frozen on purpose: not required
    frozen = torch.optim.SGD([p for p in algo.parameters() if p.requires_grad], lr=0.0)
    assert math.isfinite(algo.train_iteration(PROMPTS[:1], frozen)["grad_norm"])
    assert all(p.grad is None for p in algo.parameters())  # applied and zeroed


@pytest.mark.parametrize("algorithm, setting, message", [
    ("grpo", "estimator=bogus", "grpo: estimator must be one of"),
    ("grpo", "scale=bogus", "grpo: scale must be one of"),
    ("grpo", "loss_agg=bogus", "grpo: loss_agg must be one of"),
    ("grpo", "clip_low=2", "grpo: clip_low must be in [0, 1)"),
    ("grpo", "importance_level=seq", "grpo: importance_level must be one of"),
    ("grpo", "group_size=1", "grpo: GRPO needs group_size >= 2"),
    ("grpo", "beta=-1", "grpo: beta must be >= 0"),
    ("grpo", "tis_cap=0", "grpo: tis_cap must be > 0"),
    ("grpo", "temperature=0", "temperature must be > 0"),
    ("grpo", "lr=-1", "lr must be > 0"),
    ("grpo", "max_grad_norm=-1", "max_grad_norm must be > 0 or None"),
    ("grpo", "keep_checkpoints=0", "keep_checkpoints must be >= 1"),
    ("grpo", "num_threads=0", "num_threads must be >= 1"),
    ("grpo", "max_tokens=0", "max_tokens must be >= 1"),
    ("ppo", "gae_gamma=2", "gae_gamma must be in [0, 1]"),
    ("ppo", "vf_coef=-1", "ppo: vf_coef must be >= 0"),
    ("ppo", "kl_coef=-1", "ppo: kl_coef must be >= 0"),
    ("ppo", "target_kl=0", "ppo: target_kl and kl_horizon must be > 0"),
    ("ppo", "target_kl=0.01", "ppo: target_kl=0.01 adapts kl_coef, which is 0 here"),
    ("grpo", "model=/some/folder", "model='/some/folder' needs a task of yours"),
    ("grpo", "reward=mod:fn", "reward: task=builtin:addition has its own reward"),
    ("grpo", "task=builtin:bogus", "task: unknown built-in task 'builtin:bogus'"),
    ("grpo", "task=/no/such/prompts.jsonl", "task: /no/such/prompts.jsonl does not exist"),
    ("grpo", "eval_task=prompts.jsonl", "eval_task: task=builtin:addition evaluates on all"),
    ("grpo", "lora_alpha=8", "lora_alpha is not used with lora_r=0"),
    ("ppo", "lora_r=-1", "lora_r must be >= 0"),
    ("grpo", "eval_prompts=0", "eval_prompts must be >= 1"),
    ("ppo", "missing_eos_penalty=-1", "ppo: missing_eos_penalty must be a finite number >= 0"),
    ("grpo", "dtype=float64", "dtype must be float32 or bfloat16"),
])
def test_online_config_refuses_bad_values_before_any_work(tmp_path, capsys, algorithm, setting,
                                                           message):
    """Each bad value is a config error naming the key (exit status 2), found when the config
    is read: nothing is written, no warm-up runs, vLLM never starts."""
    from alignfuse.engine.cli import main

    assert main(["train", algorithm, f"out_dir={tmp_path / 'run'}", setting]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alignfuse: config error: ") and message in err, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# With the real vLLM build


@pytest.fixture(scope="module")
def vllm_policy():
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    model = tiny_model("llama", 128, seed=9)
    rollout = VLLMRollout(model, max_model_len=128)
    yield model, rollout
    rollout.close()


@pytest.mark.vllm
@needs_vllm
def test_grpo_and_ppo_user_loops_with_vllm(vllm_policy):
    model, rollout = vllm_policy
    ref = tiny_model("llama", 128, seed=9)
    grpo = GRPO(model, rollout, parity_reward, ref_model=ref, beta=0.01, group_size=G,
                sampling=sampling(seed=1), tis_cap=2.0, ppo_epochs=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    syncs = []
    for it in range(3):
        grpo.sampling.seed = it
        metrics = grpo.train_iteration(PROMPTS, optimizer)
        syncs.append(rollout.stats["sync_s_total"])
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        # vLLM sampled with the weights just synced: trainer/sampler ratio ~1 (fp32).
        assert abs(metrics["tis_weight_mean"] - 1.0) < 1e-3, metrics["tis_weight_mean"]
    assert syncs[0] < syncs[1] < syncs[2]  # weights were synced every iteration
    ppo = PPO(model, rollout, parity_reward, kl_coef=0.0, group_size=2, sampling=sampling(seed=2))
    optimizer = torch.optim.AdamW(ppo.parameters(), lr=1e-3)
    metrics = ppo.train_iteration(PROMPTS, optimizer)
    assert all(math.isfinite(v) for v in metrics.values()), metrics


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_main_job_raises_the_reward(tmp_path):
    """The GRPO main job at reduced size: the reward rises clearly."""
    from alignfuse.engine.online_loop import run_grpo_demo

    # Half the main job's iterations (measured here: 0.390 -> 0.675 in 60 s unloaded).
    summary = run_grpo_demo([f"out_dir={tmp_path}", "iterations=30", "tensorboard=false"])
    assert summary["rollout"] == ("VLLMRollout" if vllm_available() else "HFRollout")
    assert summary["reward_after"] > summary["reward_before"] + 0.15, summary
    assert len(summary["reward_curve"]) == 30
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "summary.json").exists()


def _crash_and_resume_equals_uninterrupted(args, tmp_path):
    """Run `args` uninterrupted in tmp_path/a, and in tmp_path/b crashed after iteration 1
    then resumed; assert the same final weights and reward curve. Returns (the full run's
    summary, the state of the checkpoint the resume started from)."""
    from alignfuse.engine.online_loop import make_online_config, train_online

    quiet = lambda *a: None  # noqa: E731
    full = train_online(make_online_config(None, [*args, f"out_dir={tmp_path / 'a'}"]),
                        progress=quiet)
    with pytest.raises(RuntimeError, match="injected crash"):
        train_online(make_online_config(None, [*args, f"out_dir={tmp_path / 'b'}",
                                               "crash_after_iterations=1"]), progress=quiet)
    # The checkpoint the resume starts from (later ones rotate it away).
    crashed = torch.load(tmp_path / "b" / "checkpoints" / "step-000001" / "state.pt",
                         weights_only=False)
    resumed = train_online(make_online_config(None, [*args, f"out_dir={tmp_path / 'b'}"]),
                           resume=True, progress=quiet)
    for (name, a), b in zip(full["model"].state_dict().items(),
                            resumed["model"].state_dict().values()):
        assert torch.equal(a, b), name
    assert full["reward_curve"] == resumed["reward_curve"]
    return full, crashed


@pytest.mark.parametrize("algorithm", ["grpo", "ppo-adaptive-kl"])
def test_online_loop_resumes_exactly(tmp_path, algorithm):
    """`alignfuse train grpo --resume` after a crash ends with the uninterrupted run's weights
    (prompts and sampling seeds are functions of (seed, iteration); Adam and RNG restored;
    PPO's adaptive KL controller too: its update after the resume starts from its state)."""
    from alignfuse.engine.metrics import read_metrics
    from alignfuse.engine.online_loop import make_online_config, train_online

    small = ["max_operand=1", "prompts_per_iteration=4", "group_size=4", "sft_warmup_steps=2",
             "sft_examples=8", "iterations=3", "eval_samples=1", "rollout=hf",
             "tensorboard=false", "save_every=1", "max_new_tokens=3"]
    if algorithm == "ppo-adaptive-kl":
        small += ["algorithm=ppo", "kl_coef=0.1", "target_kl=0.01"]
    quiet = lambda *a: None  # noqa: E731
    # Crash after the first iteration: the controller's update in iteration 2 sets the
    # coefficient iteration 3 uses.
    full, _ = _crash_and_resume_equals_uninterrupted(small, tmp_path)
    rows = [[{k: v for k, v in row.items() if k.startswith(("kl", "loss", "reward"))}
             for row in read_metrics(tmp_path / run / "metrics.jsonl")] for run in "ab"]
    assert rows[0] == rows[1]
    if algorithm != "grpo":
        return
    # Resuming the finished run again replaces its final evaluation (one eval row at 3), and
    # a run of 2 iterations extended to 3 has the 3-iteration run's rows: its eval at 2 goes.
    train_online(make_online_config(None, [*small, f"out_dir={tmp_path / 'b'}"]), resume=True,
                 progress=quiet)
    short = [arg for arg in small if not arg.startswith("iterations=")]
    train_online(make_online_config(None, [*short, "iterations=2", f"out_dir={tmp_path / 'c'}"]),
                 progress=quiet)
    extended = train_online(make_online_config(None, [*small, f"out_dir={tmp_path / 'c'}"]),
                            resume=True, progress=quiet)
    steps = {run: [(row["split"], row["step"])
                   for row in read_metrics(tmp_path / run / "metrics.jsonl")] for run in "abc"}
    assert steps["a"] == [("eval", 0), ("train", 1), ("train", 2), ("train", 3), ("eval", 3)]
    assert steps["b"] == steps["c"] == steps["a"], steps
    assert extended["reward_curve"] == full["reward_curve"]


# ---------------------------------------------------------------------------------------
# OnlineConfig: the GRPO-only and PPO-only keys


@pytest.mark.parametrize("algorithm, knob, reader", [
    ("ppo", "beta=0.04", "grpo"),                 # GRPO's default value: still given
    ("ppo", "estimator=rloo", "grpo"),
    ("ppo", "scale=group", "grpo"),
    ("ppo", "importance_level=sequence", "grpo"),
    ("grpo", "kl_coef=0.1", "ppo"),
    ("grpo", "target_kl=0.01", "ppo"),
    ("grpo", "target_kl=null", "ppo"),            # null is a value too
    ("grpo", "gae_gamma=1.0", "ppo"),
    ("grpo", "gae_lambda=0.9", "ppo"),
    ("grpo", "vf_coef=0.5", "ppo"),
])
def test_online_knob_the_algorithm_does_not_read_is_refused(tmp_path, capsys, algorithm, knob,
                                                            reader):
    from alignfuse.engine.cli import main
    from alignfuse.engine.loop import ConfigError
    from alignfuse.engine.online_loop import make_online_config

    key = knob.split("=")[0]
    message = f"{key} is not used by algorithm={algorithm} (only {reader} reads it); remove it"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        make_online_config(None, [f"algorithm={algorithm}", knob])
    with pytest.raises(ConfigError, match=re.escape(message)):  # from a YAML mapping
        make_online_config({"algorithm": algorithm, key: None if "null" in knob else 0.5})
    # From the command line: exit status 2, the message on stderr, nothing written.
    assert main(["train", algorithm, f"out_dir={tmp_path}", knob]) == 2
    assert f"alignfuse: config error: {message}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_online_knobs_given_to_their_algorithm_or_left_out_pass(tmp_path, capsys):
    import dataclasses

    from alignfuse.engine.cli import main
    from alignfuse.engine.online_loop import (GRPO_DEMO_CONFIG, OnlineConfig,
                                              make_online_config)

    grpo = {"estimator": "rloo", "scale": "batch", "beta": 0.0, "importance_level": "sequence"}
    ppo = {"kl_coef": 0.1, "target_kl": 0.02, "gae_gamma": 0.99, "gae_lambda": 0.9,
           "vf_coef": 0.25}
    for algorithm, knobs in (("grpo", grpo), ("ppo", ppo)):
        cfg = make_online_config(None, [f"algorithm={algorithm}",
                                        *(f"{k}={v}" for k, v in knobs.items())])
        assert {key: getattr(cfg, key) for key in knobs} == knobs
        assert make_online_config({"algorithm": algorithm, **knobs}) == cfg
        # Left out, the other algorithm's knobs keep their defaults and never raise.
        assert make_online_config(None, [f"algorithm={algorithm}", "iterations=2"]).beta == 0.04
    assert make_online_config(GRPO_DEMO_CONFIG).algorithm == "grpo"
    # A config built in code from every field (as a checkpoint's holds them all) is not checked.
    full = dataclasses.asdict(OnlineConfig(algorithm="ppo", beta=0.1, estimator="rloo"))
    assert OnlineConfig(**full).validate().beta == 0.1
    # A YAML file and the GRPO demo's overrides go through the same check.
    config = tmp_path / "ppo.yaml"
    config.write_text("algorithm: ppo\nkl_coef: 0.05\nimportance_level: token\n")
    assert main(["train", "ppo", "--config", str(config), f"out_dir={tmp_path / 'r'}"]) == 2
    assert ("config error: importance_level is not used by algorithm=ppo (only grpo reads it)"
            in capsys.readouterr().err)
    assert main(["demo", "--task", "grpo", f"out_dir={tmp_path / 'r'}", "kl_coef=0.1"]) == 2
    assert ("config error: kl_coef is not used by algorithm=grpo (only ppo reads it)"
            in capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


def test_online_knob_table_is_what_the_loop_reads(monkeypatch):
    """ONLINE_ALGORITHM_KNOBS matches the code: give every key make_online_algorithm passes on
    a value of its own, build GRPO and PPO with recording stand-ins, and see which values
    reach which algorithm; the reference model follows the algorithm's own KL knob only."""
    from types import SimpleNamespace

    from alignfuse.engine.algorithms import grpo as grpo_module, ppo as ppo_module
    from alignfuse.engine.online_loop import (ONLINE_ALGORITHM_KNOBS, OnlineConfig,
                                              make_online_algorithm, needs_reference)

    calls = {}
    monkeypatch.setattr(grpo_module, "GRPO", lambda *a, **kw: calls.setdefault("grpo", kw))
    monkeypatch.setattr(ppo_module, "PPO", lambda *a, **kw: calls.setdefault("ppo", kw))
    distinct = {"estimator": "rloo", "scale": "batch", "beta": 0.0123,
                "importance_level": "sequence", "kl_coef": 0.0234, "target_kl": 0.0345,
                "gae_gamma": 0.0456, "gae_lambda": 0.0567, "vf_coef": 0.0678,
                # read by both
                "group_size": 7, "clip_low": 0.0789, "clip_high": 0.0891, "loss_agg":
                "seq-mean-token-sum", "tis_cap": 0.0912, "ppo_epochs": 5, "mini_batches": 6,
                "max_tokens": 1234}
    task = SimpleNamespace(tokenizer=None, stop_token_ids=[0], score=parity_reward)
    read = {}
    for algorithm in ("grpo", "ppo"):
        make_online_algorithm(OnlineConfig(algorithm=algorithm, **distinct), None, None,
                              task, ref_model=None)
        passed = list(calls[algorithm].values())
        read[algorithm] = {key for key, value in distinct.items()
                           if any(type(p) is type(value) and p == value for p in passed)}
    for algorithm, other in (("grpo", "ppo"), ("ppo", "grpo")):
        assert read[algorithm] - read[other] == {
            key for key, readers in ONLINE_ALGORITHM_KNOBS.items() if readers == (algorithm,)}
    assert set(ONLINE_ALGORITHM_KNOBS) == read["grpo"] ^ read["ppo"]
    # GRPO's beta does not give PPO a reference model, nor PPO's kl_coef GRPO one.
    assert not needs_reference(OnlineConfig(algorithm="ppo", beta=0.04, kl_coef=0.0))
    assert needs_reference(OnlineConfig(algorithm="ppo", beta=0.0, kl_coef=0.1))
    assert not needs_reference(OnlineConfig(algorithm="grpo", beta=0.0, kl_coef=0.1))
    assert needs_reference(OnlineConfig(algorithm="grpo", beta=0.04, kl_coef=0.0))


def test_grpo_kl_to_the_base_of_a_lora_policy_without_a_copy():
    """GRPO with `ref_model=BaseReference(model)`: with fresh adapters (B = 0) the policy is
    its base, so the reference log-probs equal the old ones; after an update they still
    equal a frozen copy of the base's, and differ from the policy's."""
    import copy

    import peft

    from alignfuse.engine import BaseReference

    base = tiny_model("llama", 128, seed=6)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8,
                                                      target_modules=["q_proj", "v_proj"]))
    grpo = GRPO(model, HFRollout(model), parity_reward, ref_model=BaseReference(model),
                beta=0.04, group_size=G, sampling=sampling(seed=7))
    batches, _ = grpo.make_experience(PROMPTS)
    for b in batches:
        assert torch.equal(b.ref_logps, b.old_logps)
    optimizer = torch.optim.AdamW(grpo.parameters(), lr=3e-2)
    for _ in range(2):
        grpo.train_iteration(PROMPTS, optimizer)
    batches, _ = grpo.make_experience(PROMPTS)
    for b in batches:
        assert_rel_close(b.ref_logps, grpo._token_logps(frozen, b.packed), 1e-6, "reference")
        assert not torch.allclose(b.ref_logps, b.old_logps)


# ---------------------------------------------------------------------------------------
# The ready loop on your own model, prompts and reward function

REWARD_PY = '''
def starts_with_a_digit(prompt, completion, kind):
    # The record's own text (no chat template) and its other fields arrive here.
    if not prompt.startswith("note ") or kind != "digit":
        raise AssertionError(f"the reward got prompt={prompt!r} kind={kind!r}")
    return float(completion[:1].isdigit())

NOT_A_FUNCTION = 3
'''


def _user_task(root, num_prompts=12):
    """A model folder (the tiny llama, saved with its chat-templated tokenizer), a prompts
    file whose records carry a field for the reward, and the reward's file."""
    from alignfuse.engine.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model_dir = root / "base"
    tiny_model("llama", len(tokenizer), seed=5).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(f'{{"prompt": "note {i}", "kind": "digit"}}\n'
                               for i in range(num_prompts)))
    (root / "reward.py").write_text(REWARD_PY)
    return [f"model={model_dir}", f"task={prompts}",
            f"reward={root / 'reward.py'}:starts_with_a_digit"]


def test_online_loop_on_your_model_prompts_and_reward_raises_it(tmp_path):
    """`alignfuse train grpo model=<folder> task=<prompts.jsonl> reward=<file.py:fn>`: the
    prompts go through the model's chat template, the reward gets each record's own text and
    fields, the reward rises, and the run ends with the trained model as a folder."""
    from transformers import AutoModelForCausalLM

    from alignfuse.engine.online_loop import make_online_config, train_online

    args = _user_task(tmp_path) + [
        f"out_dir={tmp_path / 'run'}", "rollout=hf", "iterations=12", "prompts_per_iteration=6",
        "group_size=8", "max_new_tokens=2", "lr=3e-3", "eval_samples=8", "tensorboard=false"]
    seen = []
    summary = train_online(make_online_config(None, args), progress=seen.append)
    assert "SFT warm-up" not in seen[0]  # a task of yours has no warm-up
    # ~10 digits of ~90 tokens at the start.
    assert summary["reward_before"] < 0.35 and summary["reward_after"] > 0.7, summary
    exported = AutoModelForCausalLM.from_pretrained(summary["export"])
    for (name, a), b in zip(summary["model"].state_dict().items(),
                            exported.state_dict().values()):
        assert torch.equal(a, b), name
    # Twelve prompts, six per iteration: each epoch (two iterations) sees every prompt once.
    from alignfuse.engine.online_loop import iteration_prompts, load_task_records, make_task
    from alignfuse.engine.tiny import tiny_tokenizer

    cfg = make_online_config(None, args)
    task = make_task(cfg, summary["model"], tiny_tokenizer(), *load_task_records(cfg))
    epoch = [r.prompt for it in (2, 3) for r in iteration_prompts(cfg, task, it)]
    assert sorted(epoch) == sorted(f"note {i}" for i in range(12))
    # The chat template renders the prompt (as engine/data.py does for offline data).
    ids = task.batch(task.prompts[:1])[0]["prompt"]
    assert task.tokenizer.decode(ids) == "<|user|>note 0<|assistant|>"
    assert task.eval_prompts == task.prompts  # at most eval_prompts=64 of the task's own


def _train_reward_model(root, base):
    """`alignfuse train rm` on pairs preferring a digit to a letter after "note i": its
    out_dir/model, the reward model folder."""
    from alignfuse.engine.cli import main

    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(f'{{"instruction": "note {i}", "input": "", "chosen": "{i % 10}", '
                             f'"rejected": "{chr(97 + i % 26)}"}}\n' for i in range(40)))
    assert main(["train", "rm", f"model={base}", f"data={pairs}", f"out_dir={root / 'rm'}",
                 "steps=30", "lr=3e-3", "tensorboard=false", "progress=false",
                 "num_threads=1"]) == 0
    return root / "rm" / "model"


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_loop_with_a_reward_model_you_trained_raises_its_score(tmp_path, algorithm):
    """SFT -> reward model -> RL as commands: `alignfuse train rm` writes out_dir/model, and
    `alignfuse train grpo|ppo ... reward_model=<that folder>` optimises its score (batched,
    on the texts, through its own tokenizer): the evaluated score rises, and the rewards the
    loop trained on are the reward model's scores of the samples."""
    from alignfuse.engine.algorithms import load_reward_model
    from alignfuse.engine.online_loop import make_online_config, train_online

    model, task, _ = _user_task(tmp_path)
    rm = _train_reward_model(tmp_path, model.split("=", 1)[1])
    args = [model, task, f"reward_model={rm}", f"algorithm={algorithm}",
            f"out_dir={tmp_path / 'run'}", "rollout=hf", "iterations=12",
            "prompts_per_iteration=6", "group_size=8", "max_new_tokens=2", "lr=3e-3",
            "eval_samples=8", "tensorboard=false"]
    summary = train_online(make_online_config(None, args), progress=lambda line: None)
    # Measured (seed 0): GRPO -2.8 -> 3.7.
    assert summary["reward_after"] > summary["reward_before"] + 2.0, summary
    curve = summary["reward_curve"]
    assert sum(curve[-3:]) / 3 > sum(curve[:3]) / 3 + 1.0, curve
    # What the run scored with is the folder's reward model, on the record's own text.
    from alignfuse.engine.online_loop import load_task_records, make_task
    from alignfuse.engine.tiny import tiny_tokenizer

    cfg = make_online_config(None, args)
    run_task = make_task(cfg, summary["model"], tiny_tokenizer(), *load_task_records(cfg))
    alone = load_reward_model(rm)
    batch = run_task.batch(run_task.prompts[:3])
    got = run_task.score_batch(["<ignored>"] * 3, ["7", "q", "12"], batch)
    want = alone.score_batch([r.prompt for r in run_task.prompts[:3]], ["7", "q", "12"])
    assert torch.equal(torch.as_tensor(got), want) and want[0] > want[1]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_lora_run_keeps_the_base_and_resumes_exactly(tmp_path, algorithm):
    """lora_r > 0 online: only the adapters train (the KL reference is the base itself), a
    checkpoint holds them alone, a crashed run resumes to the uninterrupted one's adapters,
    and the run ends with out_dir/adapter and the merged model."""
    import peft
    from transformers import AutoModelForCausalLM

    kl = "beta=0.05" if algorithm == "grpo" else "kl_coef=0.05"
    args = _user_task(tmp_path) + [
        f"algorithm={algorithm}", kl, "rollout=hf", "iterations=3", "prompts_per_iteration=4",
        "group_size=4", "max_new_tokens=2", "lr=1e-2", "eval_samples=2", "tensorboard=false",
        "save_every=1", "lora_r=4", "lora_targets=q_proj,v_proj"]
    full, state = _crash_and_resume_equals_uninterrupted(args, tmp_path)
    assert state["model"] and all(".lora_" in name for name in state["model"])
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    merged = full["model"]
    moved = []
    for (name, b), m in zip(base.state_dict().items(), merged.state_dict().values()):
        if name.endswith(("q_proj.weight", "v_proj.weight")):
            moved.append(not torch.equal(b, m))
        else:
            assert torch.equal(b, m), f"{name} is not an adapter target, yet it changed"
    assert any(moved)
    adapted = peft.PeftModel.from_pretrained(base, full["adapter"])
    ids = torch.tensor([[1, 20, 30, 40]])
    torch.testing.assert_close(adapted(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_online_bf16_run_updates_through_fp32_masters_and_resumes_exactly(tmp_path, algorithm):
    """dtype=bfloat16 online: the policy (and PPO's critic) stay bf16, each is its fp32
    master rounded, the checkpoint holds the masters, and a crashed run resumes to the
    uninterrupted one's weights bit for bit."""
    args = _user_task(tmp_path) + [
        f"algorithm={algorithm}", "dtype=bfloat16", "rollout=hf", "iterations=3",
        "prompts_per_iteration=4", "group_size=4", "max_new_tokens=2", "lr=1e-3",
        "eval_samples=2", "tensorboard=false", "save_every=1"]
    full, state = _crash_and_resume_equals_uninterrupted(args, tmp_path)
    model = full["model"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    masters = state["master"]
    trained = len(list(model.parameters())) * (2 if algorithm == "ppo" else 1) + (
        2 if algorithm == "ppo" else 0)  # PPO: the critic's copy and its value head
    assert len(masters) == trained and all(m.dtype == torch.float32 for m in masters)
    for (name, p), m in zip(state["model"].items(), masters):
        assert torch.equal(p, m.to(torch.bfloat16)), name
    final = torch.load(tmp_path / "a" / "checkpoints" / "step-000003" / "state.pt",
                       weights_only=False)
    moved = sum(not torch.equal(a, b) for a, b in zip(final["master"], masters))
    assert moved > len(masters) // 2


def test_online_gradient_checkpointing_changes_memory_not_the_run(tmp_path):
    """gradient_checkpointing=true recomputes activations in the backward: the same rewards
    and weights as without (fp32), and a run may resume with it switched."""
    from alignfuse.engine.online_loop import make_online_config, train_online

    args = _user_task(tmp_path) + [
        "rollout=hf", "iterations=3", "prompts_per_iteration=4", "group_size=4",
        "max_new_tokens=2", "lr=1e-3", "eval_samples=2", "tensorboard=false"]
    quiet = lambda *a: None  # noqa: E731
    runs = [train_online(make_online_config(None, [*args, f"out_dir={tmp_path / str(on)}",
                                                   f"gradient_checkpointing={on}"]),
                         progress=quiet) for on in ("false", "true")]
    assert runs[1]["model"].is_gradient_checkpointing
    assert runs[0]["reward_curve"] == pytest.approx(runs[1]["reward_curve"], abs=1e-6)
    for (name, a), b in zip(runs[0]["model"].state_dict().items(),
                            runs[1]["model"].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    resumed = train_online(make_online_config(None, [*args, "iterations=4",
                                                     f"out_dir={tmp_path / 'true'}",
                                                     "gradient_checkpointing=false"]),
                           resume=True, progress=quiet)
    assert len(resumed["reward_curve"]) == 4


def test_the_evaluated_reward_carries_the_missing_eos_penalty(tmp_path):
    """The evaluation measures what training maximises: with missing_eos_penalty=1 the mean
    reward drops by the fraction of evaluation samples cut at max_new_tokens."""
    from alignfuse.engine.loop import load_model
    from alignfuse.engine.online_loop import (load_task_records, make_online_config, make_task,
                                              mean_reward)

    args = _user_task(tmp_path) + ["rollout=hf", "max_new_tokens=1", "eval_samples=4"]
    model, tokenizer = load_model(args[0].split("=", 1)[1], seed=0)
    rollout = HFRollout(model)
    means = []
    for extra in ([], ["missing_eos_penalty=1"]):
        cfg = make_online_config(None, args + extra)
        task = make_task(cfg, model, tokenizer, *load_task_records(cfg))
        means.append(mean_reward(rollout, model, task, cfg, seed=3))
    sampled = rollout.generate([task.ids(r.prompt) for r in task.eval_prompts], 4,
                               SamplingConfig(max_new_tokens=1, temperature=1.0, seed=3,
                                              stop_token_ids=task.stop_token_ids))
    cut = sum(s.finish_reason != "stop" for s in sampled) / len(sampled)
    assert cut > 0.5 and means[0] - means[1] == pytest.approx(cut, abs=1e-9)


def test_online_task_of_yours_refuses_bad_input_before_any_work(tmp_path, capsys):
    """Each problem with a task of yours is an error naming the key (or the record's line),
    exit status 2, before anything is written or loaded."""
    from alignfuse.engine.cli import main

    args = _user_task(tmp_path)
    model, task, reward = args
    (tmp_path / "broken.py").write_text("1 / 0\n")
    bad_record = tmp_path / "bad.jsonl"
    bad_record.write_text('{"prompt": "a"}\n{"prompt": "b", "completion": "c"}\n')
    capsys.readouterr()  # the model folder's save progress
    cases = [
        ([model, task], "needs a reward: a function, reward=module:function"),
        ([model, task, "reward=nocolon"], "reward must look like module:function"),
        ([model, task, f"reward={tmp_path / 'reward.py'}:starts_with_a_digt"],
         "has no 'starts_with_a_digt' (did you mean starts_with_a_digit?)"),
        ([model, task, f"reward={tmp_path / 'nothing.py'}:f"], "nothing.py is not a file"),
        ([model, task, f"reward={tmp_path / 'broken.py'}:f"],
         "broken.py failed: ZeroDivisionError"),
        ([model, task, f"reward={tmp_path / 'reward.py'}:NOT_A_FUNCTION"],
         "is a int, not a function"),
        ([model, task, reward, "reward=no_such_module_here:f"],
         "importing no_such_module_here failed: ModuleNotFoundError"),
        ([model, task, reward, "sft_warmup_steps=5"], "sft_warmup_steps=5: the warm-up"),
        ([model, task, reward, "max_operand=3"],
         "max_operand is read only with task=builtin:addition"),
        ([model, task, reward, "sft_lr=0.1"], "sft_lr is read only with task=builtin:addition"),
        (["model=/no/folder", task, reward],
         "model must be tiny-llama, tiny-qwen2 or a local model folder"),
        ([model, task, reward, f"eval_task={tmp_path / 'none.jsonl'}"],
         "eval_task: " + str(tmp_path / "none.jsonl") + " does not exist"),
        ([model, f"task={bad_record}", reward],
         f"{bad_record}: line 2: field 'completion'"),
        ([model, task, reward, f"reward_model={tmp_path}"],
         "reward_model: give reward= (a function) or reward_model="),
        ([model, task, f"reward_model={tmp_path / 'none'}"],
         "reward_model: " + str(tmp_path / "none") + " is not a folder"),
        ([model, task, model.replace("model=", "reward_model=")],
         "has no reward_head in its weights: it is a language model, not a reward model"),
        (["model=tiny-llama", f"reward_model={tmp_path}"],
         "reward_model: task=builtin:addition has its own reward"),
        ([model, task, reward, "dtype=float16"], "dtype=float16 cannot train here"),
        ([model, task, reward, "prompts_per_iteration=13"],
         "prompts_per_iteration=13 is more than the task's 12 prompts"),
        ([model, task, reward, "prompts_per_iteration=4", "lora_r=2",
          "lora_targets=q_proj,vproj"],
         "lora_targets: 'vproj' matches no module of the model (did you mean v_proj"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        assert main(["train", "grpo", f"out_dir={out}", "rollout=hf", *extra]) == 2, extra
        last = capsys.readouterr().err.strip().splitlines()[-1]  # after loading bars
        assert last.startswith("alignfuse: ") and message in last, (extra, last)
        assert not out.exists() or not any(out.rglob("*.pt")), extra


@pytest.mark.vllm
@needs_vllm
def test_online_lora_run_samples_from_the_merged_weights_in_vllm(tmp_path):
    """The hybrid switch under LoRA: each iteration syncs base + adapters, merged, into the
    vLLM engine, so vLLM samples from the policy being trained: its log-probs equal the
    trainer's (tis_weight_mean 1 to fp32 rounding) after the adapters have moved."""
    from alignfuse.engine.metrics import read_metrics
    from alignfuse.engine.online_loop import make_online_config, train_online

    args = _user_task(tmp_path) + [
        f"out_dir={tmp_path / 'run'}", "rollout=vllm", "iterations=3", "prompts_per_iteration=4",
        "group_size=4", "max_new_tokens=3", "lr=1e-2", "eval_samples=2", "tensorboard=false",
        "lora_r=4", "beta=0.05"]
    summary = train_online(make_online_config(None, args), progress=lambda *a: None)
    assert summary["rollout"] == "VLLMRollout"
    rows = [row for row in read_metrics(summary["metrics"]) if row["split"] == "train"]
    assert len(rows) == 3
    for row in rows:
        assert abs(row["tis_weight_mean"] - 1.0) < 1e-3, row
    assert rows[-1]["kl"] > 0  # the adapters moved the policy off its base by then
