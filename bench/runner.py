"""Run a preset's suites and write one result file (JSON) under bench/results/."""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import torch

from . import ceilings as ceilings_mod
from .environment import environment
from .harness import TIME_BUDGET, ContextLost, TimingConfig, excluded_by, run_case
from .presets import PRESETS, Stage
from .schema import SCHEMA_VERSION, validate

SUITES = ("logprobs", "losses", "packing", "step")
# Shares of the time budget for a preset without a plan (see `run`): one stage per suite,
# the headline suite gets the most.
SUITE_WEIGHTS = {"logprobs": 5.0, "losses": 2.0, "packing": 0.5, "step": 2.5}
RESULTS = Path(__file__).resolve().parent / "results"
IN_PROGRESS = ("the run had not finished when this file was last written: if this stays, it "
               "was killed (e.g. by the GPU session's time limit) and what follows is what "
               "finished before that")
# `python -m bench run` exits with this when a CUDA fault stopped the run (the result file
# is written, complete: false, with the reason).
EXIT_STOPPED = 3


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:40]


def _suite_module(name: str):
    return importlib.import_module(f"bench.suites.{name}")


def default_plan(suites: tuple[str, ...]) -> list[Stage]:
    return [Stage(name, weight=SUITE_WEIGHTS[name]) for name in suites]


