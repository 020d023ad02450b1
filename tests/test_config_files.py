"""Config files: the library never imports configs/, the CLI loads one by path from any directory,
and config args parse strictly."""

import os
import pathlib
import re
import subprocess
import sys

import jax
import pytest

from configs import common

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_library_never_imports_configs():
    # setup.py installs eflow_jax/ only: an import of configs/ works from the repository root alone.
    pattern = re.compile(r"^\s*(from configs\b|import configs\b)|import_module\(f?[\"']configs\.", re.M)
    offenders = [str(p.relative_to(REPO)) for p in sorted((REPO / "eflow_jax").rglob("*.py"))
                 if pattern.search(p.read_text())]
    assert offenders == []


@pytest.mark.parametrize("text, expected", [("", True), ("1", True), ("true", True), ("Yes", True),
                                            ("0", False), ("false", False), ("NO", False)])
def test_boolean_args_parse(text, expected):
    arg = "runlocal" if text == "" else f"runlocal={text}"
    assert common.parse_arg(arg, runlocal=not expected).runlocal is expected


@pytest.mark.parametrize("text", ["ture", "2", "on!", "falsy"])
def test_a_boolean_arg_typo_is_an_error_naming_the_arg(text):
    with pytest.raises(ValueError, match=f"runlocal={text!r} is not a boolean"):
        common.parse_arg(f"variant=B,runlocal={text}", variant="S", runlocal=False)


def test_cli_trains_from_another_directory_with_an_absolute_config_path(tmp_path):
    # Only the library is importable (as if installed): `configs` must come from the config's path.
    site = tmp_path / "site"
    site.mkdir()
    (site / "eflow_jax").symlink_to(REPO / "eflow_jax")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    workdir = tmp_path / "run"
    argv = [sys.executable, "-m", "eflow_jax.main",
            f"--config={REPO / 'configs' / 'demo.py'}:objective=flow_matching,test=1,steps=2",
            f"--workdir={workdir}"]
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(os.listdir(workdir / "ckpt")) == ["2"]
    assert (workdir / "config.json").exists()


@pytest.mark.parametrize("name,arg", [
    ("kinetics.py", ""), ("kinetics.py", "short=1"), ("kinetics.py", "data=latents"), ("shapes.py", ""),
    ("shapes.py", "size=64"), ("kinetics.py", "baseline=1"), ("kinetics.py", "objective=solution_flow,baseline=1"),
    ("shapes.py", "objective=solution_flow"),
])
def test_token_dropped_configs_end_with_the_dense_finetune(name, arg):
    # Without SPRINT's dense phase, eflow's dense few-step samples lagged far behind on the shapes
    # gauge (2-step class accuracy 0.81 vs 0.985 with it, docs/QUALITY.md). The demo opts out (CPU time).
    from eflow_jax import config_file, sharding, train
    from eflow_jax.flow import objectives

    c = config_file.load(config_file.in_repo(name), arg)
    c.data.update(source="synthetic", path="")  # validate() checks that a dataset path exists.
    train.validate(c, sharding.make_mesh(c.mesh))
    dense_steps = c.total_steps - objectives.dense_from_step(c.objective, c.total_steps)
    drops = train.drop_ratio(c, dense=False) > 0
    assert dense_steps == (round(0.1 * c.total_steps) if drops else 0)


def test_bench_overrides_parse_literals_and_bare_strings():
    from eflow_jax import config_file

    c = config_file.load(config_file.in_repo("shapes.py"), "")
    for item in ("objective.guidance_scale=1.5", "eval.shapes.num_steps=(1,2,4)", "objective.token_drop=False",
                 "objective.mva.weighting=adaptive", "train.compile_cache_dir="):
        config_file.override(c, item)
    assert (c.objective.guidance_scale, tuple(c.eval.shapes.num_steps), c.objective.token_drop,
            c.objective.mva.weighting, c.train.compile_cache_dir) == (1.5, (1, 2, 4), False, "adaptive", "")
