#!/usr/bin/env bash
# Run HERE (a machine with PyPI), from the repository root, before a GPU session:
#   bash bench/fetch_wheels.sh
# It downloads the pure-Python benchmark baselines missing from the GPU image (its Python is
# 3.12; KINDS.md) into .whl/, which .gitignore ignores and the device call carries:
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
# No dependencies are fetched (--no-deps): both need only torch and triton, which the image
# has, and pulling them would replace the image's CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qxF '/.whl/' .gitignore || grep -qxF '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d .whl \
  "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -l .whl
