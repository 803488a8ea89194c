"""The benchmark harness (bench/): checks, timing records, result schema, report.

The CPU preset runs end to end once (a subprocess of `python -m bench run --preset cpu`,
as CI would call it); its result file must have every field, and the report must render a
table and PNG plots from it. Nothing is asserted about times. The harness itself is
tested on tiny torch-only cases, where a wrong, missing or raising contender must show.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `bench` is run from a checkout, not installed

from bench import harness, schema  # noqa: E402
from bench.harness import Case, Contender, InputSet, TimingConfig  # noqa: E402
from bench.report import render  # noqa: E402

FAST = TimingConfig(warmup=1, min_reps=3, max_reps=3, target_s=0.0, rotate_bytes=1, max_sets=2)
CPU = torch.device("cpu")


def _scale_case(contenders: list[Contender]) -> Case:
    """out = 3 * x; backward gives grad_x = 3 * upstream."""

    def make_inputs(seed: int) -> InputSet:
        g = torch.Generator().manual_seed(seed)
        return InputSet({"x": torch.randn(37, generator=g).requires_grad_()},
                        torch.randn(37, generator=g))

    def reference(s: InputSet):
        x = s.tensors["x"].detach().double()
        return {"out": 3 * x, "grad_x": 3 * s.upstream.double()}

    return Case("unit", "scale,N=37", {"N": 37}, make_inputs, reference, contenders,
                {"*": 1e-6}, grad_inputs=("x",), grad_output="out",
                work=lambda mode: {"flops": 37, "bytes": 37 * 8})


def _by_name(record: dict) -> dict:
    return {c["name"]: c for c in record["contenders"]}


def test_harness_records_right_wrong_skipped_and_raising_contenders():
    def boom(t):
        raise RuntimeError("kernel exploded")

    case = _scale_case([
        Contender("eager", "baseline", lambda t: {"out": t["x"] * 3}),
        Contender("fast", "subject", lambda t: {"out": t["x"] + t["x"] + t["x"]}),
        Contender("off", "subject", lambda t: {"out": t["x"] * 3.01}),
        Contender("missing", "subject", lambda t: {"out": t["x"]},
                  unavailable=lambda device: "not installed here"),
        Contender("raises", "subject", boom),
    ])
    record = harness.run_case(case, CPU, FAST, ceilings=None, log=lambda line: None)
    got = _by_name(record)
    assert got["eager"]["status"] == "ok" and got["fast"]["status"] == "ok"
    assert got["fast"]["check"]["rel_err"]["grad_x"] < 1e-6
    # 1% off is far outside 1e-6: recorded as wrong, with the error, and still timed.
    assert got["off"]["status"] == "wrong"
    assert got["off"]["check"]["rel_err"]["out"] == pytest.approx(0.01 / 3, rel=1e-3)
    assert set(got["off"]["check"]["failed"]) == {"out", "grad_x"}
    assert got["missing"]["status"] == "skipped"
    assert got["missing"]["reason"] == "not installed here"
    assert got["raises"]["status"] == "error" and "kernel exploded" in got["raises"]["reason"]
    for mode in harness.MODES:
        m = got["fast"]["modes"][mode]
        assert m["time_s"]["rounds"] == 3 and m["time_s"]["median"] > 0
        assert m["peak_memory_bytes"] is None and "CPU" in m["peak_memory_reason"]
        assert set(m["speedup_vs"]) == {"eager"}
        assert m["speedup_vs"]["eager"] == pytest.approx(
            got["eager"]["modes"][mode]["time_s"]["median"] / m["time_s"]["median"])


def test_check_fails_on_nan_and_on_unwritten_gradient():
    case = _scale_case([
        Contender("nan", "subject", lambda t: {"out": t["x"] * float("nan")}),
        # Forward right, but detached: no gradient reaches x.
        Contender("detached", "subject", lambda t: {"out": (t["x"] * 3).detach().requires_grad_()}),
    ])
    got = _by_name(harness.run_case(case, CPU, FAST, ceilings=None, log=lambda line: None))
    assert got["nan"]["status"] == "wrong" and math.isnan(got["nan"]["check"]["rel_err"]["out"])
    assert got["detached"]["status"] == "wrong"
    assert got["detached"]["check"]["failed"] == ["grad_x"]


def test_unavailable_case_skips_every_contender_with_the_reason():
    case = _scale_case([Contender("eager", "baseline", lambda t: {"out": t["x"] * 3})])
    case.unavailable = lambda device: "alignfuse.kernels.thing is not implemented yet"
    record = harness.run_case(case, CPU, FAST, ceilings=None, log=lambda line: None)
    assert record["contenders"][0]["status"] == "skipped"
    assert "not implemented yet" in record["contenders"][0]["reason"]


def test_inputs_rotate_and_are_never_zero():
    seen = []

    def run(t):
        seen.append(t["x"].detach().clone())
        return {"out": t["x"] * 3}

    case = _scale_case([Contender("eager", "baseline", run)])
    harness.run_case(case, CPU, FAST, ceilings=None, log=lambda line: None)
    distinct = {tuple(x.tolist()) for x in seen}
    assert len(distinct) == 2  # FAST asks for 2 input sets; both were used
    assert all(bool((x != 0).all()) for x in seen)


def test_summary_and_floor():
    stats = harness.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median"] == 3.0 and stats["min"] == 1.0 and stats["max"] == 5.0
    assert stats["p10"] == pytest.approx(1.4) and stats["p90"] == pytest.approx(4.6)
    assert stats["rounds"] == 5
    ceilings = {"matmul": {"flops_per_s": 1e12}, "copy": {"bytes_per_s": 1e9}}
    f = harness.floor({"flops": 2e12, "bytes": 1e9}, ceilings, seconds=4.0)
    assert f["floor_s"] == pytest.approx(2.0) and f["bound"] == "compute"
    assert f["fraction_of_floor"] == pytest.approx(0.5)
    f = harness.floor({"flops": 0, "bytes": 3e9}, ceilings, seconds=6.0)
    assert f["bound"] == "memory" and f["fraction_of_floor"] == pytest.approx(0.5)


def test_logprobs_reference_matches_autograd_in_float64():
    from bench.suites.logprobs import case as logprobs_case, reference

    case = logprobs_case(13, 16, 101, torch.float64, CPU)
    s = case.make_inputs(3)
    ref = reference(s, budget_bytes=101 * 8 * 2 * 5)  # several row chunks
    h, w = s.tensors["hidden"], s.tensors["weight"]
    logps = torch.log_softmax(h @ w.T, -1).gather(-1, s.tensors["targets"][:, None])[:, 0]
    gh, gw = torch.autograd.grad(logps, (h, w), s.upstream.double())
    torch.testing.assert_close(ref["logps"], logps.detach())
    torch.testing.assert_close(ref["grad_hidden"], gh)
    torch.testing.assert_close(ref["grad_weight"], gw)


def test_schema_names_what_is_missing():
    assert schema.validate({})[:2] == ["result.schema_version", "result.preset"]


# ---------------------------------------------------------------------------------------
# The CPU preset, end to end


@pytest.fixture(scope="module")
def cpu_result(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # A generous budget: on a slow machine nothing may be skipped for time (the preset's own
    # budget keeps a manual run to about a minute).
    proc = subprocess.run([sys.executable, "-m", "bench", "run", "--preset", "cpu",
                           "--budget-s", "1200", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return files[0]


@pytest.mark.slow
def test_cpu_preset_writes_a_complete_result(cpu_result):
    r = json.loads(cpu_result.read_text())
    assert schema.validate(r) == []
    assert r["preset"] == "cpu" and r["device"]["type"] == "cpu"
    assert r["command"].endswith("-m bench run --preset cpu --budget-s 1200 --out "
                                 + str(cpu_result.parent))
    assert r["complete"] is True
    assert r["versions"]["torch"] == torch.__version__
    assert r["alignfuse"]["commit"] and len(r["alignfuse"]["commit"]) == 40
    assert isinstance(r["alignfuse"]["dirty"], bool)
    assert r["ceilings"]["matmul"]["flops_per_s"] > 0 and r["ceilings"]["copy"]["bytes_per_s"] > 0
    assert set(r["suites"]) == {"logprobs", "losses", "packing", "step"}
    for suite, body in r["suites"].items():
        assert body["cases"], f"suite {suite} recorded no case"
        for case in body["cases"]:
            for c in case["contenders"]:
                assert c["status"] in harness.STATUSES
                assert c["status"] != "wrong", (suite, case["case"], c["name"], c["check"])
                assert "budget" not in (c["reason"] or ""), (suite, case["case"], c["name"])
    # The eager logprobs baseline always runs on CPU, is checked and timed in every mode.
    case = r["suites"]["logprobs"]["cases"][0]
    eager = _by_name(case)["torch-eager"]
    assert eager["status"] == "ok" and eager["check"]["passed"]
    assert case["modes"] == ["fwd+bwd"]  # the CPU preset times fwd+bwd only
    for mode in case["modes"]:
        m = eager["modes"][mode]
        assert m["time_s"]["median"] > 0 and m["floor"]["fraction_of_floor"] > 0
    # The soft-capped head (Gemma-2's): alignfuse's backends and eager are checked against
    # the capped reference; nothing errors (what cannot run on CPU says why).
    (capped,) = [c for c in r["suites"]["logprobs"]["cases"] if "softcap=3," in c["case"]]
    assert capped["sizes"]["softcap"] == 3.0
    got = _by_name(capped)
    for name in ("alignfuse/triton", "alignfuse/triton-fused", "alignfuse/triton-fused-forward",
                 "torch-eager", "alignfuse/torch", "linear_cross_entropy/triton"):
        assert got[name]["status"] == "ok" and got[name]["check"]["passed"], got[name]
    assert all(c["status"] != "error" for c in got.values()), got


@pytest.mark.slow
def test_report_renders_a_table_and_pngs(cpu_result, tmp_path):
    paths = render([cpu_result], tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| case | mode |" in report and "torch-eager" in report
    assert cpu_result.name in report  # links its JSON
    pngs = [p for p in paths if p.suffix == ".png"]
    assert pngs and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert any("logprobs" in p.name and p.name.endswith("_time.png") for p in pngs)
    # What the packing suite measures (padding efficiency) is a table of its own, not a
    # note among the skips; its legend names no torch-eager column it does not have.
    packing = report[report.index("### packing"):].split("\n### ")[0]
    assert "| case | quantity | value |" in packing
    assert re.search(r"\| [^|]+ \| efficiency_packed \| 0\.\d+ \|", packing), packing
    details = packing.split("<details>")[1] if "<details>" in packing else ""
    assert "efficiency_" not in details
    assert "speedup over torch-eager" not in packing.split("| case | mode |")[0]


@pytest.mark.parametrize("argv, message", [
    (["run", "--suites", ""], "--suites names no suite"),
    (["run", "--suites", " , "], "--suites names no suite"),
    (["run", "--budget-s", "-5"], "--budget-s must be > 0 seconds, got -5.0"),
    (["run", "--budget-s", "0"], "--budget-s must be > 0 seconds"),
])
def test_bench_run_refuses_a_run_that_would_measure_nothing(argv, message, capsys):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
def test_harness_times_and_measures_memory_on_gpu():
    """On a GPU: CUDA-event timing and peak memory are real (run by bench/gpu_session.sh)."""
    from bench.suites.logprobs import case as logprobs_case

    N, H, V = 1024, 256, 4099
    device = torch.device("cuda")
    case = logprobs_case(N, H, V, torch.bfloat16, device)
    # The eager contender alone: this tests the harness, and the GPU tests share one call.
    case.contenders = [c for c in case.contenders if c.name == "torch-eager"]
    record = harness.run_case(case, device, FAST, ceilings=None, log=lambda line: None)
    eager = _by_name(record)["torch-eager"]
    assert eager["status"] == "ok", eager
    for mode in harness.MODES:
        m = eager["modes"][mode]
        assert m["time_s"]["median"] > 0
        # Eager holds at least the float32 log_softmax of the [N, V] logits.
        assert m["peak_memory_bytes"] >= N * V * 4, (mode, m["peak_memory_bytes"])
        # ... which is extra: not an output or a gradient
        assert m["extra_memory_bytes"] >= N * V * 4, (mode, m["extra_memory_bytes"])


@pytest.mark.slow
def test_readme_gets_the_latest_gpu_table(cpu_result, tmp_path):
    from bench.report import README_BEGIN, README_END, update_readme

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{README_BEGIN} -->\nold\n{README_END}\n\n## after\n")
    assert update_readme(readme, [cpu_result]) is False  # a CPU result is never shown
    gpu = json.loads(cpu_result.read_text())
    gpu["device"] = {"type": "cuda", "name": "Stand-in GPU"}
    (tmp_path / "results").mkdir()
    fake = tmp_path / "results" / "gpu.json"
    fake.write_text(json.dumps(gpu))
    assert update_readme(readme, [fake]) is True
    text = readme.read_text()
    assert "old" not in text and "## after" in text and text.count(README_END) == 1
    assert "[gpu.json](results/gpu.json)" in text and "| case | mode |" in text
    # a later GPU run of other suites only (a follow-up call) keeps the logprobs table
    later = {**gpu, "preset": "gpu-full", "created_utc": "9999-01-01T00:00:00+00:00",
             "suites": {"step": gpu["suites"]["step"]}}
    (tmp_path / "results" / "later.json").write_text(json.dumps(later))
    assert update_readme(readme, [tmp_path / "results"]) is True
    text = readme.read_text()
    assert "[gpu.json](results/gpu.json)" in text and "later.json" not in text


def test_goals_are_computed_from_the_results_with_their_verdicts():
    """Each goal of the issue gets a line with its number and met / NOT MET, from the latest
    GPU result that measured it: here a made-up one whose every number is known."""
    from bench.report import goals

    def mode(median, fraction=None, extra=None, moved=None):
        return {"status": "ok", "time_s": {"median": median}, "extra_memory_bytes": extra,
                "floor": {"fraction_of_floor": fraction, "bytes": moved}}

    def contender(name, role, status="ok", **modes):
        return {"name": name, "role": role, "status": status,
                "modes": {k.replace("_", "+"): v for k, v in modes.items()}}

    logits = 1000 * 2**20
    head = {"case": "N=16,H=4,V=8", "sizes": {"logits_bytes": logits}, "contenders": [
        contender("alignfuse/triton", "subject", fwd_bwd=mode(2.0, 0.9, 0.005 * logits)),
        contender("liger", "baseline", fwd_bwd=mode(3.0)),
        contender("cce", "baseline", status="wrong", fwd_bwd=mode(1.0))]}
    other = {"case": "N=32,H=4,V=8", "sizes": {}, "contenders": [
        contender("alignfuse/triton", "subject", fwd_bwd=mode(2.0)),
        contender("liger", "baseline", fwd_bwd=mode(1.0))]}
    loss = {"case": "policy_loss,S=4,T=8", "sizes": {}, "contenders": [
        contender("alignfuse/cuda", "subject", fwd=mode(1e-3, 0.85, moved=1e8)),
        contender("torch-eager", "baseline", fwd=mode(1e-3, 0.99, moved=1e8))]}
    result = {"device": {"type": "cuda"}, "created_utc": "2026-01-01",
              "suites": {"logprobs": {"cases": [head, other]}, "losses": {"cases": [loss]}}}
    text = "\n".join(goals([(Path("r.json"), result)]))
    assert "r.json" in text
    assert "1.11× — met" in text                                    # 1 / 0.9
    assert "ahead of liger (fwd+bwd, alignfuse/triton): in 1 of 2 cases" in text
    assert "×0.50 to ×1.50 — **NOT MET**" in text
    assert "ahead of cce" not in text                               # it never passed
    assert "0.5% (5 of 1000 MiB) — met" in text
    # the best alignfuse loss op, not the eager baseline's 99%
    assert "the best is 85% (alignfuse/cuda, policy_loss,S=4,T=8, fwd, 1e+02 MB moved) — met" \
        in text
    assert goals([(Path("c.json"), {**result, "device": {"type": "cpu"}})]) == []


def test_memory_cell_gives_the_share_of_the_logits():
    from bench.report import _mem_cell

    contender = {"modes": {"fwd": {"peak_memory_bytes": 3 << 20}, "bwd": {},
                           "fwd+bwd": {"peak_memory_bytes": 6 << 20,
                                       "extra_memory_bytes": 3 << 19}}}
    assert _mem_cell(contender, "fwd", {"logits_bytes": 12 << 20}) == "3 MiB (25% of logits)"
    assert _mem_cell(contender, "fwd", {"N": 7}) == "3 MiB"
    assert _mem_cell(contender, "bwd", {"logits_bytes": 12 << 20}) == "—"
    assert (_mem_cell(contender, "fwd+bwd", {"logits_bytes": 12 << 20})
            == "6 MiB (50% of logits); extra 1.5 MiB (12.5%)")


def test_extra_memory_is_the_peak_above_outputs_and_gradients():
    """The log-prob case's work model says what every implementation must hold after each
    mode: the [N] float32 log-probs, plus the gradients of hidden [N, H] and weight [V, H]
    in the model dtype after a backward; the harness subtracts it from the peak."""
    from bench.suites.logprobs import case as logprobs_case

    N, H, V = 37, 16, 1031
    case = logprobs_case(N, H, V, torch.bfloat16, torch.device("cpu"))
    grads = (N * H + V * H) * 2
    assert case.work("fwd")["out_bytes"] == N * 4
    assert case.work("bwd")["out_bytes"] == case.work("fwd+bwd")["out_bytes"] == N * 4 + grads
    assert harness.extra_memory(10_000 + N * 4, case.work("fwd")) == 10_000
    assert harness.extra_memory(None, case.work("fwd")) is None
    assert harness.extra_memory(10_000, {"flops": 1, "bytes": 1}) is None
    contenders = [{"role": "baseline", "modes": {"fwd": {
        "status": "ok", "time_s": {"median": 1.0}, "peak_memory_bytes": 500 + N * 4}}}]
    harness.derived(contenders, case.work, ceilings=None)
    assert contenders[0]["modes"]["fwd"]["extra_memory_bytes"] == 500


# ---------------------------------------------------------------------------------------
# A CUDA fault, the time budget, the plan (faked on CPU: nothing here needs a GPU)

STICKY = "CUDA error: an illegal memory access was encountered"


def test_free_memory_never_raises_and_the_context_probe_reports_a_sticky_error(monkeypatch):
    def sticky(*args, **kwargs):
        raise RuntimeError(STICKY)

    monkeypatch.setattr(torch.cuda, "empty_cache", sticky)
    monkeypatch.setattr(torch.cuda, "synchronize", sticky)
    harness.free_memory(torch.device("cuda"))  # a cleanup in `finally`: must not raise
    assert STICKY in harness.context_error(torch.device("cuda"))
    assert harness.context_error(CPU) is None


def _poisoning(poisoned: dict):
    def bad(t):
        poisoned["on"] = True
        raise RuntimeError(STICKY)

    return bad


def test_a_cuda_fault_keeps_the_timed_contenders_and_stops_the_case(monkeypatch):
    poisoned = {"on": False}
    monkeypatch.setattr(harness, "context_error",
                        lambda device: STICKY if poisoned["on"] else None)
    good = lambda t: {"out": 3 * t["x"]}  # noqa: E731
    case = _scale_case([Contender("triton", "subject", good),
                        Contender("eager", "baseline", good),
                        Contender("cuda", "subject", _poisoning(poisoned)),
                        Contender("liger", "baseline", good)])
    seen = []
    with pytest.raises(harness.ContextLost) as info:
        harness.run_case(case, CPU, FAST, ceilings=None, log=lambda line: None,
                         on_progress=lambda r: seen.append([c["name"] for c in r["contenders"]]))
    record = info.value.record
    got = _by_name(record)
    assert got["triton"]["status"] == got["eager"]["status"] == "ok"
    assert got["triton"]["modes"]["fwd+bwd"]["speedup_vs"] == {
        "eager": pytest.approx(got["eager"]["modes"]["fwd+bwd"]["time_s"]["median"]
                               / got["triton"]["modes"]["fwd+bwd"]["time_s"]["median"])}
    assert got["cuda"]["status"] == "error" and got["cuda"]["context_lost"] is True
    assert got["liger"]["status"] == "skipped" and "context broke at cuda" in got["liger"]["reason"]
    assert STICKY in record["stopped"]
    # The record was handed on contender by contender, as each finished.
    assert seen[:3] == [[], ["triton"], ["triton", "eager"]]


def test_cuda_contenders_come_last_in_every_case():
    from bench.presets import PRESETS
    from bench.suites import logprobs, losses

    cases = logprobs.cases(PRESETS["gpu"], CPU) + losses.cases(PRESETS["gpu"], CPU)
    for case in cases:
        names = [c.name for c in case.contenders]
        is_cuda = [n.endswith("/cuda") for n in names]
        assert any(is_cuda), case.name
        assert is_cuda == sorted(is_cuda), (case.name, names)


def _stub_ceilings(*args):
    return {"matmul": {"dtype": "float32", "flops_per_s": 1e12, "time_s": 1.0},
            "copy": {"bytes_per_s": 1e10, "time_s": 1.0}}


@pytest.fixture
def stopped_run(monkeypatch, tmp_path):
    """A run through the runner whose third contender 'breaks the CUDA context'. Its second
    contender reads the result file as it runs: the first one must already be in it."""
    from types import SimpleNamespace

    from bench import runner
    from bench.presets import PRESETS, Stage

    poisoned, spied = {"on": False}, {}
    monkeypatch.setattr(harness, "context_error",
                        lambda device: STICKY if poisoned["on"] else None)
    monkeypatch.setattr(runner.ceilings_mod, "measure", _stub_ceilings)

    def spy(t):
        if "file" not in spied:
            (path,) = tmp_path.glob("*.json")
            spied["file"] = json.loads(path.read_text())
        return {"out": 3 * t["x"]}

    def first_cases(preset, device):
        a = _scale_case([Contender("alignfuse/cuda", "subject", _poisoning(poisoned)),
                         Contender("eager", "baseline", lambda t: {"out": 3 * t["x"]}),
                         Contender("spy", "subject", spy)])
        b = _scale_case([Contender("eager", "baseline", lambda t: {"out": 3 * t["x"]})])
        b.name = "after-the-fault"
        return [a, b]

    def never(*args, **kwargs):
        raise AssertionError("a stage after the CUDA fault ran")

    modules = {"logprobs": SimpleNamespace(cases=first_cases),
               "losses": SimpleNamespace(cases=never)}
    monkeypatch.setattr(runner, "_suite_module", modules.__getitem__)
    monkeypatch.setitem(PRESETS, "fault", replace(
        PRESETS["cpu"], name="fault", timing=FAST, modes=None,
        plan=[Stage("logprobs"), Stage("losses")]))
    path = runner.run("fault", out_dir=tmp_path, log=lambda line: None)
    return path, json.loads(path.read_text()), spied


def test_a_cuda_fault_stops_the_run_with_every_record_written(stopped_run):
    path, r, spied = stopped_run
    assert schema.validate(r) == []
    assert r["complete"] is False and STICKY in r["incomplete_reason"]
    (case,) = r["suites"]["logprobs"]["cases"]  # the case after the fault never started
    got = _by_name(case)
    # */cuda ran last (the runner orders it so), after both others were timed
    assert [c["name"] for c in case["contenders"]] == ["eager", "spy", "alignfuse/cuda"]
    assert got["eager"]["status"] == got["spy"]["status"] == "ok"
    assert got["alignfuse/cuda"]["status"] == "error"
    assert "losses" not in r["suites"]
    assert [(st["stage"], st["cases"]) for st in r["plan"]] == [("logprobs", 1)]
    # Mid-run, the file already held the contender that had finished, flagged incomplete.
    mid = spied["file"]
    assert mid["complete"] is False and "killed" in mid["incomplete_reason"]
    assert [c["name"] for c in mid["suites"]["logprobs"]["cases"][0]["contenders"]] == ["eager"]


def test_report_and_readme_flag_an_incomplete_run(stopped_run, tmp_path):
    from bench.report import README_BEGIN, README_END, update_readme

    path, r, _ = stopped_run
    render([path], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**INCOMPLETE**" in report and STICKY in report
    assert f"of a {r['budget_s']:.0f} s budget" in report
    r["device"] = {"type": "cuda", "name": "Stand-in GPU"}
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "r.json").write_text(json.dumps(r))
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN} -->\nold\n{README_END}\n")
    assert update_readme(readme, [tmp_path / "gpu"])
    assert "**INCOMPLETE**" in readme.read_text()


def test_a_case_after_the_deadline_builds_nothing():
    calls = []

    def make_inputs(seed):
        calls.append("make_inputs")
        raise AssertionError("built after the deadline")

    case = _scale_case([Contender("eager", "baseline", lambda t: {"out": 3 * t["x"]})])
    case.make_inputs = make_inputs
    late = replace(FAST, deadline=0.0)
    record = harness.run_case(case, CPU, late, ceilings=None, log=lambda line: None)
    assert calls == []
    assert record["contenders"][0]["status"] == "skipped"
    assert "budget" in record["contenders"][0]["reason"]


def test_step_and_packing_build_nothing_after_the_deadline(monkeypatch):
    from bench.presets import PRESETS
    from bench.suites import packing, step

    def boom(*args, **kwargs):
        raise AssertionError("built after the deadline")

    monkeypatch.setattr(step, "_model", boom)
    monkeypatch.setattr(packing, "lognormal_lengths", boom)
    monkeypatch.setattr(packing, "efficiency", boom)
    late = replace(FAST, deadline=0.0)
    records = (step.run(PRESETS["cpu"], CPU, late, None, lambda line: None)
               + packing.run(PRESETS["cpu"], CPU, late, None, lambda line: None))
    assert len(records) == 3
    for record in records:
        for c in record["contenders"]:
            assert c["status"] == "skipped" and "budget" in c["reason"], (record["case"], c)


def test_step_peak_memory_baseline_holds_no_gradients(monkeypatch):
    """The parameter .grad left by a timed run must not count in the baseline (the measured
    run frees it with zero_grad(set_to_none=True)): every model's grads are cleared before
    `base` is read. The CUDA memory counters are faked; the step runs on CPU tensors."""
    from bench.presets import PRESETS
    from bench.suites import step

    case = step.step_case("dpo", PRESETS["cpu"].step, torch.float32, CPU)
    inputs = case.make_inputs(0)
    eager = next(c for c in case.contenders if c.name == "torch-eager")
    harness._run_mode(case, eager, inputs, "fwd+bwd", None)  # as a timed run: grads left
    # The case's models (built lazily by the run above), from the eager run's closure.
    (get_models,) = [cell.cell_contents for cell in eager.run.__closure__
                     if getattr(cell.cell_contents, "__name__", "") == "get_models"]
    models = [m for pair in get_models().values() for m in pair]

    def live_grads():
        return sum(p.grad is not None for m in models for p in m.parameters())

    assert live_grads() > 0
    grads_at_base = []
    for name, fake in (("memory_allocated", lambda device=None: grads_at_base.append(
                            live_grads()) or 0),
                       ("max_memory_allocated", lambda device=None: 1),
                       ("reset_peak_memory_stats", lambda device=None: None),
                       ("synchronize", lambda device=None: None),
                       ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, fake)
    harness.peak_memory(case, eager, inputs, "fwd+bwd", torch.device("cuda"))
    assert grads_at_base == [0]


def test_step_tokens_per_second_uses_the_mean_over_the_timed_sets(monkeypatch):
    from bench.presets import PRESETS
    from bench.suites import step

    def fake_run_case(case, device, cfg, ceilings, log, on_progress=None):
        for seed in range(2):  # two input sets, which the timed runs alternate between
            case.make_inputs(seed)
        ok = {"status": "ok", "time_s": {"median": 0.5}}
        return {"case": case.name, "input_sets": 2,
                "contenders": [{"name": "alignfuse", "modes": {"fwd+bwd": ok}}]}

    monkeypatch.setattr(step, "run_case", fake_run_case)
    records = step.run(PRESETS["cpu"], CPU, FAST, None, lambda line: None)
    for record in records:
        n = record["metrics"]["tokens_per_input_set"]
        assert len(n) == 2
        assert record["metrics"]["tokens_per_step"] == pytest.approx(sum(n) / 2)
        m = record["contenders"][0]["modes"]["fwd+bwd"]
        assert m["tokens_per_s"] == pytest.approx(sum(n) / 2 / 0.5)
    # The sets' lengths differ (else this test would prove nothing).
    assert any(len(set(r["metrics"]["tokens_per_input_set"])) == 2 for r in records)


def test_a_failed_import_is_recorded_with_its_error(monkeypatch):
    from bench.suites import common

    real = common.importlib.import_module

    def failing(name, *args):
        if name == "alignfuse.kernels":
            raise ImportError("libcudart.so.13: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(common.importlib, "import_module", failing)
    why = common.backend_unavailable("linear_logprobs", "cuda", CPU)
    assert "libcudart.so.13" in why and "not implemented yet" not in why
    monkeypatch.setattr(common.importlib, "import_module", real)
    assert "not implemented yet" in common.op_unavailable("kernels", "no_such_op_xyz")


def test_the_gpu_plan_runs_the_headline_first_and_cuda_after_the_n_sweep():
    from bench.presets import GPU_PLAN, PRESETS
    from bench.runner import _prepare
    from bench.suites import logprobs, losses

    gpu = PRESETS["gpu"]
    # The sizes stay in the preset.
    assert {(s["N"], s["H"], s["V"]) for s in gpu.logprobs} >= {
        (n, 4096, 128256) for n in (4096, 8192, 16384, 32768)} | {
        (16384, 896, 151936), (16384, 4096, 32000), (16384, 8192, 128256)}
    assert gpu.dtype == torch.bfloat16
    runs = []  # (stage index, case name, modes, contender names)
    for i, stage in enumerate(GPU_PLAN):
        module = {"logprobs": logprobs, "losses": losses}.get(stage.suite)
        if module is None:
            continue
        for c in module.cases(gpu, CPU):
            c = _prepare(c, stage, gpu.modes)
            if c is not None:
                runs.append((i, c.name, c.modes, [x.name for x in c.contenders]))
    first = runs[0]
    assert first[1].startswith("N=16384,H=4096,V=128256") and first[2] == harness.MODES
    assert "alignfuse/triton" in first[3] and not any(n.endswith("/cuda") for n in first[3])
    # Every logprobs size is timed in fwd+bwd by some stage (the plots against N).
    timed = {name for _, name, modes, _ in runs if "fwd+bwd" in modes}
    assert {c.name for c in logprobs.cases(gpu, CPU)} <= timed
    # */cuda in stages of their own (a fault there stops the run): alignfuse/cuda at the
    # headline right after the N sweep (the plots against N are kept), the others after the
    # step suite; alignfuse/torch only in the last stage.
    cuda_stages = sorted({i for i, _, _, names in runs if any(n.endswith("/cuda") for n in names)})
    assert all(all(n.endswith("/cuda") for n in names)
               for i, _, _, names in runs if i in cuda_stages)
    sweep = next(i for i, st in enumerate(GPU_PLAN) if st.name == "logprobs N sweep")
    assert cuda_stages[0] == sweep + 1
    assert {name for i, name, _, _ in runs if i == cuda_stages[0]} == {first[1]}
    assert all(i < cuda_stages[0] for i, _, _, _ in runs if i <= sweep)
    step_stage = next(i for i, st in enumerate(GPU_PLAN) if st.suite == "step")
    assert step_stage < cuda_stages[1]
    assert {i for i, _, _, names in runs if "alignfuse/torch" in names} == {len(GPU_PLAN) - 1}


def test_the_gpu_plan_sweeps_the_logits_budget_at_the_headline_only():
    """On CUDA the logprobs cases carry alignfuse/triton with the logits block capped at
    each of BUDGETS_MIB; the plan times them in one stage of their own, at the headline, in
    fwd+bwd (the peak memory they trade), and nowhere else. Building the cases touches no
    GPU."""
    from bench.presets import GPU_PLAN, PRESETS
    from bench.runner import _prepare
    from bench.suites import logprobs

    gpu, cuda = PRESETS["gpu"], torch.device("cuda")
    budgets = [f"alignfuse/triton-budget={mib}MiB" for mib in logprobs.BUDGETS_MIB]
    runs = []
    for i, stage in enumerate(GPU_PLAN):
        if stage.suite != "logprobs":
            continue
        for c in logprobs.cases(gpu, cuda):
            c = _prepare(c, stage, gpu.modes)
            if c is not None:
                runs.append((stage.name, c.name, c.modes, [x.name for x in c.contenders]))
    swept = [(st, name, modes) for st, name, modes, names in runs if set(budgets) & set(names)]
    assert [(st, name.split(",")[:3], modes) for st, name, modes in swept] == [
        ("logprobs headline budgets", ["N=16384", "H=4096", "V=128256"], ("fwd+bwd",))]
    assert next(names for st, _, _, names in runs if st == "logprobs headline budgets") == budgets
    assert not set(budgets) & {x.name for x in logprobs.cases(gpu, CPU)[0].contenders}
    note = {x.name: x.note for x in logprobs.cases(gpu, cuda)[0].contenders}[budgets[1]]
    assert note == "ALIGNFUSE_CHUNK_BUDGET_MIB=512"


def test_a_later_stage_adds_contenders_and_modes_to_the_same_record():
    eager = Contender("eager", "baseline", lambda t: {"out": t["x"] * 3})
    fast = Contender("fast", "subject", lambda t: {"out": t["x"] + t["x"] + t["x"]})
    first = _scale_case([eager])
    first.modes = ("fwd+bwd",)
    record = harness.run_case(first, CPU, FAST, ceilings=None, log=lambda line: None)
    again = _scale_case([fast])
    same = harness.run_case(again, CPU, FAST, ceilings=None, log=lambda line: None,
                            into=record)
    assert same is record and record["modes"] == list(harness.MODES)
    got = _by_name(record)
    assert got["eager"]["modes"]["fwd"]["status"] == "skipped"
    assert set(got["fast"]["modes"]["fwd+bwd"]["speedup_vs"]) == {"eager"}


def test_packing_efficiency_counts_the_slots_each_layout_allocates():
    """The packing suite's metrics, recomputed by hand on a small long-tailed draw: packed
    micro-batches allocate max_tokens each, the padded plan sequences x the longest."""
    import numpy as np

    from alignfuse.engine.packing import plan_micro_batches
    from bench.suites.packing import efficiency, lognormal_lengths

    lengths = lognormal_lengths(301, 40, 1.0, 500, seed=3)
    m = efficiency(lengths, 1024)
    packed = plan_micro_batches(lengths, max_tokens=1024)[0]
    padded = plan_micro_batches(lengths, max_tokens=1024, padded=True)[0]
    assert m["efficiency_packed"] == pytest.approx(lengths.sum() / (len(packed) * 1024))
    slots = sum(b.size * int(lengths[b].max()) for b in padded)
    assert m["efficiency_padded_plan"] == pytest.approx(lengths.sum() / slots)
    assert m["padded_plan_steps"] == len(padded) >= m["packed_steps"] == len(packed)
    assert 0.5 < m["efficiency_padded_plan"] <= 1 and np.isfinite(m["efficiency_padded_b8"])


@pytest.mark.slow
def test_gpu_session_tests_part_rehearses_dry_and_reports(tmp_path):
    """The GPU session's second call (`ALIGNFUSE_SESSION_PART=tests`), rehearsed on CPU
    (dry: two small test files): pytest runs, and its log and JUnit XML land in $OUT; an
    unknown part is refused before anything runs."""
    import xml.etree.ElementTree as ElementTree

    env = {**os.environ, "OUT": str(tmp_path), "ALIGNFUSE_SESSION_DRY": "1",
           "ALIGNFUSE_SESSION_PART": "tests", "PY": sys.executable}
    env.pop("ALIGNFUSE_TEST_DEVICE", None)
    proc = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "pytest exit 0" in (tmp_path / "session.log").read_text()
    suite = ElementTree.parse(tmp_path / "pytest_gpu_all.xml").getroot().find("testsuite")
    assert int(suite.get("tests")) > 50 and suite.get("failures") == suite.get("errors") == "0"
    # every test file is named in the script's priority list (the kernel files first)
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    listed = script.split('FILES="', 1)[1].split('"', 1)[0].split()
    assert sorted(listed) == sorted(p.stem for p in (ROOT / "tests").glob("test_*.py"))
    assert listed[:2] == ["test_foundation", "test_logprobs"]
    bad = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "ALIGNFUSE_SESSION_PART": "bench"}, timeout=60)
    assert bad.returncode == 2 and "ALIGNFUSE_SESSION_PART must be main, tests or followup" in bad.stdout


@pytest.mark.slow
def test_gpu_session_followup_part_runs_the_named_suites_then_the_named_files(tmp_path):
    """The third call (`ALIGNFUSE_SESSION_PART=followup`), rehearsed on CPU: a result JSON of
    the named suites only, then pytest on the named files only."""
    import xml.etree.ElementTree as ElementTree

    env = {**os.environ, "OUT": str(tmp_path), "ALIGNFUSE_SESSION_DRY": "1",
           "ALIGNFUSE_SESSION_PART": "followup", "ALIGNFUSE_SESSION_SUITES": "step",
           "ALIGNFUSE_SESSION_FILES": "test_reward_model", "PY": sys.executable}
    env.pop("ALIGNFUSE_TEST_DEVICE", None)
    proc = subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "session.log").read_text()
    assert "bench exit 0" in log and "pytest exit 0" in log
    [result] = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert list(result["suites"]) == ["step"] and result["complete"]
    suite = ElementTree.parse(tmp_path / "pytest_gpu_all.xml").getroot().find("testsuite")
    files = {c.get("classname").split(".")[1] for c in suite.iter("testcase")}
    assert files == {"test_reward_model"} and suite.get("failures") == suite.get("errors") == "0"


def test_an_explicit_commit_wins_over_a_stale_git_copy(monkeypatch):
    """The device machine's .git is a copy from the session's start: the commit passed in
    ALIGNFUSE_GIT_COMMIT is the one recorded, and what git saw is kept beside it."""
    from bench import environment

    monkeypatch.delenv("ALIGNFUSE_GIT_COMMIT", raising=False)
    head = environment.commit()
    assert head["source"] == "git" and len(head["commit"]) == 40
    monkeypatch.setenv("ALIGNFUSE_GIT_COMMIT", "f" * 40)
    monkeypatch.setenv("ALIGNFUSE_GIT_DIRTY", "0")
    got = environment.commit()
    assert got["commit"] == "f" * 40 and got["dirty"] is False
    assert got["git_saw"]["commit"] == head["commit"]
    monkeypatch.setenv("ALIGNFUSE_GIT_COMMIT", head["commit"])
    assert "git_saw" not in environment.commit()


# ---------------------------------------------------------------------------------------
# --exclude, the preflight, skips for time and what the report says of them


def _slow(seconds: float, backward: bool = False):
    """3 * x, sleeping `seconds` in the forward (or only in the backward)."""

    class Sleep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 3 * x

        @staticmethod
        def backward(ctx, g):
            import time

            time.sleep(seconds)
            return 3 * g

    def run(t):
        if not backward:
            import time

            time.sleep(seconds)
        return {"out": Sleep.apply(t["x"])}

    return run


def _tracking(ran: list):
    """tracked(name): a contender's run (out = 3 * x) that appends `name` to `ran`."""
    def tracked(name):
        def run(t):
            ran.append(name)
            return {"out": 3 * t["x"]}
        return run

    return tracked


