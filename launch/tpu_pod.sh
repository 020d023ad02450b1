#!/usr/bin/env bash
# Train on a TPU pod slice: copies nothing, runs the same command on every worker.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/run1 bash launch/tpu_pod.sh configs/kinetics.py:variant=L
#   DRY_RUN=1 ... bash launch/tpu_pod.sh ...   (or --dry-run first): print the gcloud command, run nothing.
# Extra arguments after the config go to eflow_jax.main (e.g. --config.optim.lr=2e-4).
# Every host runs `python -m eflow_jax.main --multiprocess`, which calls jax.distributed.initialize()
# once (jax finds the workers in the TPU VM metadata). Checkpoints must go to storage every host sees.
set -euo pipefail
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (e.g. gs://bucket/run)}"
CONFIG="${1:-configs/kinetics.py}"
shift || true
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url || true)}"
REV="${REV:-$(git rev-parse HEAD)}"
: "${REPO_URL:?set REPO_URL (this checkout has no git remote 'origin')}"
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done
# pipefail: without it the pipeline's status is tee's, and a crashed run reports success.
REMOTE="set -eo pipefail
[ -d eflow_jax ] || git clone $(printf '%q' "$REPO_URL") eflow_jax
cd eflow_jax && git fetch -q && git checkout -q $(printf '%q' "$REV")
bash launch/install.sh tpu
.venv/bin/python -m eflow_jax.main --multiprocess --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR")$EXTRA 2>&1 | tee -a train_\$(hostname).log"
CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if [ "${DRY_RUN:-0}" != 0 ]; then  # POSIX single quotes: paste-able into any shell.
  for word in "${CMD[@]}"; do printf "'%s' " "${word//\'/\'\\\'\'}"; done
  echo
  exit 0
fi
exec "${CMD[@]}"
