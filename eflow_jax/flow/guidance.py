"""Guidance baked into training targets (docs/METHOD.md sections 3 and 5).

The guided velocity target is
    v~ = v_t + c(t) (w - 1) (v_t - v_ref),   then   v~ <- m v~ + (1 - m) sg v_pred,
and samples whose label was dropped keep the plain conditional velocity v_t. v_ref is
- 'cfg' (SoFlow): the full network at the null label, sg F(x_t, t, t, null);
- 'path_drop' (EFlow): the weak path (middle blocks skipped) at the null label,
  sg F^weak(x_t, t, t, null), i.e. autoguidance by a weak model inside the same network.
The decay c(t) switches guidance off smoothly near pure noise (t > tau_d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from eflow_jax.flow.interpolant import bcast
from eflow_jax.flow.network import Keep, Network, Params, frozen

GUIDANCE_MODES = ("none", "cfg", "path_drop")


def decay_scale(t: jax.Array, tau_d: float = 0.8, k: float = 0.025) -> jax.Array:
    """c(t): 1 for t <= tau_d, then 1 - exp(-k d / (1 - d)) with d = (1 - t) / (1 - tau_d).

    d is clipped to [0, 1 - 1e-6], so c -> 1 - exp(-k 1e6) ~ 1 at t = tau_d and c -> 0 at
    t = 1; with k = 0.025 guidance is effectively off above t ~ 0.85. tau_d >= 1 disables
    the decay (c = 1 everywhere), as in SoFlow.
    """
    t = jnp.asarray(t, jnp.float32)
    if tau_d >= 1.0:
        return jnp.ones_like(t)
    d = jnp.clip((1.0 - t) / (1.0 - tau_d), 0.0, 1.0 - 1e-6)
    decayed = 1.0 - jnp.exp(-k * (d / (1.0 - d)))
    return jnp.where(t <= tau_d, 1.0, decayed)


def guided_velocity(
    v_t: jax.Array, v_ref: jax.Array, t: jax.Array, scale: float, tau_d: float, k: float
) -> jax.Array:
    """v_t + c(t) (w - 1) (v_t - v_ref): the conditional velocity pushed away from v_ref."""
    c = bcast(decay_scale(t, tau_d, k) * (scale - 1.0), v_t)
    return v_t + c * (v_t - v_ref)


def guided_target(
    v_t: jax.Array,
    v_ref: jax.Array,
    v_pred: jax.Array | None,
    t: jax.Array,
    uncond_mask: jax.Array,
    *,
    scale: float,
    mix: float,
    tau_d: float,
    k: float,
) -> jax.Array:
    """The stop-gradient training target (SoFlow's guided, mixed, masked velocity).

    Args:
      v_t: conditional velocity eps - x0 [B, ...]. v_ref: reference velocity (unconditional
        or weak). v_pred: the model's own conditional prediction (only read when mix != 1).
      t: times [B]. uncond_mask: bool [B], True where the label was dropped.
      scale: guidance scale w. mix: m. tau_d, k: decay parameters.
    Returns:
      target [B, ...] with no gradient.
    """
    target = guided_velocity(v_t, v_ref, t, scale, tau_d, k)
    if mix != 1.0:
        if v_pred is None:
            raise ValueError("mix != 1 needs the model's own prediction v_pred.")
        target = mix * target + (1.0 - mix) * v_pred
    target = jnp.where(bcast(uncond_mask, v_t) > 0, v_t, target)
    return jax.lax.stop_gradient(target)


def cfg_reference(
    net: Network, params: Params, x_t: jax.Array, t: jax.Array, keep: Keep = None
) -> jax.Array:
    """sg F(x_t, t, t, null) through the full path (dense unless keep is given)."""
    null = jnp.full(t.shape, net.null_label, jnp.int32)
    return jax.lax.stop_gradient(net(frozen(params), x_t, t, t, null, keep))


def path_drop_reference(
    net: Network, params: Params, x_t: jax.Array, t: jax.Array, label: jax.Array | None = None,
    path: str = "drop_middle",
) -> jax.Array:
    """sg F^weak(x_t, t, t, label) through the weak path `path` (Network.weak); label None = null."""
    if label is None:
        label = jnp.full(t.shape, net.null_label, jnp.int32)
    return jax.lax.stop_gradient(net.weak(frozen(params), x_t, t, label, path=path))


def guidance_active(mode: str, scale: float) -> bool:
    """Whether targets are guided at all (SoFlow guides only when w > 1)."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"Unknown guidance {mode!r}; use one of {GUIDANCE_MODES}.")
    return mode != "none" and scale > 1.0
