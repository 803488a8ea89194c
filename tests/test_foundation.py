"""The package, its compiled modules and the backend dispatch."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignfuse.kernels import BackendUnavailable, backends, resolve, segment_mean, segment_sum
from helpers import assert_rel_close

ROOT = Path(__file__).resolve().parents[1]


def test_version_answers():
    assert importlib.metadata.version("alignfuse")


def test_no_bare_top_level_packages(tmp_path):
    # `kernels` is an existing PyPI package that transformers integrates with: never shadow it.
    code = ("import importlib.util as u, alignfuse.kernels, alignfuse.engine;"
            "print(u.find_spec('kernels') is None, u.find_spec('engine') is None)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["True", "True"]


@pytest.mark.slow
def test_pip_install_dot_layout(tmp_path):
    """`pip install .` (not editable) installs alignfuse/{kernels,engine} and nothing bare."""
    target = tmp_path / "site"
    env = {**os.environ, "ALIGNFUSE_BUILD_CUDA": "0"}  # the CUDA build is checked elsewhere
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(ROOT)],
                   env=env, check=True, capture_output=True)
    tops = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info")}
    assert "alignfuse" in tops and not tops & {"kernels", "engine"}, tops
    assert not (target / "alignfuse" / "__init__.py").exists()  # a namespace package
    code = ("import alignfuse.kernels, alignfuse.engine, alignfuse.engine._host, "
            "importlib.metadata as m; print(m.version('alignfuse'))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0.1.0"


def test_host_module_imports():
    host = importlib.import_module("alignfuse.engine._host")
    assert "compiler" in host.build_info()


NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
def test_cuda_module_was_built_and_imports():
    # nvcc is on every machine of this project: the install must have built the module.
    mod = backends.cuda_module()
    assert mod is not None, "nvcc is present but alignfuse.kernels._cuda was not built"
    assert "90a" in mod.build_info()["archs"]
    if not torch.cuda.is_available():
        assert mod.device_count() == 0


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_source_compiles(source, tmp_path):
    """Each CUDA source compiles for sm_90a with warnings as errors (object only: fast)."""
    import pybind11
    import sysconfig

    cmd = [NVCC, "-c", "-std=c++17", "-O1", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
           "-arch=sm_90a", "-I", pybind11.get_include(), "-I", sysconfig.get_paths()["include"],
           "-I", str(ROOT / "csrc" / "cuda"), str(ROOT / "csrc" / "cuda" / source),
           "-o", str(tmp_path / "k.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.skipif(NVCC is None, reason="nvcc not on PATH")
@pytest.mark.parametrize("source,kernels", [
    ("logprobs.cu", ("logprobs_forward_kernel", "logprobs_backward_kernel")),
    ("fused.cu", ("fused_chunk_kernel",))])
def test_row_kernels_load_16_bytes_at_a_time(source, kernels, tmp_path):
    """The kernels that stream [N, V] logits read them with 128-bit loads (row_sweep.cuh),
    in every dtype instantiation: the PTX (built as setup.py builds, -O3) of each has a
    ld.global[.nc].v4. A rewrite that falls back to element-wise loads still passes every
    correctness test, and would only show as a slower benchmark on a GPU."""
    import pybind11
    import re
    import sysconfig

    ptx = tmp_path / "k.ptx"
    cmd = [NVCC, "-ptx", "-std=c++17", "-O3", "-arch=compute_90", "-I", pybind11.get_include(),
           "-I", sysconfig.get_paths()["include"], "-I", str(ROOT / "csrc" / "cuda"),
           str(ROOT / "csrc" / "cuda" / source), "-o", str(ptx)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries = re.split(r"^\.visible \.entry |^\.entry ", ptx.read_text(), flags=re.M)[1:]
    for kernel in kernels:
        bodies = [e for e in entries if kernel in e.split("(", 1)[0]]
        assert bodies, f"no PTX entry for {kernel}"
        for body in bodies:
            assert re.search(r"\bld\.global(\.nc)?\.v4\.", body), \
                f"{body.split('(', 1)[0]}: no 128-bit global load"


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("segment_sum", "cudnn", "cpu")


def test_auto_is_torch_on_cpu():
    assert resolve("segment_sum", "auto", "cpu")[0] == "torch"


def test_env_overrides_auto(monkeypatch, device):
    monkeypatch.setenv("ALIGNFUSE_BACKEND", "triton")
    # the test device: Triton runs on CUDA, or on CPU under the interpreter (conftest)
    assert resolve("segment_sum", "auto", device)[0] == "triton"
    # an explicit backend= still wins over the environment
    assert resolve("segment_sum", "torch", "cpu")[0] == "torch"
    # ops without the forced backend keep "auto" instead of failing the whole run
    backends.register("_torch_only_op", "torch")(lambda x: x)
    assert resolve("_torch_only_op", "auto", "cpu")[0] == "torch"
    monkeypatch.setenv("ALIGNFUSE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ALIGNFUSE_BACKEND"):
        resolve("segment_sum", "auto", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_unavailable_backend_says_why():
    with pytest.raises(BackendUnavailable, match="cuda backend for segment_sum: .*(needs CUDA tensors|not built)"):
        segment_sum(torch.randn(5), torch.tensor([0, 5], dtype=torch.int32), backend="cuda")


def test_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        resolve("segment_sum", "triton", "cpu")


def test_op_without_backend_says_so():
    backends.register("_test_only_op", "torch")(lambda x: x)
    with pytest.raises(BackendUnavailable, match="has no triton implementation"):
        resolve("_test_only_op", "triton", "cpu")


@pytest.mark.parametrize("lengths", [[37], [1, 0, 5, 1030, 3], [0, 0]])
def test_segment_sum_and_mean(backend, device, lengths):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
    values = torch.randn(sum(lengths), dtype=torch.float64, device=device, requires_grad=True)
    expected = torch.stack([values[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])
    got = segment_sum(values, cu, backend=backend)
    assert got.dtype == torch.float64  # float64 stays float64, as in the torch reference
    # fp32 accumulation (triton, cuda): the error scales with sum |v|, not with a sum that
    # may nearly cancel, so each segment is held to 1e-6 of its sum of magnitudes
    magnitude = torch.stack([values[a:b].abs().sum() for a, b in zip(cu[:-1], cu[1:])])
    assert bool(((got.double() - expected).abs() <= 1e-6 * magnitude + 1e-12).all()), \
        (got, expected)
    weights = torch.randn(len(lengths), device=device, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((got * weights).sum(), values)
    (g_exp,) = torch.autograd.grad((expected * weights).sum(), values)
    assert_rel_close(g_got, g_exp, 1e-6, "segment_sum grad")
    lens = torch.tensor(lengths, dtype=torch.float64, device=device).clamp(min=1)
    mean = segment_mean(values, cu, backend=backend)
    assert mean.dtype == torch.float64
    assert bool(((mean - expected / lens).abs() <= (1e-6 * magnitude + 1e-12) / lens).all()), \
        (mean, expected / lens)


def test_segment_sum_gradcheck():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    values = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, cu, backend="torch"), (values,))


def test_segment_bad_input():
    with pytest.raises(ValueError, match="cu_seqlens must end at the number of tokens 5"):
        segment_sum(torch.randn(5), torch.tensor([0, 4], dtype=torch.int32))
    with pytest.raises(TypeError, match="values must have dtype"):
        segment_sum(torch.arange(5), torch.tensor([0, 5], dtype=torch.int32))


def test_triton_on_cpu_tensors_needs_the_cpu_only_marker(pytester):
    """The suite's own guard (conftest.py): on CPU, a test that launches a Triton kernel on
    CPU tensors fails unless it is marked cpu_only or takes `device`, because a CUDA run of
    the suite (ALIGNFUSE_TEST_DEVICE=cuda, no interpreter) would fail it."""
    if torch.cuda.is_available():
        pytest.skip("the guard runs on CPU machines")
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_guard='''
import pytest, torch, triton, triton.language as tl

@triton.jit
def _double(x, y, n: tl.constexpr):
    o = tl.arange(0, n)
    tl.store(y + o, 2 * tl.load(x + o))

def launch():
    x = torch.randn(8)
    y = torch.empty(8)
    _double[(1,)](x, y, 8)
    assert torch.equal(y, 2 * x)

def test_unmarked():
    launch()

@pytest.mark.cpu_only
def test_marked():
    launch()

def test_takes_device(device):
    launch()

def test_no_triton():
    assert torch.ones(2).sum() == 2
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore")
    # test_unmarked passes its call, then fails in teardown: counted as passed and error
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_unmarked*",
                                 "*mark it @pytest.mark.cpu_only*"])


def test_every_random_draw_of_the_suite_replays_from_its_seed():
    """conftest seeds torch, random and numpy's legacy generator per test; a generator made
    without a seed reads OS entropy instead, and the seed printed on failure would not draw the
    failing inputs again (a CI flake in test_packing went unreproducible that way)."""
    import re
    unseeded = re.compile(r"default_rng\(\s*\)|torch\.seed\(\s*\)|random\.Random\(\s*\)"
                          r"|torch\.Generator\([^)]*\)\.seed\(\s*\)")
    found = [f"{path.name}:{n}: {line.strip()}"
             for path in sorted((ROOT / "tests").rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if unseeded.search(line.split("#")[0]) and '"""' not in line]
    assert not found, "unseeded generators (use helpers.fresh_seed / fresh_rng):\n" + \
        "\n".join(found)


