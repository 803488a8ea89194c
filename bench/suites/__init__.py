"""The benchmark suites. A suite module has either `cases(preset, device) -> [Case]`
(checked and timed by `bench.harness.run_case`) or, when its measurements do not fit the
case form, `run(preset, device, cfg, ceilings, log, on_progress=None) -> [case record]`,
passing `on_progress` on to `run_case` (the runner writes the result file after every
contender) and building nothing once `cfg.deadline` has passed."""
