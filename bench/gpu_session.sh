#!/usr/bin/env bash
# One GPU session in ONE device call (under 10 minutes): install the carried baselines,
# build alignfuse with its CUDA module, run the GPU tests, run the GPU benchmark preset, and
# leave logs and the result JSON in $OUT.
#
# Before the call, here (a machine with PyPI), from the repository root:
#   bash bench/fetch_wheels.sh          # liger-kernel + cut-cross-entropy wheels into .whl/
# Then the device call (the tree may travel without .git, so pass the commit in):
#   run(command="ALIGNFUSE_GIT_COMMIT=$(git rev-parse HEAD) ALIGNFUSE_GIT_DIRTY=0 bash bench/gpu_session.sh",
#       carry=[".whl"], timeout_s=600)
# with the literal sha written into the command, and ALIGNFUSE_GIT_DIRTY=1 if
# `git status --porcelain --untracked-files=no` prints anything. Afterwards, here:
#   cp <files_at>/*.json bench/results/ && python -m bench report --readme
# (table + PNGs under bench/results/report/, the headline table into README.md), then
# commit bench/results/ and README.md.
#
# The GPU image (KINDS.md): Python 3.12, torch 2.11 (cu130), triton 3.6, transformers 5.17,
# pybind11, pytest, pytest-benchmark, matplotlib, nvcc 13.0; no vllm, flash-attn, liger.
# Nothing can be downloaded there. At most 8 files come back from $OUT, so the PNGs are
# made here from the JSON, not there.
#
# Time plan (each stage is capped, so later stages always run and logs always come back),
# out of ALIGNFUSE_SESSION_S=570 s (the call's 600 s less the start):
#   machine + wheels ~10 s; build <= 240 s (7 .cu files in parallel, sm_90a only: likely
#   60-120 s; if it fails, or nvcc is missing, alignfuse is rebuilt without the CUDA module,
#   <= 120 s, so the Triton and torch contenders and the tests still run); GPU tests
#   (`-m "gpu or cuda_backend"`: ~10 gpu tests, real vocabularies at N=300, and the ~250
#   small backend="cuda" cases that take `device`) <= 120 s (likely 40-90 s, Triton
#   compiles included); preflight <= 65 s (likely 20-40 s): each risky contender family
#   (cut-cross-entropy, Liger's logprobs, Liger's torch.compile'd chunked GRPO/DPO losses,
#   alignfuse's CUDA backend) alone on tiny cases, in processes
#   of their own at once, each under `timeout 60`: one that raises, crashes or hangs (CCE's
#   kernels spin on locks and were never built with this Triton) is left out of the main
#   run with --exclude (`python -m bench preflight`; the outcome is in session.log);
#   benchmarks: what is left less 45 s (the contender in flight at the deadline, the
#   report). That is ~95 s in the worst case and ~270 s in a likely one. The `gpu` preset
#   runs a plan (bench/presets.py, with estimates per stage): the headline case in every
#   mode first, then the loss ops, the N sweep, alignfuse/cuda at the headline, the model
#   shapes in fwd+bwd, the linear losses, the step suite, the soft-capped head, the other
#   */cuda contenders (a CUDA fault stops the run, keeping what finished: see below). A
#   likely session gets through the model shapes or further; a worst-case one through the
#   loss ops; what does not fit is recorded as skipped for time (the result's
#   budget_exhausted, and the report's run line, say so).
# A third call, if device time is still left (a fresh machine starts in ~30 s; the build is
# redone, ~80 s):
#   run(command="ALIGNFUSE_SESSION_PART=followup ALIGNFUSE_SESSION_S=<left - 60> \
#       ALIGNFUSE_SESSION_SUITES=step,losses ALIGNFUSE_SESSION_FILES='test_algorithms ...' \
#       ALIGNFUSE_GIT_COMMIT=<sha> ALIGNFUSE_GIT_DIRTY=0 bash bench/gpu_session.sh",
#       carry=[".whl"], timeout_s=<left - 30>)
# builds, runs `bench run --preset gpu-full --suites $ALIGNFUSE_SESSION_SUITES` (no plan:
# every case, mode and contender of those suites, for ALIGNFUSE_SESSION_BENCH_S, default
# 200 s: what the first call skipped for time) into its own result JSON, then the test
# files the second call did not reach (ALIGNFUSE_SESSION_FILES, names without .py) in
# what is left.
# A second call, if the session has device time left (status): within the machine's 30 s
# of warmth, so the build is still there (else it is redone),
#   run(command="ALIGNFUSE_SESSION_PART=tests bash bench/gpu_session.sh", timeout_s=600)
# runs the WHOLE suite on the GPU (`ALIGNFUSE_TEST_DEVICE=cuda pytest -m "not cpu_only"`:
# every test that takes `device`, every backend), kernel test files first, stopped by
# SIGINT before the call's limit so pytest still writes its summary and JUnit XML; no
# benchmarks. Commit its log (bench/results/gpu-tests/) with the failures it shows.
#
# The result JSON is written into $OUT itself and rewritten after every contender, so a
# run killed by the timeout (or the device call's limit) still returns all that finished
# (complete: false). A CUDA fault (illegal memory access) breaks the process's context:
# the run records it, writes the file (complete: false, with the reason) and exits 3.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/alignfuse-gpu-out}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
export PYTHONUNBUFFERED=1
TOTAL_S="${ALIGNFUSE_SESSION_S:-570}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
stage() { echo "== +$(elapsed)s $*" | tee -a "$LOG"; }
PY="${PY:-python3}"
# setup.py looks for NVCC first: the image may have nvcc off PATH.
if [ -z "${NVCC:-}" ]; then
  NVCC=$(command -v nvcc || ls /usr/local/cuda*/bin/nvcc 2>/dev/null | head -1)
