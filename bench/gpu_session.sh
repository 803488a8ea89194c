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
# Time plan (each stage is capped, so later stages always run and logs always come back):
#   build <= 240 s, GPU tests <= 150 s, benchmarks: what is left minus a margin.
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
# ALIGNFUSE_SESSION_DRY=1 rehearses the flow on a machine without a GPU: no build, no GPU
# tests, the cpu preset instead of gpu (used to check this script itself).
DRY="${ALIGNFUSE_SESSION_DRY:-0}"
PRESET=gpu; [ "$DRY" = 1 ] && PRESET=cpu

stage "machine"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    || echo "no nvidia-smi"
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.is_available() and torch.cuda.get_device_name())"
  command -v nvcc && nvcc --version | tail -2
} 2>&1 | tee -a "$LOG"

stage "carried wheels (.whl)"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG"
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no .whl/ carried: liger and cce will be recorded as skipped (run bench/fetch_wheels.sh)" | tee -a "$LOG"
fi

if [ "$DRY" != 1 ]; then
  stage "build alignfuse (host C++ + CUDA for sm_90a only, to save time)"
  export ALIGNFUSE_BUILD_CUDA=1 ALIGNFUSE_CUDA_ARCHS="90a"
  timeout 240 $PY -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      > "$OUT/build.log" 2>&1
  echo "build exit $?" | tee -a "$LOG"
  tail -5 "$OUT/build.log" | tee -a "$LOG"
fi
$PY -c "import alignfuse.kernels.backends as b; m = b.cuda_module(); print('cuda module:', m and m.build_info())" 2>&1 | tee -a "$LOG"

if [ "$DRY" != 1 ]; then
  stage "GPU tests (pytest -m gpu)"
  ALIGNFUSE_TEST_DEVICE=cuda timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider \
      --continue-on-collection-errors \
      tests > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest exit $?" | tee -a "$LOG"
  tail -15 "$OUT/pytest_gpu.log" | tee -a "$LOG"
fi

LEFT=$(( TOTAL_S - $(elapsed) ))
BUDGET=$(( LEFT - 75 ))   # margin: the contender in flight at the deadline, then the report
stage "benchmarks: preset $PRESET, budget ${BUDGET}s"
if [ "$BUDGET" -gt 60 ]; then
  rm -rf /tmp/bench-results /tmp/bench-report && mkdir -p /tmp/bench-results
  timeout $(( LEFT - 15 )) $PY -m bench run --preset "$PRESET" --budget-s "$BUDGET" \
      --out /tmp/bench-results 2>&1 | tee "$OUT/bench.log"
  echo "bench exit ${PIPESTATUS[0]}" | tee -a "$LOG"
  cp /tmp/bench-results/*.json "$OUT/" 2>/dev/null
  # The Markdown only (the PNGs are rendered here from the JSON: 8 files come back at most).
  $PY -m bench report /tmp/bench-results --out /tmp/bench-report > /dev/null 2>&1 \
      && cp /tmp/bench-report/report.md "$OUT/report.md"
else
  echo "not enough time left for the benchmarks (${LEFT}s)" | tee -a "$LOG"
fi
stage "done"
ls -l "$OUT" | tee -a "$LOG"
# The reply carries the end of the output: finish with the headline table.
[ -f "$OUT/report.md" ] && sed -n '/^### logprobs/,/^<details>/p' "$OUT/report.md" | head -25