def test_excluded_contenders_never_run_and_say_so():
    ran = []
    tracked = _tracking(ran)
    case = _scale_case([Contender("eager", "baseline", tracked("eager")),
                        Contender("cce", "baseline", tracked("cce")),
                        Contender("alignfuse/cuda", "subject", tracked("alignfuse/cuda")),
                        Contender("liger-chunked", "baseline", tracked("liger-chunked"))])
    cfg = replace(FAST, exclude=("cce", "*/cuda", "liger"))  # a name, a pattern, a prefix
    record = harness.run_case(case, CPU, cfg, ceilings=None, log=lambda line: None)
    got = _by_name(record)
    assert set(ran) == {"eager"}
    for name, pattern in (("cce", "cce"), ("alignfuse/cuda", "*/cuda"),
                          ("liger-chunked", "liger")):
        assert got[name]["status"] == "skipped"
        assert got[name]["reason"] == f"excluded by --exclude ({pattern!r})"
    assert got["eager"]["status"] == "ok"
    # A case whose contenders are all excluded builds nothing.
    case.make_inputs = lambda seed: (_ for _ in ()).throw(AssertionError("built"))
    case.contenders = case.contenders[1:]
    record = harness.run_case(case, CPU, cfg, ceilings=None, log=lambda line: None)
    assert all(c["reason"].startswith("excluded by --exclude") for c in record["contenders"])


