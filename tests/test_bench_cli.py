"""bench.cli's CPU smoke path: the CLI run, a restart in a second process, the bench, one JSON summary."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_run_reports_the_cli_against_its_step_and_a_restart_that_loads_it(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, "-m", "eflow_jax.bench.cli", "--tiny", "--steps=6", "--log_every=2", "--iters=2",
           f"--workdir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["phase"]: r for r in map(json.loads, proc.stdout.splitlines())}  # Only JSON on stdout.
    assert list(rows) == ["config", "cli", "warm_start", "bench", "summary"]
    cli, warm, bench, summary = rows["cli"], rows["warm_start"], rows["bench"], rows["summary"]
    assert cli["windows"] == 2 and not cli["compile_cache_hit"] and cli["to_first_log_s"] > cli["compile_s"] > 0
    assert 0 <= cli["after_last_log_s"] < 60
    assert (warm["compile_source"], warm["lower_s"]) == ("executable", 0.0)  # The restart skipped tracing.
    assert bench["compile_source"] == "executable" and bench["pipelined_examples_per_s"] > 0
    assert summary["cli_over_bench"] == cli["examples_per_s"] / bench["examples_per_s"]
    assert summary["cli_over_pipelined"] == cli["examples_per_s"] / bench["pipelined_examples_per_s"]
    assert summary["compile_warm_s"] == warm["compile_s"] < summary["compile_cold_s"]
    assert "train.py" in proc.stderr  # The loop's own log lines, timestamped, for the timeline.
