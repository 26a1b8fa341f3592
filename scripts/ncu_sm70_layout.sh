#!/usr/bin/env bash
# Shared-memory bank conflicts of the Volta member's fragment loads, with its swizzled tiles and
# with plain row-major ones (scripts/ncu_sm70_layout.cu says how). Builds the probe, profiles its
# four prefill kernels (head_dim 128 and 64, each layout) with Nsight Compute, writes
# $OUT/ncu_sm70_layout.json (OUT defaults to ./gpu_out) and prints a table. Needs a GPU of
# sm_90 (the H200), nvcc and ncu, and access to the performance counters.
#
#   scripts/ncu_sm70_layout.sh              # from the repo root; about a minute
#
# All the body's ld.shared are 16-byte fragment loads (plus 16 per warp in the epilogue at
# head_dim 128), served a quarter warp at a time: 4 wavefronts per instruction when
# conflict-free. Row-major tiles put a quarter warp's 8 Q rows (or 4 K or V rows) in one group of
# 4 banks, so expect about 32 (16) wavefronts per Q (K, V) load there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
PYTHON="${PYTHON:-python3}"
for tool in "$NVCC" "$NCU"; do
  if [[ ! -x "$tool" ]]; then
    echo "error: $tool not found; put it on PATH or set NVCC / NCU to its path" >&2
    exit 1
  fi
done
command -v "$PYTHON" >/dev/null || { echo "error: $PYTHON not found (set PYTHON)" >&2; exit 1; }
mkdir -p "$OUT" build
PROBE=build/ncu_sm70_layout

echo "== build $PROBE"
"$NVCC" -std=c++17 -O3 -arch=sm_90a --expt-relaxed-constexpr -lineinfo -I. \
  scripts/ncu_sm70_layout.cu -o "$PROBE"

# Loads and stores separately: the layout is chosen for the loads (fragments); the stores are the
# tile copies (16 bytes, conflict-free either way) and the epilogue's 4-byte writes of O.
METRICS=l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum
METRICS+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum
METRICS+=,smsp__inst_executed_op_shared_ld.sum
METRICS+=,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum
METRICS+=,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum
METRICS+=,smsp__inst_executed_op_shared_st.sum
METRICS+=,gpu__time_duration.sum

CSV="$OUT/ncu_sm70_layout.csv"
echo "== ncu $PROBE (log: $CSV)"
# The probe's own output (the correctness checks) stays on stdout; ncu's CSV goes to the log.
# A failed check still leaves counters worth keeping, so the status is returned at the end.
status=0
"$NCU" --clock-control none --csv --print-units base --metrics "$METRICS" \
  -k regex:prefill_kernel --log-file "$CSV" "$PROBE" || status=$?

"$PYTHON" - "$CSV" "$OUT/ncu_sm70_layout.json" <<'EOF' || status=$?
import csv, json, re, sys

log_path, json_path = sys.argv[1:]
with open(log_path, newline="") as log:
    lines = log.read().splitlines()
header = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
if header is None:
    sys.exit("error: no CSV rows from ncu; its log ends with:\n" + "\n".join(lines[-15:]))

# Launch IDs grow with time: the last launch of each variant is the one after its warm-up.
launches = {}
# Only quoted lines are CSV: ncu's ==PROF== / ==WARNING== lines may come between them.
for row in csv.DictReader(line for line in lines[header:] if line.startswith('"')):
    name = row.get("Kernel Name") or ""
    # Demangled (PrefillSm70NaiveTraits<128>) or mangled (PrefillSm70NaiveTraitsILi128E).
    match = re.search(r"PrefillSm70(Naive)?Traits(?:<|ILi)(\d+)", name)
    if not match or not row.get("Metric Name"):
        continue
    variant = f"{'naive' if match.group(1) else 'swizzled'}_d{match.group(2)}"
    launch_id = int(row["ID"])
    entry = launches.get(variant)
    if entry is None or launch_id > entry["launch_id"]:
        entry = launches[variant] = {"kernel": name, "launch_id": launch_id, "metrics": {}}
    if launch_id == entry["launch_id"]:
        value = row["Metric Value"].replace(",", "")
        try:
            entry["metrics"][row["Metric Name"]] = float(value)
        except ValueError:
            entry["metrics"][row["Metric Name"]] = value
if not launches:
    sys.exit("error: ncu profiled no PrefillSm70 kernel; see " + log_path)

with open(json_path, "w") as out:
    json.dump(dict(sorted(launches.items())), out, indent=2)

LD = "mem_shared_op_ld.sum"
columns = [("ld wavefronts", "l1tex__data_pipe_lsu_wavefronts_" + LD),
           ("ld bank conflicts", "l1tex__data_bank_conflicts_pipe_lsu_" + LD),
           ("ld instructions", "smsp__inst_executed_op_shared_ld.sum")]
print(f"{'variant':<13}" + "".join(f"{title:>19}" for title, _ in columns)
      + f"{'wavefronts/inst':>17}{'st conflicts':>14}{'time us':>10}")
for variant, entry in sorted(launches.items()):
    m = entry["metrics"]
    values = [m.get(metric, float("nan")) for _, metric in columns]
    per_inst = values[0] / values[2] if values[2] else float("nan")
    st = m.get("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum", float("nan"))
    time_us = m.get("gpu__time_duration.sum", float("nan")) / 1e3  # base unit: ns
    print(f"{variant:<13}" + "".join(f"{v:>19,.0f}" for v in values)
          + f"{per_inst:>17.2f}{st:>14,.0f}{time_us:>10.1f}")
print(f"wrote {json_path}")
EOF

if [[ $status -ne 0 ]]; then
  echo "FAILED (status $status): see the messages above and $CSV" >&2
fi
exit $status