def test_a_case_qualified_exclusion_names_the_contender_in_those_cases_only():
    from bench.harness import excluded_by

    patterns = ("linear_*:liger",)
    assert excluded_by("liger", patterns, "linear_grpo,S=2,T=5") == "linear_*:liger"
    assert excluded_by("liger", patterns, "N=19,H=16,V=131,float32") is None
    assert excluded_by("liger", patterns) is None            # no case: names nothing
    assert excluded_by("torch-eager", patterns, "linear_dpo,P=1") is None
    assert excluded_by("liger", ("N=*:liger", "cce"), "N=19,H=16") == "N=*:liger"
    ran = []
    tracked = _tracking(ran)
    case = _scale_case([Contender("eager", "baseline", tracked("eager")),
                        Contender("liger", "baseline", tracked("liger"))])
    for case_name, excluded in ((case.name, True), ("other", False)):
        ran.clear()
        cfg = replace(FAST, exclude=(f"{case_name}:liger",))
        record = harness.run_case(case, CPU, cfg, ceilings=None, log=lambda line: None)
        assert ("liger" not in ran) == excluded and "eager" in ran
        assert (_by_name(record)["liger"]["status"] == "skipped") == excluded


def test_preflight_of_the_linear_losses_runs_their_cases(monkeypatch, capsys):
    """`--suite losses`: the linear GRPO and DPO cases with only the named contender (on the
    CPU, Liger's chunked losses run uncompiled); a raise in one case fails the preflight."""
    import alignfuse.kernels
    from bench import runner

    assert runner.preflight("liger", suite="losses") == 0
    out = capsys.readouterr().out
    assert "linear_grpo liger ok" in out and "linear_dpo liger ok" in out
    assert "torch-eager" not in out
    assert runner.preflight("cce", suite="losses") == 2
    with pytest.raises(ValueError, match="suite must be one of"):
        runner.preflight("liger", suite="step")

    def boom(*args, **kwargs):
        raise RuntimeError("compile exploded")

    monkeypatch.setattr(alignfuse.kernels, "dpo_loss", boom)  # the DPO case only
    assert runner.preflight("torch-eager", suite="losses") == 1
    assert "linear_grpo torch-eager ok" in capsys.readouterr().out


