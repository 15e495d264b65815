#!/usr/bin/env bash
# Quality sweeps of the shapes default on one GPU: each variant trains configs/shapes.py with its overrides,
# then scores prompting modes (experiments/eval_prompting.py); the train step runs ~45 steps/s on an H200
# (float32, 2200 steps in under a minute after a ~20 s compile), so a variant takes 1-2 minutes there
# against ~20 on the 2-core CPU.
#
#   bash experiments/gpu_quality_sweep.sh OUT_DIR "NAME STEPS [--config.x=y ...]" ...
#   bash experiments/gpu_quality_sweep.sh out "base 2200" "long 6600" "p188 2200 --config.model.patch=1,8,8"
#
# Per variant: OUT_DIR/NAME.train.log, NAME.metrics.jsonl (eval/adherence/* at the end: text-to-video),
# NAME.eval.log (its last line: the prompting JSON); the workdirs in OUT_DIR/runs. Env: TRAIN_S (per-variant
# training limit, s; a variant stopped by it is scored at its last checkpoint, whose step the JSON gives),
# MODES, CASES, DROP_CHECKPOINTS=1 (delete each variant's checkpoints once scored).
# Variants run one after another on purpose: six concurrent float32 runs with
# JAX_DEFAULT_MATMUL_PRECISION=highest spent over 7 minutes compiling (XLA's GEMM autotuning, per process)
# and trained nothing; hence also --xla_gpu_autotune_level=0 (compile ~20 s).
set -uo pipefail
OUT=${1:?usage: gpu_quality_sweep.sh OUT_DIR "NAME STEPS [overrides]" ...}; shift
mkdir -p "$OUT"
T0=$(date +%s)
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
$PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -1
for variant in "$@"; do
  read -r name steps overrides <<< "$variant"
  wd="$OUT/runs/$name"
  # shellcheck disable=SC2086  # overrides are separate flags
  timeout "${TRAIN_S:-300}" $PY -m sora_jax.main --config=configs/shapes.py --workdir="$wd" --config.total_steps="$steps" \
    --config.eval.features=none --config.eval.every_steps="$steps" --config.checkpoint_every_steps=$(( (steps + 3) / 4 )) \
    --config.log_every_steps=$(( (steps + 9) / 10 )) $overrides > "$OUT/$name.train.log" 2>&1
  echo "$name: training exit $? at $(( $(date +%s) - T0 )) s; $(grep -o '[0-9.]* steps/s' "$OUT/$name.train.log" | tail -1)"
  cp "$wd/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null
  $PY experiments/eval_prompting.py --workdir="$wd" --cases="${CASES:-100}" \
    --modes="${MODES:-image_to_video,extend,extend_backward,interpolate,edit}" > "$OUT/$name.eval.log" 2>&1
  echo "$name: $(grep '^{' "$OUT/$name.eval.log" | tail -1)"
  [ "${DROP_CHECKPOINTS:-0}" = 1 ] && rm -rf "$wd/checkpoints"  # e.g. when OUT_DIR must travel back small
done
echo "done at $(( $(date +%s) - T0 )) s"
