"""Test setup shared by every test.

- The suite runs on the CPU on every machine, GPU or not, exactly as CI runs it: a GPU is
  hidden (CUDA_VISIBLE_DEVICES="") unless ALIGNFUSE_TEST_DEVICE=cuda asks for it, which is
  how the `gpu` tests run (`ALIGNFUSE_TEST_DEVICE=cuda pytest -m gpu`, bench/gpu_session.sh).
  Many CPU tests run Triton kernels on CPU tensors, which needs the interpreter, and the
  interpreter cannot be on for the GPU's kernels in the same process.
- Without CUDA, Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton (triton reads it when a kernel is decorated).
- `backend` parametrizes a test over every backend: torch and triton always (triton under
  the interpreter on CPU), cuda on a GPU where the module was built, and emulated without one.
  On a CUDA machine, a test without the `device` fixture (CPU tensors) runs torch only.
- Without a GPU, the `cuda` case runs csrc/cuda's kernels and launchers, as written, on CPU
  tensors: tests/cuda_emu builds them against an emulated CUDA runtime (threads as fibers,
  checked barriers and launch configurations; tests/test_cuda_emu.py checks the emulation).
- `device` is cuda when a GPU is present, else cpu.
- `one_torch_thread` (module scope, opt-in) runs a module's tests on one torch thread.
- The `gpu` marker skips tests that need CUDA on CPU-only machines; `cpu_only` marks tests
  that run Triton kernels on CPU tensors on purpose (interpreter checks) or the CUDA
  emulation, which are skipped on a CUDA run. So `ALIGNFUSE_TEST_DEVICE=cuda pytest` can run the whole suite.
  On CPU the marker is kept honest: a test that launches a Triton kernel on CPU tensors
  without `device`, a non-torch `backend` or `cpu_only` fails, naming the marker (it would fail
  on a GPU machine, where the interpreter is off).
- Every test draws fresh random inputs from its own seed; a failure prints
  `ALIGNFUSE_TEST_SEED=<seed> python -m pytest '<test id>'`, which draws them again.
"""

from __future__ import annotations

import os
import random

TEST_DEVICE = os.environ.get("ALIGNFUSE_TEST_DEVICE", "cpu").strip().lower()
if TEST_DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"ALIGNFUSE_TEST_DEVICE must be 'cpu' or 'cuda', got {TEST_DEVICE!r}")
if TEST_DEVICE == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initializes CUDA

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


class _TritonLaunches:
    """Counts Triton kernel launches under the interpreter (CPU runs only)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return
        from triton.runtime.interpreter import InterpretedFunction

        run = InterpretedFunction.run

        def counted_run(self, *args, **kwargs):
            if not kwargs.get("warmup"):
                cls.count += 1
            return run(self, *args, **kwargs)

        InterpretedFunction.run = counted_run


_TritonLaunches.install()


def runnable_backends() -> list[str]:
    from alignfuse.kernels.backends import cuda_module

    names = ["torch", "triton"]
    if not HAS_CUDA or cuda_module() is not None:
        names.append("cuda")  # without a GPU: csrc/cuda emulated on the host (tests/cuda_emu)
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
    if request.param == "cuda" and not HAS_CUDA:
        request.getfixturevalue("emulated_cuda")
    return request.param


EMULATED_STREAM = 0x5EED  # the raw stream handle torch's current stream has under emulation


@pytest.fixture(scope="session")
def cuda_emu_module():
    """csrc/cuda built for the host against tests/cuda_emu's runtime (built once per source)."""
    from cuda_emu.build import load

    return load()


@pytest.fixture
def emulated_cuda(monkeypatch, cuda_emu_module, request):
    """backend="cuda" on CPU tensors: the ops' cuda wrappers call the emulated module, whose
    kernels run each block's threads in a shuffled order drawn from the test's seed. A test
    that then launches no kernel fails (a wrapper that fell back to torch would pass every
    comparison), unless marked `no_cuda_launch`."""
    import importlib
    import sys

    from alignfuse.kernels import backends

    importlib.import_module("alignfuse.kernels")  # every op module, before patching their names
    compiled, stream = backends.cuda_module, backends.current_stream_handle
    for name, module in list(sys.modules.items()):
        if not name.startswith("alignfuse.kernels") or module is None:
            continue
        if getattr(module, "cuda_module", None) is compiled:
            monkeypatch.setattr(module, "cuda_module", lambda: cuda_emu_module)
        if getattr(module, "current_stream_handle", None) is stream:
            monkeypatch.setattr(module, "current_stream_handle", lambda device: EMULATED_STREAM)
    why_unavailable = backends._why_unavailable

    def on_emulated_device(op, backend, device):
        if backend == "cuda" and device.type == "cpu":
            device = torch.device("cuda")  # CPU tensors stand for CUDA ones
        return why_unavailable(op, backend, device)

    monkeypatch.setattr(backends, "_why_unavailable", on_emulated_device)
    cuda_emu_module.emu_schedule("shuffle", torch.initial_seed())
    cuda_emu_module.emu_expect_stream(EMULATED_STREAM)
    launches = cuda_emu_module.emu_counts()["launches"]
    yield cuda_emu_module
    counts = cuda_emu_module.emu_counts()
    if counts["launches"] == launches and not request.node.get_closest_marker("no_cuda_launch"):
        pytest.fail("backend='cuda' ran no CUDA kernel (emulated on CPU): the op did not reach "
                    "csrc/cuda. If no launch is right (an empty or all-ignored input), mark the "
                    "test @pytest.mark.no_cuda_launch", pytrace=False)
    if counts["foreign_stream_launches"]:
        pytest.fail(f"{counts['foreign_stream_launches']} CUDA launches named another stream than "
                    "torch's current one (current_stream_handle)", pytrace=False)


