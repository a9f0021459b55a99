#!/usr/bin/env bash
# Every GPU check and benchmark in one call, on a machine with a CUDA GPU and torch/triton installed:
# stub import check, the GPU-marked tests, the kernel benchmark, then the offline benchmark table last.
# Results (logs and JSON) go to $OUT when set (the lent GPU machine), else bench/results.
#
#   bash bench/run_gpu.sh            # everything
#   bash bench/run_gpu.sh tests      # only the GPU tests (also: bench, serving)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="services/engine:services/tokenizer:clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
results=${OUT:-bench/results}
mkdir -p "$results"
what=${1:-all}
status=0

# Wheels the GPU image lacks (grpcio-health-checking, grpcio-reflection), carried in .whl/ when present.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import grpc, google.protobuf as pb; import pagoda.v1.engine_pb2_grpc, pagoda.v1.tokenizer_pb2_grpc; \
print('stubs import under grpcio', grpc.__version__, 'protobuf', pb.__version__)" || status=1

if [[ $what == all || $what == tests ]]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$results/gpu_tests.log" || status=1
fi
if [[ $what == all || $what == bench ]]; then
  for micro in kernels fused_ops sampling step_profile; do
    [[ -f bench/$micro.py ]] || continue
    python3 bench/$micro.py --out "$results/$micro.json" 2>&1 | tee "$results/$micro.log" || status=1
  done
  python3 bench/offline.py --out "$results/offline.json" 2>&1 | tee "$results/offline.log" || status=1
  if (( $(python3 -c 'import torch; print(torch.cuda.device_count())') >= 2 )); then
    python3 bench/offline.py --tensor-parallel-size 2 --out "$results/offline_tp2.json" 2>&1 \
      | tee "$results/offline_tp2.log" || status=1
  fi
fi
if [[ $what == all || $what == serving ]]; then
  python3 bench/serving.py --out "$results/serving.json" --launch -- --model bench/configs/qwen3-0.6b \
    --load-format dummy --max-model-len 4096 --max-num-batched-tokens 16384 2>&1 | tee "$results/serving.log" || status=1
fi
exit $status
