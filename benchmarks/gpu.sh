#!/usr/bin/env bash
# One command for a lent GPU: the bf16 MoE layer (moeyard grouped GEMM vs Megatron-Core MoELayer vs
# DeepSpeed-MoE, TFLOP/s and % of the dense GEMM rate), the MFU of the ~1B MoE training step, and the
# test suite's GPU-only tests. Writes benchmarks/results/moe_layer_gpu.{json,md}.
#   bash benchmarks/gpu.sh                 # extra arguments go to moe_layer_gpu.py
# Peers that are not installed (pip install deepspeed megatron-core) are reported as unavailable.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import moeyard" 2>/dev/null || pip install --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python benchmarks/moe_layer_gpu.py "$@"
python -m pytest -q -m "not slow" -k "cuda or gpu or grouped" tests/ || echo "GPU tests failed (see above)"
