#!/usr/bin/env bash
# Run HERE (where pip reaches the registry), from the repository root: downloads into .whl/ (git-ignored) the
# wheels of qpack's dependencies that the GPU image lacks, for its Python 3.12 on x86-64. check.sh installs them
# there with --no-index; name .whl in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  zstandard==0.25.0 brotli==1.2.1 constriction==0.5.0
ls -l .whl
