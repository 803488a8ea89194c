"""gae against the closed form A_t = sum_l (gamma*lam)^l delta_{t+l} over each sequence's
valid tokens (independent of the backward recursion the implementations use)."""

from __future__ import annotations

import pytest
import torch

from alignfuse.kernels.advantages import gae
from helpers import assert_rel_close, fresh_seed


def reference(rewards, values, mask, gamma, lam):
    """Padded [B, T] float64 -> (advantages, returns), 0 at masked tokens."""
    adv = torch.zeros_like(rewards, dtype=torch.float64)
    for b in range(rewards.shape[0]):
        idx = [t for t in range(rewards.shape[1]) if mask[b, t]]
        r = [float(rewards[b, t]) for t in idx]
        v = [float(values[b, t]) for t in idx] + [0.0]  # V after the last valid token is 0
        deltas = [r[k] + gamma * v[k + 1] - v[k] for k in range(len(idx))]
        for k, t in enumerate(idx):
            adv[b, t] = sum((gamma * lam) ** l * deltas[k + l] for l in range(len(idx) - k))
    ret = torch.where(mask, adv + values.double(), 0.0)
    return adv, ret


def make(B=5, T=37, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(fresh_seed())
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64)
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    mask &= torch.rand(B, T, generator=g) > 0.2  # observation tokens inside the response
    mask[0] = False  # an all-masked sequence
    mask[1] = False
    mask[1, 3] = True  # a one-token sequence
    return rewards.to(device, dtype), values.to(device, dtype), mask.to(device)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.0, 0.5)])
def test_gae_matches_closed_form(backend, device, gamma, lam):
    rewards, values, mask = make(device=device)
    adv, ret = gae(rewards, values, mask=mask, gamma=gamma, lam=lam, backend=backend)
    exp_adv, exp_ret = reference(rewards.cpu(), values.cpu(), mask.cpu(), gamma, lam)
    assert adv.shape == rewards.shape and adv.dtype == torch.float64
    assert_rel_close(adv, exp_adv, 1e-6, "advantages")
    assert_rel_close(ret, exp_ret, 1e-6, "returns")


def test_gae_padded_and_packed_agree(backend, device):
    rewards, values, mask = make(B=4, T=29, device=device)
    lengths = mask.long().cumsum(1).argmax(1) + 1  # up to the last valid token
    lengths[0] = 0
    pr = torch.cat([rewards[b, :n] for b, n in enumerate(lengths)])
    pv = torch.cat([values[b, :n] for b, n in enumerate(lengths)])
    pm = torch.cat([mask[b, :n] for b, n in enumerate(lengths)])
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=device),
                    lengths.cumsum(0)]).to(torch.int32)
    adv, ret = gae(rewards, values, mask=mask, gamma=0.97, lam=0.9, backend=backend)
    padv, pret = gae(pr, pv, mask=pm, cu_seqlens=cu, gamma=0.97, lam=0.9, backend=backend)
    assert_rel_close(padv, torch.cat([adv[b, :n] for b, n in enumerate(lengths)]), 1e-6, "adv")
    assert_rel_close(pret, torch.cat([ret[b, :n] for b, n in enumerate(lengths)]), 1e-6, "ret")
    # without a mask, packed sequences do not leak into each other
    padv, _ = gae(pr, pv, cu_seqlens=cu, gamma=0.9, lam=0.8, backend=backend)
    for b in range(4):
        a, z = int(cu[b]), int(cu[b + 1])
        alone, _ = gae(pr[a:z].reshape(1, -1), pv[a:z].reshape(1, -1), gamma=0.9, lam=0.8,
                       backend=backend) if z > a else (torch.zeros(1, 0, dtype=pr.dtype), None)
        assert_rel_close(padv[a:z], alone.reshape(-1), 1e-6, f"sequence {b}")


def test_gae_float32_bfloat16_and_whiten(backend, device):
    rewards, values, mask = make(B=3, T=40, dtype=torch.float32, device=device)
    # with sequence 1's single token, at least 2 to whiten (the random draw of sequence 2
    # left it empty in one CI run, and the expected variance of one token is NaN)
    mask[2, 0] = True
    adv, _ = gae(rewards, values, mask=mask, gamma=0.99, lam=0.95, backend=backend)
    assert adv.dtype == torch.float32
    exp_adv, _ = reference(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    assert_rel_close(adv, exp_adv, 1e-5, "float32")
    adv, ret = gae(rewards.bfloat16(), values.bfloat16(), mask=mask, backend=backend)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32
    exp_adv, _ = reference(rewards.bfloat16().float().cpu(), values.bfloat16().float().cpu(),
                           mask.cpu(), 1.0, 1.0)
    assert_rel_close(adv, exp_adv, 1e-5, "bfloat16")
    white, _ = gae(rewards, values, mask=mask, whiten=True, backend=backend)
    exp_adv, _ = reference(rewards.cpu(), values.cpu(), mask.cpu(), 1.0, 1.0)
    sel = exp_adv[mask.cpu()]
    exp_white = torch.where(mask.cpu(), (exp_adv - sel.mean()) / torch.sqrt(sel.var() + 1e-8), 0.0)
    assert_rel_close(white, exp_white, 1e-5, "whiten")


def test_gae_masked_tokens_may_hold_inf_and_nan(backend, device):
    # masked tokens take no part, whatever they hold (padding, observation tokens): a kernel
    # that multiplies by the 0 mask instead of selecting leaks 0 * NaN = NaN into valid ones
    rewards, values, mask = make(B=4, T=150, device=device)  # > one 128-token Triton tile
    mask[2, 100:140] = False  # a masked run across the tile boundary
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=rewards.dtype,
                           device=device)
    pick = torch.randint(0, 3, rewards.shape, device=device)
    rewards = torch.where(mask, rewards, garbage[pick])
    values = torch.where(mask, values, garbage[pick.flip(-1)])
    adv, ret = gae(rewards, values, mask=mask, gamma=0.99, lam=0.95, backend=backend)
    exp_adv, exp_ret = reference(rewards.cpu(), values.cpu(), mask.cpu(), 0.99, 0.95)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert_rel_close(adv, exp_adv, 1e-6, "advantages")
    assert_rel_close(ret, exp_ret, 1e-6, "returns")