def test_cuda_backend_cases_carry_their_marker(request):
    """conftest marks every case that runs csrc/cuda `cuda_backend` (the GPU session selects
    them with -m "gpu or cuda_backend"): backend="cuda" (or linear_backend, kernels), and the
    tests on `cuda_device`; and nothing else."""
    marked = {item.nodeid for item in request.session.items
              if item.get_closest_marker("cuda_backend") is not None}
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec else {}
        is_cuda = "cuda" in (params.get("backend"), params.get("linear_backend"),
                             params.get("kernels"))
        is_cuda = is_cuda or "cuda_device" in item.fixturenames
        assert is_cuda == (item.nodeid in marked), item.nodeid
    # ... and the two tests that reach the cuda kernels through cuda_device are among them
    for name in ("test_cuda_logits_path_on_strided_rows",
                 "test_chunked_strategy_many_chunks_and_vocab_blocks"):
        mine = [n for n in marked if f"::{name}[" in n]
        collected = [i.nodeid for i in request.session.items if f"::{name}[" in i.nodeid]
        if collected:  # (run alone, the session holds only this file's tests)
            assert mine, name


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks, inside = [], None
    for line in text.splitlines():
        if inside is None and line.strip() == "```python":
            inside = []
        elif inside is not None and line.strip() == "```":
            blocks.append("\n".join(inside))
            inside = None
        elif inside is not None:
            inside.append(line)
    return blocks


