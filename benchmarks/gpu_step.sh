#!/usr/bin/env bash
# benchmarks/gpu_step.py on the lent GPU machine in one call (diffusers travels as wheels in .whl/). On the device
# machine call it as `bash benchmarks/gpu_step.sh` with timeout_s 600 and carry [".whl"]: the tool sets $OUT there,
# and only what lands in $OUT comes back. At most 8 min 50 s of limits, what matters most first; STAGES picks stages
# (a rerun of one that ran out of time: STAGES=compile bash benchmarks/gpu_step.sh).
#   OUT=/tmp/gpu-cpu MODELS="tiny tiny-text" PY=.venv/bin/python bash benchmarks/gpu_step.sh   # anywhere, tiny sizes
# One process per model and stage, so every peak is clean; each has its own time limit, so one that runs long costs
# only its own figures (the log still says how far its warm-up got).
set -uo pipefail
OUT=${OUT:-runs/gpu}
MODELS=${MODELS:-adm64 sd15}
STAGES=${STAGES:-eager switch compile savers}
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
first() { echo "${MODELS%% *}"; }  # the smaller model, for the stages that cannot afford both
for stage in $STAGES; do
  case $stage in
    # the plain reference loop and disback's, 1:1 and 5:1, with and without reused samples (SD1.5 at 5:1 was missing)
    eager) for m in $MODELS; do step "${LIMIT_EAGER:-120}" --model "$m" --reference --ratio 1 5 --reuse 1 0 --steps 6 --warmup 3; done ;;
    # DisBack's overhead: a target switch with the node read ahead, the target in bf16 on the GPU
    switch) step "${LIMIT_SWITCH:-60}" --model $MODELS --switch-only ;;
    # torch.compile at 1:1 with reused samples, the smaller model only (compiling a UNet's graphs takes minutes)
    compile) step "${LIMIT_COMPILE:-160}" --model "$(first)" --ratio 1 --reuse 1 --compile 1 --steps 6 --warmup 3 ;;
    # memory savers at 1:1 with reused samples: gradient checkpointing and a rank-4 LoRA fake score, alone and together
    savers) step "${LIMIT_SAVERS:-70}" --model "$(first)" --ratio 1 --reuse 1 --checkpointing 0 1 --lora 0 4 --steps 4 --warmup 2 ;;
  esac
done
$PY benchmarks/gpu_step.py --table "$OUT/gpu_step.jsonl" > "$OUT/table.md" 2>> "$OUT/log.txt"
cat "$OUT/table.md"; grep -h '"switch_prefetched_s"' "$OUT/gpu_step.jsonl"; grep -i "exit\|error\|warning:" "$OUT/log.txt" | tail -8
