#!/usr/bin/env bash
# The GPU machine's whole job in one call: build ftengine with the CUDA backend (cmake + ninja),
# run the CUDA tests (pytest -m cuda), the kernel tests under compute-sanitizer, the GPU
# benchmarks, and leave JSON, PNG and logs under $OUT (default: ./gpu_out).
#
# The GPU machine has nvcc, torch and transformers but no network: the wheels it lacks travel in
# .whl/ (scipy-openblas32 for the CPU backend, gguf), see docs/GPU.md.
# GPU_STAGES picks stages (default "build test sanitize bench ncu"); GPU_TESTS the test files
# (default every tests/test_*cuda*.py); GPU_PYTEST_ARGS extra pytest arguments (split on
# spaces); GPU_BENCH the benchmark size (quick|full, default full); GPU_BENCHES which
# benchmarks run (see the bench stage).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
STAGES="${GPU_STAGES:-build test sanitize bench ncu}"
PYTHON="${PYTHON:-python3}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
status=0

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ftengine_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/ftengine_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/python:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"

if [[ " $STAGES " == *" build "* ]]; then
  echo "== build"
  start=$(date +%s)
  # NCCL (tensor parallelism on GPUs) comes from torch's nvidia-nccl-cu13 wheel.
  cmake -S . -B build/gpu -G Ninja -DFTENGINE_CUDA=ON -DFTENGINE_NCCL=ON \
    -DPython_EXECUTABLE="$(command -v "$PYTHON")" \
    -Dpybind11_DIR="$("$PYTHON" -m pybind11 --cmakedir)" >"$OUT/build.log" 2>&1 &&
    ninja -C build/gpu >>"$OUT/build.log" 2>&1
  rc=$?
  tail -n 30 "$OUT/build.log"
  if [[ $rc -ne 0 ]]; then
    echo "BUILD FAILED"; exit 1
  fi
  for module in build/gpu/_C*.so build/gpu/_mpi*.so build/gpu/_nccl*.so; do
    [[ -e "$module" ]] && ln -sf "../../$module" python/ftengine/
  done
  echo "build took $(( $(date +%s) - start )) s"
fi

if [[ " $STAGES " == *" test "* ]]; then
  echo "== pytest -m cuda"
  # shellcheck disable=SC2086
  # Only the files with CUDA tests: the others may import what this machine lacks (jieba).
  "$PYTHON" -m pytest -m cuda ${GPU_TESTS:-tests/test_*cuda*.py} -q -p no:cacheprovider \
    --junitxml="$OUT/cuda_tests.xml" \
    ${GPU_PYTEST_ARGS:-} 2>&1 | tee "$OUT/cuda_tests.log" | tail -n 40
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi

if [[ " $STAGES " == *" sanitize "* ]]; then
  # compute-sanitizer over the kernel tests (a subset: it slows kernels a hundredfold). Every
  # finding is an error: --error-exitcode makes the run fail.
  echo "== compute-sanitizer"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PYTHON" -m pytest -m cuda -q -p no:cacheprovider -x \
      tests/test_attention_cuda_prefill.py tests/test_attention_cuda_decode.py \
      tests/test_sampling_cuda.py -k "${GPU_SANITIZE_K:-97}" \
      >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    echo "$tool: exit $rc; $(grep -c "=========" "$OUT/sanitize_$tool.log") sanitizer lines"
    tail -n 5 "$OUT/sanitize_$tool.log"
    [[ $rc -eq 0 ]] || status=1
  done
fi

if [[ " $STAGES " == *" bench "* ]]; then
  echo "== benchmarks"
  # GPU_BENCHES picks them (default all): attention e2e pangu routes long7b long8b.
  declare -A BENCH_COMMANDS=(
    [attention]="scripts/bench_gpu_attention.py --size ${GPU_BENCH:-full}"
    [e2e]="scripts/bench_gpu_e2e.py --size ${GPU_BENCH:-full}"
    [pangu]="scripts/bench_gpu_e2e.py --shape openpangu-7b --size ${GPU_BENCH:-full}"
    [routes]="scripts/bench_gpu_cooperative.py --case routes"
    [long7b]="scripts/bench_gpu_cooperative.py --case llama-7b"
    [long8b]="scripts/bench_gpu_cooperative.py --case llama3-8b"
  )
  for name in ${GPU_BENCHES:-attention e2e pangu routes long7b long8b}; do
    # shellcheck disable=SC2086
    PYTHONPATH="$PWD/scripts:$PYTHONPATH" "$PYTHON" ${BENCH_COMMANDS[$name]} --out "$OUT" 2>&1 |
      tee -a "$OUT/bench.log" | tail -n 40
    [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  done
fi

if [[ " $STAGES " == *" ncu "* ]]; then
  # Hardware counters: shared-memory bank conflicts of the Volta member, swizzled vs row-major.
  echo "== ncu"
  OUT="$OUT" bash scripts/ncu_sm70_layout.sh 2>&1 | tail -n 12
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
exit $status
