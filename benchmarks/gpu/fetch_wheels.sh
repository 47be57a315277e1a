#!/usr/bin/env bash
# Download the wheels of benchmarks/gpu/wheels.txt for CPython 3.12 on x86-64 Linux into
# <repo>/.whl (or the folder given), for a GPU machine without network; check.sh installs them.
#
#   bash benchmarks/gpu/fetch_wheels.sh [DEST]
#   PYTHON_VERSION=3.11 bash benchmarks/gpu/fetch_wheels.sh DEST    # for another CPython
#
# Needs pip and a package index (run it where pip install works). Prints each wheel's size
# and the total, which must stay under the 64 MiB that travels with the working tree.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-$HERE/../../.whl}"
PY="${PYTHON:-python3}"
mkdir -p "$DEST"
grep -v '^\s*#' "$HERE/wheels.txt" | grep -v '^\s*$' | while read -r spec; do
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d "$DEST" "$spec"
done
ls -l "$DEST"/*.whl | awk '{printf "%8.2f MiB  %s\n", $5 / 1048576, $NF; total += $5} END {printf "%8.2f MiB  total\n", total / 1048576}'
