#!/usr/bin/env bash
# Compile check of the CUDA kernels on a machine without a GPU (CI): builds kernels/cuda/ for
# sm_90a (FTENGINE_CUDA_ARCHITECTURES overrides) as a static library, so a GPU build break never
# lands, and checks that the Hopper member's SASS holds wgmma and TMA instructions. The
# backend's host code needs cuBLASLt's headers, which the CI machine lacks; the GPU script
# (scripts/gpu_run.sh) builds everything. Skips, saying so, where there is no nvcc.
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

# The Hopper member must be Hopper machine code: wgmma (HGMMA) and TMA (UTMALDG) in the SASS of
# every instance. cuobjdump needs nvdisasm beside it; both come as 13.x wheels (5.4 MB, fetched
# once into ~/.cache/ftengine; SM90_TOOLS_DIR moves it). Skipped when the list has no 90a.
[[ "${FTENGINE_CUDA_ARCHITECTURES:-90a}" == *90a* ]] || exit 0
TOOLS="${SM90_TOOLS_DIR:-$HOME/.cache/ftengine/cuobjdump-13.5.37}"
if [[ ! -x "$TOOLS/nvidia/cu13/bin/cuobjdump" || ! -x "$TOOLS/nvidia/cu13/bin/nvdisasm" ]]; then
  mkdir -p "$TOOLS"
  python -m pip download -q --no-deps --dest "$TOOLS" \
    nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37
  for wheel in "$TOOLS"/*.whl; do python -m zipfile -e "$wheel" "$TOOLS"; done
  chmod +x "$TOOLS/nvidia/cu13/bin/cuobjdump" "$TOOLS/nvidia/cu13/bin/nvdisasm"
fi
objects=("$BUILD"/CMakeFiles/ftengine_cuda_kernels.dir/kernels/cuda/attention/prefill_sm90_*.o)
[[ -e "${objects[0]}" ]] || { echo "check_cuda_build: no prefill_sm90 objects in $BUILD" >&2; exit 1; }
for object in "${objects[@]}"; do
  sass=$(PATH="$TOOLS/nvidia/cu13/bin:$PATH" cuobjdump -sass "$object")
  hgmma=$(grep -c "HGMMA" <<<"$sass" || true)
  tma=$(grep -c "UTMALDG" <<<"$sass" || true)
  if [[ $hgmma -eq 0 || $tma -eq 0 ]]; then
    echo "check_cuda_build: $(basename "$object") has $hgmma HGMMA and $tma UTMALDG: not Hopper code" >&2
    exit 1
  fi
  echo "check_cuda_build: $(basename "$object"): $hgmma HGMMA, $tma UTMALDG"
done