fi
[ -n "$NVCC" ] && export NVCC
# ALIGNFUSE_SESSION_DRY=1 rehearses the flow on a machine without a GPU: no build, no GPU
# tests, the cpu preset instead of gpu (used to check this script itself).
DRY="${ALIGNFUSE_SESSION_DRY:-0}"
PRESET=gpu; [ "$DRY" = 1 ] && PRESET=cpu
PART="${ALIGNFUSE_SESSION_PART:-main}"   # main: build, GPU tests, benchmarks; tests: see above
case "$PART" in main|tests|followup) ;; *) echo "ALIGNFUSE_SESSION_PART must be main, tests or followup, got $PART"; exit 2 ;; esac

stage "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  if [ -n "$NVCC" ]; then echo "nvcc: $NVCC"; "$NVCC" --version | tail -2
  else echo "no nvcc (PATH, /usr/local/cuda*/bin): the CUDA module cannot be built"; fi
} 2>&1 | tee -a "$LOG"

stage "carried wheels (.whl)"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$PART" = main ]; then
  echo "no .whl/ carried: liger and cce will be recorded as skipped (run bench/fetch_wheels.sh)" | tee -a "$LOG"
fi

if [ "$DRY" != 1 ] && [ "$PART" = tests ] && $PY -c "import alignfuse.kernels._cuda" 2>/dev/null; then
  stage "build: the first call's CUDA module is still here (warm machine)"
elif [ "$DRY" != 1 ]; then
  stage "build alignfuse (host C++ + CUDA for sm_90a only, to save time)"
  export ALIGNFUSE_BUILD_CUDA=1 ALIGNFUSE_CUDA_ARCHS="90a"
  timeout 240 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      > "$OUT/build.log" 2>&1
  echo "build exit $?" | tee -a "$LOG"
  tail -5 "$OUT/build.log" | tee -a "$LOG"
  if ! $PY -c "import alignfuse.kernels, alignfuse.engine" >> "$OUT/build.log" 2>&1; then
    # Without this, nothing of alignfuse imports: no contender, no test would run.
    stage "!! BUILD WITH CUDA FAILED (nvcc missing, failed or timed out: build.log); retrying without the CUDA module"
    export ALIGNFUSE_BUILD_CUDA=0
    timeout 120 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
        >> "$OUT/build.log" 2>&1
    echo "host-only build exit $?" | tee -a "$LOG"
  fi
  if ! $PY -c "import alignfuse.kernels, alignfuse.engine" >> "$OUT/build.log" 2>&1; then
    # Last resort: the pure-Python packages from the tree (alignfuse is a namespace package;
    # no compiled module: packing falls back to its Python planner).
    stage "!! HOST-ONLY BUILD FAILED TOO: importing alignfuse from the source tree"
    mkdir -p /tmp/alignfuse-src/alignfuse
    ln -sfn "$PWD/kernels" /tmp/alignfuse-src/alignfuse/kernels
    ln -sfn "$PWD/engine" /tmp/alignfuse-src/alignfuse/engine
    export PYTHONPATH="/tmp/alignfuse-src${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
