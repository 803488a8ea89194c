"""Result files -> a Markdown report and PNG plots (time and memory against N).

    python -m bench report [FILES OR FOLDERS] [--out DIR]

For each (preset, device) the latest result is reported: a header with the device,
versions, commit and ceilings, then per suite a table whose rows are (case, mode) and whose
columns are the contenders. A cell is the median time with its spread, the speedup over
torch-eager (its median / this median) and the fraction of the physical floor; ✗ marks a
contender whose output failed the check against the reference (also in the speedup table,
beside a baseline that failed it), and "skipped (time)" a mode the time budget left out. A
run whose plan the budget cut short is flagged as such in its header line. Quantities a case
measures besides time (the packing suite's padding efficiency, the step suite's tokens per
step) get a table of their own; each contender's note (what it runs, what to know beside
its numbers) is listed under the table; skips and errors are listed with their reasons
under each table. Plots: one PNG per (suite, mode, sizes other than N) for time, and one
for peak memory where it was measured (GPU).
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

from .schema import validate

EAGER = "torch-eager"


def load(paths: list[Path]) -> list[tuple[Path, dict]]:
    files = []
    for p in map(Path, paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    results = []
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "schema_version" in data:
            results.append((f, data))
    return results


def latest(results: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    best: dict[tuple, tuple[Path, dict]] = {}
    for path, r in results:
        key = (r["preset"], r["device"]["name"])
        if key not in best or r["created_utc"] > best[key][1]["created_utc"]:
            best[key] = (path, r)
    return sorted(best.values(), key=lambda pr: (pr[1]["device"]["type"] != "cuda",
                                                 pr[1]["preset"]))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms >= 0.01 else f"{ms:.2e}"


def _cell(contender: dict, mode: str) -> str:
    if contender["status"] in ("skipped", "error"):
        return contender["status"]
    m = contender["modes"].get(mode)
    if not m or m.get("status") != "ok":
        if _for_time(m):
            return "skipped (time)"
        return (m or {}).get("status", "—")
    t = m["time_s"]
    # Spread as half the interquartile range over the median: "±3%".
    spread = 50 * t["iqr"] / t["median"]
    text = f"{_ms(t['median'])} ms ±{spread:.0f}%" if spread >= 10 else \
        f"{_ms(t['median'])} ms ±{spread:.1f}%"
    if EAGER in m.get("speedup_vs", {}):
        text += f" ×{m['speedup_vs'][EAGER]:.3g}"
    floor = m.get("floor") or {}
    if floor.get("fraction_of_floor") is not None:
        text += f" ({100 * floor['fraction_of_floor']:.2g}%)"
    if m.get("tokens_per_s"):
        text += f", {m['tokens_per_s']:.4g} tok/s"
    if contender["status"] == "wrong":
        text += " ✗"
    return text


def _mem_cell(contender: dict, mode: str, sizes: dict) -> str:
    """Peak MiB, and as a share of the [N, V] logits where the case says their size (the
    memory a fused LM-head op exists to avoid); then the extra memory, the peak above the
    outputs and gradients every implementation holds, as a share of the logits too (the
    goal: under 1%)."""
    m = contender["modes"].get(mode) or {}
    if m.get("peak_memory_bytes") is None:
        return "—"
    logits = sizes.get("logits_bytes")
    text = f"{m['peak_memory_bytes'] / 2**20:.4g} MiB"
    if logits:
        text += f" ({100 * m['peak_memory_bytes'] / logits:.3g}% of logits)"
    extra = m.get("extra_memory_bytes")
    if extra is not None:
        text += f"; extra {extra / 2**20:.4g} MiB"
        if logits:
            text += f" ({100 * extra / logits:.3g}%)"
    return text


def _header(path: Path, r: dict, out: Path) -> list[str]:
    v, a, c = r["versions"], r["alignfuse"], r["ceilings"]
    commit = (a["commit"] or "unknown")[:10] + (" (dirty)" if a["dirty"] else "")
    link = os.path.relpath(path.resolve(), out.resolve())
    lines = [f"## `{r['preset']}` on {r['device']['name']}", "",
             f"- result: [{path.name}]({link}), {r['created_utc']}, commit {commit}",
             f"- command: `{r['command']}`",
             f"- torch {v['torch']}, triton {v['triton']}, CUDA {v['cuda']}, "
             f"driver {v['driver'] or '— (' + str(v['driver_reason']) + ')'}",
             f"- ceilings measured in this run: {c['matmul']['dtype']} matmul "
             f"{c['matmul']['flops_per_s'] / 1e12:.3g} TFLOP/s, copy "
             f"{c['copy']['bytes_per_s'] / 1e9:.3g} GB/s"]
    lines.append(_run_line(r))
    if r.get("triton_interpreter"):
        lines.append("- **Triton ran under the interpreter (CPU): these times are a smoke "
                     "test and mean nothing.**")
    return lines + [""]


def _for_time(entry: dict | None) -> bool:
    """A contender or mode left out by the time budget (every such reason says so)."""
    return "time budget" in ((entry or {}).get("reason") or "")


def _run_line(r: dict) -> str:
    """Whether the run finished, against its budget: an incomplete run (killed by a time
    limit, or stopped by a CUDA fault) is flagged, with the reason it recorded, and so is a
    finished run whose plan the budget cut short (what it left out, counted)."""
    took = f"{r.get('seconds', 0):.0f} s of a {r.get('budget_s', 0):.0f} s budget"
    counts = r.get("skipped_for_time")
    if counts is None:  # files written before the runner counted them
        counts = {"contenders": sum(
            1 for body in r.get("suites", {}).values() for case in body.get("cases", [])
            for c in case["contenders"] if c["status"] == "skipped" and _for_time(c)),
            "modes": 0}
    late = ""
    if counts["contenders"] or counts["modes"]:
        late = (f"; **BUDGET EXHAUSTED**: {counts['contenders']} contender(s) and "
                f"{counts['modes']} mode(s) of timed contenders skipped for time")
    if r.get("exclude"):
        late += f"; excluded (--exclude): {', '.join(r['exclude'])}"
    stages = r.get("plan") or []
    ran = [st["stage"] for st in stages if st.get("cases")]
    plan = f"; plan stages run: {', '.join(ran) or 'none'}" if stages else ""
    if r.get("complete"):
        return f"- run: complete, {took}{late}{plan}"
    why = r.get("incomplete_reason") or ("the file was written before the run finished "
                                         "(killed by a time limit?)")
    return f"- run: **INCOMPLETE** ({why}); {took}{late}{plan}"


def _suite_table(suite: str, body: dict) -> list[str]:
    cases = body.get("cases", [])
    if not cases:
        return []
    names: list[str] = []
    for case in cases:
        for c in case["contenders"]:
            if c["name"] not in names:
                names.append(c["name"])
    eager = f" ×speedup over {EAGER}," if EAGER in names else ""
    lines = [f"### {suite}", "",
             f"Cell: median time ±half the interquartile range,{eager} (% of the physical "
             "floor); ✗ = failed the check against the reference; skipped (time) = left out "
             "by the time budget.", "",
             "| case | mode | " + " | ".join(names) + " |",
             "|---|---|" + "---|" * len(names)]
    memory_rows, notes, measured = [], [], []
    for case in cases:
        by_name = {c["name"]: c for c in case["contenders"]}
        for mode in case["modes"]:
            cells = [_cell(by_name[n], mode) if n in by_name else "" for n in names]
            lines.append(f"| {case['case']} | {mode} | " + " | ".join(cells) + " |")
            mem = [_mem_cell(by_name[n], mode, case["sizes"]) if n in by_name else ""
                   for n in names]
            if any(m not in ("—", "") for m in mem):
                memory_rows.append(f"| {case['case']} | {mode} | " + " | ".join(mem) + " |")
        for c in case["contenders"]:
            if c["status"] in ("skipped", "error"):
                notes.append(f"- {case['case']} / {c['name']}: {c['status']}: {c['reason']}")
            elif c["status"] == "wrong":
                errs = ", ".join(f"{k} {v:.2e}" if v is not None else f"{k} NaN/missing"
                                 for k, v in c["check"]["rel_err"].items())
                notes.append(f"- {case['case']} / {c['name']}: failed the check ({errs})")
            late = [(mode, m) for mode, m in c["modes"].items() if _for_time(m)]
            if late and c["status"] in ("ok", "wrong"):
                notes.append(f"- {case['case']} / {c['name']}: "
                             f"{', '.join(mode for mode, _ in late)} skipped for time: "
                             f"{late[0][1]['reason']}")
        for key, value in (case.get("metrics") or {}).items():
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            measured.append(f"| {case['case']} | {key} | {shown} |")
    # What each contender runs, and what to know beside its numbers (e.g. CCE's gradient
    # filtering, Liger's bf16 grad_weight): each one's note, the first case's.
    described: dict[str, str] = {}
    for case in cases:
        for c in case["contenders"]:
            if c.get("note") and c["name"] not in described:
                described[c["name"]] = c["note"]
    if described:
        lines += ["", "Contenders:", "", *(f"- {n}: {note}" for n, note in described.items())]
    speed_rows = _speedup_rows(cases)
    if speed_rows:
        lines += ["", "Speedup of each alignfuse contender over each baseline "
                  "(baseline median / its median; memory: its peak / the baseline's; "
                  "✗ = that contender failed its check):", "",
                  "| case | mode | contender | speedup | memory |", "|---|---|---|---|---|",
                  *speed_rows]
    if measured:  # what a suite measures besides time (padding efficiency, tokens/step)
        lines += ["", "Measured in each case besides time:", "",
                  "| case | quantity | value |", "|---|---|---|", *measured]
    if memory_rows:
        lines += ["", "Peak memory above the live inputs; extra: the peak above the outputs "
                  "and the inputs' gradients, which every implementation holds (the goal for "
                  "the log-prob op: under 1% of the logits):", "",
                  "| case | mode | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names), *memory_rows]
    if notes:
        lines += ["", "<details><summary>skips, errors and failed checks</summary>", "",
                  *_dedupe(notes), "", "</details>"]
    return lines + [""]


def _speedup_rows(cases: list[dict]) -> list[str]:
    """One row per timed subject and mode; ✗ beside a name (the subject's or a baseline's)
    that failed its check: a speedup over a wrong result is no speedup."""
    rows = []
    for case in cases:
        wrong = {c["name"] for c in case["contenders"] if c["status"] == "wrong"}

        def named(name: str) -> str:
            return f"{name} ✗" if name in wrong else name

        for c in case["contenders"]:
            if c["role"] != "subject":
                continue
            for mode, m in c["modes"].items():
                if m.get("status") != "ok" or not m.get("speedup_vs"):
                    continue
                speed = ", ".join(f"×{v:.3g} vs {named(k)}" for k, v in m["speedup_vs"].items())
                mem = ", ".join(f"{v:.3g} of {named(k)}"
                                for k, v in m.get("memory_ratio_vs", {}).items())
                rows.append(f"| {case['case']} | {mode} | {named(c['name'])} | {speed} | "
                            f"{mem or '—'} |")
    return rows


# The goals for GPU numbers (reported against, never asserted): the log-prob op's
# default contender at the headline size and across the logprobs cases, and the loss ops.
GOAL_SUBJECT = "alignfuse/triton"      # the default strategy, timed in every logprobs case
LOSS_OPS = ("policy_loss", "group_advantages", "dpo_loss", "kto_loss")


def _mode(case: dict, name: str, mode: str) -> dict | None:
    for c in case["contenders"]:
        if c["name"] == name and c["status"] == "ok":
            m = c["modes"].get(mode)
            return m if m and m.get("status") == "ok" else None
    return None


def goals(results: list[tuple[Path, dict]]) -> list[str]:
    """One line per goal, each computed from the latest GPU results that measured it, with
    met / NOT MET. Nothing here is typed by hand: rerun the report on new results."""
    gpu = sorted((pr for pr in results if pr[1]["device"]["type"] == "cuda"),
                 key=lambda pr: pr[1]["created_utc"], reverse=True)

    def cases_of(suite: str) -> tuple[str, list[dict]]:
        for path, r in gpu:
            cases = r["suites"].get(suite, {}).get("cases", [])
            if cases:
                return path.name, cases
        return "", []

    def verdict(ok: bool) -> str:
        return "met" if ok else "**NOT MET**"

    lines = []
    src, cases = cases_of("logprobs")
    if cases:
        head = cases[0]  # the headline comes first in every GPU preset
        m = _mode(head, GOAL_SUBJECT, "fwd+bwd")
        if m and m.get("floor", {}).get("fraction_of_floor"):
            x = 1 / m["floor"]["fraction_of_floor"]
            lines.append(f"- linear_logprobs fwd+bwd within 1.25× of the matmul floor "
                         f"({GOAL_SUBJECT}, {head['case']}): {x:.2f}× — {verdict(x <= 1.25)}. "
                         "The floor is 6·N·H·V FLOPs; a method that keeps no logits "
                         "recomputes them in the backward (8·N·H·V), 1.33× at best.")
        for rival in ("liger", "cce"):
            ratios, wrong = [], 0
            for case in cases:
                mine, theirs = _mode(case, GOAL_SUBJECT, "fwd+bwd"), None
                for c in case["contenders"]:
                    if c["name"] == rival and c["status"] == "wrong":
                        wrong += 1
                if mine:
                    theirs = _mode(case, rival, "fwd+bwd")
                if mine and theirs:
                    ratios.append(theirs["time_s"]["median"] / mine["time_s"]["median"])
            if ratios:
                ahead = sum(r > 1 for r in ratios)
                lines.append(f"- ahead of {rival} (fwd+bwd, {GOAL_SUBJECT}): in {ahead} of "
                             f"{len(ratios)} cases where both passed the check, ×"
                             f"{min(ratios):.2f} to ×{max(ratios):.2f}"
                             + (f"; {rival} failed its check in {wrong} more" if wrong else "")
                             + f" — {verdict(ahead == len(ratios))}")
        extra = m.get("extra_memory_bytes") if m else None
        logits = head["sizes"].get("logits_bytes")
        if extra is not None and logits:
            share = extra / logits
            lines.append(f"- extra memory under 1% of the materialized logits ({GOAL_SUBJECT}, "
                         f"{head['case']}, fwd+bwd): {100 * share:.3g}% ({extra / 2**20:.0f} "
                         f"of {logits / 2**20:.0f} MiB) — {verdict(share < 0.01)}")
    src_losses, loss_cases = cases_of("losses")
    best = None
    for case in loss_cases:
        if not case["case"].startswith(LOSS_OPS):
            continue
        for c in case["contenders"]:
            if c["role"] != "subject" or c["status"] != "ok":
                continue
            for mode, m in c["modes"].items():
                f = (m.get("floor") or {}).get("fraction_of_floor") if m.get("status") == "ok" \
                    else None
                if f is not None and (best is None or f > best[0]):
                    best = (f, case["case"], c["name"], mode, m["floor"].get("bytes"))
    if best:
        f, case, name, mode, moved = best
        size = "" if moved is None else f", {moved / 1e6:.2g} MB moved"
        lines.append(f"- loss kernels at 80% or more of the copy bandwidth: the best is "
                     f"{100 * f:.2g}% ({name}, {case}, {mode}{size}) — "
                     f"{verdict(f >= 0.8)}"
                     + ("; at these sizes launches and host work, not bytes, set the time"
                        if moved is not None and moved < 64e6 else ""))
    if not lines:
        return []
    used = sorted({n for n in (src, src_losses) if n})
    return ["Goals (reported, not asserted; computed from " + ", ".join(used) + "):", "",
            *lines, ""]


def _dedupe(items: list[str]) -> list[str]:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=]+", "_", text).strip("_")


def _axis(sizes: dict) -> str | None:
    for key in ("N", "S", "sequences", "tokens"):
        if isinstance(sizes.get(key), (int, float)):
            return key
    return None


def plots(r: dict, out: Path) -> list[Path]:
    """Time and memory against N (or S), one line per contender; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for suite, body in r["suites"].items():
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for case in body.get("cases", []):
            axis = _axis(case["sizes"])
            if axis is None:
                continue
            # One op per plot: the case name before its first comma names it.
            op = case["case"].split(",")[0] if "=" not in case["case"].split(",")[0] else suite
            # logits_bytes follows N: not a size that tells groups apart
            rest = tuple(sorted((k, str(v)) for k, v in case["sizes"].items()
                                if k not in (axis, "N", "S", "logits_bytes")))
            groups[(op, axis, rest)].append(case)
        for (op, axis, rest), cases in groups.items():
            modes = cases[0]["modes"]
            for mode in modes:
                for what in ("time", "memory"):
                    lines = defaultdict(list)
                    for case in cases:
                        for c in case["contenders"]:
                            m = c["modes"].get(mode) or {}
                            if m.get("status") != "ok":
                                continue
                            y = (m["time_s"]["median"] * 1e3 if what == "time"
                                 else m.get("peak_memory_bytes"))
                            if y is None:
                                continue
                            y = y if what == "time" else y / 2**20
                            lines[c["name"]].append((case["sizes"][axis], y))
                    if not lines:
                        continue
                    fig, ax = plt.subplots(figsize=(6, 4))
                    for name, pts in sorted(lines.items()):
                        pts.sort()
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                label=name)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xlabel(axis)
                    ax.set_ylabel("median time (ms)" if what == "time" else "peak memory (MiB)")
                    extra = ", ".join(f"{k}={v}" for k, v in rest)
                    title = f"{op} {mode} on {r['device']['name']}\n{extra}"
                    if r.get("triton_interpreter"):  # the PNG may be seen without report.md
                        title += "\nTriton interpreted (CPU): a smoke test, times mean nothing"
                    ax.set_title(title, fontsize=9)
                    ax.grid(True, which="both", alpha=0.3)
                    ax.legend(fontsize=8)
                    fig.tight_layout()
                    name = _slug(f"{r['preset']}_{op}_{mode}_{extra}_{what}") + ".png"
                    path = out / name
                    fig.savefig(path, dpi=100)
                    plt.close(fig)
                    made.append(path)
    return made


