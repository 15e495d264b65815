#!/usr/bin/env bash
# The GPU figures of the scale issue on one NVIDIA GPU: the ~700M video DiT at 8192 tokens per
# sample (128 x 256 x 256 clips, 4 x 16 x 16 patches), bfloat16 compute, cuDNN flash attention;
# then the longest clip whose step fits with full remat (compile-time memory analysis, batch 1),
# and cuDNN vs XLA attention at the same size; packed rows through cuDNN (stage `packed`, not in the default list).
#
#   bash experiments/gpu_benchmark.sh [OUT_DIR]      # one JSON line per measurement in OUT_DIR
#   STAGES="longest step_8k" SWEEP_FRAMES=4096,8192 bash experiments/gpu_benchmark.sh OUT_DIR  # some stages
#
# Measured on an H100 80GB (jax 0.11.2, flax 0.12.10; README "On a GPU"): remat none, batch 4:
# 0.407 s/step, 80.6k tokens/s, 404 TFLOP/s of a 753 TFLOP/s bf16 matmul: mfu 0.54, 65.1 GB peak;
# remat dots: 0.477 s/step, mfu 0.44, 33.3 GB. On an H200: remat none 0.391 s/step, mfu 0.55; with full
# remat one 16384 x 256 x 256 clip (1M tokens) compiles to 135.9 GB. Each 700M compile takes 90-120 s there, so each
# stage has its own time limit and one slow compile does not cost the others.
set -uo pipefail
OUT="${1:-gpu_benchmark}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}  # JAX takes 75% by default
STAGES=" ${STAGES:-step_8k step_8k_dots longest cudnn_8k xla_8k} "
BENCH="${PYTHON:-python} experiments/benchmark.py --config=configs/video_dit.py:700M --config.model.attention_impl=cudnn"
CLIP_8K="--config.data.frames=128 --config.data.height=256 --config.data.width=256"

stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 seconds=$2; shift 2
  echo "=== $name ($(date +%T), limit ${seconds}s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\{|error|Error|timing|frames ' | cut -c1-2000
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

${PYTHON:-python} -c 'import jax, flax, sys; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

run_stage() {  # the stages, run in the order STAGES names them
  case $1 in
    # 1. The headline: 4 samples x 8192 tokens per step, no remat (fits 80 GB); then remat of all but matmuls.
    step_8k) stage step_8k ${STEP_S:-240} $BENCH $CLIP_8K --config.batch_size=4 --config.model.remat=none \
      --warmup=2 --steps=5 ;;
    step_8k_dots) stage step_8k_dots ${STEP_S:-240} $BENCH $CLIP_8K --config.batch_size=4 \
      --config.model.remat=dots --warmup=2 --steps=5 ;;
    # 2. The longest clip that fits with full remat (one sample; compile only, the memory XLA plans).
    longest) stage longest ${LONGEST_S:-420} $BENCH --config.batch_size=1 --config.model.remat=full \
      --analyze_only --config.data.height=256 --config.data.width=256 --sweep_frames=${SWEEP_FRAMES:-2048,4096,8192} ;;
    # 3. cuDNN vs XLA attention at 8192 tokens (one sample, full remat, so XLA's scores fit).
    cudnn_8k) stage cudnn_8k ${PAIR_S:-200} $BENCH $CLIP_8K --config.batch_size=1 --config.model.remat=full \
      --warmup=1 --steps=3 ;;
    xla_8k) stage xla_8k ${PAIR_S:-200} $BENCH $CLIP_8K --config.batch_size=1 --config.model.remat=full \
      --warmup=1 --steps=3 --config.model.attention_impl=xla ;;
    # 4. Packed rows (configs/shapes_native.py) through cuDNN: its packed layout's tests (spans against XLA's
    # segment ids), segment-masked and packed-layout attention against XLA's (outputs, gradients, times), then a
    # short packed training run with cuDNN attention in bfloat16 (loss in metrics.jsonl; its log says whether
    # the packed layout was on).
    packed) stage packed_test ${PACKED_S:-120} ${PYTHON:-python} -m pytest -q -rs tests/test_layers.py -k cudnn
      stage packed_attention ${PACKED_S:-120} ${PYTHON:-python} experiments/packed_attention_benchmark.py \
      --implementation=cudnn --dtype=bfloat16
      stage packed_train ${PACKED_TRAIN_S:-240} ${PYTHON:-python} -m sora_jax.main --config=configs/shapes_native.py \
      --workdir="$OUT/packed_train" --config.total_steps=100 --config.log_every_steps=20 --config.data.num_train=4096 \
      --config.packing.curriculum_steps=40 --config.model.attention_impl=cudnn --config.model.dtype=bfloat16
      grep -h "cuDNN.*packed layout" "$OUT/packed_train.log" ;
      cp "$OUT/packed_train/metrics.jsonl" "$OUT/packed_train_metrics.jsonl" 2>/dev/null ;;
    *) echo "unknown stage $1" ;;
  esac
}
for name in $STAGES; do run_stage "$name"; done
