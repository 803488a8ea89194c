"""The fields every result file has. `validate` lists what is missing (empty: complete).

A result file (one run of one preset):

    schema_version, preset, budget_s, created_utc, command, seconds,
    complete    (false while the run is going, the file being rewritten after every
                 contender, and in the end if a CUDA fault stopped it; true: the process
                 finished, which says nothing of what its time budget left out: see
                 budget_exhausted)
    incomplete_reason  (optional; null once complete: why not, "in progress" in a file
                 left by a killed run)
    budget_exhausted  (optional, absent from older files) true when the time budget (the
                 run's, or a plan stage's share of it) left something out; then
    skipped_for_time  (optional) {contenders: skipped whole, modes: skipped of contenders
                 timed in other modes} count it (every such reason says "time budget")
    exclude     (optional) the `--exclude` patterns: those contenders are recorded as
                 skipped, "excluded by --exclude (pattern)"
    plan        (optional) [{stage, suite, budget_s, seconds, cases}]: the stages run
    device      {type, name, ...}                      (GPU: capability, multiprocessors, L2)
    host        {platform, cpu, cores}
    versions    {python, torch, triton, cuda, driver, driver_reason, transformers,
                 liger_kernel, cut_cross_entropy, alignfuse}    (null where absent)
    alignfuse   {commit, dirty, dirty_paths, source[, git_saw]} (ALIGNFUSE_GIT_COMMIT, else git)
    triton_interpreter                          (true: CPU smoke, times mean nothing)
    ceilings    {matmul {dtype, flops_per_s, time_s}, copy {bytes_per_s, time_s}}
    suites      {<suite> {seconds, budget_s, error (null, or why the suite broke), cases [case]}}

    case        {suite, case, sizes, modes, notes, tolerances, contenders [contender],
                 stopped (optional: the CUDA context broke in this case, why)}
    contender   {name, role: subject|baseline, status: ok|wrong|skipped|error, reason
                 (a contender checked but timed in no mode for time is "skipped"),
                 check {passed, rel_err {quantity: err, null when NaN or missing},
                        tolerance, failed} (ok/wrong),
                 modes {<mode> mode}, metrics (suite-specific, optional),
                 context_lost (optional: true for the contender whose error broke the
                 CUDA context),
                 modes_skipped_for_time (optional: the modes the time budget left out)}
    mode        (skipped: {status, reason, estimate_s (optional: the seconds its runs
                 were estimated to need, when that did not fit in the time left)}; ok:)
                {status, time_s {median, q1, q3, iqr, p10, p90, min, max, mean, stddev, rounds,
                                  l2_flushed},
                 peak_memory_bytes (null on CPU; for bwd and fwd+bwd the measured run
                 includes the forward), peak_memory_reason,
                 speedup_vs {baseline: baseline median / this median},
                 memory_ratio_vs {baseline: this peak / baseline peak},
                 extra_memory_bytes (optional, schema 1 files before it lack it: the peak
                 minus the outputs and input gradients that every implementation holds;
                 null where unknown: CPU, or no model of them),
                 floor {flops, bytes, compute_s, memory_s, floor_s, bound, fraction_of_floor}
                 (null where the suite has no floor model, with the case's notes saying why)}
"""

from __future__ import annotations

SCHEMA_VERSION = 1

TOP = ("schema_version", "preset", "budget_s", "created_utc", "command", "seconds", "complete",
       "device", "host", "versions", "alignfuse", "triton_interpreter", "ceilings", "suites")
VERSIONS = ("python", "torch", "triton", "cuda", "driver", "driver_reason")
TIME = ("median", "q1", "q3", "iqr", "p10", "p90", "min", "max", "rounds")
MODE = ("status", "time_s", "peak_memory_bytes", "peak_memory_reason", "speedup_vs",
        "memory_ratio_vs", "floor")


def _missing(obj, keys, where: str) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where} is not an object"]
    return [f"{where}.{k}" for k in keys if k not in obj]


def validate(result: dict) -> list[str]:
    """Every missing or inconsistent field, as a readable path."""
    problems = _missing(result, TOP, "result")
    if problems:
        return problems
    problems += _missing(result["device"], ("type", "name"), "device")
    problems += _missing(result["versions"], VERSIONS, "versions")
    problems += _missing(result["alignfuse"], ("commit", "dirty"), "alignfuse")
    problems += _missing(result["ceilings"].get("matmul"), ("dtype", "flops_per_s"),
                         "ceilings.matmul")
    problems += _missing(result["ceilings"].get("copy"), ("bytes_per_s",), "ceilings.copy")
    for suite, body in result["suites"].items():
        for i, case in enumerate(body.get("cases", [])):
            where = f"suites.{suite}.cases[{i}]"
            problems += _missing(case, ("suite", "case", "sizes", "modes", "contenders"), where)
            for c in case.get("contenders", []):
                cw = f"{where}.{c.get('name')}"
                problems += _missing(c, ("name", "role", "status", "reason", "check", "modes"), cw)
                status = c.get("status")
                if status in ("skipped", "error") and not c.get("reason"):
                    problems.append(f"{cw}: status {status} without a reason")
                if status in ("ok", "wrong"):
                    problems += _missing(c.get("check"), ("passed", "rel_err"), f"{cw}.check")
                    for mode in case.get("modes", []):
                        m = c["modes"].get(mode)
                        if m is None:
                            problems.append(f"{cw}.modes.{mode} missing")
                        elif m.get("status") == "ok":
                            problems += _missing(m, MODE, f"{cw}.modes.{mode}")
                            problems += _missing(m.get("time_s"), TIME, f"{cw}.modes.{mode}.time_s")
                            if (m.get("peak_memory_bytes") is None
                                    and not m.get("peak_memory_reason")):
                                problems.append(f"{cw}.modes.{mode}: null memory, no reason")
    return problems
