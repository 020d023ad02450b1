#!/usr/bin/env bash
# Train on a TPU pod slice: copies nothing, runs the same command on every worker.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/run1 bash launch/tpu_pod.sh configs/kinetics.py:variant=L
# Every host runs `python -m eflow_jax.main`; main.py calls jax.distributed.initialize() once
# (TPU_WORKER_HOSTNAMES is set on pod workers). Checkpoints must go to storage every host sees.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (e.g. gs://bucket/run)}"
CONFIG="${1:-configs/kinetics.py}"
shift || true
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
REV="${REV:-$(git rev-parse HEAD)}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d eflow_jax ] || git clone '$REPO_URL' eflow_jax
  cd eflow_jax && git fetch -q && git checkout -q '$REV'
  bash launch/install.sh tpu
  .venv/bin/python -m eflow_jax.main --config='$CONFIG' --workdir='$WORKDIR' $* 2>&1 | tee -a train_\$(hostname).log
"