$PY -c "import alignfuse.kernels.backends as b; m = b.cuda_module(); print('cuda module:', m and m.build_info())" 2>&1 | tee -a "$LOG"
if [ "$DRY" != 1 ] && ! $PY -c "import alignfuse.kernels._cuda" 2>/dev/null; then
  echo "!! CUDA MODULE MISSING: backend='cuda' tests and */cuda contenders are skipped (build.log says why)" | tee -a "$LOG"
fi

if [ "$PART" = followup ]; then
  SUITES="${ALIGNFUSE_SESSION_SUITES:-step,losses}"
  BENCH_S="${ALIGNFUSE_SESSION_BENCH_S:-200}"
  [ "$DRY" = 1 ] && BENCH_S=60
  stage "benchmarks: preset gpu-full, suites $SUITES, budget ${BENCH_S}s"
  FULL=gpu-full; [ "$DRY" = 1 ] && FULL=cpu
  timeout $(( BENCH_S + 60 )) $PY -m bench run --preset "$FULL" --suites "$SUITES" \
      --budget-s "$BENCH_S" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  echo "bench exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

if [ "$PART" = tests ] || [ "$PART" = followup ]; then
  # Kernel tests first (what a GPU can newly break), then the engine's; SIGINT, not KILL,
  # at the deadline, so pytest reports what ran. DRY: the flow on CPU, two small files.
  FILES="test_foundation test_logprobs test_linear_cross_entropy test_linear_policy_loss
    test_logprobs_memory test_policy_loss test_preference test_advantages test_gae
    test_reward_model test_triton_sm90 test_packing test_forward test_algorithms test_rollout
    test_data test_loop test_online test_multiprocess test_bench test_cuda_emu"
  [ "$DRY" = 1 ] && FILES="test_advantages test_reward_model"
  [ "$PART" = followup ] && FILES="${ALIGNFUSE_SESSION_FILES:-$FILES}"
  ARGS=(); for f in $FILES; do ARGS+=("tests/$f.py"); done
  # any test file not named above still runs, last (the followup runs only those named)
  [ "$DRY" = 1 ] || [ "$PART" = followup ] || for f in tests/test_*.py; do
    [[ " ${ARGS[*]} " == *" $f "* ]] || ARGS+=("$f")
  done
  LEFT=$(( TOTAL_S - $(elapsed) - 20 ))
  stage "whole suite on the GPU (pytest -m 'not cpu_only'), ${LEFT}s"
  DEVICE=cuda; [ "$DRY" = 1 ] && DEVICE=cpu
  ALIGNFUSE_TEST_DEVICE=$DEVICE timeout -s INT "$LEFT" $PY -m pytest -q -m "not cpu_only" \
      -p no:cacheprovider --continue-on-collection-errors -rfE --durations=20 \
      --junitxml="$OUT/pytest_gpu_all.xml" "${ARGS[@]}" > "$OUT/pytest_gpu_all.log" 2>&1
  echo "pytest exit $?" | tee -a "$LOG"
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu_all.log" | head -40 | tee -a "$LOG"
  tail -3 "$OUT/pytest_gpu_all.log" | tee -a "$LOG"
  stage "done"
  exit 0
fi

if [ "$DRY" != 1 ]; then
  # the gpu tests and every backend="cuda" case that takes `device`: csrc/cuda against
  # the torch reference on real hardware, before the benchmark times it
  stage "GPU tests (pytest -m 'gpu or cuda_backend')"
  ALIGNFUSE_TEST_DEVICE=cuda timeout 120 $PY -m pytest -q -m "gpu or cuda_backend" -p no:cacheprovider \
      --continue-on-collection-errors \
      tests > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest exit $?" | tee -a "$LOG"
  tail -15 "$OUT/pytest_gpu.log" | tee -a "$LOG"
fi