def test_bench_run_passes_exclude_on(monkeypatch, tmp_path):
    from bench import runner
    from bench.__main__ import main

    seen = {}

    def fake_run(preset, suites, out, budget_s, argv=None, exclude=()):
        seen["exclude"] = exclude
        path = tmp_path / "r.json"
        path.write_text(json.dumps({"complete": True}))
        return path

    monkeypatch.setattr(runner, "run", fake_run)
    assert main(["run", "--exclude", " cce, ,*/cuda,liger"]) == 0
    assert seen["exclude"] == ("cce", "*/cuda", "liger")
    assert main(["run", "--exclude", ""]) == 0 and seen["exclude"] == ()


def test_a_mode_that_cannot_fit_before_the_deadline_is_skipped_with_its_estimate():
    import time

    case = _scale_case([Contender("slow", "subject", _slow(0.1))])
    sets = [case.make_inputs(0)]
    cfg = replace(FAST, deadline=time.monotonic() + 0.05)
    with pytest.raises(harness.OutOfTime) as info:
        harness.time_mode(case, case.contenders[0], sets, "fwd", CPU, cfg)
    # the first warm-up measured ~0.1 s; it, 3 timed runs and the memory run: ~0.4 s
    assert "time budget" in str(info.value) and info.value.estimate_s >= 0.4
    # Time left for the fewest runs, not for max_reps: the timed runs are capped to it.
    cfg = replace(FAST, min_reps=2, max_reps=50, target_s=100.0,
                  deadline=time.monotonic() + 1.0)
    stats = harness.time_mode(case, case.contenders[0], sets, "fwd", CPU, cfg)
    assert 2 <= stats["rounds"] < 20


