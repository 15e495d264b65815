#!/usr/bin/env bash
# Train sora_jax on a Cloud TPU pod slice: every TPU VM worker runs the same command, JAX discovers
# the slice (--distributed), and all workers share the workdir through a Cloud Storage bucket
# mounted with gcsfuse (Orbax writes each worker's checkpoint shards there).
#
#   export PROJECT=my-project ZONE=us-east5-a TPU_NAME=sora ACCELERATOR=v5p-128 BUCKET=my-bucket
#   export CONFIG=configs/video_dit.py:2B RUN=video_2b           # the workdir is /mnt/$BUCKET/runs/$RUN
#   experiments/launch/tpu_pod.sh create     # the slice (v5p-128 = 64 chips = v5p:4x4x4, 16 hosts)
#   experiments/launch/tpu_pod.sh setup      # copy this checkout, install it, mount the bucket
#   experiments/launch/tpu_pod.sh run        # start training on all workers (background)
#   experiments/launch/tpu_pod.sh watch      # follow worker 0's log (steps/s, ETA)
#   experiments/launch/tpu_pod.sh stop       # SIGTERM everywhere: all save the same step, exit 0
#   experiments/launch/tpu_pod.sh delete     # tear the slice down (the bucket keeps the run)
#
# Before booking, check that the config fits the slice (a CPU suffices; pip install -e '.[tpu]'):
#   python experiments/benchmark.py --config=$CONFIG --analyze_only --topology=v5p:4x4x4 \
#     --config.model.attention_impl=splash
# Attention runs as the Pallas splash kernel (ATTENTION=xla for XLA's; README, "On a TPU").
# A run resumes from its latest checkpoint: after a preemption or `stop`, `run` again.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}" "${BUCKET:?set BUCKET}"
ACCELERATOR="${ACCELERATOR:-v5p-128}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"    # the TPU VM image for v5p (v6e: v2-alpha-tpuv6e)
CONFIG="${CONFIG:-configs/video_dit.py:2B}"
RUN="${RUN:-$(basename "${CONFIG%%:*}" .py)_${CONFIG##*:}}"
WORKDIR="/mnt/$BUCKET/runs/$RUN"
REPO_DIR='~/sora_jax'
ATTENTION="${ATTENTION:-splash}"        # the Pallas TPU flash kernel: memory linear in the tokens
EXTRA_FLAGS="${EXTRA_FLAGS:-}"          # e.g. "--config.total_steps=100000"

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" --project="$PROJECT"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
    ;;
  setup)
    repo_root="$(cd "$(dirname "$0")/../.." && pwd)"
    tar -C "$repo_root" --exclude=.git --exclude=runs -czf /tmp/sora_jax.tgz .
    tpu scp /tmp/sora_jax.tgz "$TPU_NAME":/tmp/sora_jax.tgz --worker=all
    on_all "mkdir -p $REPO_DIR && tar -C $REPO_DIR -xzf /tmp/sora_jax.tgz && cd $REPO_DIR \
      && python3 -m pip install -q -e . 'jax[tpu]' \
      && sudo mkdir -p /mnt/$BUCKET && sudo chown \$USER /mnt/$BUCKET \
      && (mountpoint -q /mnt/$BUCKET || gcsfuse --implicit-dirs $BUCKET /mnt/$BUCKET)"
    ;;
  run)
    on_all "cd $REPO_DIR && nohup python3 -m sora_jax.main --distributed --config=$CONFIG \
      --workdir=$WORKDIR --config.model.attention_impl=$ATTENTION $EXTRA_FLAGS > ~/train.log 2>&1 &"
    echo "started on all workers; workdir $WORKDIR; logs: $0 watch"
    ;;
  watch)
    tpu ssh "$TPU_NAME" --worker=0 --command="tail -n 50 -f ~/train.log"
    ;;
  stop)
    on_all "pkill -TERM -u \$USER -f 'sora_jax.main --distributed' || true"
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    echo "usage: $0 create|setup|run|watch|stop|delete (see the comments at the top)" >&2
    exit 2
    ;;
esac
