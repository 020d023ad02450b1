"""When main calls jax.distributed.initialize(): each platform's environment, multi- and single-host."""

import pytest

from eflow_jax import distributed

GCE_POD_METADATA = {"agent-worker-number": "2", "worker-network-endpoints": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"}
SLURM_4_TASKS = {"SLURM_JOB_ID": "77", "SLURM_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
                 "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}

MULTI_HOST = [  # (environment, GCE TPU metadata, platform)
    ({}, GCE_POD_METADATA, "gce-tpu"),  # gcloud ... tpu-vm ssh --worker=all: no env var says "pod".
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3", "TPU_WORKER_ID": "0"}, {}, "gke-tpu"),
    ({"TPU_PROCESS_ADDRESSES": "10.0.0.2:8476,10.0.0.3:8476", "TPU_WORKER_ID": "1"}, {}, "gke-tpu"),
    ({"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1", "TPU_WORKER_ID": "0"}, {}, "tpu-multislice"),
    (SLURM_4_TASKS, {}, "slurm"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, {}, "explicit"),
]
SINGLE_HOST = [  # Must not initialize: it would wait for peers that never come.
    ({}, {}),  # A laptop or one GPU box.
    ({}, {"agent-worker-number": "0", "worker-network-endpoints": "10.0.0.2"}),  # v5e-8: one-host TPU VM.
    ({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0"}, {}),  # One-host GKE slice.
    ({"MEGASCALE_NUM_SLICES": "1", "TPU_WORKER_HOSTNAMES": "w-0"}, {}),
    (dict(SLURM_4_TASKS, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1"), {}),  # One task.
    # A shell inside salloc: the allocation has 4 tasks, this is one process.
    ({k: v for k, v in SLURM_4_TASKS.items() if k not in ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS")}, {}),
    ({"TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_ID": "0"}, {}),
]


@pytest.mark.parametrize(("env", "metadata", "platform"), MULTI_HOST)
def test_multi_host_platforms_initialize(env, metadata, platform):
    assert distributed.detect_platform(env, metadata) == platform
    assert distributed.should_initialize(env, None, metadata)
    assert not distributed.should_initialize(env, False, metadata)  # --nomultiprocess wins.


@pytest.mark.parametrize(("env", "metadata"), SINGLE_HOST)
def test_single_host_does_not_initialize(env, metadata):
    assert distributed.detect_platform(env, metadata) is None
    assert not distributed.should_initialize(env, None, metadata)
    assert distributed.should_initialize(env, True, metadata)  # --multiprocess wins.


def test_maybe_initialize_calls_jax_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: calls.append(1))
    monkeypatch.setattr(distributed, "read_tpu_metadata", lambda env: GCE_POD_METADATA)
    assert distributed.maybe_initialize(None, {}) and calls == [1]
    assert not distributed.maybe_initialize(False, {}) and calls == [1]
    monkeypatch.setattr(distributed, "read_tpu_metadata", lambda env: {})
    assert not distributed.maybe_initialize(None, {"SLURM_NTASKS": "8"}) and calls == [1]


def test_no_metadata_query_off_tpu_vms():
    assert distributed.read_tpu_metadata({"TPU_SKIP_MDS_QUERY": "1"}) == {}


def test_explicit_env_passes_process_count_and_id(monkeypatch):
    seen = []
    monkeypatch.setattr("jax.distributed.initialize", lambda **kw: seen.append(kw))
    env = {"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.maybe_initialize(None, env)
    assert seen == [{"coordinator_address": "localhost:1234", "num_processes": 2, "process_id": 1}]
