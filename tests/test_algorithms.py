"""Algorithm objects inside a plain user-written loop (the test owns the optimizer)."""

from __future__ import annotations

import pytest
import torch

from alignfuse.engine.algorithms import DPO, KTO, ORPO, SFT, RewardModel, SimPO, kto_sequences
from alignfuse.engine.forward import precompute_reference_logps
from alignfuse.engine.packing import pack
from alignfuse.engine.tiny import tiny_model
from alignfuse.kernels.preference import dpo_loss
from alignfuse.kernels.preference.dpo import LENGTH_NORMALIZED, LOSS_TYPES
from helpers import (TRANSFORMED_HEADS, assert_rel_close, preference_pairs,
                     transformed_head_model)

VOCAB = 61


# The machine is shared: two oversubscribed threads were 5-15x slower than one here.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair_data(seed: int, num_pairs: int = 4):
    """Pairs `[chosen, rejected]` sharing a prompt: sequences, prompt lengths, groups."""
    return preference_pairs(torch.Generator().manual_seed(seed), VOCAB, num_pairs,
                            max_completion=7)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def unpacked_logps(model, seq, prompt_len) -> torch.Tensor:
    ids = torch.tensor(seq)[None]
    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    logp = logp.gather(1, ids[0, 1:, None])[:, 0]
    return logp[prompt_len - 1:].sum()


def make(name: str, model, ref_model):
    return {"sft": lambda: SFT(model), "dpo": lambda: DPO(model, ref_model, beta=0.5),
            "kto": lambda: KTO(model, ref_model, beta=0.5), "orpo": lambda: ORPO(model, beta=0.5),
            "simpo": lambda: SimPO(model), "rm": lambda: RewardModel(model)}[name]()


def batches_for(name: str, seed: int, max_tokens: int = 400):
    seqs, prompts, groups = pair_data(seed)
    if name == "kto":
        data = kto_sequences([s[:p] for s, p in zip(seqs, prompts)],
                             [s[p:] for s, p in zip(seqs, prompts)],
                             [i % 2 == 0 for i in range(len(seqs))])
        return pack(data["sequences"], max_tokens=max_tokens,
                    prompt_lengths=data["prompt_lengths"], groups=data["groups"],
                    extras=data["extras"])
    return pack(seqs, max_tokens=max_tokens, prompt_lengths=prompts, groups=groups)


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "orpo", "simpo", "rm"])
def test_step_in_a_user_loop_lowers_the_loss(name):
    model = tiny_model("llama", VOCAB, seed=3)
    ref_model = tiny_model("llama", VOCAB, seed=3).eval()
    algo = make(name, model, ref_model)  # before the optimizer: RewardModel adds its head
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    (batch,) = batches_for(name, seed=4)
    history = []
    for _ in range(6):
        optimizer.zero_grad()
        metrics = algo.step(batch)
        optimizer.step()
        assert all(isinstance(v, float) for v in metrics.values()), metrics
        history.append(metrics["loss"])
    assert history[-1] < history[0] - 1e-3, history


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_loss_and_gradients_match_unpacked(loss_type):
    model = tiny_model("qwen2", VOCAB, seed=5)
    ref_model = tiny_model("qwen2", VOCAB, seed=6).eval()
    seqs, prompts, groups = pair_data(7, num_pairs=3)
    (batch,) = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups)
    kwargs = {"label_smoothing": 0.1} if loss_type in ("sigmoid", "robust") else {}
    algo = DPO(model, ref_model, beta=0.3, loss_type=loss_type, **kwargs)
    metrics = algo.step(batch)
    packed_grads = grads(model)
    model.zero_grad()

    policy = torch.stack([unpacked_logps(model, s, p) for s, p in zip(seqs, prompts)])
    with torch.no_grad():
        ref = torch.stack([unpacked_logps(ref_model, s, p) for s, p in zip(seqs, prompts)])
    lengths = torch.tensor([float(len(s) - p) for s, p in zip(seqs, prompts)])
    extra = ({"chosen_lengths": lengths[0::2], "rejected_lengths": lengths[1::2]}
             if loss_type in LENGTH_NORMALIZED else {})
    losses, _, _ = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=0.3,
                            loss_type=loss_type, **kwargs, **extra)
    losses.mean().backward()
    assert abs(metrics["loss"] - float(losses.mean())) <= 1e-5 * max(1.0, abs(metrics["loss"]))
    expected = grads(model)
    assert packed_grads.keys() == expected.keys()
    for name in expected:
        assert_rel_close(packed_grads[name], expected[name], 1e-4, f"{loss_type} grad {name}")


