#!/bin/bash
# Proves the Volta member (prefill_sm70, mma.m8n8k4) compiles to real sm_70 machine code that
# runs on Volta's tensor cores, on a machine without a GPU: CUDA 13 (our toolkit) refuses sm_70,
# so this compiles it with NVRTC 12.9 from PyPI (nvidia-cuda-nvrtc-cu12, ~90 MB, plus the runtime
# wheel's cuda_fp16.h, ~3.5 MB), checks the cubin's ELF arch and kernels
# (scripts/check_sm70_build.py), then disassembles it and requires HMMA.884 in every kernel.
#
# SASS: no disassembler on PyPI reads sm_70 (the nvdisasm / cuobjdump wheels start at CUDA 13.2,
# which refuses sm_70: 'CUDA architecture "SM70" is deprecated'; no cu12 builds of them exist).
# Debian 12's non-free nvidia-cuda-toolkit (CUDA 11.8) has one, so this fetches that one .deb
# (84 MB, not the 1.6 GB toolkit with its dependencies) with a private apt configuration: the
# host's Debian mirror with the non-free component, lists and downloads under the cache dir, the
# machine's apt sources left as they are. Only nvdisasm (51 MB) is kept, in
# ~/.cache/ftengine (SM70_TOOLS_DIR), so a fresh clone on the same machine reuses it. Or point
# NVDISASM at any nvdisasm of CUDA <= 12 to skip the download.
#
# Unlike the NVRTC download (which skips when offline, before anything is checked), a missing
# disassembler fails: by then PyPI answered, so the network is up, and a failure here means the
# pinned .deb left the archive (a Debian point release) or the host is not Debian; skipping would
# quietly drop the one check that the kernel uses the tensor cores.
#
#   scripts/check_sm70_build.sh            # about 12 s of compiling and disassembling, plus the
#                                          # downloads (~94 MB of wheels; 84 MB .deb once)
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
"$PYTHON" scripts/check_sm70_build.py --libnvrtc "$NVRTC" \
  --cuda-include "$WORK/unpacked/nvidia/cuda_runtime/include" --out "$WORK"

# The disassembler: nvdisasm of CUDA 11.8, from exactly this .deb of Debian 12 (bookworm) non-free.
DEB=nvidia-cuda-toolkit
DEB_VERSION=11.8.89~11.8.0-5~deb12u1
TOOLS=${SM70_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ftengine}/nvdisasm-${DEB_VERSION//\~/_}
fetch_nvdisasm() {
  local apt="$TOOLS.apt" mirror
  # The host's Debian mirror: the URI of its main suite (bookworm on Debian 12; security is
  # bookworm-security), read from apt's own configuration so no host is named here.
  mirror=$( . /etc/os-release && apt-get indextargets --no-release-info \
    --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
    awk -v suite="${VERSION_CODENAME:-}" '$2 == suite { print $1; exit }') || true
  if [ -z "$mirror" ]; then
    echo "FAIL: no Debian mirror in apt's sources to fetch $DEB from (not Debian?);" \
      "set NVDISASM to an nvdisasm of CUDA <= 12"
    return 1
  fi
  rm -rf "$apt" && mkdir -p "$apt/lists/partial" "$apt/archives/partial" "$apt/sources"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bookworm non-free" \
    >"$apt/sources/non-free.list"
  # Run as root, apt would hand the download to its _apt user, which can't write to root's cache.
  local options=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$apt/sources"
    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt" -o APT::Sandbox::User="$(id -un)")
  echo "Fetching nvdisasm: $DEB=$DEB_VERSION from ${mirror} bookworm non-free (84 MB, once)"
  if ! (cd "$apt/archives" && apt-get -qq "${options[@]}" update &&
        apt-get -qq "${options[@]}" download "$DEB=$DEB_VERSION") >"$apt/apt.log" 2>&1; then
    echo "FAIL: could not download $DEB=$DEB_VERSION (offline, or superseded in the archive?):"
    tail -3 "$apt/apt.log"
    apt-cache "${options[@]}" policy "$DEB" 2>/dev/null | grep -i candidate || true
    return 1
  fi
  # Only nvidia-cuda-toolkit's nvdisasm (static but for glibc), moved into place in one step so an
  # interrupted run leaves no half-written tool behind.
  dpkg-deb --fsys-tarfile "$apt"/archives/"$DEB"_*.deb | tar -x -C "$apt" ./usr/bin/nvdisasm
  mkdir -p "$TOOLS" && mv "$apt/usr/bin/nvdisasm" "$TOOLS/nvdisasm"
  rm -rf "$apt"
}
if [ -z "${NVDISASM:-}" ]; then
  NVDISASM=$TOOLS/nvdisasm
  [ -x "$NVDISASM" ] || fetch_nvdisasm
fi
echo "nvdisasm: $("$NVDISASM" --version | grep -o 'release [0-9.]*, V[0-9.]*')"

mkdir -p build/sm70
SASS=build/sm70/prefill_sm70.sass
if ! "$NVDISASM" "$WORK/prefill_sm70.cubin" >"$SASS" 2>"$WORK/nvdisasm.log"; then
  echo "FAIL: $NVDISASM could not disassemble the sm_70 cubin:"
  head -3 "$WORK/nvdisasm.log"
  exit 1
fi
# m8n8k4 with f32 accumulators is 4 HMMA.884 steps on sm_70; every kernel (head_dim 64/128 x
# causal or not) must have them, so a variant falling back to FMA fails too.
echo "SASS ($SASS): $(grep -c 'HMMA\.884' "$SASS" || true) HMMA.884 instructions"
awk '/^\.text\..*:$/ { kernel = $0; kernels[++n] = kernel; count[kernel] = 0 }
     /HMMA\.884/ { count[kernel]++ }
     END {
       for (i = 1; i <= n; i++) {
         match(kernels[i], /ILi[0-9]+E/); head = substr(kernels[i], RSTART + 3, RLENGTH - 4)
         match(kernels[i], /Lb[01]E/); causal = substr(kernels[i], RSTART + 2, 1) == "1"
         printf "  head_dim %3s %-10s %5d\n", head, causal ? "causal" : "not causal",
                count[kernels[i]]
         if (count[kernels[i]] == 0) missing++
       }
       if (n != 4 || missing) exit 1
     }' "$SASS" || {
  echo "FAIL: not every one of the 4 sm_70 kernels has HMMA.884 in its SASS"
  exit 1
}
grep -m3 'HMMA\.884' "$SASS" | tr -s ' '
echo "OK: the sm70 member runs mma.m8n8k4 on Volta's tensor cores (HMMA.884 in the sm_70 SASS)"
