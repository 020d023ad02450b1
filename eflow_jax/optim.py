"""The optax chain from config: clip -> AdamW with warmup + schedule."""

from __future__ import annotations

import ml_collections
import optax


def optim_config(**overrides) -> ml_collections.ConfigDict:
    """SoFlow's ImageNet recipe: AdamW lr 1e-4, betas (0.9, 0.99), no weight decay, no clipping."""
    cfg = ml_collections.ConfigDict(dict(
        lr=1e-4, b1=0.9, b2=0.99, weight_decay=0.0, eps=1e-8,
        warmup_steps=0, schedule="constant",  # 'constant' | 'cosine'
        grad_clip=0.0,  # Global-norm clip; 0 = off.
        ema_decay=0.9999, ema_warmup=False,  # Warmup: decay_t = min(decay, (1 + t) / (10 + t)).
    ))
    cfg.update(overrides)
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Settings that cannot train, named with their fix (before anything compiles)."""
    if not cfg.lr > 0:
        raise ValueError(f"optim.lr={cfg.lr}: the learning rate must be > 0 (e.g. --config.optim.lr=1e-4).")
    if cfg.schedule not in ("constant", "cosine"):
        raise ValueError(f"optim.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'.")
    if cfg.warmup_steps < 0 or cfg.grad_clip < 0:
        raise ValueError(f"optim.warmup_steps={cfg.warmup_steps}, optim.grad_clip={cfg.grad_clip}: both must "
                         f"be >= 0 (0 turns them off).")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"optim.ema_decay={cfg.ema_decay}: it must be in [0, 1) (e.g. 0.9999).")


# An EMA without warmup whose horizon 1/(1 - decay) exceeds this share of the run still holds
# decay^total_steps of the init at the end (0.9999 over 3k steps: 74%), so its samples look untrained.
EMA_HORIZON_SHARE = 0.25


def ema_horizon_warning(cfg: ml_collections.ConfigDict, total_steps: int) -> str | None:
    """A warning when the EMA cannot follow a run of `total_steps` (None when it fits).

    With ema_warmup the decay is min(decay, (1 + t) / (10 + t)), which tracks any run length, so
    only a fixed decay is checked.
    """
    if cfg.ema_warmup or cfg.ema_decay == 0.0:
        return None
    horizon = 1.0 / (1.0 - cfg.ema_decay)
    if horizon <= EMA_HORIZON_SHARE * total_steps:
        return None
    init_share = cfg.ema_decay ** total_steps
    return (f"optim.ema_decay={cfg.ema_decay} averages over ~{horizon:.0f} steps, more than "
            f"{EMA_HORIZON_SHARE:.0%} of total_steps={total_steps}: the final EMA params still hold "
            f"{init_share:.0%} of the initial weights. Set --config.optim.ema_warmup=True, or an "
            f"ema_decay <= {1.0 - 1.0 / (EMA_HORIZON_SHARE * total_steps):.6g}.")


def learning_rate(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "cosine":
        main = optax.cosine_decay_schedule(cfg.lr, max(total_steps - cfg.warmup_steps, 1))
    else:
        raise ValueError(f"optim.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'.")
    if cfg.warmup_steps <= 0:
        return main
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(learning_rate(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def ema_decay(cfg: ml_collections.ConfigDict, step):
    """EMA decay at `step` (a traced int), with the optional warmup for short runs."""
    if not cfg.ema_warmup:
        return cfg.ema_decay
    import jax.numpy as jnp

    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))
