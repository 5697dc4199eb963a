#!/usr/bin/env bash
# Create ./.venv with everything GhostVis needs (torch, deepspeed, timm, ...) and build rustbpe.
# Works offline from crates.io (see scripts/build_rustbpe.sh) and on an ordinary Linux box.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
cd "$(dirname "$0")/.."

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip
# torch first, pinned: a bare "torch" requirement would pull a multi-GB CUDA build on machines without one.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH_SPEC"
"$PY" -m pip install -q -e ".[test]" maturin
PATH="$(cd "$VENV" && pwd)/bin:$PATH" bash scripts/build_rustbpe.sh
"$PY" -c "import ghostvis, rustbpe, deepspeed, timm; print('ghostvis setup ok: torch', __import__('torch').__version__, 'deepspeed', deepspeed.__version__)"
