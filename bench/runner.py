"""Run a preset's suites and write one result file (JSON) under bench/results/."""

from __future__ import annotations

import importlib
import json
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
    started = time.monotonic()
    budget = preset.budget_s if budget_s is None else budget_s
    cfg = replace(preset.timing, deadline=started + budget)

    result = {"schema_version": SCHEMA_VERSION, "preset": preset.name,
              "budget_s": budget, **environment(device, argv)}
    log(f"bench: preset {preset.name} on {result['device']['name']} "
        f"(commit {str(result['alignfuse']['commit'])[:10]}, dirty={result['alignfuse']['dirty']})")
    ceilings = ceilings_mod.measure(device, preset.dtype, preset.matmul_size, preset.copy_bytes)
    result["ceilings"] = ceilings
    log(f"bench: ceilings: matmul {ceilings['matmul']['flops_per_s'] / 1e12:.4g} TFLOP/s "
        f"({ceilings['matmul']['dtype']}), copy {ceilings['copy']['bytes_per_s'] / 1e9:.1f} GB/s")

    result["suites"] = {}
    for name in suites:
        module = importlib.import_module(f"bench.suites.{name}")
        t0 = time.monotonic()
        if hasattr(module, "cases"):
            records = [run_case(c, device, cfg, ceilings, log) for c in module.cases(preset, device)]
        else:
            records = module.run(preset, device, cfg, ceilings, log)
        result["suites"][name] = {"cases": records, "seconds": time.monotonic() - t0}
        log(f"bench: suite {name}: {len(records)} case(s) in {time.monotonic() - t0:.1f} s")
    result["seconds"] = time.monotonic() - started

    problems = validate(result)
    if problems:  # a writer bug: never write a result file that misses a field
        raise AssertionError("result misses fields: " + "; ".join(problems[:10]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["created_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = out_dir / f"{stamp}_{preset.name}_{_slug(result['device']['name'])}.json"
    path.write_text(json.dumps(result, indent=1, default=_json_default) + "\n")
    log(f"bench: wrote {path} ({result['seconds']:.1f} s)")
    return path


def _json_default(value):
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, float):
        return value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
