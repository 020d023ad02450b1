"""Noising path x_t = alpha_t x_0 + beta_t eps and the Euler solution-map coefficients.

Time runs from t=0 (data) to t=1 (noise), as in SoFlow (docs/METHOD.md section 2). The default
path is linear (alpha = 1 - t, beta = t, so the conditional velocity is eps - x_0); 'trig'
(alpha = cos(pi t / 2), beta = sin(pi t / 2)) is kept as an option because SoFlow offers it.
The solution map always uses the Euler coefficients a(t, s) = 1, b(t, s) = s - t, so
f(x, t, s) = x + (s - t) F(x, t, s), f(x, t, t) = x and v(x, t) = F(x, t, t).

Every function takes per-sample times of shape [B] and data of any rank [B, ...].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

INTERPOLANTS = ("linear", "trig")


def bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """Reshape a per-sample [B] vector so it broadcasts against a [B, ...] tensor."""
    v = jnp.asarray(v)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim)).astype(like.dtype)


def _check(kind: str) -> None:
    if kind not in INTERPOLANTS:
        raise ValueError(f"Unknown interpolant {kind!r}; use one of {INTERPOLANTS}.")


def alpha(t: jax.Array, kind: str = "linear") -> jax.Array:
    """Data coefficient alpha_t."""
    _check(kind)
    return 1.0 - t if kind == "linear" else jnp.cos(0.5 * jnp.pi * t)


def beta(t: jax.Array, kind: str = "linear") -> jax.Array:
    """Noise coefficient beta_t."""
    _check(kind)
    return t if kind == "linear" else jnp.sin(0.5 * jnp.pi * t)


def alpha_dot(t: jax.Array, kind: str = "linear") -> jax.Array:
    """d alpha_t / dt."""
    _check(kind)
    if kind == "linear":
        return -jnp.ones_like(t)
    return -0.5 * jnp.pi * jnp.sin(0.5 * jnp.pi * t)


def beta_dot(t: jax.Array, kind: str = "linear") -> jax.Array:
    """d beta_t / dt."""
    _check(kind)
    if kind == "linear":
        return jnp.ones_like(t)
    return 0.5 * jnp.pi * jnp.cos(0.5 * jnp.pi * t)


def interpolate(
    x0: jax.Array, eps: jax.Array, t: jax.Array, kind: str = "linear"
) -> tuple[jax.Array, jax.Array]:
    """Noised sample and its conditional velocity.

    Args:
      x0: clean data [B, ...]. eps: Gaussian noise like x0. t: times [B].
      kind: 'linear' or 'trig'.
    Returns:
      (x_t, v_t) with x_t = alpha_t x0 + beta_t eps and v_t = alpha'_t x0 + beta'_t eps.
    """
    x_t = bcast(alpha(t, kind), x0) * x0 + bcast(beta(t, kind), x0) * eps
    v_t = bcast(alpha_dot(t, kind), x0) * x0 + bcast(beta_dot(t, kind), x0) * eps
    return x_t, v_t


def renoise(x0_hat: jax.Array, eps: jax.Array, t: jax.Array, kind: str = "linear") -> jax.Array:
    """Put a clean estimate back on the path at time t (the multistep sampler's renoise)."""
    return bcast(alpha(t, kind), x0_hat) * x0_hat + bcast(beta(t, kind), x0_hat) * eps


def solution_map(x: jax.Array, F: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """Euler parameterisation f = a(t,s) x + b(t,s) F with a = 1, b = s - t."""
    return x + bcast(s - t, x) * F


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, s: jax.Array) -> jax.Array:
    """x + (s - t) v: an Euler step from t to s along velocity v."""
    return x + bcast(s - t, x) * v


def dbds_at_diagonal(t: jax.Array) -> jax.Array:
    """d b(t, s) / ds at s = t for the Euler coefficients (= 1); enters the velocity weight."""
    return jnp.ones_like(t)
