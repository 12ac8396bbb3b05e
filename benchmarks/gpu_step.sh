#!/usr/bin/env bash
# benchmarks/gpu_step.py on the lent GPU machine in one call (diffusers travels as wheels in .whl/): at most 7 min 30 s
# of limits, half of a session's 15 device minutes, what matters most first (the reference comparison, then
# torch.compile, then the memory savers). Call it with timeout_s 480 and carry [".whl"].
#   OUT=runs/gpu bash benchmarks/gpu_step.sh                     # ADM-64 and SD1.5 on the GPU
#   OUT=runs/gpu-cpu MODELS="tiny tiny-text" bash benchmarks/gpu_step.sh   # the same script anywhere, at a tiny size
# One process per model and stage, so every peak is clean; each has its own time limit, so one that runs long costs
# only its own figures.
set -uo pipefail
OUT=${OUT:-runs/gpu}
MODELS=${MODELS:-adm64 sd15}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/machine.txt" 2>&1
step() {  # step LIMIT_S ARGS...: one process of gpu_step.py
  local limit=$1; shift
  timeout "$limit" $PY benchmarks/gpu_step.py "$@" --out "$OUT/gpu_step.jsonl" >> "$OUT/log.txt" 2>&1
  echo "exit $? (limit ${limit} s): $*" >> "$OUT/log.txt"
}
# 1. Eager: the plain reference loop and disback's, 1:1 and 5:1, with and without reused samples, and a target switch.
for m in $MODELS; do step "${LIMIT_EAGER:-100}" --model "$m" --reference --ratio 1 5 --reuse 0 1 --steps 6 --warmup 3; done
# 2. torch.compile at 1:1 with reused samples (its compile time is the row's warmup_s).
for m in $MODELS; do step "${LIMIT_COMPILE:-80}" --model "$m" --ratio 1 --reuse 1 --compile 1 --steps 6 --warmup 3; done
# 3. Memory savers at 1:1 with reused samples: gradient checkpointing and a rank-4 LoRA fake score, alone and together.
for m in $MODELS; do step "${LIMIT_SAVERS:-45}" --model "$m" --ratio 1 --reuse 1 --checkpointing 0 1 --lora 0 4 --steps 4 --warmup 2; done
$PY benchmarks/gpu_step.py --table "$OUT/gpu_step.jsonl" > "$OUT/table.md" 2>> "$OUT/log.txt"
cat "$OUT/table.md"; grep -i "exit\|error\|warning:" "$OUT/log.txt" | tail -8
