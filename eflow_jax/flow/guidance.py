"""Guidance baked into training targets (docs/METHOD.md sections 3 and 5).

The guided velocity target is
    v~ = v_t + c(t) (w - 1) (v_t - v_ref),   then   v~ <- m v~ + (1 - m) sg v_pred,
and samples whose label was dropped keep the plain conditional velocity v_t. v_ref is
- 'cfg' (SoFlow): the full network at the null condition, sg F(x_t, t, t, null);
- 'path_drop' (EFlow): the weak path (middle blocks skipped) at the null condition,
  sg F^weak(x_t, t, t, null), i.e. autoguidance by a weak model inside the same network.
The reference passes are run by the objectives' cores (objectives.py), which decide what merges.
The decay c(t) switches guidance off smoothly near pure noise (t > tau_d).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from eflow_jax.flow.interpolant import bcast

GUIDANCE_MODES = ("none", "cfg", "path_drop")
WEAK_LABELS = ("null", "cond", "independent")


class Guidance(NamedTuple):
    """Static guidance settings of a training target (mode 'none': unguided targets)."""

    mode: str = "none"  # 'none' | 'cfg' | 'path_drop'
    scale: float = 1.0
    mix: float = 1.0
    tau_d: float = 1.0
    k: float = 0.025
    # Condition of the weak reference: 'null' (SPRINT) or 'cond' (pure autoguidance ablation);
    # 'independent' guides from null too (it only changes how the weak sub-batch is drawn).
    weak_label: str = "null"
    uncond_dropped: bool = False  # cfg ablation: run the unconditional pass token-dropped
    weak_path: str = "drop_middle"  # or 'skip_half' (STG-style ablation): see Network.weak

    @property
    def active(self) -> bool:
        return guidance_active(self.mode, self.scale)


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


def guidance_active(mode: str, scale: float) -> bool:
    """Whether targets are guided at all (SoFlow guides only when w > 1)."""
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"Unknown guidance {mode!r}; use one of {GUIDANCE_MODES}.")
    return mode != "none" and scale > 1.0
