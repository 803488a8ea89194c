"""linear_cross_entropy against torch.nn.functional.cross_entropy on float64 logits, for every
runnable backend: loss and gradients of hidden, weight, bias, every reduction, label smoothing,
temperature, ignore_index, chunking, layouts [N, H] and [B, T, H]."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from alignfuse.kernels import linear_cross_entropy
from alignfuse.kernels.logprobs import reference as logprobs_reference
from helpers import assert_rel_close, fresh_seed

N, H, V = 37, 48, 1031
IGNORE = -100


def make_inputs(shape=(N,), *, dtype=torch.float32, device="cpu", seed=None, vocab=V, dim=H):
    g = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    hidden = torch.randn(*shape, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * (3.0 / dim ** 0.5)
    bias = torch.randn(vocab, generator=g) * 0.5
    targets = torch.randint(0, vocab, shape, generator=g)
    flat = targets.view(-1)
    flat[3] = IGNORE
    flat[-1] = IGNORE
    leaves = [x.to(device=device, dtype=dtype).requires_grad_() for x in (hidden, weight, bias)]
    return (*leaves, targets.to(device))


def reference(hidden, weight, bias, targets, *, temperature=1.0, reduction="mean",
              label_smoothing=0.0, softcap=None):
    """F.cross_entropy on float64 logits (soft-capped first with `softcap`); returns (loss,
    grads)."""
    h, w, b = (x.detach().double().requires_grad_() for x in (hidden, weight, bias))
    logits = h @ w.T + b
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits / temperature
    loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), targets.reshape(-1),
                           ignore_index=IGNORE, reduction=reduction,
                           label_smoothing=label_smoothing)
    if reduction == "none":
        loss = loss.reshape(targets.shape)
    return loss.detach(), torch.autograd.grad(_weighted(loss), (h, w, b))


def _weighted(loss):
    # per-token outputs get fixed random incoming gradients, so the test sees more than sums
    if loss.dim() == 0:
        return loss
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(loss.shape, generator=g, dtype=torch.float64)
    return (loss * weights.to(loss.device, loss.dtype)).sum()


def check(backend, inputs, *, tol=2e-5, **kwargs):
    hidden, weight, bias, targets = inputs
    want, want_grads = reference(*inputs, **kwargs)
    got = linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=IGNORE,
                               backend=backend, **kwargs)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_rel_close(got, want, tol, "loss")
    grads = torch.autograd.grad(_weighted(got), (hidden, weight, bias))
    for name, g, w in zip(("grad_hidden", "grad_weight", "grad_bias"), grads, want_grads):
        assert_rel_close(g, w, 10 * tol, name)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_f_cross_entropy(backend, device, reduction, label_smoothing):
    check(backend, make_inputs(device=device), reduction=reduction,
          label_smoothing=label_smoothing,
          temperature=0.7)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-3)])
def test_softcap(backend, device, monkeypatch, reduction, label_smoothing, dtype, tol):
    """Gemma-2's soft-capped logits, c tanh(z / c) before the temperature, over several
    chunks (raw logits reach ~4 c here, so the cap matters)."""
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 5 * V * 6)
    check(backend, make_inputs(device=device, dtype=dtype), tol=tol, reduction=reduction,
          label_smoothing=label_smoothing, temperature=0.7, softcap=2.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padded_batch_shape(backend, device, reduction):
    check(backend, make_inputs((3, 13), device=device), reduction=reduction,
          label_smoothing=0.05)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_inputs(backend, device, reduction):
    # the GPU dtype, here on CPU: bf16 d loss / d logits buffer, fp32 logits
    check(backend, make_inputs(dtype=torch.bfloat16, device=device), tol=1e-3,
          reduction=reduction,
          label_smoothing=0.1)


def test_no_bias_and_full_smoothing(backend, device):
    hidden, weight, _, targets = make_inputs(device=device)
    want, (gh, gw, _) = reference(hidden, weight, torch.zeros(V, device=device), targets,
                                  label_smoothing=1.0)
    got = linear_cross_entropy(hidden, weight, targets, label_smoothing=1.0, backend=backend)
    assert_rel_close(got, want, 2e-5, "loss")
    for g, w in zip(torch.autograd.grad(got, (hidden, weight)), (gh, gw)):
        assert_rel_close(g, w, 2e-4, "grad")


def test_ignored_tokens_get_no_gradient(backend, device):
    hidden, weight, bias, targets = make_inputs(device=device)
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend)
    (grad_h,) = torch.autograd.grad(loss, hidden)
    ignored = targets == IGNORE
    assert grad_h[ignored].abs().max() == 0 and grad_h[~ignored].abs().sum(-1).min() > 0


@pytest.mark.no_cuda_launch  # nothing to compute: the wrapper returns before a launch
def test_all_ignored_gives_zero_not_nan(backend, device):
    hidden, weight, bias, targets = make_inputs(device=device)
    targets[:] = IGNORE
    loss = linear_cross_entropy(hidden, weight, targets, bias=bias, backend=backend)
    (grad_h,) = torch.autograd.grad(loss, hidden)
    assert float(loss.detach()) == 0.0 and float(grad_h.abs().max()) == 0.0


def test_chunking_agrees(backend, device, monkeypatch):
    inputs = make_inputs(device=device)
    one = linear_cross_entropy(*inputs[:2], inputs[3], bias=inputs[2], label_smoothing=0.1,
                               backend=backend)
    one_grads = torch.autograd.grad(one, inputs[:3])
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 5 * V * 4)  # 5-row chunks
    if backend == "triton":
        from alignfuse.kernels.fused import triton_fused_loss

        launches = []
        original = triton_fused_loss.fused_chunk_loss
        monkeypatch.setattr(triton_fused_loss, "fused_chunk_loss",
                            lambda z, *a, **k: (launches.append(z.shape[0]), original(z, *a, **k)))
    many = linear_cross_entropy(*inputs[:2], inputs[3], bias=inputs[2], label_smoothing=0.1,
                                backend=backend)
    if backend == "triton":
        assert launches == [5] * 7  # 35 counted tokens
    assert_rel_close(many, one, 1e-6, "loss")
    for g_many, g_one in zip(torch.autograd.grad(many, inputs[:3]), one_grads):
        assert_rel_close(g_many, g_one, 1e-5, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 1e-3)])
@pytest.mark.cpu_only  # the CUDA emulation (CPU tensors)
def test_cuda_backend_in_several_chunks(emulated_cuda, monkeypatch, reduction, dtype, tol):
    """The cuda backend (kernels/fused/cuda.py and csrc/cuda/fused.cu, emulated on CPU) with
    label smoothing over several chunks; on a GPU, test_bf16_gpu_real_vocab (-m gpu)."""
    monkeypatch.setattr(logprobs_reference, "CHUNK_BUDGET_BYTES", 5 * V * 6)
    check("cuda", make_inputs(dtype=dtype), tol=tol, reduction=reduction, label_smoothing=0.1)


def test_float64_gradcheck_of_the_reference():
    hidden, weight, bias, targets = make_inputs((6,), dtype=torch.float64, seed=0, vocab=9, dim=5)
    for reduction, softcap in (("mean", None), ("none", None), ("mean", 0.8)):
        assert torch.autograd.gradcheck(
            lambda h, w, b: linear_cross_entropy(h, w, targets, bias=b, temperature=1.3,
                                                 label_smoothing=0.2, reduction=reduction,
                                                 softcap=softcap, backend="torch"),
            (hidden, weight, bias))


def test_bad_input_names_the_argument():
    hidden, weight, bias, targets = make_inputs(seed=0)
    bad = targets.clone()
    bad[0] = V
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, bad)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(hidden, weight, targets[:-1])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(hidden, weight[:, :-1], targets)
    with pytest.raises(ValueError, match="bias"):
        linear_cross_entropy(hidden, weight, targets, bias=bias[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(hidden, weight, targets, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(hidden, weight, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must have the same dtype"):
        linear_cross_entropy(hidden, weight.double(), targets)
    with pytest.raises(TypeError, match="targets"):
        linear_cross_entropy(hidden, weight, targets.float())


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_gpu_real_vocab(backend, device, reduction):
    inputs = make_inputs((300,), dtype=torch.bfloat16, device=device, vocab=151936, dim=896)
    check(backend, inputs, tol=1e-3, reduction=reduction, label_smoothing=0.1)