# Preflight: each risky contender family alone on a tiny case (check, warm-up, two timed
# runs), in a process of its own under a timeout, all at once (one GPU, 16 cores: mostly
# Triton compiles, which also fill the on-disk cache the main run reads). One that fails
# or times out is excluded from the main run (recorded there as "excluded by --exclude").
# DRY: the same on the CPU (CCE skips itself there; Liger runs interpreted).
PRE_S=${ALIGNFUSE_PREFLIGHT_S:-60}; [ $(( TOTAL_S - $(elapsed) )) -lt 240 ] && [ "$PRE_S" -gt 45 ] && PRE_S=45
stage "preflight: cce, liger, alignfuse/cuda, liger's chunked losses (tiny cases, in parallel, ${PRE_S}s each)"
EXCLUDE=""
# name (its log), suite, contender, what the main run excludes when it fails: Liger's
# logprobs (Triton kernels) and its chunked GRPO/DPO losses (torch.compile'd chunks) fail
# apart, so each is excluded only in its own cases (logprobs cases are named N=...).
names=(cce liger alignfuse/cuda liger-chunked); suites=(logprobs logprobs logprobs losses)
contenders=(cce liger alignfuse/cuda liger); patterns=(cce 'N=*:liger' '*/cuda' 'linear_*:liger')
pids=()
for i in "${!names[@]}"; do
  name=${names[$i]}
  timeout -k 5 "$PRE_S" $PY -m bench preflight --suite "${suites[$i]}" \
      --contender "${contenders[$i]}" > "/tmp/preflight-${name//\//-}.log" 2>&1 &
  pids+=($!)
done
for i in "${!names[@]}"; do
  wait "${pids[$i]}"; rc=$?
  name=${names[$i]}; f="/tmp/preflight-${name//\//-}.log"
  case $rc in
    0) verdict="passed" ;;
    124|137) verdict="TIMED OUT after ${PRE_S}s: excluded" ;;
    *) verdict="FAILED (exit $rc): excluded" ;;
  esac
  [ "$rc" = 0 ] || EXCLUDE="${EXCLUDE:+$EXCLUDE,}${patterns[$i]}"
  { echo "preflight $name: $verdict"
    grep -E "^preflight|Error|error" "$f" | tail -4 | sed 's/^/    /'; } | tee -a "$LOG"
done
echo "preflight: main run excludes: ${EXCLUDE:-nothing}" | tee -a "$LOG"

LEFT=$(( TOTAL_S - $(elapsed) ))
BUDGET=$(( LEFT - 45 ))   # margin: the contender in flight at the deadline, then the report
stage "benchmarks: preset $PRESET, budget ${BUDGET}s"
if [ "$BUDGET" -gt 60 ]; then
  rm -rf /tmp/bench-report
  # Straight into $OUT (rewritten after every contender): a kill keeps what finished.
  # Files in $OUT: session/build/pytest/bench logs, the result (+ a .tmp if killed while
  # writing), report.md: 7 at most of the 8 that come back.
  timeout $(( LEFT - 15 )) $PY -m bench run --preset "$PRESET" --budget-s "$BUDGET" \
      --exclude "$EXCLUDE" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  case $rc in
    0) echo "bench exit 0" ;;
    3) echo "bench exit 3: stopped by a CUDA fault (see the result's incomplete_reason)" ;;
    124|137) echo "bench exit $rc: killed by the timeout; the result holds what finished" ;;
    *) echo "bench exit $rc" ;;
  esac | tee -a "$LOG"
  # The Markdown only (the PNGs are rendered here from the JSON: 8 files come back at most).
  compgen -G "$OUT/*.json" > /dev/null && $PY -m bench report "$OUT" --out /tmp/bench-report \
      > /dev/null 2>&1 && cp /tmp/bench-report/report.md "$OUT/report.md"
else
  echo "not enough time left for the benchmarks (${LEFT}s)" | tee -a "$LOG"
fi
stage "done"
ls -l "$OUT" | tee -a "$LOG"
# The reply carries the end of the output: finish with the headline table.
[ -f "$OUT/report.md" ] && grep -m1 '^- run:' "$OUT/report.md"
[ -f "$OUT/report.md" ] && sed -n '/^### logprobs/,/^<details>/p' "$OUT/report.md" | head -25
# The call's status is not the verdict (session.log and the result file are): 0, also when
# the table above was longer than head's 25 lines (SIGPIPE under pipefail gave 141).
exit 0
