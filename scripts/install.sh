#!/usr/bin/env bash
# Create .venv and install the engine with its test tools. Safe to run again.
#   bash scripts/install.sh            # CPU or GPU, whatever torch fits this machine
# PyTorch comes first: a bare `torch` requirement pulls a multi-GB CUDA build even on machines
# without a GPU. Set TORCH_SPEC to force one (e.g. TORCH_SPEC="torch==2.13.0").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    $PIP install -q "$TORCH_SPEC"
  elif ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-* >/dev/null 2>&1; then
    $PIP install -q torch==2.13.0          # a local CPU wheel (this project's dev and CI machines)
  elif command -v nvidia-smi >/dev/null 2>&1; then
    $PIP install -q "torch>=2.1"           # CUDA build from PyPI
  else
    $PIP install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
$PIP install -q -e '.[test,serve,desk]'
.venv/bin/moderation --version