@pytest.fixture
def cuda_device(request) -> torch.device:
    """Where backend="cuda" runs: the GPU, or without one the CPU through the emulation."""
    if HAS_CUDA:
        from alignfuse.kernels.backends import cuda_module

        if cuda_module() is None:
            pytest.fail("a GPU but no alignfuse.kernels._cuda: reinstall with nvcc on PATH")
        return torch.device("cuda")
    request.getfixturevalue("emulated_cuda")
    return torch.device("cpu")


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


_SEED = pytest.StashKey[int]()  # each test item's seed, for its failure report


def _test_seed() -> int:
    text = os.environ.get("ALIGNFUSE_TEST_SEED", "").strip()
    if not text:
        return random.SystemRandom().randrange(2**31)
    if not text.isdigit() or int(text) >= 2**31:
        raise ValueError(f"ALIGNFUSE_TEST_SEED must be an integer in [0, 2**31), got {text!r}")
    return int(text)


@pytest.fixture(autouse=True)
def _seed_and_env(monkeypatch, request):
    # Fresh random inputs on every run, and every draw reproducible: each test seeds torch,
    # random and numpy with a new seed (ALIGNFUSE_TEST_SEED sets it), and a failure prints
    # the command that draws the same inputs again (pytest_runtest_makereport below). Tests
    # take their generators' seeds from torch's (helpers.fresh_seed), never torch.seed().
    seed = _test_seed()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    request.node.stash[_SEED] = seed
    monkeypatch.delenv("ALIGNFUSE_BACKEND", raising=False)
    monkeypatch.delenv("ALIGNFUSE_LINEAR_STRATEGY", raising=False)
    launches = _TritonLaunches.count
    yield
    if _TritonLaunches.count != launches and _runs_on_cpu_tensors_on_cuda(request):
        pytest.fail("this test launches Triton kernels on CPU tensors, which runs only under the "
                    "interpreter: on a CUDA machine (ALIGNFUSE_TEST_DEVICE=cuda) it would fail. "
                    "Take the `device` fixture, or mark it @pytest.mark.cpu_only", pytrace=False)


def _runs_on_cpu_tensors_on_cuda(request) -> bool:
    """Whether a CUDA run would still run this test on CPU tensors: it is not cpu_only, does
    not take `device`, and is not a triton/cuda `backend` case (those are skipped there)."""
    if request.node.get_closest_marker("cpu_only") or "device" in request.fixturenames:
        return False
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    return backend is None or backend == "torch"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    seed = item.stash.get(_SEED, None)
    if report.failed and seed is not None:
        report.sections.append(("the same draw again",
                                f"ALIGNFUSE_TEST_SEED={seed} python -m pytest '{item.nodeid}'"))


def pytest_collection_modifyitems(config, items):
    # The cuda backend's cases (backend="cuda", or a test on `cuda_device`), selectable as a
    # group: the GPU session runs them with the `gpu` tests (-m "gpu or cuda_backend"), the
    # first run of csrc/cuda on real hardware.
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec else {}
        if ("cuda" in (params.get("backend"), params.get("linear_backend"), params.get("kernels"))
                or "cuda_device" in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cuda_backend)
    if HAS_CUDA:
        marker, skip = "cpu_only", pytest.mark.skip(
            reason="runs Triton on CPU tensors under the interpreter (CPU runs only)")
    else:
        marker, skip = "gpu", pytest.mark.skip(
            reason="needs a CUDA GPU and ALIGNFUSE_TEST_DEVICE=cuda "
                   "(bench/gpu_session.sh runs them on a lent GPU)")
    for item in items:
        if marker in item.keywords:
            item.add_marker(skip)
