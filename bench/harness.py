"""The measuring core: one case, several contenders, each checked, then timed.

Method (device README METHOD.md):
- Inputs are random normal, never zeros (zeros hide unwritten outputs and run faster), and
  there are several input sets, rotated between runs so that caches do not flatter; on GPU,
  where they are too small for that, a buffer larger than the L2 is overwritten before
  each run (outside the timed region).
- Before any timing, each contender runs on input set 0 and its outputs (and gradients,
  for modes with a backward) are compared with the case's reference by relative norm
  ||out - ref|| / ||ref||. NaN fails. The result is recorded; a contender that fails its
  check is still timed, but recorded as status "wrong".
- Warm-up first (module load, Triton compilation, cuBLAS handles), then the median of
  many runs, each bracketed by its own pair of CUDA events on GPU or perf_counter on CPU.
- Peak memory comes from a separate untimed run: torch.cuda.max_memory_allocated() minus
  the memory allocated before the run (the live inputs). CPU tensors have no such
  counter, so on CPU it is null, with the reason.
- A contender that cannot run here (not installed, no GPU, op not written yet) is
  recorded as skipped with the reason; one that raises is recorded as an error.
- After an error the CUDA context is probed (a synchronize): a sticky fault (an illegal
  memory access) breaks every later CUDA call in the process, so the case stops there,
  later contenders are recorded as skipped with that reason, and `ContextLost` carries the
  record to the runner, which writes what it has and stops the run. Cleanup never raises.
- A case that starts after the deadline builds nothing (no inputs, no reference): every
  contender is recorded as skipped for time. Within a contender, a mode whose runs
  (warm-ups, the fewest timed runs, the peak-memory run) would not fit in the time left,
  at the cost of its first warm-up, is skipped for time with that estimate instead of
  overrunning; a contender with no mode timed is "skipped", never "ok". Every such
  reason says "time budget" (the runner counts them: `budget_exhausted`).
- Contenders named by `TimingConfig.exclude` (`python -m bench run --exclude`) never run:
  they are recorded as skipped, "excluded by --exclude".

Modes: "fwd" is a training forward (inputs require grad, so the contender saves what its
backward needs); "bwd" times only the backward of a forward run just before it; "fwd+bwd"
times both.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
import traceback
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
STATUSES = ("ok", "wrong", "skipped", "error")
# In every reason for a skip for time (contender, mode or case): what the runner counts.
TIME_BUDGET = "time budget"
EXCLUDED = "excluded by --exclude"

Tensors = dict[str, torch.Tensor]


class Unavailable(Exception):
    """Raised by a contender that cannot run here; the message says why."""


class OutOfTime(Exception):
    """A mode whose estimated runs do not fit in the time left (`estimate_s`: their total)."""

    def __init__(self, reason: str, estimate_s: float):
        super().__init__(reason)
        self.estimate_s = estimate_s


class ContextLost(Exception):
    """The CUDA context is broken (a sticky error such as an illegal memory access): nothing
    more can run in this process. `record` is the case record so far: the contenders that
    finished, the one that broke it (status error), the later ones skipped with the reason."""

    def __init__(self, reason: str, record: dict):
        super().__init__(reason)
        self.reason, self.record = reason, record


@dataclass
class InputSet:
    """One set of inputs. `upstream` is the gradient fed to backward (random, never zeros)."""

    tensors: Tensors
    upstream: torch.Tensor | None = None


@dataclass
class Contender:
    """One implementation of a case.

    `run(tensors) -> {output name: tensor}` must not read the upstream gradient.
    `unavailable(device) -> reason or None` is asked before anything runs.
    `role` is "subject" (alignfuse) or "baseline" (what we compare against).
    """

    name: str
    role: str
    run: Callable[[Tensors], Tensors]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    note: str = ""


@dataclass
class Case:
    """One problem at one size.

    `make_inputs(seed)` builds an input set on the device. `reference(input_set)` returns
    the values to check against, computed in higher precision: output names as returned by
    the contenders, and "grad_<input>" for each name in `grad_inputs` (the gradient of
    `<grad_output> · upstream`). `work(mode)` returns {"flops": F, "bytes": B} of the least
    work the mode must do (each input read once, each output written once), or None; an
    "out_bytes" key (optional) is the memory every implementation leaves allocated (the
    outputs and the inputs' gradients), which the peak memory is reported against.
    """

    suite: str
    name: str
    sizes: dict
    make_inputs: Callable[[int], InputSet]
    reference: Callable[[InputSet], Tensors]
    contenders: list[Contender]
    tolerances: dict[str, float]
    modes: tuple[str, ...] = MODES
    grad_inputs: tuple[str, ...] = ()
    grad_output: str | None = None
    work: Callable[[str], dict | None] = lambda mode: None
    notes: str = ""
    # Why the case cannot run at all here (e.g. its reference op has not landed yet).
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    # Called before the peak-memory baseline is read: state the contenders keep between
    # runs (a model's parameter .grad) must not count as live inputs, or a run that frees
    # it (zero_grad(set_to_none=True)) would look smaller than it is.
    reset: Callable[[], None] = lambda: None


@dataclass
class TimingConfig:
    warmup: int = 3            # untimed runs before timing
    min_reps: int = 5
    max_reps: int = 50
    target_s: float = 1.0      # aim for this much timed work per contender and mode
    rotate_bytes: int = 256 << 20  # rotate input sets until they span this many bytes
    max_sets: int = 4
    deadline: float = math.inf  # time.monotonic() after which nothing new starts
    # Contenders never run, only recorded as skipped (`--exclude`): names, name prefixes or
    # fnmatch patterns ("cce", "liger", "*/cuda"), optionally only in some cases
    # ("linear_*:liger"); see `excluded_by`.
    exclude: tuple[str, ...] = ()


def excluded_by(name: str, patterns: tuple[str, ...], case: str | None = None) -> str | None:
    """The first of `patterns` that names contender `name` (equal, a prefix of it, or an
    fnmatch pattern matching it), or None. A pattern "CASES:CONTENDER" names the contender
    only in cases whose name matches the fnmatch pattern CASES ("linear_*:liger": Liger's
    chunked losses, not its logprobs); without a `case` it names nothing."""
    def names(p: str) -> bool:
        if ":" in p:
            cases, _, p = p.partition(":")
            if case is None or not fnmatch(case, cases):
                return False
        return bool(p) and (name.startswith(p) or fnmatch(name, p))

    return next((p for p in patterns if p and names(p)), None)


# ---------------------------------------------------------------------------------------
# Device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Never raises: it runs in `finally` blocks and between cases, and once the CUDA context
    is broken, empty_cache() re-raises the sticky error (context_error says so instead)."""
    try:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - cleanup must not hide the records made so far
        pass


def context_error(device: torch.device) -> str | None:
    """None while the device still works; else why (a sticky CUDA error re-raised by a
    synchronize: after it, every CUDA call in this process fails)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001
        return _error_reason(exc)
    return None


class Timer:
    """Times regions: one pair of CUDA events per region on GPU, perf_counter on CPU.

    Regions are read back only in `seconds()`, after one synchronize, so timing does not
    add host-device round trips between runs.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._events: list[tuple] = []
        self._host: list[float] = []

    def start(self):
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def stop(self, started) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._events.append((started, ev))
        else:
            self._host.append(time.perf_counter() - started)

    def seconds(self) -> list[float]:
        if self.device.type == "cuda":
            synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in self._events]
        return list(self._host)


