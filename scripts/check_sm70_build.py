"""Compiles the Volta member of the FastAttention prefill family (prefill_sm70_kernel.h, m8n8k4)
to real sm_70 machine code with NVRTC 12.9 and checks the cubin: CUDA 13, which our builds use,
no longer targets sm_70. Run by scripts/check_sm70_build.sh with the NVRTC wheel's library path.

Checks: NVRTC compiles both head dims and both causal variants for compute_70 to a cubin
(nvrtcGetCUBIN); the cubin is an ELF whose e_flags name sm_70; its kernels are there. The shell
script then disassembles the cubin it leaves in --out and requires HMMA.884.
"""

import argparse
import ctypes
import struct
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CUDA_ELF_MACHINE = 190  # EM_CUDA

# NVRTC compiles device code only: the host-side headers the kernel headers include are stubbed.
STUBS = {
    "cuda_runtime.h": "#pragma once\n",
    "cmath": "#pragma once\n#define INFINITY __int_as_float(0x7f800000)\n",
    "type_traits": "#pragma once\nnamespace std {\n"
    "template <class T, T v> struct integral_constant { static constexpr T value = v; };\n"
    "using true_type = integral_constant<bool, true>;\n"
    "using false_type = integral_constant<bool, false>;\n"
    "template <class A, class B> struct is_same : false_type {};\n"
    "template <class A> struct is_same<A, A> : true_type {};\n"
    "template <class A, class B> inline constexpr bool is_same_v = is_same<A, B>::value;\n"
    "}\n",
    "cstdint": "#pragma once\n"
    "typedef unsigned int uint32_t; typedef int int32_t; typedef long long int64_t;\n"
    "typedef unsigned long long uint64_t; typedef unsigned long long uintptr_t;\n",
}

SOURCE = """
#include "kernels/cuda/attention/prefill_sm70_kernel.h"
#include "kernels/cuda/attention/prefill_sm70_traits.h"
namespace ftengine::kernels::cuda {
template <typename Traits, bool kCausal>
__global__ void __launch_bounds__(Traits::kNumThreads, Traits::kMinBlocksPerSm)
    prefill_sm70_check(const __grid_constant__ AttentionParams params) {
  prefill_sm70_body<Traits, kCausal>(params);
}
template __global__ void prefill_sm70_check<PrefillSm70Traits<64>, true>(
    const __grid_constant__ AttentionParams);
template __global__ void prefill_sm70_check<PrefillSm70Traits<64>, false>(
    const __grid_constant__ AttentionParams);
template __global__ void prefill_sm70_check<PrefillSm70Traits<128>, true>(
    const __grid_constant__ AttentionParams);
template __global__ void prefill_sm70_check<PrefillSm70Traits<128>, false>(
    const __grid_constant__ AttentionParams);
}
"""


def compile_cubin(nvrtc, stub_dir: Path, cuda_include: str) -> bytes:
    program = ctypes.c_void_p()
    check = lambda status, what: status == 0 or sys.exit(f"{what} failed: {status}")  # noqa: E731
    check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), SOURCE.encode(), b"sm70_check.cu", 0,
                                   None, None), "nvrtcCreateProgram")
    options = [b"--gpu-architecture=sm_70", b"-std=c++17", b"-default-device",
               f"-I{REPO}".encode(), f"-I{stub_dir}".encode(), f"-I{cuda_include}".encode()]
    status = nvrtc.nvrtcCompileProgram(program, len(options),
                                       (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    if status != 0:
        sys.exit(f"NVRTC could not compile the sm70 member for sm_70:\n{log.value.decode()}")
    nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    check(nvrtc.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
    return cubin.raw


def elf_sm(cubin: bytes) -> int:
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2, "not a 64-bit ELF"
    machine = struct.unpack_from("<H", cubin, 18)[0]
    assert machine == CUDA_ELF_MACHINE, f"e_machine {machine}, not EM_CUDA"
    flags = struct.unpack_from("<I", cubin, 48)[0]
    # e_flags keeps the SM number in its low byte (ABI v7: bits 0-7; older: bits 0-7 too).
    return flags & 0xFF


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--libnvrtc", required=True)
    parser.add_argument("--cuda-include", required=True, help="cuda_fp16.h's folder")
    parser.add_argument("--out", default=None, help="where to keep the cubin")
    args = parser.parse_args()
    nvrtc = ctypes.CDLL(args.libnvrtc)
    version = (ctypes.c_int(), ctypes.c_int())
    nvrtc.nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
    print(f"NVRTC {version[0].value}.{version[1].value}")
    with tempfile.TemporaryDirectory() as stub_dir:
        for name, text in STUBS.items():
            (Path(stub_dir) / name).write_text(text)
        cubin = compile_cubin(nvrtc, Path(stub_dir), args.cuda_include)
    sm = elf_sm(cubin)
    print(f"cubin: {len(cubin)} bytes, ELF e_flags arch sm_{sm}")
    if sm != 70:
        print(f"FAIL: the cubin is for sm_{sm}, not sm_70")
        return 1
    kernels = sorted({name.decode() for name in cubin.split(b"\0")
                      if name.startswith(b".text._ZN") and b"prefill_sm70_check" in name})
    print(f"{len(kernels)} kernels in .text sections")
    if len(kernels) != 4:
        print("FAIL: expected 4 kernels (head_dim 64/128 x causal or not)")
        return 1
    path = Path(args.out or tempfile.mkdtemp()) / "prefill_sm70.cubin"
    path.write_bytes(cubin)
    print(f"OK: the sm70 member compiles to sm_70 machine code ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