# Not KTO: its reference point z0 is estimated per micro-batch (as in TRL), so micro-batches
# see different z0s than one big batch would.
@pytest.mark.parametrize("name", ["sft", "dpo", "orpo", "rm"])
def test_gradient_accumulation_equals_one_batch(name):
    model = tiny_model("llama", VOCAB, seed=8)
    ref_model = tiny_model("llama", VOCAB, seed=9).eval()
    algo = make(name, model, ref_model)
    (whole,) = batches_for(name, seed=10, max_tokens=400)
    micro = batches_for(name, seed=10, max_tokens=30)
    assert len(micro) >= 2
    algo.step(whole)
    expected = grads(model)
    model.zero_grad()
    total = sum(algo.num_units(b) for b in micro)
    assert total == algo.num_units(whole)
    for b in micro:
        algo.step(b, loss_scale=algo.num_units(b) / total)
    for key, g in grads(model).items():
        assert_rel_close(g, expected[key], 1e-5, f"accumulated grad {key}")


def test_dpo_with_precomputed_reference_equals_reference_model():
    model = tiny_model("llama", VOCAB, seed=11)
    ref_model = tiny_model("llama", VOCAB, seed=12)
    seqs, prompts, groups = pair_data(13)
    batches = pack(seqs, max_tokens=30, prompt_lengths=prompts, groups=groups)
    ref = precompute_reference_logps(ref_model, batches)
    stored = pack(seqs, max_tokens=30, prompt_lengths=prompts, groups=groups,
                  extras={"reference_logps": ref})
    with torch.no_grad():
        for live, saved in zip(batches, stored):
            a, _ = DPO(model, ref_model).loss(live)
            b, _ = DPO(model).loss(saved)
            assert_rel_close(b, a, 1e-6, "precomputed reference")
    with pytest.raises(ValueError, match="reference log-probs"):
        DPO(model).loss(batches[0])


def test_lora_dpo_trains_only_the_adapters():
    peft = pytest.importorskip("peft")
    base = tiny_model("qwen2", VOCAB, seed=14)
    seqs, prompts, groups = pair_data(15)
    plain = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups)
    ref = precompute_reference_logps(base, plain)  # the reference is the frozen base model
    (batch,) = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups,
                    extras={"reference_logps": ref})
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    algo = DPO(model, beta=0.5)
    history = []
    for _ in range(5):
        optimizer.zero_grad()
        history.append(algo.step(batch)["loss"])
        optimizer.step()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name
    assert history[-1] < history[0], history


def test_base_reference_is_the_lora_policys_base_without_a_copy():
    """`BaseReference(model)`: the PEFT policy run with its adapters off is the reference.
    DPO then computes exactly what it does with a frozen copy of the base (loss, metrics,
    gradients), and the policy comes back as it was (training mode, adapters on)."""
    import copy

    import peft

    from alignfuse.engine import BaseReference, token_logprobs

    base = tiny_model("qwen2", VOCAB, seed=21)
    frozen = copy.deepcopy(base).eval().requires_grad_(False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # nonzero adapters: policy != base
    model = peft.get_peft_model(base, config).train()
    seqs, prompts, groups = pair_data(22)
    (batch,) = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups)
    policy_before = token_logprobs(model, batch).detach()
    results = []
    for ref in (frozen, BaseReference(model)):
        model.zero_grad()
        results.append((DPO(model, ref, beta=0.5).step(batch), grads(model)))
    (copied, copied_grads), (based, based_grads) = results
    # The policy is not its base. (Not the DPO margin: chosen minus rejected can cancel to
    # ~0 on some draws of the adapters; the largest token gap was >= 0.41 over 202 draws.)
    gap = (policy_before - token_logprobs(frozen, batch)).abs().max()
    assert gap > 0.1, gap
    for key, value in copied.items():
        assert based[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert copied_grads.keys() == based_grads.keys() and copied_grads
    for name, grad in copied_grads.items():
        assert_rel_close(based_grads[name], grad, 1e-6, name)
    assert model.training
    assert torch.equal(token_logprobs(model, batch).detach(), policy_before)
    with pytest.raises(TypeError, match="needs a PEFT model"):
        BaseReference(frozen)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="the base of this model trains too.*lm_head"):
        BaseReference(model)


