#!/usr/bin/env bash
# The checks that need a GPU, as one run on a CUDA machine (CI never has one):
#   the CUDA tests (pytest -m cuda), benchmarks/core_timing.py on the GPU, and the whole suite with a GPU present.
# usage: scripts/gpu_check.sh OUT_DIR [FASHION_MNIST_DIR]   (logs and the timing JSON go to OUT_DIR)
set -u
out=${1:?usage: scripts/gpu_check.sh OUT_DIR [FASHION_MNIST_DIR]}
data=${2:-}
mkdir -p "$out"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/gpu.txt"
echo "== CUDA tests"
timeout 240 $py -m pytest -m cuda -p no:cacheprovider -rfEs tests 2>&1 | tee "$out/cuda_tests.log"
echo "== core timing on the GPU"
timeout 180 $py benchmarks/core_timing.py --device cuda ${data:+--data-dir "$data"} \
    --out "$out/core_timing_cuda.json" 2>&1 | tee "$out/core_timing.log"
echo "== the whole suite with a GPU present"
timeout 300 $py -m pytest -p no:cacheprovider -rfE tests > "$out/full_suite.log" 2>&1
tail -25 "$out/full_suite.log"