def test_gae_has_no_gradient_and_checks_input():
    rewards = torch.randn(2, 5, requires_grad=True)
    adv, ret = gae(rewards, torch.randn(2, 5))
    assert not adv.requires_grad and not ret.requires_grad
    with pytest.raises(ValueError, match="values must have the token shape"):
        gae(torch.randn(2, 5), torch.randn(2, 4))
    with pytest.raises(ValueError, match="gamma must be a number in"):
        gae(torch.randn(2, 5), torch.randn(2, 5), gamma=1.5)
    with pytest.raises(ValueError, match="rewards is empty"):
        gae(torch.zeros(0), torch.zeros(0), cu_seqlens=torch.tensor([0, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="without cu_seqlens, rewards must be padded 2-D"):
        gae(torch.randn(5), torch.randn(5))
    # NaN/inf where a token counts is refused (API.md: NaN in rewards); test_gae_masked_...
    # shows the same values at masked tokens pass.
    mask = torch.ones(2, 5, dtype=torch.bool)
    for name, position in (("rewards", 0), ("values", 1)):
        inputs = [torch.randn(2, 5), torch.randn(2, 5)]
        inputs[position][1, 3] = float("nan")
        inputs[position][0, 0] = float("inf")
        with pytest.raises(ValueError, match=f"{name} contains 2 NaN or inf value"):
            gae(*inputs, mask=mask)
        mask_out = mask.clone()
        mask_out[1, 3] = mask_out[0, 0] = False
        assert torch.isfinite(gae(*inputs, mask=mask_out)[0]).all()


def test_gae_long_sequences_cross_tiles(backend, device):
    # longer than the Triton kernel's 128-token tile: the carries between tiles are exercised
    rewards, values, mask = make(B=3, T=300, device=device)
    mask[2, 120:140] = False  # a masked run across a tile boundary
    adv, ret = gae(rewards, values, mask=mask, gamma=0.995, lam=0.97, backend=backend)
    exp_adv, exp_ret = reference(rewards.cpu(), values.cpu(), mask.cpu(), 0.995, 0.97)
    assert_rel_close(adv, exp_adv, 1e-5, "advantages")
    assert_rel_close(ret, exp_ret, 1e-5, "returns")


# csrc/cuda/advantages.cu's per-sequence GAE (__host__ __device__), compiled for the host by
# nvcc, against the closed form. No GPU needed.
_HOST_HARNESS = r"""
#include "advantages.cu"
#include <cstdio>
#include <vector>
namespace alignfuse {
std::vector<CudaRegistrar::Fn>& CudaRegistrar::all() { static std::vector<Fn> v; return v; }
}
int main() {  // "n gamma lam" then n lines "reward value mask"; prints n lines "adv ret"
  long n;
  float gamma, lam;
  while (std::scanf("%ld %f %f", &n, &gamma, &lam) == 3) {
    std::vector<float> r(n), v(n), m(n), adv(n), ret(n);
    for (long i = 0; i < n; ++i)
      if (std::scanf("%f %f %f", &r[i], &v[i], &m[i]) != 3) return 1;
    alignfuse::gae_sequence(r.data(), v.data(), m.data(), 0, n, gamma, lam, adv.data(), ret.data());
    for (long i = 0; i < n; ++i) std::printf("%.9g %.9g\n", adv[i], ret[i]);
  }
  return 0;
}
"""


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_gae_sequence_matches_closed_form_on_host(tmp_path):
    from helpers import build_host_harness

    run = build_host_harness(tmp_path, _HOST_HARNESS)
    rewards, values, mask = make(B=4, T=53, dtype=torch.float32)
    for gamma, lam in ((1.0, 1.0), (0.99, 0.95)):
        lines = []
        for b in range(4):
            lines.append(f"53 {gamma} {lam}")
            lines += [f"{r:.9g} {v:.9g} {int(m)}" for r, v, m in
                      zip(rewards[b].tolist(), values[b].tolist(), mask[b].tolist())]
        got = run(lines).reshape(4, 53, 2)
        exp_adv, exp_ret = reference(rewards, values, mask, gamma, lam)
        assert_rel_close(got[..., 0], exp_adv, 1e-5, "cuda gae advantages")
        assert_rel_close(got[..., 1], exp_ret, 1e-5, "cuda gae returns")


@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_bindings_gae(emulated_cuda):
    """kernels/advantages/cuda.py's gae with csrc/cuda/advantages.cu emulated on CPU, on
    bf16 inputs."""
    rewards, values, mask = make(B=3, T=45, dtype=torch.bfloat16)
    exp = gae(rewards, values, mask=mask, gamma=0.9, lam=0.8, backend="torch")
    got = gae(rewards, values, mask=mask, gamma=0.9, lam=0.8, backend="cuda")
    assert_rel_close(got[0], exp[0], 1e-5, "advantages")
    assert_rel_close(got[1], exp[1], 1e-5, "returns")
