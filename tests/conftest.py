"""Test setup shared by every test.

- On a machine without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is
  set here, before anything imports triton (triton reads it when a kernel is decorated).
- `backend` parametrizes a test over every backend that can run on this machine: torch and
  triton always (triton under the interpreter on CPU), cuda where the module and a GPU exist.
  On a CUDA machine, a test without the `device` fixture (CPU tensors) runs torch only.
- `device` is cuda when a GPU is present, else cpu.
- `one_torch_thread` (module scope, opt-in) runs a module's tests on one torch thread.
- The `gpu` marker skips tests that need CUDA on CPU-only machines.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def runnable_backends() -> list[str]:
    from alignfuse.kernels.backends import cuda_module

    names = ["torch", "triton"]
    if HAS_CUDA and cuda_module() is not None:
        names.append("cuda")
    return names


@pytest.fixture(params=runnable_backends())
def backend(request) -> str:
    # A test that does not ask for `device` builds CPU tensors. On a CUDA machine only the
    # torch backend takes those (Triton runs CPU tensors only under its interpreter, which
    # is off there, and the cuda backend needs CUDA tensors): the others are skipped, not
    # failed. On CPU machines nothing is skipped.
    if HAS_CUDA and request.param != "torch" and "device" not in request.fixturenames:
        pytest.skip(f"builds CPU tensors: the {request.param} backend runs them only on "
                    "machines without CUDA (take the `device` fixture to run on the GPU)")
    return request.param


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): the
    machine is shared, and two oversubscribed threads were 5-15x slower than one here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch):
    # Fresh random inputs on every run, but reproducible within a run when re-seeded by a test.
    monkeypatch.delenv("ALIGNFUSE_BACKEND", raising=False)
    monkeypatch.delenv("ALIGNFUSE_LINEAR_STRATEGY", raising=False)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on a lent GPU: bench/gpu_session.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
