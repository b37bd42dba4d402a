#!/usr/bin/env bash
# A separate virtualenv with NVIDIA kvpress 0.5.5 for scripts/compare_kvpress.py.
# kvpress pins transformers<5.3, which kvcompress does not use, so it cannot share our environment.
# Usage: bash scripts/make_kvpress_venv.sh [VENV_DIR]   (default: ~/.venvs/kvpress)
set -euo pipefail
VENV="${1:-$HOME/.venvs/kvpress}"
python3 -m venv "$VENV"
# the CPU torch build first, so kvpress's `torch` requirement does not pull a multi-GB CUDA build
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "kvpress==0.5.5" "transformers>=4.56,<5.3" gguf
"$VENV/bin/python" -c "import kvpress, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__)"
echo "kvpress venv ready: $VENV/bin/python"
