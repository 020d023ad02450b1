"""One run per workdir: the lock, config snapshots, the model-config check (no training here)."""

import json
import os
import signal
import socket
import subprocess
import sys

import ml_collections
import pytest

from configs import demo
from eflow_jax import rundir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_HOLD_LOCK = """
import sys, time
from eflow_jax.rundir import WorkdirLock
with WorkdirLock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_lock_fails_naming_the_holder_and_is_released_when_it_dies(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunError) as err:
            with rundir.WorkdirLock(str(tmp_path)):
                pass
        message = str(err.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in message and "another --workdir" in message
        assert "\n" not in message
        with rundir.WorkdirLock(str(tmp_path), enabled=False):  # processes > 0 do not lock
            pass
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: the OS must drop the lock
        proc.wait(timeout=30)
    with rundir.WorkdirLock(str(tmp_path)):
        with pytest.raises(rundir.RunError, match=f"pid {os.getpid()}"):
            rundir.WorkdirLock(str(tmp_path)).__enter__()
    with rundir.WorkdirLock(str(tmp_path)):  # released by the `with` above
        pass


def _config(**model):
    c = demo.get_config("test=1")
    c.model.update(**model)
    return c


def test_config_snapshots_keep_the_previous_ones(tmp_path):
    workdir = str(tmp_path)
    first, second = _config(), _config()
    second.total_steps = 7
    rundir.write_config_snapshot(workdir, first)
    rundir.write_config_snapshot(workdir, first)  # unchanged: no new snapshot
    assert sorted(os.listdir(workdir)) == ["config.json"]
    rundir.write_config_snapshot(workdir, second)
    rundir.write_config_snapshot(workdir, first)
    assert sorted(os.listdir(workdir)) == ["config.1.json", "config.2.json", "config.json"]
    totals = [json.loads((tmp_path / name).read_text())["total_steps"]
              for name in ("config.1.json", "config.2.json", "config.json")]
    assert totals == [first.total_steps, 7, first.total_steps]


def test_model_config_check_names_the_fields_and_touches_nothing(tmp_path):
    workdir = str(tmp_path)
    rundir.write_config_snapshot(workdir, _config())
    rundir.check_model_config(workdir, _config(mlp_ratio=2.0))  # no checkpoint yet: nothing to mix
    os.makedirs(tmp_path / "ckpt" / "4")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(rundir.ConfigError) as err:
        rundir.check_model_config(workdir, _config(mlp_ratio=2.0, patch=(2, 4, 4)))
    assert str(err.value).startswith("this workdir was trained with another model config: "
                                      "model.mlp_ratio: 4.0 -> 2.0; model.patch: [1, 4, 4] -> [2, 4, 4]; "
                                      "use a new --workdir")
    assert "strict" not in str(err.value)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    rundir.check_model_config(workdir, _config(attention_impl="xla", remat="full"))  # same function


def test_trim_metrics_drops_rows_past_the_step_and_torn_lines(tmp_path):
    rows = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(rows) + '{"step": 5, "lo')
    assert rundir.trim_metrics(str(tmp_path), 2) == 3
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(rows[:2])
    assert rundir.trim_metrics(str(tmp_path), 2) == 0


def test_model_diff_reads_json_forms():
    saved = json.loads(ml_collections.ConfigDict(dict(a=(1, 2), b=dict(c=1))).to_json())
    assert rundir.model_diff(saved, {"a": [1, 2], "b": {"c": 1}}) == []
    assert rundir.model_diff(saved, {"a": [1, 2], "b": {}}) == ["model.b.c: 1 -> <absent>"]


def test_snapshots_from_before_text_conditioning_still_resume():
    """A class-conditional run's config.json has no model.context_len (added with text): it still resumes; a
    text run's context_len is compared."""
    from eflow_jax.models import dit

    current = json.loads(dit.model_config("tiny").to_json())
    old = {k: v for k, v in current.items() if k != "context_len"}
    assert rundir.model_diff(old, current) == []
    text = dict(current, context_dim=64)
    assert rundir.model_diff(dict(old, context_dim=64), text) == ["model.context_len: <absent> -> 77"]
