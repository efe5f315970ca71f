#!/usr/bin/env bash
# End-to-end training through hpframe's real path (launch.py: planner, parallelize, DeepSpeed engine,
# data loader, loop) on H200s, from the repository root of a 2-GPU machine:
#   bash bench/run_launch_gpu.sh
# 1) mixtral_h200 on one GPU (bf16, ZeRO-1, compile on), 2) the same per-GPU batch with dp2 x ep2 on two
# GPUs, 3) one GPU without compile. Copies each run's metrics.jsonl and log to $OUT.
set -u -o pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
STEPS=${STEPS:-15}
common="recipe=mixtral_h200 train.steps=$STEPS train.progress=false train.tensorboard=false train.eval_interval=0 train.eval_steps=1"
run() {  # name, timeout, overrides...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*"
  timeout "$t" python3 launch.py $common "$@" hydra.run.dir=/tmp/hp_$name > "$OUT/$name.log" 2>&1
  echo "exit $?"
  grep -E "peak device memory|step +$STEPS/|Error|error" "$OUT/$name.log" | tail -6
  cp /tmp/hp_$name/metrics.jsonl "$OUT/$name.metrics.jsonl" 2>/dev/null
}
nvidia-smi -L
CUDA_VISIBLE_DEVICES=0 run gpu1_compile 230
run gpu2_ep2_compile 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
if [ "${EAGER:-1}" = 1 ]; then CUDA_VISIBLE_DEVICES=0 run gpu1_eager 120 train.compile=false; fi
python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.metrics.jsonl")):
    rows = [r for r in map(json.loads, f.read_text().splitlines()) if 'loss' in r]
    tail = rows[len(rows) // 3:]  # drop warm-up / compile steps
    if not tail: continue
    med = lambda k: statistics.median(r[k] for r in tail)
    print(f"{f.name}: steps {len(rows)}, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, median tokens/s {med('tokens_per_s'):,.0f}, MFU {med('mfu'):.3f}, step {med('step_time_s')*1e3:.0f} ms")
PY
