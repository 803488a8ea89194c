"""Comparison helpers: relative norms against float64 references."""

from __future__ import annotations

import os

import numpy as np
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """||actual - expected|| / max(||expected||, floor), computed in float64.

    `floor` is for checks of a few values that a fresh draw can put next to a zero of the
    function (an IPO loss (h - 1/(2 beta))^2 with h near 1/(2 beta)): there float32 keeps its
    absolute error while the value shrinks, and a pure relative check flakes."""
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    denom = max(float(e.norm()), floor)
    return float((a - e).norm()) / denom


def assert_rel_close(actual, expected, tol: float, what: str = "", floor: float = 1e-30) -> None:
    err = rel_err(actual, expected, floor)
    _log_margin(err, tol, what)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def _log_margin(err: float, tol: float, what: str) -> None:
    """With ALIGNFUSE_TEST_MARGIN_LOG=<file>, append `test, what, err/tol` for every check.
    Repeated runs of the suite then show which checks sit close to their bound on fresh
    random inputs (the flaky ones) before CI finds them one failure at a time."""
    path = os.environ.get("ALIGNFUSE_TEST_MARGIN_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{what}\t{err / tol:.4g}\n")


def fresh_seed() -> int:
    """A seed for a test's own torch.Generator, drawn from torch's global generator, which
    conftest seeds per test (so ALIGNFUSE_TEST_SEED reproduces it; torch.seed() would not)."""
    return int(torch.randint(0, 2**31, ()))


def fresh_rng() -> np.random.Generator:
    """A numpy Generator seeded from fresh_seed(). np.random.default_rng() with no seed reads
    the OS entropy, which np.random.seed (conftest's) does not reach, so its draws could not be
    replayed with ALIGNFUSE_TEST_SEED."""
    return np.random.default_rng(fresh_seed())


