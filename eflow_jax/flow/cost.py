"""Training cost per example, in dense-full-forward units F (METHOD.md sections 3 and 8).

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
Element-wise work outside the network (interpolation, losses) is ignored.
"""

from __future__ import annotations

import ml_collections

from eflow_jax.flow.guidance import guidance_active
from eflow_jax.flow.objectives import split_sizes, validate_config

FLOP_KINDS = ("full", "dropped", "weak", "decoder")


def pass_costs(flops: dict[str, float], token_drop: bool, decoupled: bool) -> dict[str, float]:
    """Forward cost of each kind of pass in units of the dense full forward."""
    missing = [k for k in FLOP_KINDS if k not in flops]
    if missing or flops["full"] <= 0:
        raise ValueError(f"flops needs positive {FLOP_KINDS}; missing {missing}.")
    full = float(flops["full"])
    c_d = flops["dropped"] / full if token_drop else 1.0
    return {
        "dropped": c_d,
        "weak": flops["weak"] / full,
        "decoder": flops["decoder"] / full,
        "query": flops["decoder"] / full if decoupled else c_d,
    }


def branch_costs(c: ml_collections.ConfigDict, flops: dict[str, float],
                 decoupled: bool = True) -> dict[str, float]:
    """Per-example cost (F units, forward + backward) of each branch of objective c.name."""
    validate_config(c)
    guided = guidance_active(c.guidance, float(c.guidance_scale))
    mix_pass = guided and c.mix != 1.0 and not c.fm_on_con
    if c.name == "flow_matching":
        pc = pass_costs(flops, c.token_drop, decoupled)
        return {"velocity": 3.0 * pc["dropped"], "weak": 0.0, "consistency": 0.0}
    if c.name == "solution_flow":  # dense, every query a separate full pass
        ref = 1.0 if guided else 0.0
        fm = 3.0 if c.fm_on_con else 0.0
        return {"velocity": 3.0 + ref, "weak": 0.0,
                "consistency": ref + (1.0 if mix_pass else 0.0) + 3.0 + 1.0 + fm}
    pc = pass_costs(flops, c.token_drop, decoupled)
    c_d, q = pc["dropped"], pc["query"]
    if not guided:
        ref = 0.0
    elif c.guidance == "path_drop":
        ref = pc["weak"]
    else:
        ref = c_d if c.cfg_uncond_dropped else 1.0
    mva = (q + c_d) if c.mva.enabled and c.mva.beta > 0 else 0.0
    fm = 3.0 * q if c.fm_on_con else 0.0
    return {
        "velocity": 3.0 * c_d + ref,
        "weak": 3.0 * pc["weak"],
        "consistency": ref + (q if mix_pass else 0.0) + 3.0 * c_d + c_d + mva + fm,
    }


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
    n_full, n_weak, n_con = split_sizes(c, batch_size)
    avg = (n_full * costs["velocity"] + n_weak * costs["weak"]
           + n_con * costs["consistency"]) / batch_size
    return dict(costs, n_full=n_full, n_weak=n_weak, n_consistency=n_con, per_example=avg,
                flops_per_example=avg * float(flops["full"]))
