#!/usr/bin/env bash
# The full test suite, real-model parity included (slow tests run too).
# Without CUDA, TRITON_INTERPRET=1 runs the Triton kernels on CPU (the interpreter). With CUDA it is left unset, so
# the kernel tests compile the kernels and run them on CUDA tensors (bf16 and the real-model geometries included;
# `-m gpu` selects only the checks that need the GPU). An explicit TRITON_INTERPRET in the environment wins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ -z ${TRITON_INTERPRET+set} ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  export TRITON_INTERPRET=1
fi
exec "$PY" -m pytest -q -m "slow or not slow" "$@"