def test_readme_python_snippets_run_as_written():
    """The README's Python blocks run against the current API, with only the names they
    take as given defined first (and HFRollout for VLLMRollout, the alternative the snippet
    names; vLLM's own path is tested in test_rollout/test_online)."""
    import copy
    import math

    from alignfuse.engine import GRPO, HFRollout, SamplingConfig
    from alignfuse.engine.tiny import tiny_model, tiny_tokenizer

    blocks = _readme_python_blocks()
    (online,) = [b for b in blocks if "GRPO(" in b]
    (ops,) = [b for b in blocks if "from alignfuse.kernels import" in b]
    tok = tiny_tokenizer()
    model = tiny_model("llama", len(tok), seed=0)
    scope = {"torch": torch, "GRPO": GRPO, "HFRollout": HFRollout, "tok": tok,
             "model": model, "ref": copy.deepcopy(model).eval().requires_grad_(False),
             "prompt_batches": [[{"prompt": "2+2=", "answer": "4"},
                                 {"prompt": "1+2=", "answer": "3"}]]}
    assert "VLLMRollout(model)" in online
    loop = online.index("for prompts in")
    exec(online[:loop].replace("VLLMRollout(model)", "HFRollout(model)"), scope)
    scope["grpo"].sampling = SamplingConfig(max_new_tokens=4, seed=0)  # short, for CPU
    exec(online[loop:], scope)
    assert math.isfinite(scope["metrics"]["loss"]) and 0 <= scope["metrics"]["reward"] <= 1

    gen = torch.Generator().manual_seed(37)
    S, N, H, V = 16, 37, 24, 1031
    lengths = torch.tensor([2] * (S - 1) + [N - 2 * (S - 1)])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)])
    pairs = [-torch.rand(4, generator=gen) * 10 for _ in range(4)]
    scope = {"hidden": torch.randn(N, H, generator=gen),
             "lm_head": torch.nn.Linear(H, V, bias=False),
             "targets": torch.randint(0, V, (N,), generator=gen),
             "pc": pairs[0], "pr": pairs[1], "rc": pairs[2], "rr": pairs[3],
             "rewards": torch.rand(S, generator=gen), "cu": cu,
             "old_logps": -torch.rand(N, generator=gen) * 5,
             "ref": -torch.rand(N, generator=gen) * 5}
    exec(ops, scope)
    assert scope["logps"].shape == scope["entropy"].shape == (N,)
    assert scope["losses"].shape == (4,) and scope["adv"].shape == (S,)
    assert math.isfinite(float(scope["loss"].detach()))