def summarize(samples: list[float]) -> dict:
    """Median and spread of timed runs (pytest-benchmark's Stats, plus p10/p90)."""
    try:
        from pytest_benchmark.stats import Stats
    except ImportError:  # the same statistics without it (it is in the test and bench extras)
        Stats = None
    if Stats is not None:
        stats = Stats()
        for s in samples:
            stats.update(s)
        out = {k: float(getattr(stats, k)) for k in
               ("median", "q1", "q3", "iqr", "min", "max", "mean", "stddev")}
    else:
        q1, _, q3 = (statistics.quantiles(samples, n=4) if len(samples) >= 2
                     else [samples[0]] * 3)
        out = {"median": statistics.median(samples), "q1": q1, "q3": q3, "iqr": q3 - q1,
               "min": min(samples), "max": max(samples), "mean": statistics.fmean(samples),
               "stddev": statistics.stdev(samples) if len(samples) >= 2 else 0.0}
    if len(samples) >= 2:
        deciles = statistics.quantiles(samples, n=10, method="inclusive")
        out["p10"], out["p90"] = float(deciles[0]), float(deciles[-1])
    else:
        out["p10"] = out["p90"] = float(samples[0])
    out["rounds"] = len(samples)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64 (NaN or a shape mismatch gives NaN)."""
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        return math.nan
    a = actual.detach().to(torch.float64) if actual.numel() < (1 << 24) else actual.detach().float()
    e = expected.detach().to(a.dtype)
    denom = float(torch.linalg.vector_norm(e))
    return float(torch.linalg.vector_norm(a - e)) / max(denom, 1e-30)


# ---------------------------------------------------------------------------------------
# One contender


def _fresh_grads(case: Case, inputs: InputSet) -> None:
    for name in case.grad_inputs:
        inputs.tensors[name].grad = None


def _run_mode(case: Case, contender: Contender, inputs: InputSet, mode: str,
              timer: Timer | None) -> Tensors:
    """Run one mode once; when `timer` is given, time the mode's region."""
    _fresh_grads(case, inputs)
    if mode == "fwd":
        started = timer.start() if timer else None
        out = contender.run(inputs.tensors)
        if timer:
            timer.stop(started)
        return out
    if mode == "bwd":
        out = contender.run(inputs.tensors)
        started = timer.start() if timer else None
        out[case.grad_output].backward(inputs.upstream)
        if timer:
            timer.stop(started)
        return out
    if mode == "fwd+bwd":
        started = timer.start() if timer else None
        out = contender.run(inputs.tensors)
        out[case.grad_output].backward(inputs.upstream)
        if timer:
            timer.stop(started)
        return out
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check(case: Case, contender: Contender, inputs: InputSet, reference: Tensors) -> dict:
    """Compare the contender's outputs (and gradients, when the case has a backward)."""
    backward = case.grad_output is not None and any(m != "fwd" for m in case.modes)
    out = _run_mode(case, contender, inputs, "fwd+bwd" if backward else "fwd", None)
    errors = {}
    for key, ref in reference.items():
        if key.startswith("grad_"):
            if not backward:
                continue
            got = inputs.tensors[key.removeprefix("grad_")].grad
        else:
            got = out.get(key)
        errors[key] = rel_err(got, ref) if got is not None else math.nan
    _fresh_grads(case, inputs)
    failed = [k for k, e in errors.items()
              if not (e <= case.tolerances.get(k, case.tolerances.get("*", 0.0)))]
    return {"passed": not failed, "rel_err": errors,
            "tolerance": {k: case.tolerances.get(k, case.tolerances.get("*")) for k in errors},
            "failed": failed}