def test_malformed_batches_are_named():
    model = tiny_model("llama", VOCAB, seed=16)
    seqs, prompts, _ = pair_data(17)
    (unpaired,) = pack(seqs[:3], max_tokens=400, prompt_lengths=prompts[:3])
    with pytest.raises(ValueError, match="pairs"):
        SimPO(model).loss(unpaired)
    (no_labels,) = pack(seqs[:4], max_tokens=400, groups=[0, 0, 1, 1])
    with pytest.raises(ValueError, match="desirable"):
        KTO(model, tiny_model("llama", VOCAB, seed=18)).loss(no_labels)
    (float_labels,) = pack(seqs[:4], max_tokens=400, groups=[0, 0, 1, 1],
                           extras={"desirable": [0.3, 0.3, 0.0, 0.0]})
    with pytest.raises(TypeError, match=r"extras\['desirable'\] must be bool"):
        KTO(model, tiny_model("llama", VOCAB, seed=18)).loss(float_labels)
    with pytest.raises(ValueError, match="kind"):
        RewardModel(model, kind="triplet")
    with pytest.raises(TypeError, match="model"):
        SFT("not a model")


def test_sft_micro_batch_without_targets_adds_nothing():
    """A micro-batch whose sequences are all prompt (e.g. truncated) weighs 0 in the step;
    only a step with no target token at all is an error."""
    from alignfuse.engine.loop import run_batches

    model = tiny_model("llama", VOCAB, seed=3)
    seqs, prompts, _ = pair_data(5)
    with_targets = pack(seqs[:2], max_tokens=400, prompt_lengths=prompts[:2])
    no_targets = pack(seqs[2:3], max_tokens=400, prompt_lengths=[len(seqs[2])])
    sft = SFT(model)
    alone = run_batches(sft, with_targets, train=True)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    together = run_batches(sft, with_targets + no_targets, train=True)
    assert together["loss"] == alone["loss"]
    for name, grad in grads(model).items():
        assert torch.equal(grad, expected[name]), name
    with pytest.raises(ValueError, match="nothing to learn from"):
        run_batches(sft, no_targets, train=True)


def test_reward_model_accuracy_counts_ties_as_wrong():
    """A fresh zero-initialised head scores every response alike: no ranking is right yet,
    listwise as pairwise."""
    model = tiny_model("llama", VOCAB, seed=3)
    seqs, prompts, _ = pair_data(6, num_pairs=3)  # 6 sequences: 2 prompts x K=3 responses
    (listwise,) = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=[0, 0, 0, 1, 1, 1])
    _, metrics = RewardModel(model, kind="listwise").loss(listwise)
    assert metrics["rewards/top1_accuracy"] == 0.0
    (pairwise,) = batches_for("rm", seed=6)
    _, metrics = RewardModel(model, kind="pairwise").loss(pairwise)
    assert metrics["rewards/accuracy"] == 0.0


# ---------------------------------------------------------------------------------------
# Heads whose logits the model transforms after the matmul (Gemma-2's final soft-cap,
# Cohere's logit_scale): the fused losses against the same losses from the model's own
# `logits` (transformers applies the transform itself).


def head_model(family: str, seed: int):
    """helpers.transformed_head_model, eager attention, this file's vocabulary."""
    return transformed_head_model(family, "eager", seed, vocab=VOCAB, hidden=40, heads=5,
                                  head_dim=8).train()


