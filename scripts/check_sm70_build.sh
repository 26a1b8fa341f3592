#!/bin/bash
# Proves the Volta member (prefill_sm70, mma.m8n8k4) compiles to real sm_70 machine code, on a
# machine without a GPU: CUDA 13 (our toolkit) refuses sm_70, so this compiles it with NVRTC 12.9
# from PyPI (nvidia-cuda-nvrtc-cu12, ~90 MB, plus the runtime wheel's cuda_fp16.h, ~3.5 MB) and
# checks the cubin's ELF arch and kernels (scripts/check_sm70_build.py).
#
# SASS: no disassembler on PyPI reads sm_70 (the nvdisasm / cuobjdump wheels start at CUDA 13,
# which dropped sm_70; no cu12 builds of them exist). Point NVDISASM at one that does (CUDA
# <= 12, e.g. Debian's nvidia-cuda-toolkit 11.8) to also require HMMA.884 in the SASS.
#
#   scripts/check_sm70_build.sh            # about 10 s of compiling plus the downloads
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${SM70_CHECK_DIR:-$(mktemp -d)}
mkdir -p "$WORK/wheels"
if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: -d "$WORK/wheels" \
    "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-runtime-cu12==12.9.*" 2>"$WORK/pip.log"; then
  echo "SKIP: could not download NVRTC 12.9 from PyPI (offline?):"
  tail -2 "$WORK/pip.log"
  exit 0
fi
for wheel in "$WORK"/wheels/*.whl; do
  "$PYTHON" -m zipfile -e "$wheel" "$WORK/unpacked"
done
NVRTC=$(ls "$WORK"/unpacked/nvidia/cuda_nvrtc/lib/libnvrtc.so.12)
exec "$PYTHON" scripts/check_sm70_build.py --libnvrtc "$NVRTC" \
  --cuda-include "$WORK/unpacked/nvidia/cuda_runtime/include" --out "$WORK" \
  ${NVDISASM:+--nvdisasm "$NVDISASM"}