def preference_pairs(gen: torch.Generator, vocab: int, num_pairs: int,
                     max_completion: int = 8) -> tuple[list[list[int]], list[int], list[int]]:
    """`num_pairs` pairs [chosen, rejected] sharing a random prompt of 2..5 tokens, each
    completion 2..max_completion tokens, ids in [6, vocab) (clear of the special tokens):
    (sequences, prompt length of each, group of each: its pair's index)."""
    seqs, prompts = [], []
    for _ in range(num_pairs):
        prompt = torch.randint(6, vocab, (int(torch.randint(2, 6, (1,), generator=gen)),),
                               generator=gen).tolist()
        for n in torch.randint(2, max_completion + 1, (2,), generator=gen).tolist():
            seqs.append(prompt + torch.randint(6, vocab, (n,), generator=gen).tolist())
            prompts.append(len(prompt))
    return seqs, prompts, [i // 2 for i in range(len(seqs))]


def build_host_harness(tmp_path, source: str):
    """Compile `source` (which includes a csrc/cuda/*.cu file) into a host executable."""
    import pathlib
    import shutil
    import subprocess
    import sysconfig

    import pybind11

    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "harness.cu").write_text(source)
    libdir = sysconfig.get_config_var("LIBDIR")
    cmd = [shutil.which("nvcc"), "-std=c++17", "-O1", "-I", str(root / "csrc" / "cuda"),
           "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
           str(tmp_path / "harness.cu"), "-o", str(tmp_path / "harness"), "-L", libdir,
           f"-lpython{sysconfig.get_config_var('LDVERSION')}", "-Xlinker", f"-rpath={libdir}"]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]

    def run(lines: list[str]) -> torch.Tensor:
        out = subprocess.run([str(tmp_path / "harness")], input="\n".join(lines) + "\n",
                             capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return torch.tensor([[float(v) for v in line.split()] for line in out.stdout.splitlines()],
                            dtype=torch.float64)

    return run


# The tiny models whose LM head transforms its logits, and the (softcap, logit_scale) that
# `engine.forward.lm_head_of` must read from each: Gemma-2 caps (c tanh(z / c)), Cohere,
# Falcon-H1 (a Mamba-2 hybrid: it runs padded) and HyperCLOVAX multiply (z * s), Granite
# divides (z / s).
TRANSFORMED_HEADS = {"gemma2": (3.0, 1.0), "cohere": (None, 0.0625), "granite": (None, 0.125),
                     "falcon_h1": (None, 0.0625), "hyperclovax": (None, 0.125)}


def transformed_head_model(family: str, attn: str = "sdpa", seed: int = 1, *, vocab: int = 101,
                           hidden: int = 48, heads: int = 3, head_dim: int = 16, **overrides):
    """A tiny tied-embedding model of `family` (TRANSFORMED_HEADS) whose LM head is scaled up
    so that the transform matters: raw Gemma-2 logits are far past the cap (std ~5 against
    3), Cohere's and Granite's scaled logits are O(1)."""
    from transformers import (AutoConfig, AutoModelForCausalLM, CohereConfig, CohereForCausalLM,
                              Gemma2Config, Gemma2ForCausalLM, GraniteConfig, GraniteForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=80,
                  num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1,
                  head_dim=head_dim, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "gemma2":
        # attn_logit_softcapping is inside the model (eager applies it, sdpa ignores it):
        # both paths compared in the tests run the same attention either way.
        cfg = Gemma2Config(**{**common, "final_logit_softcapping": 3.0,
                              "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": head_dim,
                              **overrides})
        cls, gain = Gemma2ForCausalLM, 30.0
    elif family == "cohere":
        cfg = CohereConfig(**{**common, "logit_scale": 0.0625, **overrides})
        cls, gain = CohereForCausalLM, 100.0
    elif family == "granite":
        common.pop("head_dim")  # Granite derives it
        cfg = GraniteConfig(**{**common, "logits_scaling": 8.0, "tie_word_embeddings": True,
                               **overrides})
        cls, gain = GraniteForCausalLM, 50.0
    elif family == "falcon_h1":
        cfg = AutoConfig.for_model("falcon_h1", **{
            **common, "lm_head_multiplier": 0.0625, "mamba_d_ssm": hidden, "mamba_n_heads": heads,
            "mamba_d_head": hidden // heads, "mamba_n_groups": 1, "mamba_d_state": 8,
            "tie_word_embeddings": True, **overrides})
        cls, gain = AutoModelForCausalLM.from_config, 100.0
    elif family == "hyperclovax":
        cfg = AutoConfig.for_model("hyperclovax", **{**common, "logits_scaling": 0.125,
                                                     "tie_word_embeddings": True, **overrides})
        cls, gain = AutoModelForCausalLM.from_config, 50.0
    else:
        raise ValueError(f"family must be one of {sorted(TRANSFORMED_HEADS)}, got {family!r}")
    cfg._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(gain)
    return model.eval()


# Tiny models of families whose layers carry state along the packed row (state-space,
# short convolution, linear attention): their packed documents are not isolated.
HYBRIDS = {  # model_type: the config fields that make it tiny (on the torch fallbacks)
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1,
                  mamba_d_state=16),                                     # Mamba-2 + attention
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1,
                      mamba_d_state=16),                           # Mamba-2 || attention
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100,
                  num_experts=1, mamba_d_state=8),                       # Mamba-1 + attention
    "lfm2": dict(layer_types=["conv", "full_attention"]),               # short convolutions
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], num_experts=0,
                       linear_num_value_heads=4, linear_num_key_heads=2, head_dim=16,
                       linear_key_head_dim=16, linear_value_head_dim=16),  # gated delta rule
}


def family_model(model_type: str, fields: dict, layers: int = 2, seed: int = 3,
                 attention: str = "sdpa", vocab: int = 97):
    """A tiny random `model_type` causal LM with the family's own `fields`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, vocab_size=vocab, hidden_size=64, intermediate_size=96,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, **fields)
    config._attn_implementation = attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def hybrid_model(model_type: str, **kwargs):
    """A tiny hybrid whose packed documents are not isolated (tests/test_forward.py)."""
    return family_model(model_type, HYBRIDS[model_type], **kwargs)
