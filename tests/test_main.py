"""The command line: typed flags win, and every user mistake ends in one `error:` line naming the fix.

The subprocess tests start from a workdir holding only config.json (or a tiny checkpoint made
without training), so each costs the CLI's start-up, not a compile.
"""

import os
import subprocess
import sys

import jax
import pytest

from configs import demo
from eflow_jax import evaluate, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    return subprocess.run([sys.executable, "-m", "eflow_jax.main", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_with_config(path, config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json(indent=2))
    return path


# ---- typed flags win ----


def test_typed_eval_and_sample_flags_win_even_at_their_defaults():
    config = demo.get_config("test=1")  # eval.metric='shapes', eval.shapes.num_clips=32
    config.eval.fvd.i3d_path = "/models/i3d.npz"
    config.sample.sampler = "chain"
    evaluate.apply_eval_flags(config, {"metric": "fvd", "shapes.num_clips": 256, "fvd.i3d_path": ""})
    assert (config.eval.metric, config.eval.shapes.num_clips, config.eval.fvd.i3d_path) == ("fvd", 256, "")
    assert config.eval.shapes.num_steps == (1,)  # Not typed: the run's value stays.
    # --sample.* flags layer over the run's sample section the same way.
    assert sample.apply_sample_flags(config, {}).sampler == "chain"
    assert sample.apply_sample_flags(config, {"sampler": "renoise", "num": 8}).sampler == "renoise"


@pytest.mark.slow
def test_cli_eval_follows_its_own_advice_on_an_arrayrecord_run(tmp_path):
    # The run's config scores the shapes gauge (synthetic data only) on prepared clips; the error
    # says --eval.metric=fvd, the default value: typing it must switch to FVD, and typing the
    # default (empty) i3d_path must win over the run's.
    config = demo.get_config("test=1")
    config.data.update(source="arrayrecord", path=str(tmp_path / "clips"))
    config.eval.fvd.i3d_path = str(tmp_path / "i3d.npz")
    workdir = run_with_config(tmp_path / "run", config)
    done = cli("--mode=eval", f"--workdir={workdir}", "--eval.metric=fvd", "--eval.fvd.i3d_path=")
    assert done.returncode != 0
    assert "Use FVD for this run" not in done.stderr
    assert "config.eval.fvd.i3d_path is empty" in done.stderr, done.stderr[-2000:]
