"""Time samplers of the objectives (docs/METHOD.md section 3, SoFlow's ImageNet recipe).

- Velocity samples: t = sigmoid(N(-0.2, 1)).
- Consistency samples: u1 = sigmoid(N(-1, 0.8)), u2 = sigmoid(N(0.2, 0.8)),
  t = max(u2, 1e-4), s = min(u1, t - 1e-4), so 0 <= s < t <= 1.
- Intermediate time of the consistency loss: l = t + (s - t) r(k) with the exponential
  schedule r(k) = r0 (r1 / r0)^(k / K), then l = min(l, t - 1e-4).
- Optional SD3-style shift t -> shift t / (1 + (shift - 1) t) (monotone, so s < t is kept),
  for sweeps on video where more tokens want noisier times. shift = 1 is the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def logit_normal(rng: jax.Array, n: int, mean: float, std: float) -> jax.Array:
    """n samples of sigmoid(N(mean, std^2)), float32 [n]."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(rng, (n,), jnp.float32))


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """SD3-style resolution shift; identity for shift = 1."""
    if shift == 1.0:
        return t
    if shift <= 0.0:
        raise ValueError(f"time shift must be > 0, got {shift}.")
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_velocity_times(
    rng: jax.Array, n: int, mean: float = -0.2, std: float = 1.0, shift: float = 1.0
) -> jax.Array:
    """Times t [n] for the velocity (flow-matching) loss."""
    return shift_time(logit_normal(rng, n, mean, std), shift)


def sample_consistency_times(
    rng: jax.Array,
    n: int,
    s_mean: float = -1.0,
    s_std: float = 0.8,
    t_mean: float = 0.2,
    t_std: float = 0.8,
    min_gap: float = 1e-4,
    shift: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Pairs (t, s) [n] for the consistency loss, with s <= t - min_gap.

    Returns:
      (t, s): t = max(u2, min_gap), s = min(u1, t - min_gap) as in SoFlow.
    """
    rng_s, rng_t = jax.random.split(rng)
    u1 = shift_time(logit_normal(rng_s, n, s_mean, s_std), shift)
    u2 = shift_time(logit_normal(rng_t, n, t_mean, t_std), shift)
    t = jnp.maximum(u2, min_gap)
    s = jnp.minimum(u1, t - min_gap)
    return t, s


def snap_endpoints(
    rng: jax.Array, t: jax.Array, s: jax.Array, prob: float, min_gap: float = 1e-4
) -> tuple[jax.Array, jax.Array]:
    """MVA ablation: set t = 1 and s = 0 independently with probability `prob` each.

    The sampler only ever queries f(., tau_i, 0), so snapping trains those endpoints more.
    """
    if prob <= 0.0:
        return t, s
    rng_t, rng_s = jax.random.split(rng)
    t = jnp.where(jax.random.uniform(rng_t, t.shape) < prob, 1.0, t)
    s = jnp.where(jax.random.uniform(rng_s, s.shape) < prob, 0.0, s)
    return t, jnp.minimum(s, t - min_gap)


def l_ratio(
    step: jax.Array | int, total_steps: int, r0: float = 0.1, r1: float = 0.002
) -> jax.Array:
    """Exponential schedule r(k) = r0 (r1 / r0)^(k / K) (SoFlow's 'Exponent')."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    frac = jnp.asarray(step, jnp.float32) / float(total_steps)
    return r0 * (r1 / r0) ** frac


def intermediate_time(
    t: jax.Array, s: jax.Array, ratio: jax.Array | float, min_gap: float = 1e-4
) -> jax.Array:
    """l = min(t + (s - t) ratio, t - min_gap): the near-t point of the consistency loss."""
    return jnp.minimum(t + (s - t) * ratio, t - min_gap)
