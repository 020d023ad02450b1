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


def test_an_unwritable_lock_file_is_one_line(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop a write: the error an unwritable workdir gives instead.
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(rundir.os, "open", denied)
    with pytest.raises(rundir.RunError, match=rf"^cannot open the lock file {tmp_path}/.lock \(Permission denied\): "
                                              rf"make {tmp_path} \(and .lock in it\) writable by this user, or use "
                                              r"another --workdir.$"):
        rundir.WorkdirLock(str(tmp_path)).__enter__()


def test_a_missing_cut_or_empty_config_json_is_one_line_naming_the_way_on(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(rundir.RunError, match=r"config.json not found: --workdir must be a training run's workdir "
                                              r"or an export directory .*--config=<file>.py"):
        rundir.read_config(str(tmp_path))
    text = demo.get_config("test=1").to_json(indent=2)
    path.write_text(text[: len(text) // 2])  # Cut short (a full disk, a kill).
    with pytest.raises(rundir.RunError, match=r"config.json is not valid JSON \(.*, line \d+\): cut short .* "
                                              r"Restore it, or pass the run's config again with --config="):
        rundir.read_config(str(tmp_path))
    path.write_text("{}")
    with pytest.raises(rundir.RunError, match="config.json lacks the model, data, objective section"):
        rundir.read_config(str(tmp_path))
    path.write_text(text)
    assert rundir.read_config(str(tmp_path)).model.num_classes == 4


def test_the_os_reason_survives_a_cut_message():
    long_path = "/ckpt/" + "x" * 300
    orbax = ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{long_path}": Failed to write 94797 bytes '
                       f"to file 9: No space left on device [os_error_code='28']")
    try:
        try:
            raise orbax
        except ValueError as e:
            raise rundir.RunError(f"saving step 2 failed: {str(e)[:300]}...; free space, then rerun.") from e
    except rundir.RunError as e:
        assert rundir.one_line(e).endswith("then rerun. (the cause: No space left on device)")
    with pytest.raises(rundir.RunError) as err:  # `from None`: the error handled before is no cause.
        try:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        except BlockingIOError:
            raise rundir.RunError("workdir in use") from None
    assert rundir.one_line(err.value) == "workdir in use"
