#!/usr/bin/env bash
# Runs the GPU benchmarks on the H200 machine, from the repository root:
#   bash bench/run_device.sh gpu1   # one GPU: GPU tests, MoE layer, end-to-end training
#   bash bench/run_device.sh gpu2   # two GPUs: EP and all-to-all, then the one-GPU set on GPU 0
#   bash bench/run_device.sh repeat # one GPU: tests, then hpframe and the rooflines measured again
# The machine has torch/transformers but not deepspeed, hydra-core, omegaconf, antlr4, hjson or
# pydantic: they travel as wheels in .whl/ (see docs/performance.md). Results go to $OUT (or
# bench/results/local): JSON per benchmark, a log, and the profiler tables packed in profiles.tgz.
set -u -o pipefail
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # leave NVLink multicast off
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OUT
LOG="$OUT/log.txt"
what=${1:-gpu1}

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__); from transformers.integrations import moe; print('hf experts impls', sorted(moe.ExpertsInterface._global_mapping))"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$LOG"
python3 bench/common.py env "$OUT/env.json" --command "bash bench/run_device.sh $*"

one_gpu() {
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_moe_layer.py 2>&1 | tail -15 | tee -a "$LOG"
  timeout 220 python3 bench/moe_layer.py --profile hpframe hf_grouped_mm 2>&1 | tee -a "$LOG"
  timeout 200 python3 bench/train_e2e.py --profile hpframe_compile 2>&1 | tee -a "$LOG"
}

case "$what" in
  gpu1) one_gpu ;;
  moe) timeout 400 python3 bench/moe_layer.py "${@:2}" 2>&1 | tee -a "$LOG" ;;
  e2e) timeout 400 python3 bench/train_e2e.py "${@:2}" 2>&1 | tee -a "$LOG" ;;
  diag) timeout 300 python3 bench/moe_diag.py "${@:2}" 2>&1 | tee -a "$LOG" ;;
  repeat)  # second measurement of hpframe and the rooflines, to see the run-to-run spread
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_moe_layer.py 2>&1 | tail -15 | tee -a "$LOG"
    timeout 200 python3 bench/moe_layer.py --impls roofline_gemm dense_swiglu hpframe --out moe_layer_repeat.json 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_e2e.py --impls hpframe hpframe_compile --steps 10 --out train_e2e_repeat.json 2>&1 | tee -a "$LOG"
    ;;
  gpu2)  # the two-GPU part first: it is what this machine is for
    timeout 150 torchrun --standalone --nproc_per_node 2 bench/ep_bench.py 2>&1 | grep -v "^W.*OMP_NUM_THREADS\|^W.*\*\*\*" | tee -a "$LOG"
    one_gpu
    ;;
  *) echo "unknown target $what" ; exit 2 ;;
esac

# at most 8 files come back: pack the profiler tables into one archive
if ls "$OUT"/profile_*.txt >/dev/null 2>&1; then
  tar czf "$OUT/profiles.tgz" -C "$OUT" $(cd "$OUT" && ls profile_*.txt) && rm -f "$OUT"/profile_*.txt
fi
ls -la "$OUT"
