"""The loss formulas, each once, as functions of arrays: no network calls here.

The objectives' cores (objectives.py) decide which network passes run (and which are merged)
and hand their outputs to these formulas. Every function returns per-sample values [n]; all
reductions are per sample over every non-batch axis, so the same code serves [B, D] toys and
[B, T, H, W, C] video. Weights follow SoFlow (docs/METHOD.md section 3), sg = stop-gradient:

  velocity     w_v = sg 1 / (|d_s b(t,t)| (mean_d D^2 + eps)^p),   L_v = w_v mean_d D^2
  consistency  dq = sg (f_t - f_l) / (t - l),  w_c = sg 1 / (mean_d dq^2 + eps)^p,
               L_con = sgn(b(t,s)) w_c mean_d(N * dq)   (its gradient equals that of
               w_c (t - l) / |b| * 0.5 mean_d((f_t - sg f_l) / (t - l))^2)
  MVA          D = N - (lam u1 + (1 - lam) u2),  L_mva = w_m mean_d D^2 with w_m = w_c by
               default (the residual relative to the regressed velocity; docs/METHOD.md section 6)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eflow_jax.flow import interpolant as path

MVA_WEIGHTINGS = ("consistency", "adaptive", "none")


def per_sample_mse(delta: jax.Array) -> jax.Array:
    """mean over all non-batch axes of delta^2, in float32 [n]."""
    d = delta.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def per_sample_mean(v: jax.Array) -> jax.Array:
    """mean over all non-batch axes, in float32 [n]."""
    return jnp.mean(v.astype(jnp.float32), axis=tuple(range(1, v.ndim)))


def adaptive_weight(mse: jax.Array, p: float, eps: float, scale: jax.Array | float = 1.0) -> jax.Array:
    """sg 1 / (scale (mse + eps)^p): down-weights samples with large residuals."""
    return jax.lax.stop_gradient(1.0 / (scale * (mse + eps) ** p))


def velocity_loss(
    pred: jax.Array, target: jax.Array, t: jax.Array, p: float, eps: float, adaptive: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample velocity loss of the graded prediction. Returns (loss [n], mse [n], weight [n])."""
    mse = per_sample_mse(pred - jax.lax.stop_gradient(target))
    if adaptive:
        weight = adaptive_weight(mse, p, eps, jnp.abs(path.dbds_at_diagonal(t)))
    else:
        weight = jnp.ones_like(mse)
    return weight * mse, mse, weight


def consistency_loss(
    N: jax.Array, F_l: jax.Array, x_t: jax.Array, x_l: jax.Array, t, s, l, p: float, eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SoFlow's consistency loss of the graded online output N = F(x_t, t, s).

    Args:
      F_l: the target pass F(x_l, l, s) (stop-gradient), run at x_l = x_t + (l - t) v_step.
      t, s, l: times [n].
    Returns:
      (loss [n], dq_mse [n], w_c [n]).
    """
    f_l = path.solution_map(x_l, jax.lax.stop_gradient(F_l), l, s)  # Only in sg dq.
    f_t = path.solution_map(x_t, N, t, s)
    dq = jax.lax.stop_gradient((f_t - f_l) / path.bcast(t - l, f_t))
    dq_mse = per_sample_mse(dq)
    weight = adaptive_weight(dq_mse, p, eps)
    sign_b = jnp.sign(s - t).astype(jnp.float32)
    return sign_b * weight * per_sample_mean(N * dq), dq_mse, weight


def mva_loss(
    N: jax.Array, u1: jax.Array, u2: jax.Array, lam: jax.Array, *, weighting: str, con_weight: jax.Array,
    p: float, eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mean-velocity additivity: N should equal lam u1 + (1 - lam) u2 (docs/METHOD.md section 6).

    Args:
      u1: sg F(x_t, t, m); u2: sg F(x_m, m, s) with x_m = x_t + (m - t) u1 and m = t + lam (s - t).
      weighting: 'consistency' (default): the consistency weight w_c (`con_weight`), i.e. the
        residual relative to the size of the velocity the sample regresses. 'adaptive':
        sg 1/(residual + eps)^p, relative to itself; at init F = 0 is exactly additive, so this
        weight starts at 1/eps = 100 and pins F to the trivially additive (s- and condition-blind)
        solution: eflow then does not learn (kept only as an ablation). 'none': plain mean squares.
    Returns:
      (loss [n], residual = mean_d Delta^2 [n], weight [n]).
    """
    u1, u2 = jax.lax.stop_gradient(u1), jax.lax.stop_gradient(u2)
    lam_b = path.bcast(lam, N)
    residual = per_sample_mse(N - (lam_b * u1 + (1.0 - lam_b) * u2))
    if weighting == "consistency":
        weight = jax.lax.stop_gradient(con_weight)
    elif weighting == "adaptive":
        weight = adaptive_weight(residual, p, eps)
    elif weighting == "none":
        weight = jnp.ones_like(residual)
    else:
        raise ValueError(f"mva weighting={weighting!r}; use one of {MVA_WEIGHTINGS}.")
    return weight * residual, residual, weight
