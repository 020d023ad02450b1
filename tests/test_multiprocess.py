"""Multi-process training on one machine: 2 CPU processes x 2 devices, a local coordinator.

Each run is the command a pod runs (`python -m eflow_jax.main --config=... --workdir=...`) with the
environment a launcher sets (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); the
processes talk through jax's CPU collectives (gloo, jax's default on CPU).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from configs import demo
from eflow_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "objective=flow_matching,test=1,batch=8"
TIMEOUT_S = 240


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_", "MEGASCALE_"))}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0", **extra)
    return env


def _launch(workdir, num_processes, steps, *flags):
    """Starts `num_processes` CLI processes on `workdir`; returns [(Popen, log path)]."""
    argv = [sys.executable, "-m", "eflow_jax.main", f"--config=configs/demo.py:steps={steps},{CONFIG}",
            f"--workdir={workdir}", "--config.train.compile_cache_dir=", *flags]
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(num_processes):
        env = _env() if num_processes == 1 else _env(
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
        log = f"{workdir}.p{i}.log"
        with open(log, "w") as err:
            procs.append((subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err), log))
    return procs


def _wait(procs, timeout=TIMEOUT_S):
    """Waits for all; kills every straggler on timeout or error. Returns the exit codes."""
    deadline = time.time() + timeout
    try:
        codes = []
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1, deadline - time.time())))
        return codes
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _logs(procs):
    return "\n".join(f"--- {log}\n" + open(log).read()[-3000:] for _, log in procs)


def _run(workdir, num_processes, steps, *flags):
    procs = _launch(workdir, num_processes, steps, *flags)
    try:
        codes = _wait(procs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out:\n{_logs(procs)}")
    assert codes == [0] * num_processes, _logs(procs)
    return procs


def _saved_steps(workdir):
    ckpt = os.path.join(workdir, "ckpt")
    return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) if os.path.isdir(ckpt) else []


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _files(workdir):
    return sorted(os.path.relpath(os.path.join(d, f), workdir) for d, _, fs in os.walk(workdir) for f in fs)


def test_global_batches_do_not_depend_on_process_count():
    """Each process yields its block of the 1-process global batch; an epoch is covered once."""
    cfg = demo.get_config(CONFIG).data
    one = pipeline.make_train_iterator(cfg, global_batch_size=8, seed=3, float_video=False)
    two = [pipeline.make_train_iterator(cfg, global_batch_size=8, seed=3, process_index=i, process_count=2,
                                        float_video=False) for i in range(2)]
    seen = []
    for _ in range(cfg.num_examples // 8):  # One epoch.
        want, parts = next(one), [next(it) for it in two]
        for key in ("video", "label"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), want[key])
        seen += [v.tobytes() for v in want["video"]]
    assert len(set(seen)) == cfg.num_examples  # No example twice (the synthetic clips are distinct).


STEPS = 400  # Never reached: runs stop by signal or train.stop_at_step (the LR schedule is the same).


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """2 processes train until process 1 alone gets SIGTERM (after step 1 is logged)."""
    workdir = str(tmp_path_factory.mktemp("mp") / "run2")
    procs = _launch(workdir, 2, STEPS, "--config.checkpoint.save_every=1000")
    try:
        deadline = time.time() + TIMEOUT_S
        while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and _losses(workdir)):
            assert time.time() < deadline and all(p.poll() is None for p, _ in procs), _logs(procs)
            time.sleep(0.5)
        procs[1][0].send_signal(signal.SIGTERM)  # Only process 1 is told.
        codes = _wait(procs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"timed out:\n{_logs(procs)}")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert codes == [0, 0], _logs(procs)
    return workdir, procs


def test_sigterm_to_one_process_stops_all_at_one_saved_step(two_process_run):
    """The processes agree (preemption.py's all-gather) on the step to save; all exit 0."""
    workdir, procs = two_process_run
    saved = _saved_steps(workdir)
    assert len(saved) == 1 and 0 < saved[0] < STEPS, (saved, _logs(procs))
    assert saved[0] % 10 == 0  # A step where the processes compare their stop flags.
    assert max(_losses(workdir)) == saved[0]  # Process 0 logged up to the step both saved.


def test_two_processes_train_like_one(two_process_run, tmp_path):
    workdir, _ = two_process_run
    _run(str(tmp_path / "run1"), 1, STEPS, "--config.train.stop_at_step=3")
    two, one = _losses(workdir), _losses(str(tmp_path / "run1"))
    assert sorted(one) == [1, 2, 3] and set(one) <= set(two)
    np.testing.assert_allclose([two[s] for s in (1, 2, 3)], [one[s] for s in (1, 2, 3)], rtol=2e-4)


def test_only_process_zero_writes_logs(two_process_run):
    workdir, procs = two_process_run
    files = _files(workdir)
    assert files.count("metrics.jsonl") == 1
    events = [f for f in files if "tfevents" in f]
    assert len(events) == 1, files  # One TensorBoard writer: process 0's.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == sorted(set(steps)), steps  # One row per step, not one per process.
    assert "process 1/2" in open(procs[1][1]).read()  # Both really were in one 2-process job.


def test_two_process_checkpoint_resumes_in_one_process(two_process_run):
    """The 2-process run's checkpoint continues in 1 process, its data iterator at the same global
    position (converted from the per-process state)."""
    workdir, _ = two_process_run
    (saved,) = _saved_steps(workdir)
    procs = _run(workdir, 1, STEPS, f"--config.train.stop_at_step={saved + 2}")
    log = open(procs[0][1]).read()
    assert f"starting at step {saved}" in log, log[-3000:]
    assert f"saved by 2 processes; resuming this process at global position {saved * 8}" in log, log[-3000:]
    assert sorted(_losses(workdir)) == list(range(1, saved + 3))
    assert saved + 2 in _saved_steps(workdir)