def model_logps(model, prompt: list[int], completion: list[int], temperature: float):
    """`[len(completion)]` float64 log p(completion_i | prefix) from the model's own logits."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return logits.log_softmax(-1).gather(1, ids[0, len(prompt):, None])[:, 0]


@pytest.mark.parametrize("family", sorted(TRANSFORMED_HEADS))
def test_dpo_on_transformed_heads_matches_model_logits(family):
    model = head_model(family, seed=31)
    ref_model = head_model(family, seed=32).eval()
    seqs, prompts, groups = pair_data(33, num_pairs=3)
    (batch,) = pack(seqs, max_tokens=400, prompt_lengths=prompts, groups=groups)
    T = 0.8
    algo = DPO(model, ref_model, beta=0.3, temperature=T)
    metrics = algo.step(batch)
    packed_grads = grads(model)
    model.zero_grad()
    policy = torch.stack([model_logps(model, s[:p], s[p:], T).sum()
                          for s, p in zip(seqs, prompts)])
    with torch.no_grad():
        ref = torch.stack([model_logps(ref_model, s[:p], s[p:], T).sum()
                           for s, p in zip(seqs, prompts)])
    losses, _, _ = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], beta=0.3)
    losses.mean().backward()
    expected_loss = float(losses.mean().detach())
    assert abs(metrics["loss"] - expected_loss) <= 1e-5 * max(1.0, abs(expected_loss))
    expected = grads(model)
    assert packed_grads.keys() == expected.keys()
    for name in expected:
        assert_rel_close(packed_grads[name], expected[name], 1e-4, f"{family} grad {name}")


@pytest.mark.parametrize("family", sorted(TRANSFORMED_HEADS))
def test_grpo_on_transformed_heads_matches_model_logits(family):
    """GRPO's fused `linear_policy_loss` (clipped ratio + k3 KL, token-mean) against the
    same loss written out on the model's own logits: value and gradients."""
    from alignfuse.engine.algorithms.grpo import GRPO, RolloutBatch, completion_tensor
    from alignfuse.engine.rollout import HFRollout, SamplingConfig

    model = head_model(family, seed=41)
    # The reference is the policy before its update below (a far-off one would hit the k3
    # estimator's clamp, which the written-out loss does not model).
    ref_model = head_model(family, seed=41).eval()
    T, beta, clip = 0.9, 0.1, 0.2
    grpo = GRPO(model, HFRollout(model), lambda p, c: 0.0, ref_model=ref_model, group_size=2,
                sampling=SamplingConfig(max_new_tokens=7, temperature=T), beta=beta,
                kl_estimator="k3", clip_low=clip, clip_high=clip, loss_agg="token-mean")
    gen = torch.Generator().manual_seed(43)
    pairs = []
    for _ in range(5):
        p, c = torch.randint(2, 5, (2,), generator=gen).tolist()
        c += 3  # completions of 3..7 tokens
        pairs.append((torch.randint(6, VOCAB, (p,), generator=gen).tolist(),
                      torch.randint(6, VOCAB, (c,), generator=gen).tolist()))
    (packed,) = pack([p + c for p, c in pairs], max_tokens=400,
                     prompt_lengths=[len(p) for p, _ in pairs])
    with torch.no_grad():
        ref = [model_logps(ref_model, p, c, T) for p, c in pairs]
    # The old policy's log-probs: the current ones, moved so that many ratios clip.
    old = [(r + 0.3 * torch.randn(r.shape, generator=gen, dtype=r.dtype)).clamp(max=0)
           for r in ref]
    adv = torch.randn(len(pairs), generator=gen, dtype=torch.float64)
    old_t = completion_tensor(packed, old)
    batch = RolloutBatch(packed, torch.zeros(len(pairs)), adv[packed.seq_index].float(),
                         old_t, old_t, ref_logps=completion_tensor(packed, ref))
    # An "earlier epoch" update: the policy is no longer the reference (KL > 0).
    g = torch.Generator().manual_seed(44)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.zero_grad()
    metrics = grpo.step(batch)
    fused = grads(model)
    model.zero_grad()
    terms = []
    for s, (p, c) in enumerate(pairs):
        logp = model_logps(model, p, c, T)
        old_s = old[s].float().double()  # the experience stores float32
        ratio = torch.exp(logp - old_s)
        surrogate = torch.maximum(-adv[s] * ratio, -adv[s] * ratio.clamp(1 - clip, 1 + clip))
        d = ref[s].float().double() - logp
        terms.append(surrogate + beta * (d.exp() - d - 1))
    loss = torch.cat(terms).mean()
    loss.backward()
    expected_loss = float(loss.detach())
    assert abs(metrics["loss"] - expected_loss) <= 1e-5 * max(1.0, abs(expected_loss))
    assert metrics["kl"] > 0, metrics
    assert metrics["clipfrac"] > 0, metrics  # the clipped branch is exercised
    expected = grads(model)
    assert fused.keys() == expected.keys()
    for name in expected:
        assert_rel_close(fused[name], expected[name], 1e-4, f"{family} GRPO grad {name}")


