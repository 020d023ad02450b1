"""The dense fine-tune's program compiles in the background from the first step (train.dense_compile)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from test_dense_finetune import config, rows  # tests/ is on sys.path (pytest rootdir conftest).
from test_robust_run import REPO, _env
from test_train import assert_trees_equal

from eflow_jax import train


def _program(compile_dense, dense_from=2):
    return train.Program(*[None] * 7, step="dropped", compile_s=0.0, lower_s=0.0, compile_source="compiled",
                         save_s=0.0, flops_per_step=1.0, dense_from=dense_from, dense_flops_per_step=1.0,
                         compile_dense=compile_dense)


def test_background_compile_is_used_at_the_switch_and_waited_for():
    calls, release = [], threading.Event()

    def compile_dense():
        calls.append(threading.current_thread().name)
        release.wait(5)
        return "dense"

    prog = _program(compile_dense)
    assert prog.compile_dense_in_background() and not prog.compile_dense_in_background()  # Once.
    assert prog.step_for(2) == "dropped"  # Up to the switch: never waits.
    threading.Timer(0.3, release.set).start()
    start = time.perf_counter()
    assert prog.step_for(3) == "dense" and prog.step_for(4) == "dense"  # Waits for the thread, then reuses.
    assert time.perf_counter() - start >= 0.2
    assert calls == ["compile-dense-program"] and prog.wait_background() == 0.0


def test_a_failed_background_compile_is_redone_at_the_switch():
    attempts = []

    def fails_beside_a_running_step():  # e.g. out of memory for XLA's autotuning while a step runs
        attempts.append(threading.current_thread().name)
        if len(attempts) == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED")
        return "dense"

    prog = _program(fails_beside_a_running_step)
    assert prog.compile_dense_in_background()
    assert prog.wait_background() >= 0.0
    assert prog.step_for(3) == "dense" and attempts == ["compile-dense-program", "MainThread"]

    def broken():
        raise RuntimeError("XLA says no")

    prog = _program(broken)
    prog.compile_dense_in_background()
    with pytest.raises(RuntimeError, match="XLA says no"):  # As without the background compile.
        prog.step_for(3)


def test_no_background_compile_without_a_dense_phase_or_when_the_run_stops_first():
    assert not _program(None).compile_dense_in_background()
    prog = _program(lambda: "dense")
    c = config(steps=4, frac=0.5)
    assert train._compiles_dense_ahead(c, prog, 1)
    c.train.stop_at_step = 2  # Stops at the switch: the dense program would never run.
    assert not train._compiles_dense_ahead(c, prog, 1)
    c.train.update(stop_at_step=0, dense_compile="at_switch")
    assert not train._compiles_dense_ahead(c, prog, 1)
    c.train.dense_compile = "at_start"
    with pytest.raises(ValueError, match="train.dense_compile"):
        train.validate(c, train.sharding.make_mesh(c.mesh))


def test_background_compile_changes_no_loss(tmp_path, monkeypatch):
    programs = []
    setup = train.setup
    monkeypatch.setattr(train, "setup", lambda c: programs.append(setup(c)) or programs[-1])
    background = train.train_and_evaluate(config(), str(tmp_path / "bg"))
    prog = programs[-1]
    assert prog._background["thread"].name == "compile-dense-program" and not prog._background["thread"].is_alive()
    assert prog.step_for(3) is prog._background["result"]
    at_switch = train.train_and_evaluate(config(dense_compile="at_switch"), str(tmp_path / "lazy"))
    assert not programs[-1]._background and "dense" in programs[-1]._compiled
    assert_trees_equal(background, at_switch)
    a, b = rows(tmp_path / "bg"), rows(tmp_path / "lazy")
    assert [a[k]["loss"] for k in (1, 2, 3, 4)] == [b[k]["loss"] for k in (1, 2, 3, 4)]
    assert [a[k]["drop_ratio"] for k in (1, 2, 3, 4)] == [0.75, 0.75, 0.0, 0.0]


# The CLI with the dense program's compile held until a file appears, so the stop lands inside it.
_GATED_MAIN = """
import os, runpy, sys, time
from eflow_jax import train
gate, start = os.environ["EFLOW_TEST_GATE"], train.Program.compile_dense_in_background
def gated(self):
    inner = self.compile_dense
    def compile_dense():
        while not os.path.exists(gate):
            time.sleep(0.05)
        return inner()
    object.__setattr__(self, "compile_dense", compile_dense)
    return start(self)
train.Program.compile_dense_in_background = gated
runpy.run_module("eflow_jax.main", run_name="__main__", alter_sys=True)
"""


def test_sigterm_while_the_dense_program_compiles_saves_waits_and_exits_zero(tmp_path):
    """The stop saves first; the process then waits for the compile XLA cannot stop (else jax's exit
    handler would end it with -1, a leaked client) and exits 0."""
    workdir, log, gate = tmp_path / "run", tmp_path / "run.log", tmp_path / "gate"
    argv = [sys.executable, "-c", _GATED_MAIN, "--config=configs/demo.py:steps=400,objective=flow_matching,"
            "test=1,batch=16", "--config.objective.token_drop=True", "--config.objective.dense_finetune_frac=0.5",
            "--config.checkpoint.save_every=1000", f"--workdir={workdir}"]
    with open(log, "w") as err:
        proc = subprocess.Popen(argv, cwd=REPO, env=dict(_env(), EFLOW_TEST_GATE=str(gate)),
                                stdout=subprocess.DEVNULL, stderr=err)

    def wait_for(text):
        deadline = time.time() + 300
        while text not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)

    try:
        wait_for("in the background")
        proc.send_signal(signal.SIGTERM)
        wait_for("waiting for it")
        assert proc.poll() is None  # Held by the compile, after the save.
        gate.touch()
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    text = log.read_text()
    assert "leaked" not in text and text.index("saved step") < text.index("waiting for it")
    saved = [int(s) for s in os.listdir(workdir / "ckpt") if s.isdigit()]
    assert len(saved) == 1 and saved[0] < 200
    last = [json.loads(line) for line in open(workdir / "metrics.jsonl")][-1]
    assert last["step"] == saved[0]


def test_ctrl_c_during_the_exit_wait_leaves_at_once(monkeypatch):
    class Compiling:  # A compile that a Ctrl-C interrupts the wait for.
        def is_alive(self):
            return True

        def join(self):
            raise KeyboardInterrupt

    prog = _program(lambda: "dense")
    prog._background.update(thread=Compiling(), started=time.perf_counter())
    exits = []
    monkeypatch.setattr(train.os, "_exit", exits.append)
    prog.wait_background()
    assert exits == [128 + signal.SIGINT]
