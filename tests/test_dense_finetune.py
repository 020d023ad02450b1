"""SPRINT's full-token fine-tune inside one run (objective.dense_finetune_frac; docs/METHOD.md 4.2, 8)."""

import json
import os

import pytest
from test_train import assert_trees_equal  # tests/ is on sys.path (pytest rootdir conftest).

from configs import demo
from eflow_jax import sharding, train
from eflow_jax.flow import cost, objectives
from eflow_jax.models import dit


# Flow matching compiles fastest; with token_drop on it has a dropped and a dense phase like eflow.
# 4 steps at 0.5: steps 1-2 token-dropped, 3-4 dense.
def config(steps=4, frac=0.5, **train_overrides):
    c = demo.get_config(f"steps={steps},objective=flow_matching,test=1,batch=16")
    c.objective.update(token_drop=True, dense_finetune_frac=frac)
    c.checkpoint.save_every = 1
    c.eval.metric, c.log.probe_clips = "fvd", 0  # No end-of-run gauge or probe: only the loop is tested here.
    c.train.update(**train_overrides)
    return c


def rows(workdir):
    out = {}
    for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl"))):
        out.setdefault(r["step"], {}).update(r)
    return out


def test_switch_step_and_config_errors():
    c = objectives.default_objective_config("eflow")
    assert objectives.dense_from_step(c, 1000) == 1000  # Off by default.
    c.dense_finetune_frac = 0.1
    assert objectives.dense_from_step(c, 1000) == 900
    dense = objectives.dense_phase(c)
    assert (dense.token_drop, dense.dense_finetune_frac, c.token_drop) == (False, 0.0, True)
    c.token_drop = False
    with pytest.raises(ValueError, match="token_drop=True or dense_finetune_frac=0"):
        objectives.validate_config(c)
    c.update(token_drop=True, dense_finetune_frac=1.0)
    with pytest.raises(ValueError, match="dense_finetune_frac"):
        objectives.validate_config(c)
    nodrop = config()
    nodrop.model.keep_per_group = 4
    with pytest.raises(ValueError, match="drops no tokens"):
        train.validate(nodrop, sharding.make_mesh(nodrop.mesh))


def test_cost_model_knows_both_phases():
    c = config(steps=100, frac=0.1)
    drop, dense = train.train_flops_per_step(c), train.train_flops_per_step(c, dense=True)
    flops = dit.count_flops(c.model).as_dict()
    assert dense == pytest.approx(3 * flops["full"] * c.batch_size)  # Flow matching: 3 dense passes.
    assert drop == pytest.approx(3 * flops["dropped"] * c.batch_size) and drop < dense
    run = cost.run_forward_equivalents(c.objective, flops, c.batch_size, 100)
    assert run["dropped_steps"] == 90
    assert run["per_example"] == pytest.approx(0.9 * run["per_example_dropped"] + 0.1 * run["per_example_dense"])
    # The logged TFLOP/s of a window that straddles the switch use the mean of its steps.
    prog = train.Program(*[None] * 12, flops_per_step=1.0, dense_from=90, dense_flops_per_step=3.0,
                         compile_dense=lambda: "dense")
    assert prog.mean_flops_per_step(80, 90) == 1.0 and prog.mean_flops_per_step(90, 100) == 3.0
    assert prog.mean_flops_per_step(85, 95) == 2.0
    assert prog.step_for(95) == "dense" and prog.step_for(90) is None  # `step` (None here) up to the switch.


def test_switch_logs_the_dense_phase_and_resume_on_both_sides_is_bitwise(tmp_path, monkeypatch):
    programs = []
    setup = train.setup
    monkeypatch.setattr(train, "setup", lambda c: programs.append(setup(c)) or programs[-1])

    straight = train.train_and_evaluate(config(), str(tmp_path / "a"))
    a = rows(tmp_path / "a")
    assert [a[k]["drop_ratio"] for k in (1, 2, 3, 4)] == [0.75, 0.75, 0.0, 0.0]
    # Exactly one more program, compiled once at the switch and reused.
    prog = programs[0]
    assert prog.dense_from == 2 and list(prog._compiled) == ["dense"]
    assert prog.step_for(2) is prog.step and prog.step_for(3) is prog.step_for(4) is not prog.step

    # The same run without the fine-tune has the same first two steps and different last two.
    no_ft = tmp_path / "no_ft"
    train.train_and_evaluate(config(frac=0.0), str(no_ft))
    b = rows(no_ft)
    assert a[2]["loss"] == b[2]["loss"] and a[3]["loss"] != b[3]["loss"] and b[4]["drop_ratio"] == 0.75

    for stop in (1, 3):  # Resume before and after the switch.
        workdir = str(tmp_path / f"stop{stop}")
        train.train_and_evaluate(config(stop_at_step=stop), workdir)
        resumed = train.train_and_evaluate(config(), workdir)
        assert_trees_equal(straight, resumed)  # params, EMA, optimizer state, step, rng.
        r = rows(workdir)
        assert [r[k]["loss"] for k in (3, 4)] == [a[3]["loss"], a[4]["loss"]]
        assert [r[k]["drop_ratio"] for k in (1, 2, 3, 4)] == [0.75, 0.75, 0.0, 0.0]