def test_a_contender_timed_in_no_mode_is_skipped_not_ok():
    import time

    case = _scale_case([Contender("slow", "subject", _slow(0.1))])
    cfg = replace(FAST, deadline=time.monotonic() + 0.15)
    record = harness.run_case(case, CPU, cfg, ceilings=None, log=lambda line: None)
    (c,) = record["contenders"]
    assert c["check"]["passed"] and c["status"] == "skipped"
    assert "time budget" in c["reason"]
    assert c["modes_skipped_for_time"] == list(harness.MODES)
    assert all(m["status"] == "skipped" for m in c["modes"].values())


@pytest.fixture
def late_run(monkeypatch, tmp_path):
    """A run through the runner in which the time budget leaves out the bwd and fwd+bwd
    modes of one contender (faked: its time_mode raises OutOfTime), a baseline fails its
    check, and a contender is excluded."""
    from types import SimpleNamespace

    from bench import runner
    from bench.presets import PRESETS, Stage

    monkeypatch.setattr(runner.ceilings_mod, "measure", _stub_ceilings)
    real = harness.time_mode

    def time_mode(case, contender, sets, mode, device, cfg, estimate=None):
        if contender.name == "slow" and mode != "fwd":
            raise harness.OutOfTime("time budget: 5 more runs of ~2 s do not fit", 10.0)
        return real(case, contender, sets, mode, device, cfg, estimate)

    monkeypatch.setattr(harness, "time_mode", time_mode)

    def cases(preset, device):
        return [_scale_case([Contender("eager", "baseline", lambda t: {"out": 3.01 * t["x"]}),
                             Contender("fast", "subject", lambda t: {"out": 3 * t["x"]}),
                             Contender("slow", "subject", lambda t: {"out": 3 * t["x"]}),
                             Contender("cce", "baseline", lambda t: {"out": 3 * t["x"]})])]

    monkeypatch.setattr(runner, "_suite_module",
                        {"logprobs": SimpleNamespace(cases=cases)}.__getitem__)
    monkeypatch.setitem(PRESETS, "late", replace(
        PRESETS["cpu"], name="late", timing=FAST, modes=None, plan=[Stage("logprobs")]))
    path = runner.run("late", out_dir=tmp_path, log=lambda line: None, exclude=("cce",))
    return path, json.loads(path.read_text())


