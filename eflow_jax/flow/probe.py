"""One held-out probe that every objective is measured on, so learning curves line up.

Each objective logs its own losses on its own targets (solution flow's velocity target mixes in
0.75 sg F, eflow's is path-drop guided), so their `vel_mse` curves are not comparable. The probe
is: a fixed batch of held-out clips, fixed noise and a fixed grid of times, and the dense
conditional velocity error

    probe_vel_err = mean (F(x_t, t, t, c) - v_t)^2,   v_t = eps - x0,

plus the health signals that showed eflow's collapse (docs/METHOD.md, "Why MVA is weighted by
w_c"): the rms of the fused trunk the decoder sees, and how much F depends on the condition, on s
and on the middle blocks (F - F_weak). A network that learns moves all of them away from 0; the
collapsed one kept them near 0 while its trunk grew ~40x.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.flow import interpolant as path
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import Network, Params


class Probe(NamedTuple):
    """Fixed inputs of the probe (all leading with the probe batch axis)."""

    x_t: jax.Array  # noised clips [n, T, H, W, C]
    v_t: jax.Array  # conditional velocity eps - x0
    t: jax.Array  # float [n]: the stratified grid (i + 0.5) / n, so every noise level is covered
    cond: Condition  # the clips' own condition (labels or captions)


def make_probe(clips: np.ndarray, cond: Condition, seed: int = 0) -> Probe:
    """The probe for held-out `clips` [n, T, H, W, C] (model space) and their condition."""
    x0 = jnp.asarray(clips, jnp.float32)
    n = x0.shape[0]
    eps = jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32)
    t = (jnp.arange(n, dtype=jnp.float32) + 0.5) / n
    x_t, v_t = path.interpolate(x0, eps, t, "linear")
    return Probe(x_t, v_t, t, jax.tree.map(jnp.asarray, cond))


def _rms(a: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(a.astype(jnp.float32))))


def probe_metrics(net: Network, params: Params, probe: Probe) -> dict[str, jax.Array]:
    """Scalar probe metrics (all dense, no token drop), jit-able.

    Returns:
      probe_vel_err: mean (F(x_t,t,t,c) - v_t)^2 (an untrained net scores ~E|v_t|^2 ~ 1.3-2).
      probe_label_gap: rms(F(.., c) - F(.., null)): 0 means the condition (label or text) is ignored.
      probe_s_gap: rms(F(x_t,t,t/2,c) - F(x_t,t,t,c)): 0 means F ignores s (no solution map).
      probe_weak_gap: rms(F - F_weak): 0 means the middle blocks do nothing.
      probe_trunk_rms: rms of the fused trunk tokens (decoupled networks only).
    """
    x_t, t, cond = probe.x_t, probe.t, probe.cond
    trunk = net.encode(params, x_t, t, cond, None, False)
    F = net.decode(params, trunk, t, t)
    out = {
        "probe_vel_err": jnp.mean(jnp.square(F - probe.v_t)),
        "probe_label_gap": _rms(F - net(params, x_t, t, t, cond.nulled())),
        "probe_s_gap": _rms(net.decode(params, trunk, t, 0.5 * t) - F),
        "probe_weak_gap": _rms(F - net.weak(params, x_t, t, cond)),
    }
    if net.decoupled:
        out["probe_trunk_rms"] = _rms(trunk["h"])
    return out