def run(preset_name: str, suites: tuple[str, ...] = SUITES, out_dir: Path = RESULTS,
        budget_s: float | None = None, argv: list[str] | None = None,
        log: Callable[[str], None] = print, exclude: tuple[str, ...] = ()) -> Path:
    """Measure the ceilings, then the preset's plan (by default every case of `suites`);
    returns the result file's path. The file is rewritten after every contender.
    `exclude`: contenders never run, recorded as skipped (see harness.excluded_by)."""
    if preset_name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset_name!r}")
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"suites must be among {SUITES}, got {unknown}")
    preset = PRESETS[preset_name]
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset {preset_name!r} needs a CUDA device; use --preset cpu here")
    device = torch.device(preset.device)
    if device.type == "cpu":
        # 2 shared cores: OpenMP threads spinning against other processes' work made tiny
        # ops 100x slower than one thread. The thread count is recorded with the device.
        torch.set_num_threads(1)
    started = time.monotonic()
    budget = preset.budget_s if budget_s is None else budget_s
    exclude = tuple(exclude)
    cfg = replace(preset.timing, deadline=started + budget, exclude=exclude)

    result = {"schema_version": SCHEMA_VERSION, "preset": preset.name,
              "budget_s": budget, **environment(device, argv)}
    result["exclude"] = list(exclude)
    result["seconds"] = 0.0
    log(f"bench: preset {preset.name} on {result['device']['name']} "
        f"(commit {str(result['alignfuse']['commit'])[:10]}, dirty={result['alignfuse']['dirty']})")
    ceilings = ceilings_mod.measure(device, preset.dtype, preset.matmul_size, preset.copy_bytes)
    result["ceilings"] = ceilings
    log(f"bench: ceilings: matmul {ceilings['matmul']['flops_per_s'] / 1e12:.4g} TFLOP/s "
        f"({ceilings['matmul']['dtype']}), copy {ceilings['copy']['bytes_per_s'] / 1e9:.1f} GB/s")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["created_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = out_dir / f"{stamp}_{preset.name}_{_slug(result['device']['name'])}.json"

    # Stages run in the plan's order (what matters most first). Each may use its weight's
    # share of what is left; what one leaves unused passes on to the next.
    plan = [st for st in (preset.plan or default_plan(suites)) if st.suite in suites]
    result["suites"], result["complete"] = {}, False
    result["incomplete_reason"] = IN_PROGRESS
    result["plan"] = []
    weights = [st.weight for st in plan]

    def write() -> None:
        result["seconds"] = time.monotonic() - started
        result["skipped_for_time"] = skipped_for_time(result)
        # The process may finish (complete) with its plan cut short: said apart.
        result["budget_exhausted"] = any(result["skipped_for_time"].values())
        _write(path, result)

    stopped = None
    for i, stage in enumerate(plan):
        t0 = time.monotonic()
        left = max(0.0, started + budget - t0)
        share = left * weights[i] / sum(weights[i:]) if sum(weights[i:]) > 0 else left
        stage_cfg = replace(cfg, deadline=min(cfg.deadline, t0 + share))
        body = result["suites"].setdefault(name := stage.suite, {
            "cases": [], "seconds": 0.0, "budget_s": 0.0, "error": None})
        body["budget_s"] += share
        records: list[dict] = body["cases"]
        info = {"stage": stage.label, "suite": name, "budget_s": share, "seconds": 0.0,
                "cases": 0}
        result["plan"].append(info)
        body_seconds0 = body["seconds"]
        touched: list[int] = []  # the case records this stage made or added to

        def keep(record: dict, records=records) -> None:
            if not any(r is record for r in records):
                records.append(record)
            if id(record) not in touched:
                touched.append(id(record))
            body["seconds"] = body_seconds0 + time.monotonic() - t0
            info.update(seconds=time.monotonic() - t0, cases=len(touched))
            write()

        try:
            module = _suite_module(name)
            if hasattr(module, "cases"):
                for c in module.cases(preset, device):
                    c = _prepare(c, stage, preset.modes)
                    if c is None:
                        continue
                    existing = next((r for r in records if r["case"] == c.name), None)
                    run_case(c, device, stage_cfg, ceilings, log, on_progress=keep,
                             into=existing)
            else:
                for record in module.run(preset, device, stage_cfg, ceilings, log,
                                         on_progress=keep):
                    keep(record)
        except ContextLost as exc:
            keep(exc.record)
            stopped = (f"stopped in {name}/{exc.record['case']}: {exc.reason}; the stages "
                       "after it did not run")
        except Exception as exc:  # a broken suite is recorded; the others still run
            body["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            log(f"bench: suite {name} failed: {body['error']}")
        body["seconds"] = body_seconds0 + time.monotonic() - t0
        info.update(seconds=time.monotonic() - t0, cases=len(touched))
        write()
        log(f"bench: stage {stage.label}: {len(touched)} case(s) in "
            f"{time.monotonic() - t0:.1f} s (share {share:.0f} s)")
        if stopped:
            break
    if stopped:
        result["incomplete_reason"] = stopped
        log(f"bench: {stopped}")
    else:
        result["complete"], result["incomplete_reason"] = True, None
    write()
    if result["budget_exhausted"]:
        late = result["skipped_for_time"]
        log(f"bench: time budget exhausted: {late['contenders']} contender(s) and "
            f"{late['modes']} mode(s) of timed contenders skipped for time")
    log(f"bench: wrote {path} ({result['seconds']:.1f} s)")
    return path


def skipped_for_time(result: dict) -> dict:
    """How much of the plan the time budget (the run's, or a stage's share of it) left out:
    contenders skipped whole, and modes skipped of contenders that were timed in others."""
    contenders = modes = 0
    for body in result.get("suites", {}).values():
        for case in body.get("cases", []):
            for c in case["contenders"]:
                if c["status"] == "skipped" and TIME_BUDGET in (c.get("reason") or ""):
                    contenders += 1
                elif c["status"] in ("ok", "wrong"):
                    modes += sum(1 for m in c["modes"].values()
                                 if TIME_BUDGET in (m.get("reason") or ""))
    return {"contenders": contenders, "modes": modes}


PREFLIGHT_SUITES = ("logprobs", "losses")


def preflight(pattern: str, log: Callable[[str], None] = print, suite: str = "logprobs") -> int:
    """Tiny cases of `suite` (fwd+bwd: check, warm-up, two timed runs) with only the
    contenders `pattern` names, on the GPU if there is one (bf16), else on the CPU
    (float32, Triton interpreted): for logprobs one `linear_logprobs` case; for losses the
    linear GRPO and DPO cases (Liger's chunked losses, torch.compiled on a GPU).
    bench/gpu_session.sh runs it in a process of its own under a timeout for each risky
    family (a first compile, or a kernel that never returns, would otherwise stall the main
    run) and excludes from the main run what fails.

    Returns 0 when each ran (a failed check included: the main run records it as wrong) or
    cannot run here (the main run skips it too), 1 when one raised or broke the CUDA
    context, 2 when `pattern` names no contender of the suite's tiny cases."""
    from .suites import logprobs, losses

    if suite not in PREFLIGHT_SUITES:
        raise ValueError(f"suite must be one of {PREFLIGHT_SUITES}, got {suite!r}")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if cuda else torch.float32
    if suite == "logprobs":
        N, H, V = (1024, 256, 4099) if cuda else (19, 16, 131)
        cases = [logprobs.case(N, H, V, dtype, device)]
    else:
        S, T, H, V = (4, 128, 256, 4099) if cuda else (2, 5, 16, 131)
        cases = [losses.linear_grpo_case(S, T, H, V, dtype, device),
                 losses.linear_dpo_case(max(1, S // 2), T, H, V, dtype, device)]
    for case in cases:
        case.contenders = [c for c in case.contenders if excluded_by(c.name, (pattern,))]
        case.modes = ("fwd+bwd",)
    cases = [case for case in cases if case.contenders]
    if not cases:
        log(f"preflight {pattern}: names no {suite} contender")
        return 2
    cfg = TimingConfig(warmup=1, min_reps=2, max_reps=2, target_s=0.0, rotate_bytes=1,
                       max_sets=2)
    failed = False
    for case in cases:
        try:
            record = run_case(case, device, cfg, None, log)
        except ContextLost as exc:
            log(f"preflight {pattern}: the CUDA context broke: {exc.reason}")
            return 1
        # (each contender's line, with its reason, was logged by run_case above)
        where = f"{case.name.split(',', 1)[0]} " if suite != "logprobs" else ""
        log(f"preflight {pattern}: " + ", ".join(f"{where}{c['name']} {c['status']}"
                                                 for c in record["contenders"]))
        failed |= any(c["status"] == "error" for c in record["contenders"])
    return 1 if failed else 0


def _prepare(case, stage: Stage, modes: tuple[str, ...] | None):
    """The case as the stage runs it: selected by name, its modes and contenders narrowed,
    compiled-CUDA contenders (`*/cuda`) last. None when the stage does not run it."""
    if stage.cases is not None and not any(fnmatch(case.name, p) for p in stage.cases):
        return None
    kept = tuple(m for m in case.modes if (modes is None or m in modes)
                 and (stage.modes is None or m in stage.modes))
    case.modes = kept or case.modes
    contenders = [c for c in case.contenders
                  if (stage.only is None or any(fnmatch(c.name, p) for p in stage.only))
                  and not any(fnmatch(c.name, p) for p in stage.exclude)]
    if not contenders:
        return None
    # A fault in never-run compiled code breaks the CUDA context for everything after it.
    case.contenders = sorted(contenders, key=lambda c: c.name.endswith("/cuda"))
    return case


def _write(path: Path, result: dict) -> None:
    problems = validate(result)
    if problems:  # a writer bug: never write a result file that misses a field
        raise AssertionError("result misses fields: " + "; ".join(problems[:10]))
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(result), indent=1, default=_json_default,
                              allow_nan=False) + "\n")
    tmp.replace(path)


def _finite(value):
    """NaN and infinities become null: strict JSON (a NaN error is also in `check.failed`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float):
        return value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
