"""group_advantages against a plain-Python float64 evaluation of each estimator's formula."""

from __future__ import annotations

import math

import pytest
import torch

from alignfuse.kernels.advantages import group_advantages
from helpers import assert_rel_close, fresh_seed

ESTIMATORS = ["grpo", "dr_grpo", "rloo", "rank"]
SCALES = ["group", "batch", "none"]


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # Bessel-corrected
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _avg_ranks(xs):
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):  # positions i..j (0-based) share rank mean(i+1..j+1)
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def reference(rewards, group_size, estimator, scale, eps):
    r = [float(x) for x in rewards]
    groups = [r[i:i + group_size] for i in range(0, len(r), group_size)]
    if estimator == "rank":
        groups = [_avg_ranks(g) for g in groups]
    flat = [x for g in groups for x in g]
    out = []
    for g in groups:
        if group_size == 1 or max(g) == min(g):
            out += [0.0] * group_size
            continue
        m = _mean(g)
        if estimator == "rloo":
            out += [x - (sum(g) - x) / (group_size - 1) for x in g]
        elif estimator == "dr_grpo" or scale == "none":
            out += [x - m for x in g]
        else:
            sd = _std(g) if scale == "group" else _std(flat)
            out += [(x - m) / (sd + eps) for x in g]
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("group_size", [1, 2, 5, 8])
def test_group_advantages_match_formula(backend, device, estimator, scale, group_size):
    num_groups = 7
    g = torch.Generator().manual_seed(fresh_seed())
    # integer rewards make ties and all-equal groups; Gaussian ones make distinct values
    rewards = torch.cat([torch.randint(0, 3, (3 * group_size,), generator=g).double(),
                         torch.randn((num_groups - 3) * group_size, generator=g,
                                     dtype=torch.float64)]).to(device)
    got = group_advantages(rewards, group_size, estimator=estimator, scale=scale,
                           backend=backend)
    exp = reference(rewards.tolist(), group_size, estimator, scale, 1e-6)
    assert got.shape == rewards.shape and got.dtype == torch.float64
    assert torch.isfinite(got).all()
    assert_rel_close(got, exp, 1e-6, f"{estimator}/{scale}")
    assert not got.requires_grad


@pytest.mark.parametrize("dtype,offset,spread", [(torch.float64, 1000.0, 1e-3),
                                                  (torch.float32, 100.0, 1e-2)])
def test_rewards_on_a_large_offset_keep_their_precision(backend, device, dtype, offset, spread):
    """Reward-model scores often sit on an offset. Centring them in float32 as they are
    loses the offset's rounding (float32 of 1000 + 1e-3 x errs by 3e-5, 3% of the spread;
    a float32 group mean of values near 100 by ~4e-6). Every backend centres the
    differences to the group's first reward, so the advantages stay at the working
    precision of the spread."""
    rewards = (offset + spread * torch.randn(7 * 8, dtype=torch.float64)).to(dtype)
    for estimator in ESTIMATORS:
        for scale in SCALES:
            got = group_advantages(rewards.to(device), 8, estimator=estimator, scale=scale,
                                   backend=backend)
            exp = reference(rewards.tolist(), 8, estimator, scale, 1e-6)
            assert_rel_close(got, exp, 1e-6, f"{dtype} {estimator}/{scale}")


def test_equal_rewards_give_exact_zero(backend, device):
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0], device=device)
    for estimator in ESTIMATORS:
        for scale in SCALES:
            got = group_advantages(rewards, 3, estimator=estimator, scale=scale, backend=backend)
            assert torch.equal(got[:6].cpu(), torch.zeros(6)), (estimator, scale)
            assert got[6] < 0 < got[8]


