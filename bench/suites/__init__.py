"""The benchmark suites. A suite module has either `cases(preset, device) -> [Case]`
(checked and timed by `bench.harness.run_case`) or, when its measurements do not fit the
case form, `run(preset, device, cfg, ceilings, log) -> [case record]`."""
