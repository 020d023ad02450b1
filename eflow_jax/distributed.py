"""When to call jax.distributed.initialize(): one process per host on multi-host launchers.

Calling it where there is one process hangs or fails; not calling it on a pod runs N independent
single-host jobs that overwrite each other's checkpoints. The decision is a pure function of the
environment (plus, on GCE TPU VMs, the TPU metadata), so every platform is testable off-platform.
What each platform sets mirrors jax's own cluster detection (jax._src.clusters):

- GCE TPU VM (`gcloud compute tpus tpu-vm ssh --worker=all`): no environment variable says "pod";
  jax asks the metadata server for `agent-worker-number` and `worker-network-endpoints`, so we do.
- GKE TPU (JobSet / Job): TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES lists the workers;
  multislice adds MEGASCALE_NUM_SLICES.
- SLURM: SLURM_NTASKS (SLURM_STEP_NUM_TASKS inside srun) and SLURM_PROCID, set per task by srun.
- Anything else: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or --multiprocess.
"""

from __future__ import annotations

import glob
import os
import urllib.request
from collections.abc import Mapping

from absl import logging

TPU_METADATA_KEYS = ("agent-worker-number", "worker-network-endpoints")


def _count(listing: str | None) -> int:
    return len([part for part in (listing or "").split(",") if part.strip()])


def _int(value: str | None, default: int = 0) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def detect_platform(env: Mapping[str, str], tpu_metadata: Mapping[str, str] | None = None) -> str | None:
    """The multi-host platform this process runs on ('explicit', 'tpu-multislice', 'gke-tpu', 'gce-tpu',
    'slurm'), or
    None when it is one process on one host (a laptop, one GPU box, a single-host TPU VM)."""
    tpu_metadata = tpu_metadata or {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "explicit"
    if _int(env.get("MEGASCALE_NUM_SLICES"), 1) > 1:
        return "tpu-multislice"
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts is not None:  # GKE lists the slice's workers (one entry on a single-host slice).
        return "gke-tpu" if _count(hosts) > 1 else None
    if "agent-worker-number" in tpu_metadata and _count(tpu_metadata.get("worker-network-endpoints")) > 1:
        return "gce-tpu"
    # Under srun every task has SLURM_PROCID; a shell inside `salloc` has SLURM_NTASKS but runs one
    # process, which must not wait for peers that never come.
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if "SLURM_PROCID" in env and _int(tasks, 1) > 1:
        return "slurm"
    return None


def should_initialize(env: Mapping[str, str], flag: bool | None,
                      tpu_metadata: Mapping[str, str] | None = None) -> bool:
    """--multiprocess given (True/False) decides; unset (None), a multi-host platform does."""
    if flag is not None:
        return bool(flag)
    return detect_platform(env, tpu_metadata) is not None


def on_tpu_vm(env: Mapping[str, str]) -> bool:
    """A Cloud TPU VM host: TPU chips present (as jax checks) and the metadata query not disabled."""
    if env.get("TPU_SKIP_MDS_QUERY") is not None:
        return False
    return bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def read_tpu_metadata(env: Mapping[str, str], timeout_s: float = 2.0) -> dict[str, str]:
    """The GCE TPU metadata attributes jax's GceTpuCluster reads; {} off TPU VMs or on failure."""
    if not on_tpu_vm(env):
        return {}
    host = env.get("GCE_METADATA_IP", "metadata.google.internal")
    found = {}
    for key in TPU_METADATA_KEYS:
        request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                         headers={"Metadata-Flavor": "Google"})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                found[key] = response.read().decode()
        except OSError as e:  # Not a GCE TPU VM (e.g. GKE, or a TPU box elsewhere).
            logging.debug("TPU metadata %s unavailable: %s", key, e)
    return found


def maybe_initialize(flag: bool | None, env: Mapping[str, str] | None = None) -> bool:
    """Calls jax.distributed.initialize() when `should_initialize` says so; returns whether it did."""
    env = os.environ if env is None else env
    metadata = read_tpu_metadata(env) if flag is None else {}
    if not should_initialize(env, flag, metadata):
        return False
    import jax

    kwargs = explicit_init_args(env)
    logging.info("jax.distributed.initialize(%s) (%s)", kwargs,
                 "--multiprocess" if flag else detect_platform(env, metadata))
    jax.distributed.initialize(**kwargs)
    return True


def explicit_init_args(env: Mapping[str, str]) -> dict:
    """jax.distributed.initialize() reads JAX_COORDINATOR_ADDRESS itself but not JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (off a detected cluster it then fails): pass them when the launcher set them."""
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = _int(env["JAX_NUM_PROCESSES"], 1)
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = _int(env["JAX_PROCESS_ID"], 0)
    return kwargs
