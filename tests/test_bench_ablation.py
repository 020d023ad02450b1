"""bench.train --suite=ablation: valid rows, one switch apart, and the cost model's predicted examples/s."""

import pytest

from eflow_jax import sharding, train
from eflow_jax.bench import train as bench_train
from eflow_jax.flow import cost
from eflow_jax.models import dit

# What each row switches on top of the previous one (flattened config paths).
SWITCHES = [
    {"model.mode"},  # + GLGA attention
    {"objective.name", "objective.token_drop", "objective.cfg_uncond_dropped", "model.keep_per_group"},  # + drop
    {"objective.guidance", "objective.weak_ratio", "objective.cfg_uncond_dropped"},  # + path-drop target
    {"model.decoupled"},  # + decoupled trunk reuse
    {"objective.mva.enabled"},  # + MVA = eflow
]


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
    return out


@pytest.mark.parametrize("suite", ["ablation", "ablation_L"])
def test_rows_are_valid_and_one_switch_apart(suite):
    geometry = bench_train.SUITES[suite]
    assert set(geometry["settings"]) == set(bench_train.ABLATION) and geometry["settings"][:2] == (
        "abl0_soflow_dense", "abl5_mva_eflow")  # The two ends first (a time budget keeps the ratio).
    configs = [bench_train.build(geometry, name, "bfloat16", "none") for name in bench_train.ABLATION]
    for c in configs:
        train.validate(c, sharding.make_mesh(c.mesh))
    flat = [_flat(c.to_dict()) for c in configs]
    for before, after, switch in zip(flat[:-1], flat[1:], SWITCHES, strict=True):
        assert {k for k in after if after[k] != before.get(k)} == switch
    # The last row is the eflow setting of the kinetics suite (its token-dropped phase).
    eflow = _flat(bench_train.build(geometry, "eflow", "bfloat16", "none").to_dict())
    assert {k for k in eflow if eflow[k] != flat[-1][k]} == {"objective.dense_finetune_frac"}
    # The cost model's FLOPs per example: each switch but MVA makes a step cheaper.
    costs = [cost.forward_equivalents(c.objective, dit.count_flops(c.model).as_dict(), c.batch_size,
                                      c.model.decoupled)["flops_per_example"] for c in configs]
    assert costs[0] > costs[1] > costs[2] > costs[3] > costs[4] < costs[5] < costs[0] / 2


def test_predicted_examples_per_s_scale_row_zero_by_the_cost_ratio():
    rows = [dict(setting="abl0_soflow_dense", examples_per_s=100.0, pipelined_examples_per_s=110.0,
                 gflop_per_example=400.0),
            dict(setting="abl5_mva_eflow", examples_per_s=180.0, pipelined_examples_per_s=200.0,
                 gflop_per_example=200.0),
            dict(setting="abl1_glga", skipped="budget")]
    bench_train.predictions(rows, "abl0_soflow_dense")
    assert rows[0]["measured_over_predicted"] == 1.0
    assert rows[1]["predicted_examples_per_s"] == 200.0 and rows[1]["measured_over_predicted"] == 0.9
    assert rows[1]["pipelined_measured_over_predicted"] == pytest.approx(200 / 220)
    assert rows[1]["speedup_vs_reference"] == 1.8 and rows[1]["cost_model_speedup_vs_reference"] == 2.0
    assert "predicted_examples_per_s" not in rows[2]
    md = bench_train.ablation_markdown(rows, "t")
    assert md.index("abl0_soflow_dense") < md.index("abl1_glga") < md.index("abl5_mva_eflow")
    assert "measured 1.80x, cost model 2.00x" in md


def test_budget_estimates_a_deeper_variant_from_the_compiles_seen():
    assert bench_train._row_estimate_s({}, "B", False) == 15.0  # Nothing seen: the first row always runs.
    assert bench_train._row_estimate_s({"B": 60.0}, "B", True) == 60.0 + 15.0 + 25.0
    assert bench_train._row_estimate_s({"B": 60.0}, "L", False) == 60.0 * 24 / 12 + 15.0
