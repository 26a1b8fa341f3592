#!/usr/bin/env python3
"""Writes the instance files of the sm80 prefill member, one per (element type, head_dim), so the
kernels compile in parallel and a build can leave variants out. Run from anywhere:
    python kernels/cuda/attention/prefill_sm80_generate_instances.py
"""

from pathlib import Path

ELEMENTS = {"fp16": "__half", "bf16": "__nv_bfloat16"}
HEAD_DIMS = [64, 128]

TEMPLATE = """\
// Written by prefill_sm80_generate_instances.py; edit that script, not this file.
#include "kernels/cuda/attention/prefill_sm80_launch.h"

namespace ftengine::kernels::cuda {{

{declaration}const AttentionParams& params,
{indent}cudaStream_t stream);

}}  // namespace ftengine::kernels::cuda
"""


def main():
    directory = Path(__file__).resolve().parent
    for head_dim in HEAD_DIMS:
        for name, element in ELEMENTS.items():
            path = directory / f"prefill_sm80_hdim{head_dim}_{name}.cu"
            # Laid out as clang-format (.clang-format) would: arguments aligned after "(".
            declaration = f"template void run_prefill_sm80_instance<{element}, {head_dim}>("
            path.write_text(TEMPLATE.format(declaration=declaration, indent=" " * len(declaration)))


if __name__ == "__main__":
    main()
