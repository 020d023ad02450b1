"""2-D toy data with known ground truth, for the toy benchmark and closed-form tests.

Both data sets are Gaussian mixtures p_0 = sum_k pi_k N(mu_k, sigma^2 I), so under the linear
interpolant x_t = (1 - t) x_0 + t eps every marginal is a mixture too,
    p_t = sum_k pi_k N((1 - t) mu_k, std_t^2 I),   std_t^2 = (1 - t)^2 sigma^2 + t^2,
and the exact marginal velocity is the posterior-weighted component velocity
    v(x, t) = sum_k r_k(x, t) [-mu_k + (d std_t / dt / std_t) (x - (1 - t) mu_k)].
A single Gaussian has the closed-form flow map (docs/METHOD.md section 11.3)
    Phi_{t->s}(x) = (1 - s) mu + (std_s / std_t) (x - (1 - t) mu).
- 'mog': 4 classes; 8 modes on a circle of radius 2, class c owns the opposite modes c, c+4.
- 'gaussian': one class, N(mu, sigma^2 I) with mu = (1, -0.5), sigma = 0.5.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.flow.guidance import decay_scale


@dataclasses.dataclass(frozen=True)
class Mixture:
    """A class-conditional isotropic Gaussian mixture: mode k has mean means[k], class owner[k]."""

    means: np.ndarray  # [K, D]
    owner: np.ndarray  # [K] class of each mode
    sigma: float
    num_classes: int

    @property
    def dim(self) -> int:
        return self.means.shape[1]


def make_dataset(name: str) -> Mixture:
    """The named toy data set ('mog' or 'gaussian')."""
    if name == "mog":
        angles = np.arange(8) * (2 * np.pi / 8)
        means = 2.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        return Mixture(means.astype(np.float32), np.arange(8) % 4, 0.2, 4)
    if name == "gaussian":
        return Mixture(np.array([[1.0, -0.5]], np.float32), np.zeros(1, int), 0.5, 1)
    raise ValueError(f"Unknown toy data set {name!r}; use 'mog' or 'gaussian'.")


def sample_data(ds: Mixture, rng: jax.Array, y: jax.Array) -> jax.Array:
    """One sample per label in y [B] (each class's modes equally likely) -> [B, D]."""
    rng_mode, rng_noise = jax.random.split(rng)
    per_class = len(ds.owner) // ds.num_classes
    table = jnp.asarray(np.stack([np.flatnonzero(ds.owner == c) for c in range(ds.num_classes)]))
    pick = jax.random.randint(rng_mode, y.shape, 0, per_class)
    mode = table[y, pick]
    noise = jax.random.normal(rng_noise, (y.shape[0], ds.dim))
    return jnp.asarray(ds.means)[mode] + ds.sigma * noise


def marginal_std(t: jax.Array, sigma: float) -> jax.Array:
    """std_t of one component at time t."""
    return jnp.sqrt((1.0 - t) ** 2 * sigma**2 + t**2)


def exact_velocity(ds: Mixture, x: jax.Array, t: jax.Array, y: jax.Array | None) -> jax.Array:
    """Exact marginal velocity at (x [B, D], t [B]); y None = unconditional (all modes)."""
    means = jnp.asarray(ds.means, x.dtype)  # [K, D]
    tt = t[:, None, None]
    var = (1.0 - tt) ** 2 * ds.sigma**2 + tt**2
    centred = x[:, None, :] - (1.0 - tt) * means[None]  # [B, K, D]
    logits = -0.5 * jnp.sum(centred**2, axis=-1) / var[..., 0]
    if y is not None:  # restrict the posterior to the label's modes
        owned = jnp.asarray(ds.owner)[None, :] == y[:, None]
        logits = jnp.where(owned, logits, -jnp.inf)
    resp = jax.nn.softmax(logits, axis=-1)[..., None]
    rate = (tt - (1.0 - tt) * ds.sigma**2) / var  # d std / dt / std
    v_k = -means[None] + rate * centred
    return jnp.sum(resp * v_k, axis=1)


def gaussian_flow_map(
    x: jax.Array, t: jax.Array, s: jax.Array, mu: jax.Array, sigma: float
) -> jax.Array:
    """Phi_{t->s}(x) for data N(mu, sigma^2 I) under the linear interpolant."""
    ratio = (marginal_std(s, sigma) / marginal_std(t, sigma))[:, None]
    return (1.0 - s)[:, None] * mu + ratio * (x - (1.0 - t)[:, None] * mu)


def guided_reference(ds: Mixture, rng: jax.Array, y: jax.Array, scale: float, tau_d: float = 1.0,
                     k: float = 0.025, num_steps: int = 1000) -> jax.Array:
    """Samples of the exact guided ODE dx/dt = v_c + c(t)(w - 1)(v_c - v_u), t: 1 -> 0.

    This is the distribution a guided model should produce; scale = 1 gives the data
    (up to the Euler error of num_steps exact-velocity steps). tau_d >= 1 = constant w.
    """
    x = jax.random.normal(rng, (y.shape[0], ds.dim))
    dt = 1.0 / num_steps

    def step(i, x):
        t = jnp.full((x.shape[0],), 1.0 - i * dt)
        v_c = exact_velocity(ds, x, t, y)
        if scale != 1.0:
            v_u = exact_velocity(ds, x, t, None)
            v_c = v_c + (decay_scale(t, tau_d, k) * (scale - 1.0))[:, None] * (v_c - v_u)
        return x - dt * v_c

    return jax.jit(lambda x: jax.lax.fori_loop(0, num_steps, step, x))(x)


def sliced_wasserstein(
    a: jax.Array, b: jax.Array, rng: jax.Array, num_projections: int = 256
) -> jax.Array:
    """Sliced 1-Wasserstein distance between equal-size point sets a, b [n, D].

    W1 rather than W2: with well-separated modes, W2 is dominated by the sampling noise of
    the mode proportions (mass moved across the whole plane), W1 much less so.
    """
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal shapes, got {a.shape} and {b.shape}.")
    dirs = jax.random.normal(rng, (a.shape[1], num_projections))
    dirs = dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True)
    pa, pb = jnp.sort(a @ dirs, axis=0), jnp.sort(b @ dirs, axis=0)
    return jnp.mean(jnp.abs(pa - pb))


@functools.partial(jax.jit, static_argnums=3)
def class_mean_swd(a: jax.Array, b: jax.Array, rng: jax.Array, num_classes: int) -> jax.Array:
    """Mean over classes of the sliced W1 between a and b [C * n, D], both sorted by class."""
    a = a.reshape(num_classes, -1, a.shape[-1])
    b = b.reshape(num_classes, -1, b.shape[-1])
    return jnp.mean(jax.vmap(lambda u, v: sliced_wasserstein(u, v, rng))(a, b))
