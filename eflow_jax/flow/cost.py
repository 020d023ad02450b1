"""Training cost per example, in dense-full-forward units F (docs/METHOD.md sections 3 and 8).

A pass with gradient costs 3x its forward (backward ~ 2x forward). From the per-sample
forward FLOPs of four kinds of pass,
    'full'    dense full network,            'dropped' full network on the kept tokens,
    'weak'    weak path (middle skipped),    'decoder' decoder blocks + final layer only,
each objective's passes per example are (c_d = dropped/full, c_w = weak/full,
q = a query at another s from a shared trunk: decoder/full when decoupled, else c_d):
  flow_matching   velocity    3 c_d                          (c_d = 1 without token drop)
  solution_flow   velocity    3 + [1 unconditional]                                = 4
                  consistency [1 unc] + [1 mix pass] + 3 graded + 1 target        = 6
  eflow           velocity    3 c_d + [ref]              ref = c_w (path drop) or 1 / c_d (cfg)
                  weak        3 c_w
                  consistency [ref] + [q mix] + 3 c_d + c_d target + [q + c_d MVA] (+ 3q FM)
Brackets are present only when the switch is on (guidance active, mix != 1, MVA, fm_on_con).
With objective.weak_path='skip_half' the weak pass costs 'weak_half' (every other middle block)
instead of 'weak'. With a dense fine-tune (objective.dense_finetune_frac) the last steps run with
c_d = 1: `run_forward_equivalents` gives each phase and their step-weighted mean.
Element-wise work outside the network (interpolation, losses) is ignored.
"""

from __future__ import annotations

import ml_collections

from eflow_jax.flow.objectives import Settings, batch_split, dense_from_step, dense_phase, objective, validate_config

FLOP_KINDS = ("full", "dropped", "weak", "decoder")


def pass_costs(flops: dict[str, float], token_drop: bool, decoupled: bool,
               weak_path: str = "drop_middle") -> dict[str, float]:
    """Forward cost of each kind of pass in units of the dense full forward."""
    weak_kind = "weak_half" if weak_path == "skip_half" else "weak"
    missing = [k for k in (*FLOP_KINDS, weak_kind) if k not in flops]
    if missing or flops["full"] <= 0:
        raise ValueError(f"flops needs positive {FLOP_KINDS} (and weak_half for weak_path='skip_half'); "
                         f"missing {missing}.")
    full = float(flops["full"])
    c_d = flops["dropped"] / full if token_drop else 1.0
    return {
        "dropped": c_d,
        "weak": flops[weak_kind] / full,
        "decoder": flops["decoder"] / full,
        "query": flops["decoder"] / full if decoupled else c_d,
    }


def branch_costs(c: ml_collections.ConfigDict, flops: dict[str, float],
                 decoupled: bool = True) -> dict[str, float]:
    """Per-example cost (F units, forward + backward) of each branch of objective c.name: the cost
    formula of its table entry (objectives.OBJECTIVES), beside the core whose passes it counts."""
    validate_config(c)
    pc = pass_costs(flops, c.token_drop, decoupled, c.weak_path)
    return objective(c.name).costs(Settings.of(c), pc)


def forward_equivalents(c: ml_collections.ConfigDict, flops: dict[str, float], batch_size: int,
                        decoupled: bool = True) -> dict[str, float]:
    """Branch costs, the batch split and the batch-average cost per example.

    Args:
      c: objective config. flops: per-sample forward FLOPs by kind (FLOP_KINDS).
      batch_size: the global (or per-device) batch, for the static split.
      decoupled: whether the network's trunk ignores s (queries are decoder-only).
    Returns:
      dict with per-branch costs (F units), n_full / n_weak / n_consistency, the batch
      average 'per_example' (F units) and 'flops_per_example' (absolute).
    """
    costs = branch_costs(c, flops, decoupled)
    n_full, n_weak, n_con = batch_split(c, batch_size)
    avg = (n_full * costs["velocity"] + n_weak * costs["weak"]
           + n_con * costs["consistency"]) / batch_size
    return dict(costs, n_full=n_full, n_weak=n_weak, n_consistency=n_con, per_example=avg,
                flops_per_example=avg * float(flops["full"]))


def run_forward_equivalents(c: ml_collections.ConfigDict, flops: dict[str, float], batch_size: int,
                            total_steps: int, decoupled: bool = True) -> dict[str, float]:
    """Both phases of a run with a dense fine-tune, and their step-weighted mean per example.

    Returns dict with 'dropped_steps' (updates before the switch), 'per_example_dropped',
    'per_example_dense' and 'per_example' (the mean over all total_steps), in F units.
    """
    switch = dense_from_step(c, total_steps)
    drop = forward_equivalents(c, flops, batch_size, decoupled)["per_example"]
    dense = forward_equivalents(dense_phase(c), flops, batch_size, decoupled)["per_example"]
    mean = (switch * drop + (total_steps - switch) * dense) / total_steps
    return dict(dropped_steps=switch, per_example_dropped=drop, per_example_dense=dense, per_example=mean)
