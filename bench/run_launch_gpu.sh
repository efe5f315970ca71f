#!/usr/bin/env bash
# End-to-end training through hpframe's real path (launch.py: planner, parallelize, DeepSpeed engine,
# data loader, loop) on H200s, from the repository root of the GPU machine:
#   bash bench/run_launch_gpu.sh [SET]
# SET (default "ep"):
#   ep       1) mixtral_h200 on one GPU (bf16, ZeRO-1, compile on), 2) the same per-GPU batch with
#            dp2 x ep2 on two GPUs, 3) one GPU without compile (EAGER=0 skips it)
#   profile  one GPU: fp32 master weights (ZeRO-1 and ZeRO-2) and bf16 master weights, each with a
#            torch.profiler capture of steps 7-9 (train.profile_from_step)
#   engine   (2 GPUs) one GPU with fp32 and bf16 master weights, dp2 x ep2, and deepseek_h200 at
#            dp2 x ep2 with and without the shared-expert / all-to-all overlap (profiled)
#   after    (2 GPUs) bench/grad_copy.py, then one GPU, dp2 x ep2 and the deepseek_h200 overlap pair again
#   pure     (2 GPUs) train.master_dtype=bf16 with ZeRO 0 on one GPU and at dp2 x ep2
#   final1   (1 GPU) the plain bf16 update (profiled at the end) and fp32 master weights, loss compiled
#   final2   (2 GPUs) the plain bf16 update on one GPU and at dp2 x ep2, everything in
#   layouts2 (2 GPUs) mixtral_h200 at tp2 and pp2 with the one-GPU global batch, dp2 x ep2 profiled, and
#            the planner's layout suggestion for 2 GPUs
#   layouts4 (4 GPUs) mixtral_h200 at dp4 x ep4, tp2 x ep2, pp2 x ep2 and tp2 x pp2 with the global batch
#            of the 2-GPU dp2 x ep2 reference (8 x 4096), plus the planner's layout suggestion
#   final3   (2 GPUs) GPU tests, both precision paths on one GPU and at dp2 x ep2, deepseek_h200 dp2 x ep2
#   adamw    (1 GPU) GPU tests, bench/adamw_bench.py, both precision paths on one GPU
#   gemm     (1 GPU) the AdamW kernel test, bench/grouped_vs_loop.py, the plain bf16 update profiled
#   balanced (2 GPUs, STEPS=40) plain bf16 on one GPU and at dp2 x ep2 with the aux-loss-free bias
#   versus   (1 GPU) transformers' grouped_mm Mixtral and hpframe's plain step (bench/train_e2e.py), then launch.py
#   final5   (1-2 GPUs) plain bf16 on one GPU and at dp2 x ep2
#   final6   (1 GPU, STEPS=30) GPU tests, transformers' grouped_mm Mixtral (bench/train_e2e.py), then
#            launch.py plain bf16 (steps 28-30 profiled) and fp32 master weights
#   final7   (1 GPU, STEPS=30) GPU tests, grouped vs loop GEMMs, the MoE layer bench, transformers'
#            grouped_mm Mixtral, then launch.py plain bf16 (steps 28-30 profiled) and fp32 master weights
#   final8   (1 GPU, STEPS=40) transformers' grouped_mm Mixtral, then launch.py plain bf16 with Python's
#            automatic garbage collection and with train.gc_interval=20, and fp32 master weights
#   final9   (1 GPU, STEPS=40) GPU tests, bench/kernel_sweep.py, the MoE layer bench, transformers' grouped_mm
#            Mixtral, then launch.py plain bf16 and fp32 master weights
#   final10  (1 GPU, STEPS=40) GPU tests, transformers' grouped_mm Mixtral, launch.py plain bf16 twice and
#            fp32 master weights
#   profile2 (1 GPU, STEPS=30) GPU tests, launch.py plain bf16 with steps 28-30 profiled
#   profile10 (1 GPU, STEPS=30) launch.py plain bf16 with steps 18-27 profiled (step-to-step variation)
#   probe    (2 GPUs, STEPS=80) bench/kernel_choices.py, then plain bf16 on one GPU and at dp2 x ep2
#            with the aux-loss-free bias at rates 0.005 and 0.01
#   overlap  (1 GPU, STEPS=40) GPU tests, plain bf16 without and with train.overlap_optimizer, twice each
#   master   (1 GPU, STEPS=40) GPU tests, fp32 master weights, plain bf16, fp32 master weights again
#   overlap2 (2 GPUs, STEPS=80) GPU tests, dp2 x ep2 plain bf16 with the aux-loss-free bias, without and
#            with train.overlap_optimizer (the update beside a forward that waits on all-to-alls)
#   autotune (1 GPU) GPU tests, bench/grouped_autotune.py (torch's grouped GEMMs against inductor's
#            autotuned choice, six forms, three shapes)
#   trace    (1 GPU) GPU tests, the MoE layer bench, the plain bf16 update profiled with Python stacks
#            and its kernels grouped by caller (bench/trace_callers.py), fp32 master weights
# Copies each run's metrics.jsonl, log and profile tables to $OUT and prints a summary; NAME.env.json
# beside each run records its command, git commit ($BENCH_COMMIT on a machine without .git), source
# digest and library versions (bench/common.py environment()).
set -u -o pipefail
SET=${1:-ep}
OUT=${OUT:-bench/results/local}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
STEPS=${STEPS:-12}
common="recipe=mixtral_h200 train.steps=$STEPS train.progress=false train.tensorboard=false train.eval_interval=0 train.eval_steps=1"
run() {  # name, timeout, overrides...
  local name=$1 t=$2; shift 2
  echo "=== $name: $*"
  # commit, library versions (read now) and the command of this run, beside its results
  python3 bench/common.py env "$OUT/$name.env.json" --command "python3 launch.py $common $* (bench/run_launch_gpu.sh $SET)"
  timeout "$t" python3 launch.py $common "$@" hydra.run.dir=/tmp/hp_$name > "$OUT/$name.log" 2>&1
  echo "exit $?"
  grep -E "peak device memory|step +$STEPS/|Error|error" "$OUT/$name.log" | tail -6
  cp /tmp/hp_$name/metrics.jsonl "$OUT/$name.metrics.jsonl" 2>/dev/null
  if [ -d /tmp/hp_$name/profile ]; then
    # tables, and the trace when it fits what the device returns (16 MiB a file)
    for f in $(find /tmp/hp_$name/profile -name 'rank0_*' -size -15M); do cp "$f" "$OUT/${name}_$(basename "$f")"; done
  fi
}
nvidia-smi -L
NGPU=$(nvidia-smi -L | wc -l)
prof="train.profile_from_step=7 train.profile_num_steps=3"
case $SET in
  ep)
    CUDA_VISIBLE_DEVICES=0 run gpu1_compile 230
    run gpu2_ep2_compile 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
    if [ "${EAGER:-1}" = 1 ]; then CUDA_VISIBLE_DEVICES=0 run gpu1_eager 120 train.compile=false; fi
    ;;
  profile)
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200 $prof
    CUDA_VISIBLE_DEVICES=0 run gpu1_bf16master 200 $prof train.master_dtype=bf16
    CUDA_VISIBLE_DEVICES=0 run gpu1_zero2 200 $prof parallel.zero_stage=2
    ;;
  engine)  # 2 GPUs
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    CUDA_VISIBLE_DEVICES=0 run gpu1_bf16master 200 train.master_dtype=bf16
    run gpu2_ep2_fp32master 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
    ds="recipe=deepseek_h200 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $prof"
    run gpu2_ds_ep2_overlap 260 $ds parallel.ep_overlap=true
    run gpu2_ds_ep2_no_overlap 260 $ds parallel.ep_overlap=false
    ;;
  after)  # 2 GPUs: the engine and EP changes after the first profiles
    python3 bench/grad_copy.py --out "$OUT/grad_copy.json"
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    run gpu2_ep2_fp32master 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
    ds="recipe=deepseek_h200 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2"
    run gpu2_ds_ep2_overlap 260 $ds parallel.ep_overlap=true
    run gpu2_ds_ep2_no_overlap 260 $ds parallel.ep_overlap=false
    ;;
  pure)  # 2 GPUs: the plain bf16 update (ZeRO 0, bf16 master weights) on one GPU and at dp2 x ep2
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    run gpu2_ep2_pure_bf16 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure
    ;;
  final1)  # 1 GPU: both bf16 paths after the loss is compiled too (STEPS=16: steps 14-16 profiled)
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0 \
      train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  final2)  # 2 GPUs: plain bf16 update on one GPU and at dp2 x ep2 with every change in (start-up time in the logs)
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    run gpu2_ep2_pure_bf16 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure
    ;;
  layouts2)  # 2 GPUs, global batch 4 x 4096: the one-GPU run of set "engine" is the reference
    g2="cluster.gpus_per_node=2"
    run gpu2_tp2 200 $g2 parallel.tp=2
    run gpu2_pp2 200 $g2 parallel.pp=2 parallel.grad_accum=2 parallel.micro_batch_size=2
    run gpu2_ep2_profile 200 $g2 parallel.dp=2 parallel.ep=2 $prof
    python3 launch.py recipe=mixtral_h200 $g2 plan.dry_run=true plan.suggest=true > "$OUT/gpu2_suggest.txt" 2>&1
    ;;
  layouts4)  # 4 GPUs, global batch 8 x 4096 everywhere; the 2-GPU dp2 x ep2 run is the reference
    g4="cluster.gpus_per_node=4"
    CUDA_VISIBLE_DEVICES=0,1 run gpu2_ep2_ref 150 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
    run gpu4_dp4_ep4 170 $g4 parallel.dp=4 parallel.ep=4 parallel.micro_batch_size=2
    run gpu4_tp2_ep2 170 $g4 parallel.tp=2 parallel.dp=2 parallel.ep=2
    run gpu4_pp2_ep2 170 $g4 parallel.pp=2 parallel.dp=2 parallel.ep=2 parallel.grad_accum=4 parallel.micro_batch_size=1
    run gpu4_tp2_pp2 170 $g4 parallel.tp=2 parallel.pp=2 parallel.grad_accum=4 parallel.micro_batch_size=2
    python3 launch.py recipe=mixtral_h200 $g4 plan.dry_run=true plan.suggest=true > "$OUT/gpu4_suggest.txt" 2>&1
    ;;
  trace)  # 1 GPU: GPU tests, the MoE layer, the plain bf16 update traced to its Python callers
          # (STEPS=16: steps 14-16 profiled with stacks), fp32 master weights (start-up of the meta build)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
    timeout 200 python3 bench/moe_layer.py --impls roofline_gemm hpframe --out moe_layer.json 2>&1 | tail -12
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0 \
      train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3 train.profile_with_stack=true
    t=/tmp/hp_gpu1_pure_bf16/profile/rank0_trace.json.gz
    if [ -f $t ]; then
      python3 bench/trace_callers.py $t --top 60 > "$OUT/gpu1_pure_bf16_callers.txt"
      python3 bench/trace_callers.py $t --match 'copy|cat|fill|Memcpy|Memset|elementwise' --top 40 > "$OUT/gpu1_pure_bf16_copies.txt"
      head -25 "$OUT/gpu1_pure_bf16_copies.txt" | cut -c1-220
    fi
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    grep -E "plan:|model:|engine|step +1/" "$OUT/gpu1_fp32master.log" | head -8 | cut -c1-200
    ;;
  final3)  # 2 GPUs: after the step verdict moved to the device (GPU tests first), both precision paths
           # on one GPU and at dp2 x ep2, and deepseek_h200 at dp2 x ep2
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    if [ "$NGPU" -ge 2 ]; then
      run gpu2_ep2_pure_bf16 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure
      run gpu2_ep2_fp32master 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
      run gpu2_ds_ep2 260 recipe=deepseek_h200 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2
    else
      echo "one GPU only: the dp2 x ep2 runs are left out"
      CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_profile 200 $pure train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    fi
    ;;
  adamw)  # 1 GPU: GPU tests, the AdamW kernels side by side, then both precision paths through launch.py
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 200 python3 bench/adamw_bench.py --out adamw.json 2>&1 | tail -8
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  gemm)  # 1 GPU: the AdamW kernel test, grouped vs per-expert GEMMs, the plain bf16 update profiled
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_adamw_kernel.py 2>&1 | tail -2
    timeout 200 python3 bench/grouped_vs_loop.py --out grouped_vs_loop.json 2>&1 | tail -4
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_profile 200 train.master_dtype=bf16 parallel.zero_stage=0 \
      train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    ;;
  balanced)  # 2 GPUs, STEPS=40: EP weak scaling once the routing is balanced (aux-loss-free bias, rate 0.005)
    pure="train.master_dtype=bf16 parallel.zero_stage=0 moe.bias_update_rate=0.005"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_bias 200 $pure
    run gpu2_ep2_pure_bf16_bias 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure
    ;;
  versus)  # 1 GPU: transformers' best (grouped_mm experts) and hpframe's launch.py (plain bf16 update), same machine
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm hpframe_compile --steps 10 --out train_e2e.json 2>&1 | tail -3
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0
    ;;
  final5)  # after DeepSpeed's throughput timer is off: plain bf16 on one GPU, and at dp2 x ep2 where 2 GPUs are lent
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    if [ "$NGPU" -ge 2 ]; then run gpu2_ep2_pure_bf16 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure; fi
    ;;
  final6)  # 1 GPU: after the stacked q/k/v GEMM, the compiled attention half and the Triton norm
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm --steps 10 --out train_e2e.json 2>&1 | tail -3
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  final7)  # 1 GPU: after the packed gate|up expert weight (w13), the compiled attention half and the Triton norm
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 120 python3 bench/grouped_vs_loop.py --out grouped_vs_loop.json 2>&1 | tail -3
    timeout 240 python3 bench/moe_layer.py --impls roofline_gemm hpframe --out moe_layer.json 2>&1 | tail -8
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm --steps 10 --out train_e2e.json 2>&1 | tail -1
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  final8)  # 1 GPU: step_time_s now the period between step ends; manual garbage collection
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm --steps 10 --out train_e2e.json 2>&1 | tail -1
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_gc 200 $pure train.gc_interval=20
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master_gc 200 train.gc_interval=20
    ;;
  final9)  # 1 GPU: after the counting sort of the dispatch order
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 150 python3 bench/kernel_sweep.py --out kernel_sweep.json 2>&1 | tail -30
    timeout 240 python3 bench/moe_layer.py --impls roofline_gemm hpframe --out moe_layer.json 2>&1 | tail -7
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm --steps 10 --out train_e2e.json 2>&1 | tail -1
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  final10)  # 1 GPU: AdamW and norm kernels at the swept launch shapes, aux loss from the sort's counts
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 240 python3 bench/train_e2e.py --impls hf_grouped_mm --steps 10 --out train_e2e.json 2>&1 | tail -1
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_b 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    ;;
  profile2)  # 1 GPU: the kernel breakdown of the tree as committed (GPU tests first)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0 \
      train.profile_from_step=$((STEPS - 2)) train.profile_num_steps=3
    ;;
  profile10)  # 1 GPU: ten profiled steps, to see where the slower steps lose their time
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0 \
      train.profile_from_step=18 train.profile_num_steps=10
    ;;
  overlap)  # 1 GPU: GPU tests, then plain bf16 without and with train.overlap_optimizer, alternating
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_overlap 200 $pure train.overlap_optimizer=true
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_b 200 $pure
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_overlap_b 200 $pure train.overlap_optimizer=true
    ;;
  master)  # 1 GPU: GPU tests, then fp32 master weights twice and the plain bf16 update once
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master 200
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16 200 train.master_dtype=bf16 parallel.zero_stage=0
    CUDA_VISIBLE_DEVICES=0 run gpu1_fp32master_b 200
    ;;
  overlap2)  # 2 GPUs, STEPS=80: dp2 x ep2 plain bf16 (balanced by the bias) without and with train.overlap_optimizer
    pure="train.master_dtype=bf16 parallel.zero_stage=0 moe.bias_update_rate=0.005"
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -3
    if [ "$NGPU" -ge 2 ]; then
      run gpu2_ep2_pure_bf16 240 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure
      run gpu2_ep2_pure_bf16_overlap 240 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure train.overlap_optimizer=true
    else
      echo "overlap2 needs 2 GPUs, found $NGPU"
    fi
    ;;
  autotune)  # 1 GPU: GPU tests, then the six expert GEMMs against inductor's autotuned grouped GEMMs
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -2
    timeout 500 python3 bench/grouped_autotune.py --compile-shapes "${COMPILE_SHAPES:-mixtral_h200,dsv2lite,dsv3}" \
      --out grouped_autotune.json > "$OUT/grouped_autotune.log" 2>&1
    echo "exit $?"; grep -E "TFLOP|all six|Error" "$OUT/grouped_autotune.log"
    ;;
  probe)  # 2 GPUs, STEPS=80: the dense kernels' choices, then EP weak scaling over a longer balanced run
    timeout 240 python3 bench/kernel_choices.py --out kernel_choices.json 2>&1 | tail -30
    pure="train.master_dtype=bf16 parallel.zero_stage=0"
    CUDA_VISIBLE_DEVICES=0 run gpu1_pure_bf16_bias 200 $pure moe.bias_update_rate=0.005
    if [ "$NGPU" -ge 2 ]; then
      run gpu2_ep2_pure_bf16_bias 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure moe.bias_update_rate=0.005
      run gpu2_ep2_pure_bf16_bias01 230 cluster.gpus_per_node=2 parallel.dp=2 parallel.ep=2 $pure moe.bias_update_rate=0.01
    fi
    ;;
  *) echo "unknown set $SET"; exit 2 ;;
esac
python3 - "$OUT" <<'PY'
import json, statistics, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.metrics.jsonl")):
    rows = [r for r in map(json.loads, f.read_text().splitlines()) if 'loss' in r]
    tail = rows[len(rows) // 3:]  # drop warm-up / compile steps
    if not tail: continue
    med = lambda k: statistics.median(r[k] for r in tail)
    print(f"{f.name}: steps {len(rows)}, lm losses {' '.join(f'{r['lm_loss']:.4f}' for r in rows[:4])} ... {rows[-1]['lm_loss']:.3f}, median tokens/s {med('tokens_per_s'):,.0f}, MFU {med('mfu'):.3f}, step {med('step_time_s')*1e3:.0f} ms")
PY
