"""The host emulation of CUDA (tests/cuda_emu) that runs csrc/cuda's kernels on CPU tensors.

The `cuda` cases of the backend-parametrized tests are only as good as the emulation under
them, so it is checked here with kernels written right and wrong on purpose
(tests/cuda_emu/selftest.cu): a missing barrier must change the answer with the order the
threads run in, a read across blocks with the order the blocks run in, a barrier that some threads skip must be an error, the warp shuffles and
block reductions must be exact, and 16-bit conversions must round as the device does.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cpu_only  # the emulated module exists on CPU runs only


@pytest.fixture
def emu(cuda_emu_module):
    yield cuda_emu_module
    cuda_emu_module.emu_schedule("shuffle", 0)


def broadcast(emu, mode: str, with_barrier: bool, blocks=3, threads=96) -> torch.Tensor:
    out = torch.full((blocks * threads,), -1.0)
    emu.emu_schedule(mode, 7)
    emu.emu_selftest_shared_broadcast(out.data_ptr(), blocks, threads, int(with_barrier))
    return out.view(blocks, threads)


def test_a_missing_barrier_shows_in_the_thread_order(emu):
    expected = torch.arange(1, 4, dtype=torch.float32)[:, None].expand(3, 96)
    for mode in ("forward", "reverse", "shuffle"):
        assert torch.equal(broadcast(emu, mode, with_barrier=True), expected), mode
    # without the barrier, thread 0's write reaches the others only when it happens to run first
    assert torch.equal(broadcast(emu, "forward", with_barrier=False), expected)
    assert not torch.equal(broadcast(emu, "reverse", with_barrier=False), expected)
    assert not torch.equal(broadcast(emu, "shuffle", with_barrier=False), expected)


def test_a_read_across_blocks_shows_in_the_block_order(emu):
    def chain(mode):
        out = torch.zeros(9)
        emu.emu_schedule(mode, 3)
        emu.emu_selftest_block_chain(out.data_ptr(), 9)
        return out

    in_order = torch.arange(1, 10, dtype=torch.float32)
    assert torch.equal(chain("forward"), in_order)
    assert not torch.equal(chain("reverse"), in_order)
    assert not torch.equal(chain("shuffle"), in_order)


@pytest.mark.parametrize("mode", ["forward", "reverse", "shuffle"])
def test_every_block_of_a_3d_grid_runs_once(emu, mode):
    out = torch.zeros(5 * 3 * 2)
    emu.emu_schedule(mode, 11)
    emu.emu_selftest_block_ids(out.data_ptr(), 5, 3, 2)
    assert torch.equal(out, torch.ones_like(out))


@pytest.mark.parametrize("threads", [32, 96, 256, 1024])
def test_block_sum_is_the_sum(emu, threads):
    blocks = 3
    x = torch.randn(blocks, threads)
    out = torch.empty(blocks)
    emu.emu_selftest_block_sums(x.data_ptr(), out.data_ptr(), blocks, threads, threads)
    # fp32 summation order differs from torch's: the error scales with the terms' magnitudes,
    # not with a sum that may cancel to ~0 (rtol * |sum| came within 0.92 of failing).
    bound = 1e-6 * x.abs().sum(1) + 1e-7
    assert ((out - x.sum(1)).abs() <= bound).all(), (out, x.sum(1))


def test_a_barrier_some_threads_skip_is_an_error(emu):
    x = torch.randn(2 * 128)
    out = torch.zeros(2)
    # whole warps return (96 live threads): their lanes miss no shuffle, only the barrier
    with pytest.raises(RuntimeError, match=r"__syncthreads reached by 96 of 128 threads"):
        emu.emu_selftest_block_sums(x.data_ptr(), out.data_ptr(), 2, 128, 96)
    # the module is usable again afterwards (the error is not sticky)
    emu.emu_selftest_block_sums(x.data_ptr(), out.data_ptr(), 2, 128, 128)
    torch.testing.assert_close(out, x.view(2, 128).sum(1), rtol=1e-5, atol=1e-5)


def test_a_shuffle_some_lanes_skip_is_an_error(emu):
    x = torch.randn(128)
    out = torch.zeros(1)
    # 40 live threads: warp 1 has 8 lanes in block_sum's first warp_sum and 24 returned
    with pytest.raises(RuntimeError, match=r"warp shuffle that thread \(\d+,0,0\) .* never reaches"):
        emu.emu_selftest_block_sums(x.data_ptr(), out.data_ptr(), 1, 128, 40)


@pytest.mark.parametrize("threads", [0, 1025, 2048])
def test_a_bad_launch_configuration_is_reported(emu, threads):
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emu.emu_selftest_block_sums(x.data_ptr(), x.data_ptr(), 1, threads, threads)
    with pytest.raises(RuntimeError, match="invalid configuration argument"):
        emu.emu_selftest_block_sums(x.data_ptr(), x.data_ptr(), 0, 32, 32)  # an empty grid


def test_warp_max_and_sum_reach_every_lane(emu):
    x = torch.randn(64)
    mx, sm = torch.empty(64), torch.empty(64)
    emu.emu_selftest_warp_ops(x.data_ptr(), mx.data_ptr(), sm.data_ptr(), 64)
    for w in range(2):
        lanes = slice(32 * w, 32 * w + 32)
        assert torch.equal(mx[lanes], x[lanes].max().expand(32))
        torch.testing.assert_close(sm[lanes], x[lanes].sum().expand(32), rtol=1e-5, atol=1e-5)


def test_16_bit_conversions_round_as_the_device(emu):
    """Round to nearest even, against torch's conversions: random values, the halfway cases
    of both formats, their overflow edges, subnormals, infinities and NaN."""
    g = torch.Generator().manual_seed(torch.initial_seed())
    random = torch.randn(4000, generator=g) * torch.logspace(-9, 6, 4000)
    # exact ties: a bf16 value plus half of its last place (float32 holds them exactly)
    bf = torch.randn(500, generator=g).to(torch.bfloat16).float()
    bf_ties = bf + bf.abs() * 2.0 ** -8 * torch.where(bf.abs() > 0, 1.0, 0.0)
    half = (torch.randn(500, generator=g) * 100).half().float()
    half_ties = torch.nextafter(half, torch.full_like(half, float("inf")))
    edges = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -65520.0, 6e-8, 3e-8, 1e-40,
                          3.3895314e38, 3.4028235e38, float("inf"), float("-inf")])
    x = torch.cat([random, bf_ties, half_ties, edges])
    got_bf, got_half = torch.empty_like(x), torch.empty_like(x)
    emu.emu_selftest_round_trip(x.data_ptr(), got_bf.data_ptr(), got_half.data_ptr(), x.numel())
    assert torch.equal(got_bf, x.bfloat16().float())
    assert torch.equal(got_half, x.half().float())
    nan = torch.tensor([float("nan")])
    emu.emu_selftest_round_trip(nan.data_ptr(), got_bf.data_ptr(), got_half.data_ptr(), 1)
    assert got_bf[0].isnan() and got_half[0].isnan()


SWEEP_DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16),
                (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("x_dtype,y_dtype", SWEEP_DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("V", [1, 5, 37, 1031, 4099])
def test_row_sweeps_visit_every_element_once(emu, x_dtype, y_dtype, V):
    """row_sweep.cuh's sweep_row and map_row on rows of every alignment: row starts at each
    element offset within 16 bytes, a row stride that shifts the alignment from row to row,
    and an output row in another phase than the input's (element-wise stores) or the same
    (packed stores). Every element is visited once, with its own index, and nothing outside
    the rows is written."""
    from alignfuse.kernels.backends import cuda_dtype_code

    g = torch.Generator().manual_seed(torch.initial_seed())
    rows = 5
    for x_offset, x_pad, y_offset, y_pad, threads in [(0, 0, 0, 0, 256), (1, 3, 1, 3, 256),
                                                      (3, 1, 0, 0, 96), (5, 0, 2, 1, 32),
                                                      (7, 9, 7, 9, 1024)]:
        x_stride, y_stride = V + x_pad, V + y_pad
        x_buf = torch.full((x_offset + rows * x_stride + 16,), float("nan"), dtype=x_dtype)
        x = x_buf[x_offset:x_offset + rows * x_stride].view(rows, x_stride)[:, :V]
        x.copy_(torch.randn(rows, V, generator=g))
        y_buf = torch.full((y_offset + rows * y_stride + 16,), -7.0, dtype=y_dtype)
        y = y_buf[y_offset:y_offset + rows * y_stride].view(rows, y_stride)[:, :V]
        visits = torch.zeros(rows * V + 16)
        emu.emu_selftest_row_sweep(x.data_ptr(), cuda_dtype_code(x), rows, V, x_stride,
                                   visits.data_ptr(), y.data_ptr(), cuda_dtype_code(y), y_stride,
                                   threads)
        where = f"x offset {x_offset}, stride {x_stride}; y offset {y_offset}, stride {y_stride}"
        assert torch.equal(visits[:rows * V], torch.ones(rows * V)), where
        assert torch.equal(visits[rows * V:], torch.zeros(16)), where
        assert torch.equal(y, x.to(y_dtype)), where
        outside = torch.ones_like(y_buf, dtype=torch.bool)
        outside[y_offset:y_offset + rows * y_stride].view(rows, y_stride)[:, :V] = False
        assert torch.equal(y_buf[outside], torch.full_like(y_buf[outside], -7.0)), where


def test_a_misaligned_packed_access_is_an_error(emu):
    x = torch.randn(64)
    out = torch.zeros(1)
    emu.emu_selftest_packed_load(x.data_ptr(), 4, out.data_ptr())  # 16 bytes in: aligned
    assert out[0] == x[4]
    with pytest.raises(RuntimeError, match=r"misaligned address: a 16-byte access at 0x[0-9a-f]+ "
                                           r"by thread \(\d+,0,0\) of block \(0,0,0\)"):
        emu.emu_selftest_packed_load(x.data_ptr(), 1, out.data_ptr())


def test_the_build_cache_key_covers_every_file_it_compiles():
    """The emulated module is cached by a hash of its inputs: a header left out of it (the
    .cuh files once were) keeps serving a stale build after that header changes."""
    import pathlib

    from cuda_emu.build import CUDA_SOURCES, HERE, hashed_files

    every = {p for p in pathlib.Path(CUDA_SOURCES).iterdir() if p.suffix in (".cu", ".cuh", ".h")}
    every |= {p for p in pathlib.Path(HERE).rglob("*") if p.suffix in (".cu", ".cpp", ".h")}
    assert every and every <= set(hashed_files())


def test_schedule_names_are_checked(emu):
    with pytest.raises(ValueError, match="mode must be forward, reverse or shuffle"):
        emu.emu_schedule("sideways", 0)


def test_the_emulated_module_has_the_compiled_modules_functions(emu):
    """Every function of csrc/cuda (the names its files register) is in the emulated module,
    built from the same files."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    names = set()
    for path in (root / "csrc" / "cuda").glob("*.cu"):
        names |= set(re.findall(r'm\.def\(\s*"(\w+)"', path.read_text()))
    assert {"logprobs_forward", "fused_chunk_loss", "policy_loss", "dpo_loss"} <= names
    assert all(hasattr(emu, name) for name in names), sorted(n for n in names if not hasattr(emu, n))
    assert emu.build_info()["cuda_runtime"] == 0  # the emulation's mark
