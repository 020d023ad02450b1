#!/usr/bin/env bash
# Creates .venv with Python 3.12 (jax 0.11.2 needs >= 3.12) and installs eflow_jax into it.
#   bash launch/install.sh          # core + video (CPU jax)
#   bash launch/install.sh test     # + test extras (pytest, scipy, scikit-video, tensorflow-datasets)
#   bash launch/install.sh cuda13   # + CUDA 13 jax plugin (GPU boxes); 'tpu' for TPU VMs
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"

find_python() {
  for cand in python3.12 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
      command -v "$cand"; return
    fi
  done
  if command -v pyenv >/dev/null; then  # pyenv installs are not on PATH by version name.
    for p in "$(pyenv root)"/versions/3.12*/bin/python3; do
      [ -x "$p" ] && { echo "$p"; return; }
    done
  fi
  echo "error: Python 3.12 not found (jax 0.11.2 needs it). Install it, e.g. 'pyenv install 3.12', and rerun." >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
echo "installed eflow_jax into $(pwd)/.venv ($(.venv/bin/python --version))"