def time_mode(case: Case, contender: Contender, sets: list[InputSet], mode: str,
              device: torch.device, cfg: TimingConfig, estimate: float | None = None) -> dict:
    """Warm up, then time `mode` over rotated input sets; returns the summary.

    Raises `OutOfTime` when the mode's runs (warm-ups, `min_reps` timed runs and the
    peak-memory run) would not fit before `cfg.deadline`, judged from the first warm-up (the
    check before it compiled what it needs) or, without warm-ups, from `estimate` (seconds
    of one run, e.g. the check's). Timed runs are capped to what fits, never under min_reps.
    """
    # Warm up on every input set: a new shape may compile (Triton autotuning, flex attention).
    warmup = 0 if cfg.warmup == 0 else max(cfg.warmup, len(sets))
    t0 = time.perf_counter()
    if warmup:
        _run_mode(case, contender, sets[0], mode, None)
        synchronize(device)
    first = time.perf_counter() - t0 if warmup else (estimate or 0.0)
    runs = max(warmup - 1, 0) + cfg.min_reps + 1
    left = cfg.deadline - time.monotonic()
    if first * runs > left:
        raise OutOfTime(f"{TIME_BUDGET}: {runs} more runs of ~{first:.3g} s "
                        f"(~{first * runs:.3g} s: warm-ups, {cfg.min_reps} timed, 1 for "
                        f"memory) do not fit in the {max(left, 0):.3g} s left", first * runs)
    for i in range(1, warmup):
        _run_mode(case, contender, sets[i % len(sets)], mode, None)
    synchronize(device)
    per_run = (time.perf_counter() - t0) / warmup if warmup else first
    reps = int(min(cfg.max_reps, max(cfg.min_reps, math.ceil(cfg.target_s / max(per_run, 1e-6)))))
    if math.isfinite(cfg.deadline) and per_run > 0:  # less the peak-memory run
        fit = int((cfg.deadline - time.monotonic()) / per_run) - 1
        reps = max(cfg.min_reps, min(reps, fit))
    # Inputs too small to leave the L2 by rotation alone: overwrite a buffer larger than it
    # before each run (outside the timed region), as triton.testing.do_bench does.
    flush = None
    if device.type == "cuda" and len(sets) * _input_bytes(sets[0]) < cfg.rotate_bytes:
        flush = torch.empty(cfg.rotate_bytes // 4, dtype=torch.int32, device=device)
    timer = Timer(device)
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        _run_mode(case, contender, sets[i % len(sets)], mode, timer)
    samples = timer.seconds()
    _fresh_grads(case, sets[0])
    return {**summarize(samples), "l2_flushed": flush is not None}


def peak_memory(case: Case, contender: Contender, inputs: InputSet, mode: str,
                device: torch.device) -> tuple[int | None, str | None]:
    """Bytes allocated above the live inputs during one run of `mode` (GPU), or (None, why)."""
    if device.type != "cuda":
        return None, ("CPU: torch keeps no peak-allocation counter for CPU tensors, and the "
                      "process RSS high-water mark cannot be reset between contenders")
    _fresh_grads(case, inputs)
    case.reset()
    free_memory(device)
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = _run_mode(case, contender, inputs, mode, None)
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    _fresh_grads(case, inputs)
    return int(peak), None


def _error_reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 600:
        text = text[:600] + " ..."
    return text


def run_contender(case: Case, contender: Contender, sets: list[InputSet], reference: Tensors,
                  device: torch.device, cfg: TimingConfig) -> dict:
    record = {"name": contender.name, "role": contender.role, "note": contender.note,
              "status": "skipped", "reason": None, "check": None, "modes": {}}
    why = contender.unavailable(device)
    if why:
        record["reason"] = why
        return record
    if time.monotonic() > cfg.deadline:
        record["reason"] = f"the run's {TIME_BUDGET} was spent before this contender started"
        return record
    try:
        started = time.perf_counter()
        record["check"] = check(case, contender, sets[0], reference)
        check_s = time.perf_counter() - started  # one fwd+bwd, compiles included
        record["status"] = "ok" if record["check"]["passed"] else "wrong"
        out_of_time = None  # a mode that did not fit: the later ones cost no less
        for mode in case.modes:
            if out_of_time is None and time.monotonic() > cfg.deadline:
                out_of_time = {"status": "skipped", "reason": f"the run's {TIME_BUDGET} was spent"}
            if out_of_time is None:
                try:
                    timing = time_mode(case, contender, sets, mode, device, cfg, check_s)
                except OutOfTime as exc:
                    out_of_time = {"status": "skipped", "reason": str(exc),
                                   "estimate_s": exc.estimate_s}
            if out_of_time is not None:
                record["modes"][mode] = dict(out_of_time)
                continue
            peak, peak_why = peak_memory(case, contender, sets[0], mode, device)
            record["modes"][mode] = {"status": "ok", "time_s": timing,
                                     "peak_memory_bytes": peak,
                                     "peak_memory_reason": peak_why}
        late = [m for m, v in record["modes"].items() if v["status"] == "skipped"]
        if late:
            record["modes_skipped_for_time"] = late
        if late and len(late) == len(case.modes) and record["status"] == "ok":
            # Checked, never timed: not "ok" (a report would show it as a result).
            record.update(status="skipped", reason=(
                f"{TIME_BUDGET}: passed its check, but no mode was timed "
                f"({record['modes'][late[0]]['reason']})"))
    except Unavailable as exc:
        record.update(status="skipped", reason=str(exc))
    except Exception as exc:  # recorded, never silently dropped
        record.update(status="error", reason=_error_reason(exc))
        record["traceback_tail"] = traceback.format_exc(limit=-3)[-1500:]
    finally:
        for s in sets:
            _fresh_grads(case, s)
        free_memory(device)
    return record


# ---------------------------------------------------------------------------------------
# One case


def _input_bytes(inputs: InputSet) -> int:
    return sum(t.numel() * t.element_size() for t in inputs.tensors.values()
               if isinstance(t, torch.Tensor))


def make_sets(case: Case, cfg: TimingConfig) -> list[InputSet]:
    """Enough input sets to span `cfg.rotate_bytes` (at least 2, at most `cfg.max_sets`)."""
    first = case.make_inputs(0)
    size = max(_input_bytes(first), 1)
    count = int(min(cfg.max_sets, max(2, math.ceil(cfg.rotate_bytes / size))))
    return [first] + [case.make_inputs(seed) for seed in range(1, count)]


def derived(contenders: list[dict], work: Callable[[str], dict | None],
            ceilings: dict | None) -> None:
    """Fill ratios to each baseline and the fraction of the physical floor, per mode."""
    baselines = [c for c in contenders if c["role"] == "baseline"]
    for c in contenders:
        for mode, m in c["modes"].items():
            if m.get("status") != "ok":
                continue
            t = m["time_s"]["median"]
            m["speedup_vs"], m["memory_ratio_vs"] = {}, {}
            for b in baselines:
                bm = b["modes"].get(mode, {})
                if b is c or bm.get("status") != "ok":
                    continue
                m["speedup_vs"][b["name"]] = bm["time_s"]["median"] / t
                if m["peak_memory_bytes"] is not None and bm.get("peak_memory_bytes"):
                    m["memory_ratio_vs"][b["name"]] = (m["peak_memory_bytes"]
                                                       / bm["peak_memory_bytes"])
            w = work(mode)
            m["floor"] = floor(w, ceilings, t)
            m["extra_memory_bytes"] = extra_memory(m["peak_memory_bytes"], w)


def extra_memory(peak: int | None, w: dict | None) -> int | None:
    """The peak above what the mode must leave allocated (its outputs and the inputs'
    gradients, `out_bytes` of the case's work model), or None where either is unknown."""
    if peak is None or not w or w.get("out_bytes") is None:
        return None
    return peak - w["out_bytes"]


def floor(w: dict | None, ceilings: dict | None, seconds: float) -> dict | None:
    """The least time the work can take at the measured ceilings, and its fraction of `seconds`."""
    if not w or not ceilings:
        return None
    rate = ceilings.get("matmul", {}).get("flops_per_s")
    bandwidth = ceilings.get("copy", {}).get("bytes_per_s")
    compute_s = w.get("flops", 0) / rate if rate else None
    memory_s = w.get("bytes", 0) / bandwidth if bandwidth else None
    floor_s = max(x for x in (compute_s, memory_s, 0.0) if x is not None)
    return {"flops": w.get("flops"), "bytes": w.get("bytes"), "compute_s": compute_s,
            "memory_s": memory_s, "floor_s": floor_s,
            "bound": "compute" if (compute_s or 0) >= (memory_s or 0) else "memory",
            "fraction_of_floor": floor_s / seconds if seconds > 0 else None}


def run_case(case: Case, device: torch.device, cfg: TimingConfig, ceilings: dict | None,
             log: Callable[[str], None] = print,
             on_progress: Callable[[dict], None] | None = None,
             into: dict | None = None) -> dict:
    """Check and time every contender of `case`; returns the case's result record.

    `on_progress(record)` is called with the record as soon as it exists and again after
    every contender (the runner writes the result file then: a run killed mid-case keeps
    every contender that finished). `into`: an earlier record of the same case to add these
    contenders to (a later stage of the preset's plan); its modes become the union.
    Raises `ContextLost` (with the record) when a contender broke the CUDA context.
    """
    if into is None:
        record = {"suite": case.suite, "case": case.name, "sizes": case.sizes,
                  "modes": list(case.modes), "notes": case.notes, "contenders": [],
                  "tolerances": case.tolerances}
    else:
        record = into
        record["modes"] = [m for m in MODES if m in record["modes"] or m in case.modes] \
            + [m for m in record["modes"] + list(case.modes) if m not in MODES]

    def progress() -> dict:
        """The record made complete (every mode filled, ratios derived), handed to
        on_progress; at every step, so a file written mid-case is valid."""
        _fill_modes(record)
        derived(record["contenders"], case.work, ceilings)
        if on_progress is not None:
            on_progress(record)
        return record

    progress()

    # Excluded contenders never run (an exclusion outranks any other reason for a skip).
    excluded = {c.name: f"{EXCLUDED} ({p!r})" for c in case.contenders
                if (p := excluded_by(c.name, cfg.exclude, case.name))}
    why = case.unavailable(device)
    if why is None and time.monotonic() > cfg.deadline:
        # Nothing is built: inputs and a higher-precision reference can cost seconds.
        why = f"the run's {TIME_BUDGET} was spent before this case started"
    if why is None and len(excluded) == len(case.contenders):
        why = EXCLUDED
    if why:
        record["contenders"] += [_skipped(c, excluded.get(c.name, why)) for c in case.contenders]
        log(f"  {case.suite}/{case.name} skipped: {why}")
        return progress()
    try:
        sets = make_sets(case, cfg)
        record["input_sets"] = len(sets)
        reference = case.reference(sets[0])
    except Exception as exc:
        # The case itself could not be built (e.g. out of memory): every contender is
        # recorded as skipped with that reason rather than dropped.
        reason = f"the case could not be set up: {_error_reason(exc)}"
        record["contenders"] += [_skipped(c, reason, "error") for c in case.contenders]
        log(f"  {case.suite}/{case.name} error: {reason}")
        broken = context_error(device)
        free_memory(device)
        if broken:
            record["stopped"] = f"the CUDA context broke while setting up this case: {broken}"
            progress()
            raise ContextLost(record["stopped"], record) from exc
        return progress()
    for i, contender in enumerate(case.contenders):
        if contender.name in excluded:
            record["contenders"].append(_skipped(contender, excluded[contender.name]))
            log(_one_line(case, record["contenders"][-1]))
            progress()
            continue
        result = run_contender(case, contender, sets, reference, device, cfg)
        record["contenders"].append(result)
        log(_one_line(case, result))
        broken = context_error(device) if result["status"] == "error" else None
        if broken:
            reason = (f"the CUDA context broke at {contender.name} ({broken}); nothing more "
                      "can run in this process (the fault may come from an earlier "
                      "asynchronous launch of this contender)")
            result["context_lost"] = True
            record["contenders"] += [_skipped(c, reason) for c in case.contenders[i + 1:]]
            record["stopped"] = reason
            log(f"  {case.suite}/{case.name}: {reason}")
            progress()
            raise ContextLost(reason, record)
        progress()
    del sets, reference
    free_memory(device)
    return progress()


def _fill_modes(record: dict) -> None:
    """A checked contender has an entry for every mode of its case (schema): modes added to
    the case by a later stage of the plan are recorded as skipped for it, with why."""
    for c in record["contenders"]:
        if c["status"] not in ("ok", "wrong"):
            continue
        for mode in record["modes"]:
            c["modes"].setdefault(mode, {
                "status": "skipped",
                "reason": "not in this preset's plan for this contender (time)"})


def _skipped(c: Contender, reason: str, status: str = "skipped") -> dict:
    return {"name": c.name, "role": c.role, "note": c.note, "status": status,
            "reason": reason, "check": None, "modes": {}}


def _one_line(case: Case, result: dict) -> str:
    head = f"  {case.suite}/{case.name} {result['name']:<22}"
    if result["status"] in ("skipped", "error"):
        return f"{head} {result['status']}: {result['reason']}"
    times = " ".join(f"{mode}={m['time_s']['median'] * 1e3:.3f}ms" if m.get("status") == "ok"
                     else f"{mode}=skipped" for mode, m in result["modes"].items())
    return f"{head} {result['status']} {times}"
