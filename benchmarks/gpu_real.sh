#!/usr/bin/env bash
# SDXL and SD1.5 at their published sizes through `disback text`, and the step-time goal, on the lent GPU:
# `bash benchmarks/gpu_real.sh` with carry [".whl"] (diffusers and disback itself as wheels, built by
# `bash benchmarks/gpu_real.sh --wheels` here). The tool sets $OUT there; only what lands in it comes back.
#   OUT=/tmp/real TINY=1 PY=.venv/bin/python bash benchmarks/gpu_real.sh   # anywhere: tiny widths, to check it runs
# All parts take about 13 minutes on an H200 (SDXL's text run alone 5 min: BENCHMARKS.md), more than one call's 10:
# split them over calls, e.g. PARTS="ceilings sdxl", then PARTS="sd15 step compile". PARTS picks parts, in order.
# Each step has its own time limit, so one that runs long costs only its own figures; the log says how far it got.
# Results are JSON lines in $OUT/results.jsonl (benchmarks/real_size.py and benchmarks/gpu_step.py write them); the
# table at the end comes from both. A part that ended is noted in $WORK/done, and the same command called again on a
# machine still warm goes on with the parts not yet run; every result so far is in $WORK/results.jsonl too.
set -uo pipefail
if [ "${1:-}" = "--wheels" ]; then  # here, before the call: the packages the device machine lacks
  PY=${PY:-.venv/bin/python}
  rm -f .whl/disback-*.whl
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d .whl "diffusers==$($PY -c 'import diffusers; print(diffusers.__version__)')"
  $PY -m pip wheel -q --no-deps -w .whl . && ls -la .whl
  exit