def test_bad_loss_options_are_refused_when_the_algorithm_is_made():
    """The loss's own checks run at construction (one dummy pair), not at the first step."""
    model = tiny_model("llama", 31, seed=0)
    with pytest.raises(ValueError, match="beta"):
        DPO(model, beta=-1.0)
    with pytest.raises(ValueError, match="loss_type"):
        DPO(model, loss_type="sigmod")
    with pytest.raises(ValueError, match="desirable_weight"):
        KTO(model, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        ORPO(model, beta=float("nan"))
    with pytest.raises(ValueError, match="label_smoothing"):
        SimPO(model, label_smoothing=0.7)
    DPO(model, loss_type="ipo", beta=0.5)  # valid options pass
    # a reference that is the policy itself would move with it: the loss stays at its start
    for algorithm in (DPO, KTO):
        with pytest.raises(ValueError, match="ref_model is the policy model itself"):
            algorithm(model, model)


def test_a_kto_dataset_of_one_record_is_a_data_error():
    """Data, not a bug: the command prints a DataError as one line (exit status 2)."""
    from alignfuse.engine.algorithms.kto import kto_dataset
    from alignfuse.engine.data import DataError, TokenizedDataset

    with pytest.raises(DataError, match="needs >= 2 records"):
        kto_dataset(TokenizedDataset([[5]], [[6]], [0], {"desirable": [True]}))


# ---------------------------------------------------------------------------------------
# A trained reward model on texts (TextRewardModel / load_reward_model): GRPO/PPO's reward


def _texts(n):
    """Prompts and completions of varied lengths from a fresh draw (their characters are in
    the tiny tokenizer's alphabet)."""
    from helpers import fresh_rng

    rng = fresh_rng()
    letters = "abcdefghij0123456789+= "
    word = lambda: "".join(rng.choice(list(letters), size=int(rng.integers(1, 13))))  # noqa: E731
    return [word() for _ in range(n)], [word() for _ in range(n)]


def test_a_saved_reward_model_scores_texts_as_its_model_did(tmp_path):
    """`load_reward_model` on an exported reward model (`alignfuse train rm`'s out_dir/model:
    the causal LM with `reward_head` in its weights) gives, for each (prompt, completion) in
    a batch packed over several micro-batches, the score of its head on the last token of
    that pair alone, rendered by the folder's tokenizer as the training data was."""
    from alignfuse.engine import checkpoint as ckpt
    from alignfuse.engine.algorithms import load_reward_model
    from alignfuse.engine.algorithms.reward_model import attach_reward_head
    from alignfuse.engine.data import encode_prompt_completion
    from alignfuse.engine.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama", len(tokenizer), seed=21)
    head = attach_reward_head(model)
    torch.nn.init.normal_(head.weight, std=0.5)
    torch.nn.init.normal_(head.bias, std=0.5)
    ckpt.export_pretrained(model, tokenizer, tmp_path / "rm")
    scorer = load_reward_model(tmp_path / "rm", max_tokens=48)
    prompts, completions = _texts(23)
    scores = scorer.score_batch(prompts, completions)
    assert scores.shape == (23,) and scores.dtype == torch.float32
    expected = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = sum(encode_prompt_completion(tokenizer, p, c), [])
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
            expected.append(float(head(hidden)))
    assert_rel_close(scores, torch.tensor(expected), 1e-5, "scores")
    assert scores.std() > 0.1
    assert scorer(prompts[3], completions[3]) == pytest.approx(expected[3], rel=1e-5)


def test_a_one_label_sequence_classifier_is_a_reward_model_too(tmp_path):
    """A Hugging Face `*ForSequenceClassification` with one label: batched on right-padded
    rows of at most max_tokens padded tokens, each score equals the model's logit on that
    sequence alone."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignfuse.engine.algorithms import load_reward_model
    from alignfuse.engine.data import encode_prompt_completion
    from alignfuse.engine.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(22)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    scorer = load_reward_model(tmp_path / "cls", max_tokens=64)
    prompts, completions = _texts(19)
    scores = scorer.score_batch(prompts, completions)
    with torch.no_grad():
        expected = [float(model(torch.tensor([sum(encode_prompt_completion(tokenizer, p, c),
                                                  [])])).logits[0, 0])
                    for p, c in zip(prompts, completions)]
    assert_rel_close(scores, torch.tensor(expected), 1e-5, "classifier scores")
    assert scores.std() > 0


def test_a_folder_that_is_not_a_reward_model_is_refused_saying_why(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from alignfuse.engine import checkpoint as ckpt
    from alignfuse.engine.algorithms import load_reward_model
    from alignfuse.engine.algorithms.reward_model import check_reward_model_folder
    from alignfuse.engine.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    ckpt.export_pretrained(tiny_model("llama", len(tokenizer), seed=1), tokenizer,
                           tmp_path / "lm")
    with pytest.raises(ValueError, match="has no reward_head in its weights: it is a "
                                         "language model"):
        load_reward_model(tmp_path / "lm")
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_labels=2)).save_pretrained(tmp_path / "two")
    with pytest.raises(ValueError, match="sequence classifier with 2 labels"):
        check_reward_model_folder(tmp_path / "two")
    with pytest.raises(ValueError, match="no config.json"):
        check_reward_model_folder(tmp_path)
