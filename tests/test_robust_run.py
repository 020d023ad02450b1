"""Never lose results, never mix runs: locks, signals, failed saves, resumes (real training runs)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from configs import demo
from eflow_jax import checkpoint, rundir, train, writers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = "objective=flow_matching,test=1,batch=16"


def small_config(steps=4, **train_overrides):
    c = demo.get_config(f"steps={steps},{TEST_CONFIG}")
    c.train.update(**train_overrides)
    return c


def _env(cache=True):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    if cache:  # Reuse the suite's compiles; without it, the compile takes long enough to signal into.
        env.update(JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    return env


class Run:
    """`python -m eflow_jax.main` in the background, its stderr in a file that tests wait on."""

    def __init__(self, workdir, config=f"steps=400,{TEST_CONFIG}", save_every=1000, cache=True, prefix=()):
        self.workdir, self.log = workdir, f"{workdir}.{time.monotonic_ns()}.log"
        argv = list(prefix) or [sys.executable, "-m", "eflow_jax.main"]
        argv += [f"--config=configs/demo.py:{config}", f"--config.checkpoint.save_every={save_every}",
                 f"--workdir={workdir}"]
        with open(self.log, "w") as err:
            # SIGINT as in a terminal, also when the tests themselves run in the background (`&` ignores it).
            self.proc = subprocess.Popen(argv, cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL, stderr=err,
                                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def stderr(self) -> str:
        with open(self.log) as f:
            return f.read()

    def wait_for(self, predicate, what: str, timeout: float = 300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} before {what}:\n{self.stderr()[-3000:]}")
            time.sleep(0.2)
        self.proc.kill()
        raise AssertionError(f"no {what} after {timeout}s:\n{self.stderr()[-3000:]}")

    def wait_for_rows(self, n: int):
        path = os.path.join(self.workdir, "metrics.jsonl")
        self.wait_for(lambda: os.path.exists(path) and open(path).read().count("\n") >= n, f"{n} metric rows")

    def wait_for_log(self, text: str):
        self.wait_for(lambda: text in self.stderr(), repr(text))

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def _steps(workdir) -> list[int]:
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "ckpt")) if s.isdigit())


def test_second_run_on_a_workdir_fails_at_once_and_sigint_saves_then_a_second_sigint_quits(tmp_path):
    workdir = tmp_path / "run"
    first = Run(workdir)
    try:
        first.wait_for_rows(2)
        second = Run(workdir)
        assert second.finish(timeout=60) == 1  # before building the model: no compile, no restore
        err = second.stderr().strip()
        assert err.splitlines()[-1].startswith(f"error: workdir {workdir} is in use by pid {first.proc.pid} on host ")
        assert "Traceback" not in err and "compiled" not in err
        first.proc.send_signal(signal.SIGINT)  # Ctrl-C: save at the step boundary, exit 0
        assert first.finish() == 0, first.stderr()[-3000:]
    finally:
        first.proc.kill()
    saved = _steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < 400

    third = Run(workdir)  # the lock went with the first run; it resumes
    try:
        third.wait_for_log(f"starting at step {saved[0]}")
        third.wait_for_rows(saved[0] + 1)
        third.proc.send_signal(signal.SIGINT)
        third.wait_for_log("send it again to quit at once")
        third.proc.send_signal(signal.SIGINT)
        assert third.finish(timeout=10) == -signal.SIGINT
    finally:
        third.proc.kill()


def test_sigterm_during_the_compile_exits_zero(tmp_path):
    run = Run(tmp_path / "run", cache=False)  # a real compile, long enough to land in
    try:
        run.wait_for_log("starting at step 0")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.stderr()[-3000:]
    finally:
        run.proc.kill()


def test_eflow_checkpoint_survives_sigterm_and_its_repeat(tmp_path):
    """`timeout` (and SLURM) may deliver TERM more than once: the repeat must not kill the save."""
    workdir = tmp_path / "run"
    run = Run(workdir, "steps=400,objective=eflow,test=1,batch=16")
    try:
        run.wait_for_rows(1)
        run.proc.send_signal(signal.SIGTERM)
        run.wait_for_log("Received signal 15")
        run.proc.send_signal(signal.SIGTERM)
        assert run.finish() == 0, run.stderr()[-3000:]
    finally:
        run.proc.kill()
    saved = _steps(workdir)
    assert len(saved) == 1 and saved[0] >= 1 and "saved step" in run.stderr()
    assert not [name for name in os.listdir(workdir / "ckpt") if "tmp" in name]


_DISK_FULL = """
import errno, sys
import orbax.checkpoint as ocp
from absl import app
from eflow_jax import main

def disk_full(self, step, *args, **kwargs):  # What orbax raises (tensorstore's message, long paths and all).
    tmp = f"{self.directory}/{step}.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp/_sharding"
    raise ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp}": Failed writing: "{tmp}.__lock": '
                     f"Failed to write 94797 bytes to file 9: No space left on device [os_error_code='28']")

