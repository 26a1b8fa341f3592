#!/usr/bin/env python3
"""Writes the instance files of the prefill members, one per (member, element type, head_dim), so
the kernels compile in parallel and a build can leave variants out. Run from anywhere:
    python kernels/cuda/attention/prefill_generate_instances.py
"""

from pathlib import Path

HEAD_DIMS = [64, 128]
# member -> {element name: traits template of (head_dim)}. Turing and Volta tensor cores have no
# bf16, so their members are fp16 only.
MEMBERS = {
    "sm90": {
        "fp16": "PrefillSm90Traits<__half, {head_dim}>",
        "bf16": "PrefillSm90Traits<__nv_bfloat16, {head_dim}>",
    },
    "sm80": {
        "fp16": "PrefillSm80Traits<__half, {head_dim}>",
        "bf16": "PrefillSm80Traits<__nv_bfloat16, {head_dim}>",
    },
    "sm75": {"fp16": "PrefillSm75Traits<{head_dim}>"},
    "sm70": {"fp16": "PrefillSm70Traits<{head_dim}>"},
}

TEMPLATE = """\
// Written by prefill_generate_instances.py; edit that script, not this file.
#include "kernels/cuda/attention/prefill_launch.h"

namespace ftengine::kernels::cuda {{

{declaration}const AttentionParams& params,
{indent}cudaStream_t stream);

}}  // namespace ftengine::kernels::cuda
"""


def main():
    directory = Path(__file__).resolve().parent
    for member, elements in MEMBERS.items():
        for head_dim in HEAD_DIMS:
            for name, traits in elements.items():
                path = directory / f"prefill_{member}_hdim{head_dim}_{name}.cu"
                # Laid out as clang-format (.clang-format) would: arguments aligned after "(".
                declaration = (
                    f"template void run_prefill_instance<{traits.format(head_dim=head_dim)}>("
                )
                path.write_text(
                    TEMPLATE.format(declaration=declaration, indent=" " * len(declaration))
                )


if __name__ == "__main__":
    main()
