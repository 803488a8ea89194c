"""Run a preset's suites and write one result file (JSON) under bench/results/."""

from __future__ import annotations

import importlib
import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from . import ceilings as ceilings_mod
from .environment import environment
from .harness import run_case
from .presets import PRESETS
from .schema import SCHEMA_VERSION, validate

SUITES = ("logprobs", "losses", "packing", "step")
# Shares of the time budget (see `run`): the headline suite gets the most.
SUITE_WEIGHTS = {"logprobs": 5.0, "losses": 2.0, "packing": 0.5, "step": 2.5}
RESULTS = Path(__file__).resolve().parent / "results"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:40]


def run(preset_name: str, suites: tuple[str, ...] = SUITES, out_dir: Path = RESULTS,
        budget_s: float | None = None, argv: list[str] | None = None,
        log: Callable[[str], None] = print) -> Path:
    """Measure the ceilings, then every case of `suites`; returns the result file's path."""
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
    cfg = replace(preset.timing, deadline=started + budget)

    result = {"schema_version": SCHEMA_VERSION, "preset": preset.name,
              "budget_s": budget, **environment(device, argv)}
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

    # The budget is shared out so that every suite gets its turn: each suite may use its
    # weight's share of what is left, and what one leaves unused passes on to the next.
    result["suites"], result["complete"] = {}, False
    weights = {name: SUITE_WEIGHTS[name] for name in suites}
    for name in suites:
        module = importlib.import_module(f"bench.suites.{name}")
        t0 = time.monotonic()
        left = max(0.0, started + budget - t0)
        share = left * weights[name] / sum(weights.values())
        weights.pop(name)
        suite_cfg = replace(cfg, deadline=min(cfg.deadline, t0 + share))
        records: list[dict] = []
        body = result["suites"][name] = {"cases": records, "seconds": 0.0, "budget_s": share,
                                         "error": None}
        try:
            if hasattr(module, "cases"):
                for c in module.cases(preset, device):
                    records.append(run_case(_only_modes(c, preset.modes), device, suite_cfg,
                                            ceilings, log))
                    # After every case: a run killed by a time limit still leaves its results.
                    body["seconds"] = time.monotonic() - t0
                    result["seconds"] = time.monotonic() - started
                    _write(path, result)
            else:
                records += module.run(preset, device, suite_cfg, ceilings, log)
        except Exception as exc:  # a broken suite is recorded; the others still run
            body["error"] = f"{type(exc).__name__}: {exc}"[:1000]
            log(f"bench: suite {name} failed: {body['error']}")
        body["seconds"] = time.monotonic() - t0
        result["seconds"] = time.monotonic() - started
        _write(path, result)
        log(f"bench: suite {name}: {len(records)} case(s) in {time.monotonic() - t0:.1f} s")
    result["complete"] = True
    result["seconds"] = time.monotonic() - started
    _write(path, result)
    log(f"bench: wrote {path} ({result['seconds']:.1f} s)")
    return path


def _only_modes(case, modes: tuple[str, ...] | None):
    kept = tuple(m for m in case.modes if modes is None or m in modes)
    case.modes = kept or case.modes
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
