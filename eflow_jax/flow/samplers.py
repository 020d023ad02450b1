"""Samplers (docs/METHOD.md section 9); all pure, jit-able, with a static number of steps.

Few-step solution-map samplers (no CFG at inference: guidance is baked in by training):
- `renoise_sample`: SoFlow's multistep sampler on the grid tau_i = 1 - i/N. For i < N-1,
  x0_hat = f(x, tau_i, 0) and x = alpha(tau_{i+1}) x0_hat + beta(tau_{i+1}) eps_i with fresh
  noise; the last step returns f(x, tau_{N-1}, 0). N NFE.
- `chain_sample`: the deterministic chain x <- f(x, tau_i, tau_{i+1}). N NFE.
Iterative flow-matching baselines, guided by CFG (unconditional half batched with the
conditional one: 2 NFE per velocity evaluation) or by path drop (weak path at the null label):
- `euler_sample`: N uniform Euler steps from t=1 to 0 (50 steps = 100 NFE with CFG).
- `heun_sample`: Heun's method, 2 velocity evaluations per step.
Deterministic given (noise, rng). Every sampler is one lax.fori_loop over the time grid, so the
compiled program (and its compile time) does not grow with the number of steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.flow import interpolant as path
from eflow_jax.flow.condition import Condition, join
from eflow_jax.flow.guidance import GUIDANCE_MODES
from eflow_jax.flow.network import Network, Params


def time_grid(num_steps: int) -> list[float]:
    """tau_i = 1 - i/N for i = 0..N (static Python floats)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
    return [1.0 - i / num_steps for i in range(num_steps + 1)]


def _full(x: jax.Array, value) -> jax.Array:
    """Per-sample time [B] (float32, or float64 when x is float64)."""
    return jnp.full((x.shape[0],), value, jnp.result_type(x.dtype, jnp.float32))


def _grid_array(num_steps: int, x: jax.Array) -> jax.Array:
    """time_grid as a constant array, rounded exactly as the per-step Python floats would be."""
    return jnp.asarray(np.asarray(time_grid(num_steps)), jnp.result_type(x.dtype, jnp.float32))


def _as_typed_keys(rng: jax.Array) -> jax.Array:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)  # A raw uint32 key [2] (or [B, 2]).


def renoise_sample(
    net: Network, params: Params, noise: jax.Array, cond: Condition, num_steps: int,
    rng: jax.Array, interpolant: str = "linear",
) -> jax.Array:
    """SoFlow's renoising multistep sampler.

    Args:
      noise: the starting x at t = 1 [B, ...]. cond: the samples' condition. num_steps: N (static).
      rng: fresh-noise key for the N - 1 renoising steps: one key for the batch, or one key per
        sample [B] (then each sample's fresh noise depends on its own key only, so how samples are
        batched never changes a sample).
    Returns:
      samples at t = 0, like noise.
    """
    grid = _grid_array(num_steps, noise)
    rng = _as_typed_keys(rng)
    if rng.ndim == 0:
        keys = jax.random.split(rng, max(num_steps - 1, 1))
        fresh_noise = lambda i, x: jax.random.normal(keys[i], x.shape, x.dtype)  # noqa: E731
    else:
        fresh_noise = lambda i, x: jax.vmap(  # noqa: E731
            lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(rng)
    zero = lambda x: _full(x, 0.0)  # noqa: E731

    def step(i, x):
        x0_hat = net.solution(params, x, _full(x, grid[i]), zero(x), cond)
        return path.renoise(x0_hat, fresh_noise(i, x), _full(x, grid[i + 1]), interpolant)

    x = jax.lax.fori_loop(0, num_steps - 1, step, noise)
    return net.solution(params, x, _full(x, grid[num_steps - 1]), zero(x), cond)


def chain_sample(
    net: Network, params: Params, noise: jax.Array, cond: Condition, num_steps: int
) -> jax.Array:
    """Deterministic chain of solution maps x <- f(x, tau_i, tau_{i+1})."""
    grid = _grid_array(num_steps, noise)

    def step(i, x):
        return net.solution(params, x, _full(x, grid[i]), _full(x, grid[i + 1]), cond)

    return jax.lax.fori_loop(0, num_steps, step, noise)


def guided_velocity_fn(net: Network, params: Params, cond: Condition, scale: float, guidance: str):
    """Returns v(x, t) = v_ref + w (v_cond - v_ref), the inference-time guided velocity.

    guidance 'cfg': v_ref = F(x, t, t, null), computed in one batched call with the
    conditional half. 'path_drop': v_ref = F^weak(x, t, t, null). 'none' (or w = 1): v_cond.
    null is the network's learned null condition (flow/condition.py).
    """
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"Unknown guidance {guidance!r}; use one of {GUIDANCE_MODES}.")
    null = cond.nulled()

    def velocity(x: jax.Array, t: jax.Array) -> jax.Array:
        if guidance == "none" or scale == 1.0:
            return net(params, x, t, t, cond)
        if guidance == "cfg":
            xx, tt = jnp.concatenate([x, x]), jnp.concatenate([t, t])
            v_cond, v_unc = jnp.split(net(params, xx, tt, tt, join(cond, null)), 2)
            return v_unc + scale * (v_cond - v_unc)
        v_cond, v_weak = net(params, x, t, t, cond), net.weak(params, x, t, null)
        return v_weak + scale * (v_cond - v_weak)

    return velocity


def euler_sample(
    net: Network, params: Params, noise: jax.Array, cond: Condition, num_steps: int,
    guidance_scale: float = 1.0, guidance: str = "cfg",
) -> jax.Array:
    """Euler ODE solve from t = 1 to 0 with num_steps uniform steps (a lax.fori_loop)."""
    velocity = guided_velocity_fn(net, params, cond, guidance_scale, guidance)
    grid = _grid_array(num_steps, noise)

    def step(i, x):
        t, s = _full(x, grid[i]), _full(x, grid[i + 1])
        return path.euler_step(x, velocity(x, t), t, s)

    return jax.lax.fori_loop(0, num_steps, step, noise)


def heun_sample(
    net: Network, params: Params, noise: jax.Array, cond: Condition, num_steps: int,
    guidance_scale: float = 1.0, guidance: str = "cfg",
) -> jax.Array:
    """Heun (trapezoidal predictor-corrector) ODE solve from t = 1 to 0."""
    velocity = guided_velocity_fn(net, params, cond, guidance_scale, guidance)
    grid = _grid_array(num_steps, noise)

    def step(i, x):
        t, s = _full(x, grid[i]), _full(x, grid[i + 1])
        v1 = velocity(x, t)
        x_pred = path.euler_step(x, v1, t, s)
        v2 = velocity(x_pred, s)
        return path.euler_step(x, 0.5 * (v1 + v2), t, s)

    return jax.lax.fori_loop(0, num_steps, step, noise)
