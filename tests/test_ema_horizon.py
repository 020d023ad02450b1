"""Optimizer/EMA settings that do not fit the run length are flagged before anything compiles."""

import pytest
from absl import logging

from configs import demo, kinetics
from eflow_jax import optim, sharding, train


def test_fixed_long_ema_on_a_short_run_warns_with_the_fix():
    cfg = optim.optim_config(ema_decay=0.9999, ema_warmup=False)
    message = optim.ema_horizon_warning(cfg, 3_000)
    assert message is not None
    assert "74%" in message and "ema_warmup=True" in message  # 0.9999^3000 = 0.741 of the init.


@pytest.mark.parametrize("decay,warmup,steps", [
    (0.9999, False, 400_000),  # The long run the kinetics defaults are for.
    (0.9999, True, 3_000),  # Warmup tracks any run length.
    (0.999, False, 4_000),  # Horizon 1k = 25% of the run: the edge still fits.
    (0.0, False, 10),  # No EMA.
])
def test_fitting_ema_does_not_warn(decay, warmup, steps):
    assert optim.ema_horizon_warning(optim.optim_config(ema_decay=decay, ema_warmup=warmup), steps) is None


def test_validate_logs_the_warning_once(monkeypatch):
    seen = []
    monkeypatch.setattr(logging, "warning", lambda fmt, *args: seen.append(fmt % args))
    train._warn_once.cache_clear()
    config = demo.get_config("steps=3000,test=1")
    config.optim.update(ema_decay=0.9999, ema_warmup=False)
    mesh = sharding.make_mesh(config.mesh)
    train.validate(config, mesh)
    train.validate(config, mesh)  # train_and_evaluate validates again inside setup.
    assert len([m for m in seen if "optim.ema_decay=0.9999" in m]) == 1
    seen.clear()
    train.validate(demo.get_config("test=1"), mesh)  # The demo's own EMA fits.
    assert not seen


def test_kinetics_short_variant_fits_its_run():
    for arg in ("short=1", "short=1,steps=3000", "runlocal=1"):
        c = kinetics.get_config(arg)
        assert optim.ema_horizon_warning(c.optim, c.total_steps) is None, arg
        assert c.optim.warmup_steps < c.total_steps
    long_run = kinetics.get_config()
    assert long_run.total_steps == 400_000 and optim.ema_horizon_warning(long_run.optim, 400_000) is None
    assert optim.ema_horizon_warning(long_run.optim, 3_000) is not None  # What short=1 is for.
