"""Drawing a training batch's randomness: the static sub-batch split, noise, times, condition
drop, token masks and MVA split points (docs/METHOD.md sections 3, 5, 6, 8).

Scoring (objectives.py) is a pure function of what is drawn here, so tests can hand a core any
explicit inputs. The split is static (from the batch size): [full-path velocity | weak velocity |
consistency], in that order.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from eflow_jax.flow import times
from eflow_jax.flow.condition import Condition, take
from eflow_jax.flow.network import Keep, Network


class VelocityBatch(NamedTuple):
    """Inputs of a velocity (flow-matching) sub-batch; all arrays lead with the batch axis."""

    x0: jax.Array  # clean data [n, ...]
    eps: jax.Array  # noise like x0
    t: jax.Array  # float [n]
    cond: Condition  # the sample's own condition (before the condition drop)
    uncond: jax.Array  # bool [n]: condition dropped -> null condition, unguided target
    keep: Keep = None  # per-sample kept-token ids, or None for dense

    @property
    def cond_in(self) -> Condition:
        """The condition the network sees: null where it was dropped."""
        return self.cond.nulled(self.uncond)


class ConsistencyBatch(NamedTuple):
    """Inputs of a consistency sub-batch (SoFlow section 3 plus the MVA split point lam)."""

    x0: jax.Array
    eps: jax.Array
    t: jax.Array  # float [n], t > s
    s: jax.Array  # float [n]
    l: jax.Array  # float [n], s <= l < t: the near-t point of the consistency loss
    cond: Condition
    uncond: jax.Array
    lam: jax.Array  # float [n] in (0, 1): MVA split m = t + lam (s - t)
    keep: Keep = None

    @property
    def cond_in(self) -> Condition:
        return self.cond.nulled(self.uncond)


class Draw(NamedTuple):
    """One batch's sub-batches; a sub-batch of size 0 is None."""

    vel: VelocityBatch | None
    weak: VelocityBatch | None
    con: ConsistencyBatch | None


@dataclasses.dataclass(frozen=True)
class DrawSettings:
    """What `draw` reads, frozen once per run (objectives.Settings.draw holds it)."""

    velocity_ratio: float = 1.0  # phi: the velocity share of the batch
    weak_ratio: float = 0.0  # share of the velocity samples on the weak path
    label_drop: float = 0.1  # condition drop probability (SoFlow's cfg_mask)
    weak_label: str = "null"  # 'independent' draws the weak samples' own condition drop
    token_drop: bool = False
    velocity_mean: float = -0.2
    velocity_std: float = 1.0
    s_mean: float = -1.0
    s_std: float = 0.8
    t_mean: float = 0.2
    t_std: float = 0.8
    min_gap: float = 1e-4
    shift: float = 1.0
    r0: float = 0.1  # l schedule r(k) = r0 (r1 / r0)^(k / K)
    r1: float = 0.002
    snap_prob: float = 0.0
    mva_split: str = "uniform"  # 'uniform' lam ~ U(0, 1) | 'half'


def split_sizes(velocity_ratio: float, weak_ratio: float, batch_size: int) -> tuple[int, int, int]:
    """Static sub-batch sizes (n_full_velocity, n_weak, n_consistency) summing to batch_size.

    n_velocity = int(velocity_ratio * B) as in SoFlow; n_weak = int(weak_ratio * n_velocity).
    """
    n_vel = int(velocity_ratio * batch_size)
    n_weak = int(weak_ratio * n_vel)
    n_con = batch_size - n_vel
    too_small = (
        (velocity_ratio > 0 and n_vel - n_weak == 0)
        or (velocity_ratio < 1 and n_con == 0)
        or (weak_ratio > 0 and n_weak == 0)
    )
    if too_small:
        raise ValueError(
            f"A batch of {batch_size} is too small to split with velocity_ratio={velocity_ratio} and "
            f"weak_ratio={weak_ratio} (got full/weak/consistency = {n_vel - n_weak}/{n_weak}/{n_con}); use a "
            "larger per-device batch or change the ratios."
        )
    return n_vel - n_weak, n_weak, n_con


def draw(d: DrawSettings, net: Network, x0: jax.Array, cond: Condition, rng: jax.Array, step: jax.Array,
         total_steps: int) -> Draw:
    """All of one batch's randomness, from `rng` (the split is static, from x0.shape[0])."""
    batch = x0.shape[0]
    n_full, n_weak, n_con = split_sizes(d.velocity_ratio, d.weak_ratio, batch)
    n_vel = n_full + n_weak
    k = dict(zip(("eps", "drop", "tv", "tc", "snap", "lam", "keep_v", "keep_c"),
                 jax.random.split(rng, 8), strict=True))
    eps = jax.random.normal(k["eps"], x0.shape, x0.dtype)
    uncond = jax.random.uniform(k["drop"], (batch,)) < d.label_drop

    def keep_for(key, n):
        return net.sample_keep(key, n) if d.token_drop else None

    vel = weak = con = None
    if n_vel:
        t_v = times.sample_velocity_times(k["tv"], n_vel, d.velocity_mean, d.velocity_std, d.shift)
        vel = VelocityBatch(x0[:n_full], eps[:n_full], t_v[:n_full], take(cond, 0, n_full), uncond[:n_full],
                            keep_for(k["keep_v"], n_full))
        if n_weak:
            sl = slice(n_full, n_vel)
            # 'independent': the weak samples' own condition drop (path drop and condition drop are
            # independent, as SPRINT draws them); else every weak sample is null (or, for 'cond', the
            # mask is unused: objectives pick the condition).
            weak_uncond = uncond[sl] if d.weak_label == "independent" else jnp.ones((n_weak,), bool)
            weak = VelocityBatch(x0[sl], eps[sl], t_v[n_full:], take(cond, n_full, n_vel), weak_uncond)
    if n_con:
        t, s = times.sample_consistency_times(k["tc"], n_con, d.s_mean, d.s_std, d.t_mean, d.t_std,
                                              d.min_gap, d.shift)
        t, s = times.snap_endpoints(k["snap"], t, s, d.snap_prob, d.min_gap)
        l = times.intermediate_time(t, s, times.l_ratio(step, total_steps, d.r0, d.r1), d.min_gap)
        if d.mva_split == "half":
            lam = jnp.full((n_con,), 0.5, jnp.float32)
        else:  # keep m strictly inside (s, t)
            lam = jax.random.uniform(k["lam"], (n_con,), minval=1e-3, maxval=1.0 - 1e-3)
        con = ConsistencyBatch(x0[n_vel:], eps[n_vel:], t, s, l, take(cond, n_vel), uncond[n_vel:], lam,
                               keep_for(k["keep_c"], n_con))
    return Draw(vel, weak, con)
