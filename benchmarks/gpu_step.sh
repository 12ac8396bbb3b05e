#!/usr/bin/env bash
# benchmarks/gpu_step.py on the lent GPU machine in one call (diffusers travels as wheels in .whl/).
#   OUT=runs/gpu bash benchmarks/gpu_step.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/machine.txt" 2>&1
timeout "${LIMIT_S:-230}" python3 benchmarks/gpu_step.py --model adm64 sd15 --steps 4 --warmup 2 --out "$OUT/gpu_step.jsonl" > "$OUT/log.txt" 2>&1
echo "exit $?" >> "$OUT/log.txt"
tail -12 "$OUT/log.txt"
