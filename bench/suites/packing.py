"""`packing`: padding efficiency and packer speed on long-tailed sequence lengths.

Lengths are lognormal (median `median_len`, log-sigma `sigma_log`, clipped to
[1, max_len]): most sequences are short, a few are very long, as in chat and reasoning
data. Recorded per case:
- metrics: real tokens / allocated token slots for alignfuse's packing (every micro-batch
  allocates `max_tokens` slots), for its padded plan (`pack(padded=True)`, for models
  that run on padded rows: sequences x the longest per micro-batch) and for padding in
  the given order and after sorting by length (a length-grouped sampler, padding's best
  case); see `efficiency`.
- speed: `alignfuse.engine.pack` with the C++ and the Python planner, against building
  length-sorted padded batches with `torch.nn.utils.rnn.pad_sequence` (the baseline).
  Each contender's output is checked: every sequence appears once with all its tokens.

Packing is host work: it is timed with perf_counter on the CPU in every preset, and it has
no physical floor (the floor fields are null). So it is not in the GPU session's plan (a GPU
adds nothing to it); run it on a CPU: `python -m bench run --preset cpu --suites packing`
(or, at the `gpu` preset's sizes, `--preset gpu-full --suites packing` on a GPU machine).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch

from ..harness import Case, Contender, InputSet, run_case
from .common import alignfuse_op, op_unavailable

SUITE = "packing"
HOST = torch.device("cpu")


def lognormal_lengths(n: int, median: float, sigma: float, max_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, max_len).astype(np.int64)


def _sequences(lengths: np.ndarray, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(1, 32000, int(lengths.sum()), dtype=np.int64)  # never all zeros
    return np.split(tokens, np.cumsum(lengths)[:-1])


def _pack_contender(planner: str, max_tokens: int) -> Contender:
    def run(t):
        pack = alignfuse_op("engine", "pack")
        batches = pack(t["sequences"], max_tokens=max_tokens, backend=planner)
        counts = torch.zeros(len(t["sequences"]), dtype=torch.float64)
        for b in batches:
            counts.index_add_(0, b.seq_index, torch.diff(b.cu_seqlens).to(torch.float64))
        return {"tokens_per_sequence": counts}

    def unavailable(device):
        why = op_unavailable("engine", "pack")
        if why:
            return why
        if planner == "cpp":
            try:
                from alignfuse.engine import _host
            except ImportError as exc:
                return f"the C++ module alignfuse.engine._host is not built ({exc})"
            if not hasattr(_host, "plan_bins"):
                return "alignfuse.engine._host has no plan_bins (C++ planner not built)"
        return None

    return Contender(f"alignfuse/{planner}", "subject", run, unavailable,
                     note=f"alignfuse.engine.pack(max_tokens={max_tokens}, backend={planner!r})")


def _padded_sorted(batch_size: int) -> Contender:
    def run(t):
        seqs = t["sequences"]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        counts = torch.zeros(len(seqs), dtype=torch.float64)
        for lo in range(0, len(order), batch_size):
            idx = order[lo:lo + batch_size]
            batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(seqs[i]) for i in idx],
                                                    batch_first=True)
            mask = torch.nn.utils.rnn.pad_sequence(
                [torch.ones(len(seqs[i]), dtype=torch.bool) for i in idx], batch_first=True)
            counts[idx] = mask.sum(1).to(torch.float64)
            del batch
        return {"tokens_per_sequence": counts}

    return Contender("padded-sorted", "baseline", run,
                     note=f"sort by length, pad_sequence in batches of {batch_size}")


def _padded_efficiency(lengths: np.ndarray, batch_size: int) -> float:
    slots = sum(int(lengths[i:i + batch_size].max()) * lengths[i:i + batch_size].size
                for i in range(0, lengths.size, batch_size))
    return float(lengths.sum()) / slots


def efficiency(lengths: np.ndarray, max_tokens: int) -> dict:
    """Real tokens / allocated slots: packed, the padded plan (`pack(padded=True)`:
    sequences x the longest per micro-batch), and padded at several batch sizes.

    At the packer's token budget, padding fits only `max_tokens // longest` sequences per
    batch (1 with a long tail), so it pays in steps rather than in slots: both the step
    counts and the efficiency at fixed batch sizes of 8 and 32 (in the given order, and
    sorted by length) are recorded.
    """
    padding_efficiency = alignfuse_op("engine", "padding_efficiency")
    budget_batch = max(1, max_tokens // int(lengths.max()))
    out = {"sequences": int(lengths.size), "real_tokens": int(lengths.sum()),
           "max_tokens": max_tokens, "length_median": float(np.median(lengths)),
           "length_p99": float(np.percentile(lengths, 99)), "length_max": int(lengths.max()),
           "padded_batch_size_at_budget": budget_batch,
           "padded_steps_at_budget": -(-lengths.size // budget_batch)}
    for b in (8, 32):
        out[f"efficiency_padded_b{b}"] = _padded_efficiency(lengths, b)
        out[f"efficiency_padded_sorted_b{b}"] = _padded_efficiency(np.sort(lengths), b)
    if padding_efficiency is None:
        out["efficiency_packed"] = None
        out["efficiency_reason"] = "alignfuse.engine.padding_efficiency not implemented yet"
        return out
    eff = padding_efficiency(lengths, max_tokens=max_tokens, batch_size=budget_batch)
    out.update(efficiency_packed=eff.packed, packed_steps=eff.num_micro_batches)
    # The padded plan (pack(padded=True)), for models that run on padded rows: what its
    # micro-batches allocate is sequences x the longest, within max_tokens.
    plan = alignfuse_op("engine", "plan_micro_batches")(lengths, max_tokens=max_tokens,
                                                          padded=True)[0]
    out.update(efficiency_padded_plan=out["real_tokens"] / sum(
        b.size * int(lengths[b].max()) for b in plan), padded_plan_steps=len(plan))
    return out


def run(preset, device, cfg, ceilings, log, on_progress=None) -> list[dict]:
    p = preset.packing
    if not p:
        return []
    n, max_tokens = p["sequences"], p["max_tokens"]
    late = time.monotonic() > cfg.deadline  # then nothing is drawn or packed
    lengths = None if late else lognormal_lengths(n, p["median_len"], p["sigma_log"],
                                                  p["max_len"], seed=0)
    # Padding at the packer's token budget fits one long-tail sequence per batch; the
    # baseline builds batches of 8 (as a length-grouped sampler would), which is faster.
    batch_size = 8 if late else max(8, max_tokens // int(lengths.max()))

    def make_inputs(seed: int) -> InputSet:
        ls = lengths if seed == 0 else lognormal_lengths(n, p["median_len"], p["sigma_log"],
                                                         p["max_len"], seed)
        return InputSet({"sequences": _sequences(ls, seed), "lengths": torch.from_numpy(ls)})

    def reference(s: InputSet):
        return {"tokens_per_sequence": s.tensors["lengths"].to(torch.float64)}

    case = Case(SUITE, f"lognormal,sequences={n},max_tokens={max_tokens}",
                {"sequences": n, "max_tokens": max_tokens, "median_len": p["median_len"],
                 "sigma_log": p["sigma_log"], "max_len": p["max_len"]},
                make_inputs, reference,
                [_pack_contender("cpp", max_tokens), _pack_contender("python", max_tokens),
                 _padded_sorted(batch_size)],
                {"*": 0.0}, modes=("fwd",),
                notes="host work timed on the CPU; no physical floor. 'fwd' = one call.")
    # Input sets hold Python lists, so rotation by bytes does not apply: two sets.
    host_cfg = replace(cfg, rotate_bytes=0, max_sets=2, warmup=min(cfg.warmup, 1),
                       max_reps=min(cfg.max_reps, 5), min_reps=min(cfg.min_reps, 3))
    record = run_case(case, HOST, host_cfg, None, log, on_progress=on_progress)
    if late:
        return [record]
    record["metrics"] = m = efficiency(lengths, max_tokens)
    log(f"  packing: efficiency packed={m.get('efficiency_packed')} in {m.get('packed_steps')} "
        f"steps; padded plan {m.get('efficiency_padded_plan', float('nan')):.3f} in "
        f"{m.get('padded_plan_steps')} steps; padded (batch 8) {m['efficiency_padded_b8']:.3f}, sorted "
        f"{m['efficiency_padded_sorted_b8']:.3f}; padded at the same budget: "
        f"{m['padded_steps_at_budget']} steps")
    return [record]