def test_float32_and_bfloat16_rewards(backend, device):
    rewards = torch.randn(24, device=device)
    exp = reference(rewards.tolist(), 6, "grpo", "group", 1e-6)
    got = group_advantages(rewards, 6, backend=backend)
    assert got.dtype == torch.float32
    assert_rel_close(got, exp, 1e-6, "float32")
    low = rewards.bfloat16()
    got = group_advantages(low, 6, backend=backend)
    assert got.dtype == torch.float32
    assert_rel_close(got, reference(low.float().tolist(), 6, "grpo", "group", 1e-6), 1e-6, "bf16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rank_of_16_bit_rewards(backend, device, dtype):
    # ranks order the rewards by value, negative ones and ties included (Triton's interpreter
    # compares bfloat16 tensors by their bit patterns, so the kernel compares in float32)
    rewards = torch.tensor([-1.0, 0.5, -2.0, 2.0, 0.25, -0.5, -0.5, 3.0], dtype=dtype,
                           device=device)
    for scale in SCALES:
        got = group_advantages(rewards, 4, estimator="rank", scale=scale, backend=backend)
        exp = reference(rewards.float().tolist(), 4, "rank", scale, 1e-6)
        assert_rel_close(got, exp, 1e-6, f"rank {dtype} scale={scale}")


def test_rank_is_invariant_to_monotone_transforms(backend, device):
    rewards = torch.randn(16, dtype=torch.float64, device=device)
    a = group_advantages(rewards, 8, estimator="rank", backend=backend)
    b = group_advantages(rewards.exp() * 3 + 1, 8, estimator="rank", backend=backend)
    assert_rel_close(a, b, 1e-6, "rank invariance")


def test_rloo_is_leave_one_out(backend, device):
    rewards = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=torch.float64, device=device)
    got = group_advantages(rewards, 4, estimator="rloo", backend=backend)
    exp = torch.tensor([1 - 14 / 3, 2 - 13 / 3, 4 - 11 / 3, 8 - 7 / 3], dtype=torch.float64)
    assert_rel_close(got, exp, 1e-6, "rloo")


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="rewards contains 1 NaN or inf"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="rewards contains 1 NaN or inf"):
        group_advantages(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(ValueError, match="group_size 4 must divide the number of rewards 6"):
        group_advantages(torch.randn(6), 4)
    with pytest.raises(ValueError, match="rewards is empty"):
        group_advantages(torch.zeros(0), 2)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        group_advantages(torch.randn(6), 0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        group_advantages(torch.randn(6), 2, estimator="ppo")
    with pytest.raises(ValueError, match="scale must be one of"):
        group_advantages(torch.randn(6), 2, scale="global")
    with pytest.raises(ValueError, match="rewards must be 1-D"):
        group_advantages(torch.randn(2, 3), 3)
    with pytest.raises(TypeError, match="rewards must have dtype"):
        group_advantages(torch.arange(6), 3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_bindings_group_advantages(emulated_cuda, estimator):
    """kernels/advantages/cuda.py with csrc/cuda/advantages.cu emulated on CPU: integer and
    offset float64 rewards, whose group differences the wrapper takes before its cast."""
    rewards = torch.cat([torch.randint(0, 3, (12,)).double(), torch.randn(12, dtype=torch.float64)])
    expected = {scale: group_advantages(rewards, 4, estimator=estimator, scale=scale,
                                        backend="torch") for scale in SCALES}
    # float64 rewards on an offset: the wrapper takes the group differences before its
    # float32 cast (float32 of 1000 + 1e-3 x errs by 3% of the spread)
    offset = 1000.0 + 1e-3 * torch.randn(24, dtype=torch.float64)
    expected_offset = {scale: group_advantages(offset, 4, estimator=estimator, scale=scale,
                                               backend="torch") for scale in SCALES}
    for scale in SCALES:
        got = group_advantages(rewards, 4, estimator=estimator, scale=scale, backend="cuda")
        assert got.dtype == torch.float64
        assert_rel_close(got, expected[scale], 1e-6, scale)
        got = group_advantages(offset, 4, estimator=estimator, scale=scale, backend="cuda")
        assert_rel_close(got, expected_offset[scale], 1e-6, f"offset {scale}")
