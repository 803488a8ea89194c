"""The two physical ceilings, measured in the same run as the benchmarks they judge.

- matmul: a large matrix product in the benchmark's dtype (bf16 on GPU) on random normal
  inputs, FLOP/s = 2·M·N·K / median time. Zeros would run faster (METHOD.md), so never.
- copy: a large device-to-device copy, bytes/s = (bytes read + bytes written) / median time.

Both are timed with the harness's own timer (CUDA events on GPU, perf_counter on CPU) over
two rotated input sets, after warm-up. Datasheet numbers are leads; these are the ceilings.
"""

from __future__ import annotations

import torch

from .harness import Timer, free_memory, summarize, synchronize


def _timed(fn, sets: list, device: torch.device, warmup: int, reps: int) -> dict:
    for i in range(warmup):
        fn(sets[i % len(sets)])
    synchronize(device)
    timer = Timer(device)
    for i in range(reps):
        started = timer.start()
        fn(sets[i % len(sets)])
        timer.stop(started)
    return summarize(timer.seconds())


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, reps: int = 10) -> dict:
    gen = torch.Generator(device=device).manual_seed(1234)
    sets = [(torch.randn(size, size, device=device, dtype=dtype, generator=gen),
             torch.randn(size, size, device=device, dtype=dtype, generator=gen))
            for _ in range(2)]
    out = torch.empty(size, size, device=device, dtype=dtype)
    stats = _timed(lambda ab: torch.matmul(ab[0], ab[1], out=out), sets, device, 3, reps)
    flops = 2.0 * size ** 3
    sets.clear()
    free_memory(device)
    return {"what": f"{size}x{size}x{size} matmul, random normal inputs",
            "dtype": str(dtype).removeprefix("torch."), "flops": flops, "time_s": stats,
            "flops_per_s": flops / stats["median"]}


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> dict:
    numel = nbytes // 4
    gen = torch.Generator(device=device).manual_seed(4321)
    sets = [torch.randn(numel, device=device, generator=gen) for _ in range(2)]
    dst = torch.empty(numel, device=device)
    stats = _timed(lambda src: dst.copy_(src), sets, device, 3, reps)
    moved = 2.0 * numel * 4  # read + write
    sets.clear()
    free_memory(device)
    return {"what": f"device-to-device copy of {numel * 4 / 2**20:.0f} MiB (read + write counted)",
            "bytes": moved, "time_s": stats, "bytes_per_s": moved / stats["median"]}


def measure(device: torch.device, dtype: torch.dtype, matmul_size: int, copy_bytes: int) -> dict:
    """Both ceilings: {"matmul": {..., "flops_per_s"}, "copy": {..., "bytes_per_s"}}."""
    return {"matmul": matmul_rate(device, dtype, matmul_size),
            "copy": copy_bandwidth(device, copy_bytes)}
