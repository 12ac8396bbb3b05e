#!/usr/bin/env bash
# The Fashion-MNIST benchmark on one GPU: `disback demo --preset fashion`, teacher to report, in one call.
#   OUT=runs/gpu FASHION_ROOT=/usr/share/datasets/fashion-mnist bash benchmarks/gpu_fashion.sh [--set KEY=VALUE ...]
# On the project's lent GPU machine, diffusers travels as wheels in .whl/ and the IDX files in .fashion/.
set -uo pipefail
OUT=${OUT:-runs/gpu}
RUN=${RUN:-/tmp/disback-fashion}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 DISBACK_CACHE=$RUN-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/gpu.txt"
start=$(date +%s)
timeout "${LIMIT_S:-480}" python3 -m disback demo --preset fashion --set data.root="${FASHION_ROOT:-/usr/share/datasets/fashion-mnist}" \
  --out "$RUN" --quiet "$@" > "$OUT/log.txt" 2>&1
echo "exit $? after $(( $(date +%s) - start )) s" >> "$OUT/log.txt"
# At most 8 files come back from the device machine: the report, its pictures, the summary and the metrics.
for f in summary.json report.md curves.png samples.png; do cp "$RUN/$f" "$OUT/" 2>/dev/null; done
# Every record names its stage, so one file holds the teacher's, stage 1's, DisBack's and the baseline's metrics.
cat "$RUN"/{teacher,path,disback,baseline}/metrics.jsonl > "$OUT/metrics.jsonl" 2>/dev/null
tail -5 "$OUT/log.txt"
