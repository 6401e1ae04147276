#!/usr/bin/env bash
# Prepare the GPU check (benches/gpu/run.sh) on a machine without a GPU: the CUDA build of `pipe`
# gzipped at .gpu/pipe.gz, the commit it was built from in .gpu/commit (the GPU machine gets the
# working tree without .git, and every result file must name its commit), and the liger-kernel wheel
# in .gpu/wheels (the GPU image lacks it; it is pure Python on Triton, so one py3-none-any wheel
# serves). .gpu/ is git-ignored. Then, on the GPU machine, from the repository root:
#   bash benches/gpu/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
eval "$(bash ../shared/cuda/toolchain.sh)"
CARGO_TARGET_DIR=target-cuda cargo build --release --locked --features cuda
mkdir -p .gpu/wheels
gzip -9 -c target-cuda/release/pipe > .gpu/pipe.gz
commit=$(git rev-parse HEAD)
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then commit="$commit-dirty"; fi
echo "$commit" > .gpu/commit
rm -f .gpu/wheels/*.whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels "liger-kernel==0.8.5"
ls -l .gpu/pipe.gz .gpu/wheels
echo "commit $(cat .gpu/commit)"
