#!/usr/bin/env bash
# On the lent GPU machine, in one call: the convergence benchmark on digits (5 seeds, one process per seed sharing
# the GPU) and the methods benchmark on 2-D data (CPU cores, one thread per process).
#   OUT=runs/gpu bash benchmarks/gpu_convergence.sh
# The digits teacher (runs/bench-digits/digits/teacher) and the feature network (runs/cache) are trained beforehand
# and carried, so that the machine's minutes go to the comparison; diffusers travels as wheels in .whl/.
set -uo pipefail
OUT=${OUT:-runs/gpu}
LIMIT=${LIMIT_S:-480}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 DISBACK_CACHE=$PWD/runs/cache
{ nvidia-smi --query-gpu=name,memory.total --format=csv; nproc; python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"; } > "$OUT/machine.txt" 2>&1
start=$(date +%s)
timeout "$LIMIT" python3 benchmarks/convergence.py --data digits --jobs 5 --out runs/bench-digits > "$OUT/digits.log" 2>&1 &
CUDA_VISIBLE_DEVICES= timeout "$LIMIT" python3 benchmarks/convergence.py --data ring8 grid25 moons --seeds 0 1 2 \
  --methods vsd dmd dmd2 sid --set distill.steps=800 --jobs 10 --out runs/bench-methods > "$OUT/methods.log" 2>&1 &
wait
echo "both done after $(( $(date +%s) - start )) s" >> "$OUT/machine.txt"
# Tables from whatever (data, seed) pairs finished, should the limit have cut a benchmark short.
for b in digits methods; do
  grep -q "seed" "$OUT/$b.log" || continue
  python3 benchmarks/convergence.py --reuse --out "runs/bench-$b" > /dev/null 2>> "$OUT/$b.log"
  cp "runs/bench-$b/results.json" "$OUT/$b-results.json"; cp "runs/bench-$b/table.md" "$OUT/$b-table.md"
done
cp runs/bench-digits/curves-digits.png "$OUT/" 2>/dev/null
tail -3 "$OUT/digits.log" "$OUT/methods.log"