ocp.CheckpointManager.save = disk_full
app.run(main.main)
"""


def test_failed_save_is_one_line_with_the_step_and_closes_everything(tmp_path):
    run = Run(tmp_path / "run", f"steps=4,{TEST_CONFIG}", save_every=2, prefix=[sys.executable, "-c", _DISK_FULL])
    assert run.finish(timeout=300) == 1
    err = run.stderr().strip()
    last = err.splitlines()[-1]
    assert last.startswith(f"error: saving step 2 to {tmp_path / 'run' / 'ckpt'} failed: ValueError: "), last
    assert "No space left on device" in last, last  # The reason survives the cut of a long message.
    assert "Traceback" not in err, err[-3000:]


def _files(workdir) -> dict:
    """Every file but the lock (each run writes its pid there) and TensorBoard's events."""
    return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file() and p.name != ".lock" and "tb" not in p.parts}


def test_model_change_or_corrupt_checkpoint_touch_nothing_and_a_resume_keeps_one_record(tmp_path):
    """A changed model fails before touching the workdir; so does a corrupt latest checkpoint, which
    names the previous one; resuming from it replaces config.json (keeping the old one) and does not
    repeat the steps logged after that checkpoint."""
    workdir = tmp_path / "run"
    with pytest.raises(train.NonFiniteError):  # dies at step 6 after logging 1-5, saved at 2 and 4
        train.train_and_evaluate(small_config(steps=7, inject_nan_at_step=6), str(workdir))
    assert _steps(workdir) == [2, 4]
    files = _files(workdir)

    changed = small_config(steps=7)
    changed.model.mlp_ratio = 2.0
    with pytest.raises(rundir.ConfigError, match=r"^this workdir was trained with another model config: "
                                                 r"model.mlp_ratio: 4.0 -> 2.0; use a new --workdir"):
        train.train_and_evaluate(changed, str(workdir))
    assert _files(workdir) == files

    data = workdir / "ckpt" / "4" / "state" / "d"
    for name in os.listdir(data):
        os.truncate(data / name, os.path.getsize(data / name) // 2)
    files = _files(workdir)
    with pytest.raises(checkpoint.CheckpointError, match=r"^cannot restore step 4 .*restore_step=2 "):
        train.train_and_evaluate(small_config(steps=7), str(workdir))
    assert _files(workdir) == files  # config.json and metrics.jsonl are still the last run's

    resumed = small_config(steps=7)
    resumed.checkpoint.restore_step = 2
    train.train_and_evaluate(resumed, str(workdir))
    steps = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert _steps(workdir) == [4, 6, 7]  # a new step 4; the corrupt one was moved aside, not deleted
    assert os.listdir(workdir / "ckpt.set_aside") == [f"4.{os.getpid()}"]
    assert json.loads((workdir / "config.json").read_text())["train"]["inject_nan_at_step"] == -1
    assert json.loads((workdir / "config.1.json").read_text())["train"]["inject_nan_at_step"] == 6


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(total_steps=0), "total_steps=0"),
    (lambda c: c.checkpoint.update(save_every=0), "checkpoint.save_every=0"),
    (lambda c: c.log.update(every_steps=0), "log.every_steps=0"),
    (lambda c: c.objective.update(label_drop=1.5), "objective.label_drop=1.5"),
    (lambda c: c.optim.update(lr=0.0), "optim.lr=0.0"),
    (lambda c: c.model.update(video_shape=(4, 16, 16)), r"model.video_shape=\(4, 16, 16\): give 4 positive sizes"),
    (lambda c: c.model.update(num_classes=0), "model.num_classes=0 and model.context_dim=0: the model would take "
                                              "neither class labels nor text; set --config.model.num_classes"),
    (lambda c: c.model.update(num_classes=0, context_dim=16), "model.num_classes=0 but data.num_classes=4: the model "
                                                              "would ignore the data's labels"),
], ids=["total_steps", "save_every", "every_steps", "label_drop", "lr", "video_shape", "no_condition",
        "labels_ignored"])
def test_bad_config_fails_before_the_workdir_exists(mutate, message, tmp_path):
    c = small_config()
    mutate(c)
    with pytest.raises(rundir.ConfigError, match=message):
        train.train_and_evaluate(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_failed_events_flush_is_not_retried_at_exit(tmp_path, monkeypatch):
    """tensorboardX flushes again at exit: after the run's error line, that printed a disk-full traceback."""
    writer = writers.MetricWriter(str(tmp_path), enabled=True)
    writer.scalars(1, {"loss": 1.0})
    events = writer._tb.file_writer.event_writer

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(events._ev_writer, "flush", disk_full)
    writer.close()  # One warning.
    events.close()  # What tensorboardX's atexit hook calls.
    assert events._worker is None or not events._worker.is_alive()


def test_writer_close_after_a_failed_flush_does_not_raise(tmp_path, monkeypatch):
    """close() runs while an error unwinds the loop: a full disk there must not replace that error."""
    writer = writers.MetricWriter(str(tmp_path), enabled=True)
    writer.scalars(1, {"loss": 1.0})

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer._tb, "close", disk_full)
    writer.close()
    assert writer._jsonl.closed
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["loss"] == 1.0