fi
OUT=${OUT:-runs/gpu-real}
WORK=${WORK:-/tmp/disback-real}  # pipelines and runs: tens of GB for SDXL, deleted after each family
PARTS=${PARTS:-ceilings sdxl sd15 step compile}  # in order of importance; also sd35m and flux (disk: see below)
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
if [ -d .whl ] && [ -z "${TINY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
R=$WORK/results.jsonl  # copied to $OUT at the end of every part
LOG=$OUT/log.txt
touch "$WORK/done" "$R"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; date -u;
  $PY -c "import torch, diffusers, transformers, disback; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, disback.__file__)"; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
lim() {  # lim LIMIT_S COMMAND...: one step under its own limit, its output in the log
  local limit=$1; shift
  echo "== $(date +%T) (limit ${limit} s): $*" >> "$LOG"
  timeout -k 5 "$limit" "$@" >> "$LOG" 2>&1
  local rc=$?
  echo "== exit $rc after $SECONDS s in all" >> "$LOG"
  return $rc
}
# The sd preset's settings (batch 16, 5 fake-score updates per generator update, bf16, gradient checkpointing) for a
# short budget: 4 stage-1 steps, 3 nodes (so the target switches once), 3 generator iterations, every step logged.
SHORT=(--quiet --set degrade.steps=4 --set degrade.nodes=2 --set degrade.spacing=steps --set degrade.plateau=0
  --set distill.steps=3 --set distill.schedule=fixed --set distill.switch_every=1 --set eval.every=1
  --set run.checkpoint_every=0 --set run.on_nonfinite=skip)
TINY_ARGS=()
if [ -n "${TINY:-}" ]; then
  TINY_ARGS=(--tiny)
  SHORT+=(--set degrade.batch=2 --set distill.batch=2 --set run.precision=fp32 --set text.resolution=256)
fi
text_family() {  # text_family FAMILY LIMIT_S [--set ...]: build, `disback text`, summary, sampling; then free the disk
  local family=$1 limit=$2; shift 2
  lim "${LIMIT_BUILD:-90}" $PY benchmarks/real_size.py build "$family" --out "$WORK/$family-pipe" "${TINY_ARGS[@]}" --results "$R" || return
  local started
  started=$(date +%s.%N)
  lim "$limit" $PY -m disback text --pretrained "$WORK/$family-pipe" --prompts benchmarks/prompts.txt \
    --out "$WORK/$family" "${SHORT[@]}" "$@" || return
  lim 60 $PY benchmarks/real_size.py summary "$WORK/$family" --started "$started" --results "$R"
  lim "${LIMIT_SAMPLE:-80}" $PY benchmarks/real_size.py sample --base "$WORK/$family-pipe" \
    --export "$WORK/$family/pipeline" --batch 4 --results "$R"
  df -h "$WORK" >> "$LOG"
  rm -rf "${WORK:?}/$family" "${WORK:?}/$family-pipe" "$WORK/.$family-pipe-tokenizer"
}
step() {  # step LIMIT_S ARGS...: one process of gpu_step.py, its rows into the results
  local limit=$1; shift
  lim "$limit" $PY benchmarks/gpu_step.py "$@" --out "$R"
}
for part in $PARTS; do
  if grep -qx "$part" "$WORK/done"; then echo "$part: done in an earlier call" >> "$LOG"; continue; fi
  case $part in
    ceilings) lim 40 $PY benchmarks/real_size.py ceilings --results "$R" ;;
    # SDXL: LoRA fake score and LoRA nodes (rank 4), as docs/text-to-image.md runs it
    sdxl) text_family sdxl "${LIMIT_SDXL:-330}" --set network.lora_rank=4 ;;
    # SD1.5: full copies of every network
    sd15) text_family sd15 "${LIMIT_SD15:-200}" ;;
    # SD3.5-medium (sd3 preset: LoRA fake score and nodes) and FLUX.1-dev (flux-dev preset: everything LoRA); not in
    # the default PARTS. Disk, estimated from parameter counts: the fp16 build, the fp32 teacher and generator files
    # and the fp32 export come to about 66 GB for SD3.5-medium and 200 GB for FLUX.1-dev, more than the lent
    # machine's 64 GB: run these where the disk has room (WORK=...).
    sd35m) text_family sd35m "${LIMIT_SD35M:-300}" ;;
    flux) text_family flux-dev "${LIMIT_FLUX:-400}" ;;
    # the step-time goal: the plain reference loop against disback's with reused samples, 1:1 and 5:1; then SDXL's
    # loop at 1:1 as the text run trains it (LoRA fake score, checkpointing; the text run gives the preset's 5:1)
    step)
      if [ -n "${TINY:-}" ]; then
        step 120 --model tiny tiny-text --reference --ratio 1 5 --reuse 1 --steps 2 --warmup 1
      else
        step "${LIMIT_ADM:-70}" --model adm64 --reference --ratio 1 5 --reuse 1 --steps 5 --warmup 2
        step "${LIMIT_SD15_STEP:-80}" --model sd15 --reference --ratio 1 5 --reuse 1 --steps 4 --warmup 2
        step "${LIMIT_SDXL_STEP:-70}" --model sdxl --ratio 1 --reuse 0 --lora 4 --checkpointing 1 --steps 3 --warmup 1
      fi ;;
    # torch.compile at 1:1 with reused samples; its compile time is the warm-up
    compile)
      if [ -n "${TINY:-}" ]; then
        step 20 --model tiny --ratio 1 --reuse 1 --compile 1 --steps 2 --warmup 1
      else
        step "${LIMIT_COMPILE:-150}" --model adm64 --ratio 1 --reuse 1 --compile 1 --steps 5 --warmup 3
      fi ;;
  esac
  echo "$part" >> "$WORK/done"
  cp "$R" "$OUT/results.jsonl"
done
$PY benchmarks/gpu_step.py --table "$R" > "$OUT/table.md" 2>> "$LOG"
cat "$OUT/table.md"
grep -v '"loop"' "$R" 2>/dev/null
grep "^== exit\|rror\|Traceback" "$LOG" | tail -20
