"""The run directory: its layout, the lock, the model-config check, config snapshots, metrics on resume.

This module is the one place that knows what lives where in a workdir (or an export directory):

    workdir/ckpt/<step>/    train state + data iterator (checkpoint.py writes it)
    workdir/ckpt.set_aside/ steps moved out by checkpoint.restore_step; ckpt.restore_step.json: it was applied
    workdir/config.json     the config snapshot (config.<n>.json: earlier, different ones)
    workdir/metrics.jsonl   one row per logged step;  workdir/tb/  TensorBoard events
    workdir/samples/step_<n>/   the train loop's samples of step n; below it, <sampler>_<k>steps_seed<s>/
                            of --mode=sample (each sample folder: samples.json says what made it)
    workdir/eval/  workdir/export/  workdir/fvd_stats/   --mode=eval / --mode=export defaults
    workdir/profile/        jax.profiler traces (log.profile_start)
    workdir/.lock           the flock of the run using it
    export/params/ + export/config.json + export/export.json   an export (params only; which step)

    check_model_config(workdir, config)       # read-only: before anything is written
    with WorkdirLock(workdir):                 # a second run on the same workdir fails at once
        ... restore ...
        write_config_snapshot(workdir, config) # only after the restore succeeded
        trim_metrics(workdir, start_step)      # rows of steps the checkpoint does not have

Only process 0 of a multi-process run takes the lock and writes files; every process runs the
read-only check, so all of them fail together.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import socket

from absl import logging

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"
# Implementation choices that compute the same function from the same parameters: a run may
# resume with other values (e.g. another attention kernel on another machine).
RUNTIME_MODEL_FIELDS = frozenset({"attention_impl", "remat"})
# Fields that shape nothing unless the model takes text (model.context_dim > 0): snapshots of runs
# from before text conditioning lack them, and those runs still resume.
TEXT_MODEL_FIELDS = frozenset({"context_len"})


def lock_path(workdir: str) -> str:
    return os.path.join(workdir, LOCK_NAME)


def ckpt_dir(workdir: str) -> str:
    return os.path.join(workdir, "ckpt")


def params_dir(run_dir: str) -> str:
    """An export's params (its presence is what makes a directory an export)."""
    return os.path.join(run_dir, "params")


def is_export(run_dir: str) -> bool:
    return os.path.isdir(params_dir(run_dir))


def export_record_path(run_dir: str) -> str:
    """An export's record: the checkpoint step it holds, which params (ema / raw), where from."""
    return os.path.join(run_dir, "export.json")


def read_export_record(run_dir: str) -> dict:
    """The export's record; {} for exports written before it existed."""
    try:
        with open(export_record_path(run_dir)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return {}


def config_path(run_dir: str) -> str:
    return os.path.join(run_dir, CONFIG_NAME)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_NAME)


def tb_dir(workdir: str) -> str:
    return os.path.join(workdir, "tb")


def samples_dir(workdir: str, step: int | None) -> str:
    """Samples of checkpoint `step`: the train loop's, and --mode=sample's default output in a folder per
    settings below it. None: an export that does not record its step."""
    return os.path.join(workdir, "samples", "step_unknown" if step is None else f"step_{step}")


def samples_record_path(out_dir: str) -> str:
    """What made a folder's samples (run, checkpoint step, sampler settings): samples of another
    run, step or settings are never written beside them."""
    return os.path.join(out_dir, "samples.json")


def profile_dir(workdir: str) -> str:
    return os.path.join(workdir, "profile")


def eval_dir(workdir: str) -> str:
    return os.path.join(workdir, "eval")


def export_dir(workdir: str) -> str:
    return os.path.join(workdir, "export")


def fvd_stats_dir(workdir: str) -> str:
    """Real FVD statistics cached in the run (synthetic data, or a read-only data folder)."""
    return os.path.join(workdir, "fvd_stats")


REQUIRED_SECTIONS = ("model", "data", "objective")  # What sampling, export and eval read from a snapshot.


