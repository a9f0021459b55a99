#!/usr/bin/env bash
# Every GPU check and benchmark in one call, on a machine with a CUDA GPU and torch/triton installed:
# stub import check, the GPU-marked tests, the micro-benchmarks and the step profile, the offline table,
# then the serving tables last. Everything printed goes to run_gpu.log and every benchmark's JSON into
# one results.json (two files: the lent machine returns few), under $OUT when set, else bench/results.
#
#   bash bench/run_gpu.sh            # everything
#   bash bench/run_gpu.sh tests      # only the GPU tests; stages: tests, bench, serving
#   bash bench/run_gpu.sh bench serving
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="services/engine:services/tokenizer:clients/python${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
results=${OUT:-bench/results}
mkdir -p "$results"
stages=" ${*:-tests bench serving} "  # any of: tests bench serving (default all three)
want() { [[ $stages == *" $1 "* ]]; }
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

log="$results/run_gpu.log"
parts="$results/parts"  # one JSON per benchmark, merged into results.json at the end
mkdir -p "$parts"
run() { "$@" 2>&1 | tee -a "$log" || status=1; }

if want tests; then
  # test_security.py holds no GPU tests and needs cryptography, which the GPU image lacks.
  run python3 -m pytest -q -p no:cacheprovider -m gpu tests/ --ignore tests/test_security.py
fi
if want bench; then
  run python3 bench/kernels.py --pieces --fp8 --out "$parts/kernels.json"
  for micro in fused_ops linear sampling moe; do
    run python3 bench/$micro.py --out "$parts/$micro.json"
  done
  run python3 bench/step_profile.py --trace 10 --trace-prefill 3 --out "$parts/step_profile.json"
  run python3 bench/step_profile.py --num-seqs 1 --trace 20 --out "$parts/step_profile_one_seq.json"
  run python3 bench/offline.py --out "$parts/offline.json"
  run python3 bench/offline.py --kv-cache-dtype fp8 --skip-latency --out "$parts/offline_fp8.json"
  run python3 bench/offline.py --model bench/configs/qwen3-30b-a3b --out "$parts/offline_moe.json"
  if [[ -f .carry/smollm2-tokenizer/tokenizer.json ]]; then  # the grammars read SmolLM2's tokenizer.json
    run python3 bench/structured.py --dtype bfloat16 --out "$parts/structured.json"
  fi
  if (( $(python3 -c 'import torch; print(torch.cuda.device_count())') >= 2 )); then
    run python3 bench/offline.py --tensor-parallel-size 2 --out "$parts/offline_tp2.json"
  fi
fi
if want serving; then
  engine=(--model bench/configs/qwen3-0.6b --load-format dummy --max-model-len 4096 --max-num-batched-tokens 16384)
  # The text front needs a tokenizer: SmolLM2's files, carried in .carry/smollm2-tokenizer (bench/RESULTS.md).
  front=()
  [[ -f .carry/smollm2-tokenizer/tokenizer.json ]] && front=(--front .carry/smollm2-tokenizer --front-workers 4)
  # Four client processes: one Python client saturates near the engine's message rate.
  run python3 bench/serving.py --clients 4 --out "$parts/serving.json" --launch "${front[@]}" -- "${engine[@]}"
  run python3 bench/serving.py --out "$parts/serving_one_stream.json" --concurrency 1 --num-seqs 16 --launch \
    -- "${engine[@]}"
fi
python3 - "$parts" "$results/results.json" <<'MERGE'
import json, pathlib, sys
parts, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(parts.glob("*.json"))}, indent=2))
for p in parts.glob("*.json"):
    p.unlink()
parts.rmdir()
MERGE
exit $status
