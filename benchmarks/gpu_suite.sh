#!/usr/bin/env bash
# The GPU validation suite in one command, for a lent H100 / H200 (under 8 minutes): ELF-B training
# tokens/s, peak memory and MFU per branch (bf16 + compile, batch 32 and the largest that fits,
# against elflm.plan's estimate), and the wall time of 1000 × 1024-token samples with 32 SDE
# steps, eager and compiled. Writes $OUT/gpu_suite.json and $OUT/gpu_suite.md
# (OUT=benchmarks/results by default). Extra arguments go to benchmarks/gpu_suite.py
# (--smoke: tiny sizes on the CPU, to test the code paths; --budget SECONDS).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" benchmarks/gpu_suite.py --out "$OUT" "$@"
