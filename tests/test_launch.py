"""Launchers: dry runs print the exact command; a crashed run is not reported as success by `tee`."""

import os
import shlex
import stat
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, args, **env):
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args], cwd=REPO,
                          env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)


def _tpu_dry_run(*args):
    done = _run("tpu_pod.sh", list(args), TPU_NAME="pod-1", ZONE="us-east5-a", WORKDIR="gs://b/run 1",
                REPO_URL="https://example.com/eflow_jax.git", REV="abc123", DRY_RUN="1")
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_tpu_pod_dry_run_prints_the_gcloud_command():
    argv = _tpu_dry_run("configs/kinetics.py:variant=L", "--config.log.note=two words")
    assert argv[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod-1", "--zone", "us-east5-a",
                        "--worker=all"]
    assert argv[9] == "--command"
    remote = argv[10]
    main = next(line for line in remote.splitlines() if "eflow_jax.main" in line)
    words = shlex.split(main.split(" 2>&1 ")[0])
    # Every worker joins one jax.distributed job; quoted arguments survive the remote shell.
    assert words[1:] == ["-m", "eflow_jax.main", "--multiprocess", "--config=configs/kinetics.py:variant=L",
                         "--workdir=gs://b/run 1", "--config.log.note=two words"]
    assert "git checkout -q abc123" in remote
    assert _tpu_dry_run("--dry-run", "configs/demo.py")[:6] == argv[:6]  # The flag form too.


def test_tpu_pod_remote_command_fails_when_training_crashes(tmp_path):
    # Run the worker's command here with stubs: git and the install succeed, training exits 3.
    remote = _tpu_dry_run("configs/demo.py")[10]
    bin_dir, repo = tmp_path / "bin", tmp_path / "eflow_jax"
    for path, body in ((bin_dir / "git", "exit 0"), (repo / "launch" / "install.sh", "exit 0"),
                       (repo / ".venv" / "bin" / "python", "echo crashed; exit 3")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    done = subprocess.run(["bash", "-c", remote], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 3, (done.returncode, done.stdout, done.stderr)
    assert "crashed" in done.stdout  # Still tee'd to the terminal (and the log).


def test_slurm_dry_run_prints_the_srun_command():
    done = _run("slurm.sbatch", ["configs/kinetics.py", "/shared/run1", "--config.optim.lr=2e-4"], DRY_RUN="1",
                SLURM_JOB_NODELIST="")
    assert done.returncode == 0, done.stderr
    words = shlex.split(done.stdout)
    assert words[0].startswith("JAX_COORDINATOR_ADDRESS=")
    assert words[1:] == ["srun", "--kill-on-bad-exit=1", ".venv/bin/python", "-m", "eflow_jax.main",
                         "--multiprocess", "--config=configs/kinetics.py", "--workdir=/shared/run1",
                         "--config.optim.lr=2e-4"]
    outside = _run("slurm.sbatch", ["configs/kinetics.py", "/shared/run1"], SLURM_JOB_NODELIST="", DRY_RUN="0")
    assert outside.returncode == 2 and "submit it with sbatch" in outside.stderr


def _checkout(tmp_path, origin):
    """A git checkout whose origin is `origin`, with one commit."""
    repo = tmp_path / "checkout"
    repo.mkdir(parents=True)
    for cmd in (["init", "-q"], ["remote", "add", "origin", origin],
                ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, capture_output=True)
    return repo


def _tpu_dry_run_in(repo, **env):
    env = dict(os.environ, TPU_NAME="pod-1", ZONE="us-east5-a", WORKDIR="gs://b/run", DRY_RUN="1", **env)
    return subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_pod.sh"), "configs/demo.py"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=60)


def test_tpu_pod_refuses_a_local_origin_or_an_unpushed_commit(tmp_path, monkeypatch):
    """Issue 25.12: REPO_URL defaulted to a local origin path; `git clone /local/path` cannot work on a pod."""
    monkeypatch.delenv("REPO_URL", raising=False)
    monkeypatch.delenv("REV", raising=False)
    local = _checkout(tmp_path / "a", "/home/me/src/eflow_jax")
    done = _tpu_dry_run_in(local)
    assert done.returncode == 2 and not done.stdout, done.stdout
    assert "REPO_URL=/home/me/src/eflow_jax is a path on this machine" in done.stderr
    assert "Set REPO_URL to a URL they can reach" in done.stderr

    hosted = _checkout(tmp_path / "b", "git@github.com:me/eflow_jax.git")
    done = _tpu_dry_run_in(hosted)  # HEAD was never pushed.
    assert done.returncode == 2 and "is not on origin" in done.stderr and "git push origin HEAD" in done.stderr
    subprocess.run(["git", "update-ref", "refs/remotes/origin/main", "HEAD"], cwd=hosted, check=True)  # Pushed.
    done = _tpu_dry_run_in(hosted)
    assert done.returncode == 0, done.stderr
    assert "git clone git@github.com:me/eflow_jax.git eflow_jax" in shlex.split(done.stdout)[10]
    done = _tpu_dry_run_in(local, REPO_URL="https://example.com/eflow_jax.git")  # Another URL: taken as given.
    assert done.returncode == 0, done.stderr
