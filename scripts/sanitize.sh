#!/usr/bin/env bash
# Builds the native module with AddressSanitizer + UndefinedBehaviorSanitizer and runs the CPU
# kernel and model tests against it. Any report fails the run (halt_on_error).
# Expects the environment of scripts/test.sh (torch, transformers, build tools) to be active.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=build/sanitize
cmake -S . -B "$BUILD" -G Ninja -DFTENGINE_SANITIZE=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$(command -v python)" -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" >/dev/null
ninja -C "$BUILD" >/dev/null
# A package tree whose _C is the sanitized build.
rm -rf "$BUILD/pkg" && mkdir -p "$BUILD/pkg"
cp -r python/ftengine "$BUILD/pkg/ftengine"
rm -f "$BUILD/pkg/ftengine"/_C*.so
cp "$BUILD"/_C*.so "$BUILD/pkg/ftengine/"

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python itself is not built with ASan and keeps interned objects to exit: leaks are not ours.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
TESTS="$PWD/tests"
(ROOT=$PWD; cd /tmp && PYTHONPATH="$ROOT/$BUILD/pkg" python -m pytest -q -p no:cacheprovider \
  "$TESTS/test_attention_cpu.py" "$TESTS/test_attention_tiers.py" "$TESTS/test_kernels_cpu.py" "$TESTS/test_llama_model.py" \
  "$TESTS/test_bad_input.py" "$TESTS/test_gguf_model.py" -x)
