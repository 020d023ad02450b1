"""The training system: bit-exact resume, preemption, NaN stop, sharding rules, config errors."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import demo
from eflow_jax import optim, sharding, train
from eflow_jax import state as state_lib
from eflow_jax.models import dit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# The loop's mechanics do not depend on the objective; flow matching compiles ~5x faster than
# eflow on CPU (the eflow objective itself is covered in test_flow_*.py and by the demo run).
TEST_CONFIG = "objective=flow_matching,test=1,batch=16"


def small_config(steps=4, **train_overrides):
    c = demo.get_config(f"steps={steps},{TEST_CONFIG}")
    c.train.update(**train_overrides)
    return c


def leaves(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(jax.tree.map(
        lambda a: jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a, tree))]


def assert_trees_equal(a, b):
    for x, y in zip(leaves(a), leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_is_bitwise_equal(tmp_path):
    straight = train.train_and_evaluate(small_config(), str(tmp_path / "a"))
    train.train_and_evaluate(small_config(stop_at_step=2), str(tmp_path / "b"))
    assert sorted(os.listdir(tmp_path / "b" / "ckpt")) == ["2"]
    resumed = train.train_and_evaluate(small_config(), str(tmp_path / "b"))
    assert int(resumed.step) == int(straight.step) == 4
    assert_trees_equal(straight, resumed)  # params, EMA, optimizer state, step and rng.
    # Same data order: the logged losses of steps 3-4 match the uninterrupted run.
    def losses(run):
        rows = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        return {r["step"]: r["loss"] for r in rows}
    a, b = losses("a"), losses("b")
    assert a[3] == b[3] and a[4] == b[4]


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(train.NonFiniteError, match="step 3.*last good checkpoint is step 2"):
        train.train_and_evaluate(small_config(inject_nan_at_step=3), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["2"]


def test_skip_nonfinite_keeps_training(tmp_path):
    state = train.train_and_evaluate(small_config(inject_nan_at_step=2, skip_nonfinite=True), str(tmp_path))
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["finite"] for r in rows] == [1.0, 0.0, 1.0, 1.0]
    # Where each window's wall time went: input, device, host (they add up to 1).
    for r in rows:
        fractions = [r["data_wait_frac"], r["device_wait_frac"], r["host_frac"]]
        assert all(0 <= f <= 1 for f in fractions) and sum(fractions) == pytest.approx(1, abs=1e-6)
    assert rows[0]["compile_s"] > 0 and "compile_s" not in rows[1]
    assert all(np.isfinite(x).all() for x in leaves(state.params))


def test_sigterm_saves_exits_zero_and_resume_continues(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    cmd = [sys.executable, "-m", "eflow_jax.main", f"--config=configs/demo.py:steps=400,{TEST_CONFIG}",
           "--config.checkpoint.save_every=1000", f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = sorted(int(s) for s in os.listdir(workdir / "ckpt") if s.isdigit())
    assert len(steps) == 1 and 2 <= steps[0] < 400, steps  # Saved at the next step boundary.
    config = json.loads((workdir / "config.json").read_text())
    assert config["total_steps"] == 400


def test_every_large_param_is_sharded_on_8_devices():
    mesh = sharding.make_mesh(sharding.mesh_config(ici=dict(data=1, fsdp=4, tensor=2)))
    cfg = dit.model_config("B", attention_impl="xla")
    model = dit.EFlowDiT(cfg)
    abstract, _ = state_lib.state_shardings(model, optim.make_optimizer(optim.optim_config(), 10), mesh)
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.params)[0]:
        if np.prod(leaf.shape) >= 2**16:
            spec = leaf.sharding.spec
            assert "fsdp" in jax.tree.leaves(tuple(spec)), (jax.tree_util.keystr(path), spec)
            checked += 1
    assert checked > 50
    # Optimizer moments follow their params.
    mu = abstract.opt_state[0][0].mu  # chain(adamw) -> adamw chain -> ScaleByAdamState
    assert mu["middle"]["block_0"]["mlp"]["gate_up"]["kernel"].sharding.spec == \
        abstract.params["middle"]["block_0"]["mlp"]["gate_up"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", None, "tensor")


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(batch_size=12), "not divisible by the data-parallel size"),
    (lambda c: c.model.update(variant="XXL"), "model.variant"),
    (lambda c: c.data.update(source="arrayrecord", path="/nonexistent/kinetics"), "prepare"),
    (lambda c: c.data.update(num_frames=8), "num_frames"),
    (lambda c: c.model.update(tile=(3, 4, 4)), "model.tile"),
])
def test_config_errors_before_compile(mutate, message, tmp_path):
    c = small_config()
    mutate(c)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train.train_and_evaluate(c, str(tmp_path))


def test_mesh_errors_name_the_fix():
    with pytest.raises(ValueError, match="covers 6 devices but there are 8"):
        sharding.make_mesh(sharding.mesh_config(ici=dict(data=3, fsdp=2, tensor=1)))
    with pytest.raises(ValueError, match="more than one -1"):
        sharding.make_mesh(sharding.mesh_config(ici=dict(data=-1, fsdp=-1, tensor=1)))


def test_params_initialised_into_shardings():
    mesh = sharding.make_mesh(sharding.mesh_config(ici=dict(data=2, fsdp=4, tensor=1)))
    c = small_config()
    model = dit.EFlowDiT(c.model)
    tx = optim.make_optimizer(c.optim, 4)
    abstract, shardings = state_lib.state_shardings(model, tx, mesh)
    state = state_lib.create_state(model, tx, mesh, 0, shardings)
    for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
        assert x.sharding.is_equivalent_to(a.sharding, x.ndim)
    assert nn.meta.unbox(state.params) is not None


# metrics.jsonl of `configs/demo.py:test=1 --config.optim.lr=1e6` (issue 25.7): it stopped at step 5 and
# called step 4, whose probe was NaN and whose weights had exploded, "the last good checkpoint".
_EXPLODING = [dict(step=1, loss=0.718, grad_norm=1.04, param_norm=46.8, update_norm=0.0, probe_vel_err=1.62),
              dict(step=2, loss=0.719, grad_norm=1.07, param_norm=1.08e6, update_norm=1.08e6, probe_vel_err=3.3e11),
              dict(step=3, loss=1.40, grad_norm=4.40, param_norm=6.46e6, update_norm=6.08e6, probe_vel_err=7.8e24),
              dict(step=4, loss=1.43, grad_norm=18.8, param_norm=2.19e7, update_norm=1.85e7, probe_vel_err=np.nan)]


def test_nan_stop_names_the_last_checkpoint_whose_metrics_were_sane():
    message = train.nonfinite_message(5, _EXPLODING, [2, 4], "/w/ckpt")
    assert "last good checkpoint is step 4" not in message
    assert message.startswith("non-finite loss or gradient at step 5, but the divergence began earlier: step 2 "
                              "logged param_norm 1.08e+06, 23077x the 46.8 of step 1; no checkpoint in /w/ckpt "
                              "precedes it (it has steps [2, 4]): start again in a new --workdir")
    healthy = [dict(r, step=r["step"] * 100, param_norm=46.8 + r["step"], probe_vel_err=1.0) for r in _EXPLODING]
    nan_probe = healthy[:3] + [dict(healthy[3], probe_vel_err=np.nan)]  # Diverged by the row of step 400.
    message = train.nonfinite_message(401, nan_probe, [200, 400], "/w/ckpt")
    assert "step 400 logged probe_vel_err=nan; the last good checkpoint is step 200" in message
    assert "--config.checkpoint.restore_step=200" in message
    assert train.nonfinite_message(401, healthy, [200, 400], "/w/ckpt") == (
        "non-finite loss or gradient at step 401; the last good checkpoint is step 400 in /w/ckpt. Lower "
        "optim.lr, set optim.grad_clip, or set train.skip_nonfinite=True to skip such updates.")


@pytest.mark.slow  # A real run (~25 s on 2 cores): the loop feeds its logged rows to the NaN stop.
def test_nan_stop_of_an_exploding_run_does_not_call_an_exploded_checkpoint_good(tmp_path):
    config = small_config(steps=8)
    config.optim.lr = 1e6
    with pytest.raises(train.NonFiniteError) as err:
        train.train_and_evaluate(config, str(tmp_path))
    message = str(err.value)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    saved = sorted(int(s) for s in os.listdir(tmp_path / "ckpt"))
    assert "the divergence began earlier: step 2 logged param_norm" in message, (message, rows)
    assert f"no checkpoint in {tmp_path / 'ckpt'} precedes it (it has steps {saved})" in message
