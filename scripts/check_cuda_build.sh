#!/usr/bin/env bash
# Compile check of the CUDA kernels on a machine without a GPU (CI): builds kernels/cuda/ for
# sm_90a (FTENGINE_CUDA_ARCHITECTURES overrides) as a static library, so a GPU build break never
# lands. The backend's host code needs cuBLASLt's headers, which the CI machine lacks; the GPU
# script (scripts/gpu_run.sh) builds everything. Skips, saying so, where there is no nvcc.
# Usage: bash scripts/check_cuda_build.sh   (inside the environment scripts/test.sh made)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_build: no nvcc on this machine; CUDA kernels not compiled"
  exit 0
fi
BUILD=build/cuda-check
start=$(date +%s)
cmake -S . -B "$BUILD" -G Ninja -DFTENGINE_CUDA_KERNELS_ONLY=ON \
  -DFTENGINE_CUDA_ARCHITECTURES="${FTENGINE_CUDA_ARCHITECTURES:-90a}" \
  -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
  >/dev/null
ninja -C "$BUILD" ftengine_cuda_kernels
echo "check_cuda_build: kernels compiled for sm_${FTENGINE_CUDA_ARCHITECTURES:-90a} in $(( $(date +%s) - start )) s"