def test_a_budget_cut_run_finishes_but_says_what_it_left_out(late_run, tmp_path):
    path, r = late_run
    assert schema.validate(r) == []
    # complete: the process finished its plan; budget_exhausted: the plan was cut
    assert r["complete"] is True and r["budget_exhausted"] is True
    assert r["skipped_for_time"] == {"contenders": 0, "modes": 2}
    assert r["exclude"] == ["cce"]
    got = _by_name(r["suites"]["logprobs"]["cases"][0])
    assert got["slow"]["status"] == "ok"
    assert got["slow"]["modes_skipped_for_time"] == ["bwd", "fwd+bwd"]
    assert got["slow"]["modes"]["bwd"]["estimate_s"] == 10.0
    assert got["cce"]["reason"] == "excluded by --exclude ('cce')"
    render([path], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "**BUDGET EXHAUSTED**: 0 contender(s) and 2 mode(s)" in report
    assert "excluded (--exclude): cce" in report
    assert "| skipped (time) |" in report
    assert "bwd, fwd+bwd skipped for time: time budget" in report
    # the speedup table marks the baseline that failed its check
    assert "vs eager ✗" in report


def test_a_run_with_nothing_cut_is_not_flagged(stopped_run):
    _, r, _ = stopped_run
    assert r["budget_exhausted"] is False and r["skipped_for_time"] == {"contenders": 0,
                                                                        "modes": 0}


def test_preflight_runs_one_family_alone(monkeypatch, capsys):
    from bench import runner
    from bench.suites import logprobs

    assert runner.preflight("torch-eager") == 0
    out = capsys.readouterr().out
    assert "preflight torch-eager: torch-eager ok" in out and "liger" not in out
    assert runner.preflight("no-such-contender") == 2

    def boom(t, softcap=None):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(logprobs, "_eager", boom)
    assert runner.preflight("torch-eager") == 1


def test_torch_rowwise_matches_the_reference_in_chunks(monkeypatch):
    from bench.suites import logprobs

    monkeypatch.setattr(logprobs, "ROWWISE_ROWS", 5)  # several chunks of 37 rows
    for dtype in (torch.bfloat16, torch.float32):
        case = logprobs.case(37, 16, 1031, dtype, CPU)
        (rowwise,) = [c for c in case.contenders if c.name == "torch-rowwise"]
        assert rowwise.role == "baseline"
        s = case.make_inputs(1)
        check = harness.check(case, rowwise, s, case.reference(s))
        assert check["passed"], (dtype, check)
        assert set(check["rel_err"]) == {"logps", "grad_hidden", "grad_weight"}


def test_step_floor_leaves_out_an_untied_input_embedding(monkeypatch):
    from alignfuse.engine import tiny

    from bench.presets import PRESETS
    from bench.suites import step

    cfg = PRESETS["cpu"].step
    total, matmul = step._count_params(cfg)
    assert total - matmul == cfg["vocab"] * cfg["hidden"]  # the embedding table
    case = step.step_case("grpo", cfg, torch.float32, CPU)
    assert case.flops_per_token == 6 * matmul and case.sizes["params"] == total
    # Tied to the LM head, it is the head's weight: counted once, and kept.
    real = tiny.tiny_config
    monkeypatch.setattr(tiny, "tiny_config",
                        lambda *a, **k: real(*a, **{**k, "tie_word_embeddings": True}))
    tied_total, tied_matmul = step._count_params(cfg)
    assert tied_matmul == tied_total == total - cfg["vocab"] * cfg["hidden"]


def test_a_step_model_that_cannot_be_configured_is_a_recorded_skip(monkeypatch):
    from bench.presets import PRESETS
    from bench.suites import step

    def broken(cfg):
        raise ImportError("libcudart.so.13: cannot open shared object file")

    monkeypatch.setattr(step, "_count_params", broken)
    records = step.run(PRESETS["cpu"], CPU, FAST, None, lambda line: None)
    assert len(records) == 2
    for record in records:
        for c in record["contenders"]:
            assert c["status"] == "skipped" and "libcudart.so.13" in c["reason"]


def test_loss_op_floors_write_the_gradients_in_backward_modes():
    from bench.suites import losses

    S, T = 3, 11
    case = losses.policy_loss_case(S, T, CPU)
    assert case.work("fwd+bwd")["bytes"] - case.work("fwd")["bytes"] == S * T * 4
    assert case.work("bwd")["bytes"] == case.work("fwd+bwd")["bytes"]
    dpo = losses.dpo_loss_case(7, CPU)
    assert dpo.work("fwd+bwd")["bytes"] - dpo.work("fwd")["bytes"] == 2 * 7 * 4


def test_the_gpu_plan_leaves_packing_to_the_cpu_and_fits_its_device_calls():
    from bench.presets import GPU_PLAN, PRESETS
    from bench.runner import _prepare
    from bench.suites import logprobs

    assert "packing" not in {stage.suite for stage in GPU_PLAN}
    assert PRESETS["gpu-full"].budget_s <= 540  # one device call is 600 s at most
    # torch-rowwise (a second eager baseline) is timed in the headline case only
    with_rowwise = set()
    for i, stage in enumerate(GPU_PLAN):
        if stage.suite != "logprobs":
            continue
        for c in logprobs.cases(PRESETS["gpu"], CPU):
            c = _prepare(c, stage, PRESETS["gpu"].modes)
            if c is not None and "torch-rowwise" in [x.name for x in c.contenders]:
                with_rowwise.add((i, c.name, c.modes))
    assert with_rowwise == {(0, "N=16384,H=4096,V=128256,bfloat16", harness.MODES)}


def test_report_lists_each_contenders_note(late_run, tmp_path):
    path, r = late_run
    case = r["suites"]["logprobs"]["cases"][0]
    case["contenders"][1]["note"] = "skips gradient tiles below filter_eps"
    (tmp_path / "noted.json").write_text(json.dumps(r))
    render([tmp_path / "noted.json"], tmp_path / "report")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "- fast: skips gradient tiles below filter_eps" in report
