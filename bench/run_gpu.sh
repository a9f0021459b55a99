#!/usr/bin/env bash
# Every GPU check and benchmark in one call, on a machine with a CUDA GPU and torch/triton installed:
# stub import check, the GPU-marked tests, the kernel benchmark, then the offline benchmark table last.
# Results (logs and JSON) go to $OUT when set (the lent GPU machine), else bench/results.
#
#   bash bench/run_gpu.sh            # everything
#   bash bench/run_gpu.sh tests      # only the GPU tests
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="services/engine:services/tokenizer:clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
results=${OUT:-bench/results}
mkdir -p "$results"
what=${1:-all}
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import grpc, google.protobuf as pb; import pagoda.v1.engine_pb2_grpc, pagoda.v1.tokenizer_pb2_grpc; \
print('stubs import under grpcio', grpc.__version__, 'protobuf', pb.__version__)" || status=1

if [[ $what == all || $what == tests ]]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$results/gpu_tests.log" || status=1
fi
if [[ $what == all || $what == bench ]]; then
  for micro in kernels fused_ops sampling; do
    [[ -f bench/$micro.py ]] || continue
    python3 bench/$micro.py --out "$results/$micro.json" 2>&1 | tee "$results/$micro.log" || status=1
  done
  python3 bench/offline.py --out "$results/offline.json" 2>&1 | tee "$results/offline.log" || status=1
fi
exit $status
