#!/usr/bin/env bash
# The full test suite, real-model parity included (slow tests run too). TRITON_INTERPRET=1 runs kernels on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec "${PYTHON:-python3}" -m pytest -q -m "slow or not slow" "$@"
