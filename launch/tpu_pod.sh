#!/usr/bin/env bash
# Train on a TPU pod slice: copies nothing, runs the same command on every worker.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a WORKDIR=gs://bucket/run1 bash launch/tpu_pod.sh configs/kinetics.py:variant=L
#   DRY_RUN=1 ... bash launch/tpu_pod.sh ...   (or --dry-run first): print the gcloud command, run nothing.
# Every worker clones REPO_URL (default: this checkout's origin) and checks out REV (default: HEAD): both
# must be reachable from the pod, so a local path is refused, and so is a REV that origin does not have
# (push first). The dry run refuses them too, naming the fix.
# Extra arguments after the config go to eflow_jax.main (e.g. --config.optim.lr=2e-4).
# Every host runs `python -m eflow_jax.main --multiprocess`, which calls jax.distributed.initialize()
# once (jax finds the workers in the TPU VM metadata). Checkpoints must go to storage every host sees.
set -euo pipefail
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR (e.g. gs://bucket/run)}"
CONFIG="${1:-configs/kinetics.py}"
shift || true
ORIGIN_URL="$(git config --get remote.origin.url || true)"
REPO_URL="${REPO_URL:-$ORIGIN_URL}"
REV="${REV:-$(git rev-parse HEAD)}"
fail() { echo "tpu_pod.sh: $*" >&2; exit 2; }  # Also in a dry run: it shows what the pod would hit.
[ -n "$REPO_URL" ] || fail "set REPO_URL to a git URL the pod's workers can clone (this checkout has no remote 'origin')"
# Each worker clones REPO_URL itself: a path on this machine (origin of a local clone) does not exist there.
reachable_url() {
  case "$1" in
    file://*) return 1 ;;
    *://*) return 0 ;;
  esac
  local host="${1%%:*}"  # git's scp-like form, host:path, has no '/' before its first ':'.
  [[ "$1" == *:* && -n "$host" && "$host" != */* ]]
}
reachable_url "$REPO_URL" || fail "REPO_URL=$REPO_URL is a path on this machine: the pod's workers cannot clone it. \
Set REPO_URL to a URL they can reach (https://host/repo.git or git@host:repo.git) and push the commit to run."
# ... and checks out REV there: it must be pushed. Only origin's refs are known here (as of the last fetch).
if [ "$REPO_URL" = "$ORIGIN_URL" ] && [ -z "$(git branch -r --list 'origin/*' --contains "$REV" 2>/dev/null)" ]; then
  fail "commit $REV is not on origin ($REPO_URL) as of the last fetch: the pod's workers could not check it out. \
Push it (git push origin HEAD), or set REV to a pushed commit or branch."
fi
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "tpu_pod.sh: this checkout has uncommitted changes; the pod runs commit $REV without them" >&2
fi
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
