#!/usr/bin/env bash
# Create ./.venv with everything GhostVis needs (torch, deepspeed, timm, ...) and build rustbpe.
# Works offline from crates.io (see scripts/build_rustbpe.sh) and on an ordinary Linux box.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# torch and torchvision must be a matching pair (timm imports torchvision); a bare "torch" requirement
# would pull whatever build the index serves. Override with TORCH_SPEC for your CUDA version.
case "$(uname -m)" in
  aarch64|arm64) DEFAULT_TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)             DEFAULT_TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
TORCH_SPEC=${TORCH_SPEC:-$DEFAULT_TORCH}
cd "$(dirname "$0")/.."

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -c "import torch, torchvision" 2>/dev/null || "$PY" -m pip install -q $TORCH_SPEC
"$PY" -m pip install -q -e ".[test]" maturin
PATH="$(cd "$VENV" && pwd)/bin:$PATH" bash scripts/build_rustbpe.sh
"$PY" -c "import ghostvis, rustbpe, deepspeed, timm; print('ghostvis setup ok: torch', __import__('torch').__version__, 'deepspeed', deepspeed.__version__)"