def read_config(run_dir: str):
    """The config snapshot a training run (or an export) wrote, as a ConfigDict; a missing, cut or
    unreadable one is a RunError saying how to go on."""
    import ml_collections

    path = config_path(run_dir)
    again = ("pass the run's config again with --config=<file>.py[:args] and the --config.* flags it was "
             "trained with")
    if not os.path.exists(path):
        what = ("this workdir has checkpoints but its config.json is gone" if has_checkpoint(run_dir) else
                "--workdir must be a training run's workdir or an export directory (python -m eflow_jax.main "
                "--mode=export)")
        raise RunError(f"{path} not found: {what}; {again}.")
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError as e:  # json.JSONDecodeError, or bytes that are not UTF-8.
        raise RunError(f"{path} is not valid JSON ({getattr(e, 'msg', e)}, line {getattr(e, 'lineno', '?')}): cut "
                       f"short by a full disk or a kill, or edited? Restore it, or {again}.") from None
    except OSError as e:
        raise RunError(f"cannot read {path} ({e.strerror}): make it readable by this user.") from None
    missing = [name for name in REQUIRED_SECTIONS if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise RunError(f"{path} lacks the {', '.join(missing)} section(s) of a run config; restore it, or {again}.")
    return ml_collections.ConfigDict(saved)


class RunError(RuntimeError):
    """A failure the user fixes from its one-line message; the CLI prints only the message."""


class ConfigError(RunError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def one_line(err: BaseException) -> str:
    """`err`'s message for the CLI's `error:` line, ending with the operating-system reason behind it
    (e.g. 'No space left on device') when the message lost it (a long library message cut short)."""
    text = str(err)
    reason = os_reason(err)
    return text if reason is None or reason in text else f"{text} (the cause: {reason})"


def os_reason(err: BaseException) -> str | None:
    """The OS error behind `err` or its causes: an OSError's, or tensorstore's `[os_error_code='28']`."""
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        code = getattr(cause, "errno", None) if isinstance(cause, OSError) else None
        if code is None and (match := re.search(r"os_error_code='?(\d+)", str(cause))):
            code = int(match.group(1))
        if code:
            return os.strerror(code)
        # `raise ... from None` cuts the chain: the error before it is not this one's cause.
        cause = cause.__cause__ or (None if cause.__suppress_context__ else cause.__context__)
    return None


class WorkdirLock:
    """An exclusive flock on workdir/.lock, released on any exit (the OS drops it with the process).

    Args:
      workdir: the run directory (created if missing).
      enabled: False on processes other than 0 (they share process 0's workdir).
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.path = lock_path(workdir)
        self._workdir = workdir
        self._enabled = enabled
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        if not self._enabled:
            return self
        try:
            os.makedirs(self._workdir, exist_ok=True)
            # No O_TRUNC: a failed attempt must not erase the holder's pid and host.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"cannot open the lock file {self.path} ({e.strerror}): make {self._workdir} (and "
                           f"{LOCK_NAME} in it) writable by this user, or use another --workdir.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunError(f"workdir {self._workdir} is in use by {holder}; wait for that run to end or stop it "
                           f"(the lock goes with its process), or use another --workdir.") from None
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now}).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc_info) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (deleting it would race a new run)
            self._fd = None


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
    except (ValueError, KeyError, OSError):
        return "another process (its pid is not written yet)"


def _flatten(tree: dict, prefix: str) -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_diff(saved: dict, current: dict) -> list[str]:
    """'model.field: saved -> current' for every differing field (JSON forms, so tuples == lists)."""
    a, b = _flatten(saved, "model."), _flatten(current, "model.")
    text = bool(a.get("model.context_dim")) or bool(b.get("model.context_dim"))
    ignored = RUNTIME_MODEL_FIELDS | (frozenset() if text else TEXT_MODEL_FIELDS)
    keys = sorted(k for k in a.keys() | b.keys() if k.split(".")[1] not in ignored)
    missing = "<absent>"
    return [f"{k}: {a.get(k, missing)} -> {b.get(k, missing)}" for k in keys if a.get(k, missing) != b.get(k, missing)]


def has_checkpoint(workdir: str) -> bool:
    """Whether workdir/ckpt holds a committed step (orbax names those by the bare step number)."""
    ckpt = ckpt_dir(workdir)
    return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def check_model_config(workdir: str, config) -> None:
    """Fails, touching nothing, if the workdir's checkpoints were trained with another model config.

    Compared against the `model` section of the workdir's config.json, which is only written after a
    successful restore, so it is the config of the run the checkpoints came from.
    """
    path = config_path(workdir)
    if not (has_checkpoint(workdir) and os.path.exists(path)):
        return
    with open(path) as f:
        saved = json.load(f).get("model", {})
    diff = model_diff(saved, json.loads(config.model.to_json()))
    if diff:
        raise ConfigError(f"this workdir was trained with another model config: {'; '.join(diff)}; "
                          f"use a new --workdir (or checkpoint.init_from={ckpt_dir(workdir)} "
                          f"there to start from its weights).")


def write_config_snapshot(workdir: str, config) -> str:
    """Writes config.json; a different previous one is kept as config.<n>.json (n = 1, 2, ...)."""
    path = config_path(workdir)
    text = config.to_json(indent=2)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        n = 1
        while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
            n += 1
        os.replace(path, os.path.join(workdir, f"config.{n}.json"))
    _write_atomically(path, text)
    return path


def trim_metrics(workdir: str, step: int) -> int:
    """Drops metrics.jsonl rows past `step` (logged by a run that died before saving them).

    The resumed run logs those steps again; keeping both would repeat them. Returns the rows dropped.
    """
    path = metrics_path(workdir)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_step(line) is not None and _row_step(line) <= step]
    if len(kept) == len(lines):
        return 0
    _write_atomically(path, "".join(kept))
    dropped = len(lines) - len(kept)
    logging.warning("dropped %d rows past the restored step %d from %s (logged after the last save).",
                    dropped, step, path)
    return dropped


def _row_step(line: str) -> int | None:
    try:  # A row cut short by a kill does not parse: it is dropped too.
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