README_BEGIN = "<!-- bench:latest-gpu begin"
README_END = "<!-- bench:latest-gpu end -->"


def update_readme(readme: Path, paths: list[Path]) -> bool:
    """Put the logprobs table of the latest GPU result that has one (with a link to its JSON)
    between the README's bench markers: a later run of other suites only (a session's
    follow-up call, `--suites step,losses`) does not blank it. Returns False when there is
    no GPU result to show."""
    gpu = [pr for pr in latest(load(paths)) if pr[1]["device"]["type"] == "cuda"
           and pr[1]["suites"].get("logprobs", {}).get("cases")]
    if not gpu:
        return False
    path, r = max(gpu, key=lambda pr: pr[1]["created_utc"])
    text = readme.read_text()
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme} has no bench markers ({README_BEGIN} ... {README_END})")
    start = text.index("\n", start) + 1
    header = _header(path, r, readme.parent)
    table = _suite_table("logprobs", r["suites"].get("logprobs", {"cases": []}))
    body = "\n".join(["Latest GPU results (the headline suite; all suites and plots: "
                      "`python -m bench report`):", "", *header[2:],
                      *goals(latest(load(paths))), *table])
    readme.write_text(text[:start] + body + "\n" + text[end:])
    return True


def render(paths: list[Path], out: Path) -> list[Path]:
    """Write out/report.md and the plots from the latest result of each (preset, device)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = latest(load(paths))
    if not chosen:
        raise FileNotFoundError(f"no result files in {[str(p) for p in paths]}")
    lines = ["# alignfuse benchmarks", "",
             "Generated by `python -m bench report` from the result files linked below "
             "(fields: bench/schema.py). Speedup = torch-eager median / contender median; "
             "% = physical floor (FLOPs / measured matmul rate or bytes / measured copy "
             "bandwidth, the larger) / median.", "", *goals(chosen)]
    made = []
    for path, r in chosen:
        problems = validate(r)
        lines += _header(path, r, out)
        if problems:
            lines += [f"**This result misses fields:** {', '.join(problems[:5])}", ""]
        for suite, body in r["suites"].items():
            if body.get("error"):
                lines += [f"### {suite}", "", f"**The suite broke:** {body['error']}", ""]
            lines += _suite_table(suite, body)
        pngs = plots(r, out)
        made += pngs
        lines += [f"![{p.stem}]({p.name})" for p in pngs] + [""]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return [report, *made]
