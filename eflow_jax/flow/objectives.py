"""Training objectives selected by name: 'flow_matching', 'solution_flow' (SoFlow), 'eflow'.

- flow_matching: plain velocity regression with 10% label dropout (CFG happens in the sampler).
- solution_flow: SoFlow exactly as its official code (docs/METHOD.md section 3): a static 75/25
  velocity/consistency split, a CFG-guided target from a full dense unconditional pass,
  the 0.25 mix with the model's own prediction, the decay c(t), adaptive weights, and the
  consistency loss with its intermediate time l. This is the throughput baseline.
- eflow (sections 5-8): the same losses, but one token-drop mask per sample shared by its
  online / target / MVA passes, path-drop guided targets from the weak path, a static weak
  sub-batch that trains the weak path, the MVA regularizer, and one shared trunk per
  consistency sample decoded at several s.

Each objective has a pure core with explicit inputs (tests call these), and `make_loss`
draws the randomness and calls the core:

    loss_fn = make_loss(default_objective_config('eflow'), net, total_steps)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x0, y, rng, step)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from eflow_jax.flow import branches as br
from eflow_jax.flow import guidance as guide
from eflow_jax.flow import network, times
from eflow_jax.flow.branches import ConsistencyBatch, Guidance, Metrics, VelocityBatch
from eflow_jax.flow.network import Network, Params

OBJECTIVES = ("flow_matching", "solution_flow", "eflow")
WEAK_LABELS = ("null", "cond", "independent")
WEAK_PATHS = network.WEAK_PATHS
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Metrics]]


def default_objective_config(name: str) -> ml_collections.ConfigDict:
    """All objective settings, with SoFlow's ImageNet values (docs/METHOD.md sections 3, 5-8)."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; use one of {OBJECTIVES}.")
    c = ml_collections.ConfigDict()
    c.name = name
    c.interpolant = "linear"
    c.velocity_ratio = 1.0 if name == "flow_matching" else 0.75  # phi: velocity share of the batch
    c.weak_ratio = 0.1 if name == "eflow" else 0.0  # share of velocity samples on the weak path
    c.label_drop = 0.1  # cfg_mask ~ Bernoulli(0.1): null label, unguided target
    c.guidance = {"flow_matching": "none", "solution_flow": "cfg", "eflow": "path_drop"}[name]
    c.guidance_scale = 3.0
    c.mix = 0.25  # target <- m * guided + (1 - m) * sg v_pred
    c.decay_tau = 0.8
    c.decay_k = 0.025
    # Label of the weak sub-batch: 'null' (SPRINT: always the null label), 'cond' (PDG with the
    # conditional label, autoguidance ablation), or 'independent' (keeps the class label, dropped
    # with label_drop independently of the path drop, as SPRINT draws the two). The weak
    # reference in guided targets uses the null label unless 'cond'.
    c.weak_label = "null"
    # 'drop_middle' (the middle replaced by mu) | 'skip_half' (STG-style: run every other middle
    # block, ablation d of docs/METHOD.md section 5).
    c.weak_path = "drop_middle"
    c.cfg_uncond_dropped = False  # eflow + guidance='cfg': token-dropped unconditional pass
    c.adaptive_weight = name != "flow_matching"
    c.p = 1.0
    c.eps = 0.01
    c.time = ml_collections.ConfigDict(
        dict(velocity_mean=-0.2, velocity_std=1.0, s_mean=-1.0, s_std=0.8, t_mean=0.2, t_std=0.8,
             min_gap=1e-4, shift=1.0)
    )
    c.r0 = 0.1  # l schedule r(k) = r0 (r1 / r0)^(k / K)
    c.r1 = 0.002
    c.mva = ml_collections.ConfigDict(
        # weighting: 'consistency' (w_c, default) | 'adaptive' (1/(residual+eps): does not learn,
        # ablation only) | 'none'. See branches.mva_regularizer.
        dict(enabled=name == "eflow", beta=1.0, split="uniform", snap_prob=0.0, weighting="consistency")
    )
    c.token_drop = name == "eflow"  # one net.sample_keep mask per sample
    # SPRINT's full-token fine-tune: the last fraction of the steps trains dense (token_drop off);
    # 0 = never. Inference is always dense. See dense_from_step.
    c.dense_finetune_frac = 0.0
    c.fm_on_con = False  # also regress the velocity on consistency samples (free with a trunk)
    return c


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Reject settings that an objective would silently ignore or that cannot work."""
    if c.name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {c.name!r}; use one of {OBJECTIVES}.")
    if c.guidance not in ("none", "cfg", "path_drop"):
        raise ValueError(f"guidance={c.guidance!r}; use 'none', 'cfg' or 'path_drop'.")
    if c.mva.split not in ("uniform", "half"):
        raise ValueError(f"mva.split={c.mva.split!r}; use 'uniform' or 'half'.")
    if c.mva.weighting not in br.MVA_WEIGHTINGS:
        raise ValueError(f"mva.weighting={c.mva.weighting!r}; use one of {br.MVA_WEIGHTINGS}.")
    if not 0.0 <= c.label_drop <= 1.0:
        raise ValueError(f"objective.label_drop={c.label_drop}: it is a probability; set it in [0, 1] (0.1 is "
                         f"SoFlow's).")
    if not 0.0 <= c.velocity_ratio <= 1.0 or not 0.0 <= c.weak_ratio < 1.0:
        raise ValueError("velocity_ratio must be in [0, 1] and weak_ratio in [0, 1).")
    if c.name == "flow_matching":
        if c.guidance != "none" or c.velocity_ratio != 1.0 or c.weak_ratio or c.mva.enabled:
            raise ValueError("flow_matching trains unguided velocity only: set guidance='none', "
                             "velocity_ratio=1, weak_ratio=0, mva.enabled=False (CFG is a "
                             "sampler option).")
    if c.name == "solution_flow":
        if c.guidance == "path_drop" or c.weak_ratio or c.mva.enabled or c.token_drop:
            raise ValueError("solution_flow is SoFlow as published (dense, CFG target, no weak "
                             "sub-batch, no MVA); use objective 'eflow' for path-drop guidance, "
                             "weak_ratio, mva or token_drop.")
    if c.weak_label not in WEAK_LABELS:
        raise ValueError(f"objective.weak_label={c.weak_label!r}; use one of {WEAK_LABELS}.")
    if c.weak_path not in WEAK_PATHS:
        raise ValueError(f"objective.weak_path={c.weak_path!r}; use one of {WEAK_PATHS}.")
    if not 0.0 <= c.dense_finetune_frac < 1.0:
        raise ValueError(f"objective.dense_finetune_frac={c.dense_finetune_frac}: use a fraction in [0, 1) "
                         f"(0 = no dense fine-tune; SPRINT uses ~0.1).")
    if c.dense_finetune_frac > 0 and not c.token_drop:
        raise ValueError("objective.dense_finetune_frac > 0 switches token drop off late in the run, but "
                         "objective.token_drop=False never drops: set token_drop=True or "
                         "dense_finetune_frac=0.")
    # SoFlow draws the label-drop mask only when its guidance scale is above 1 and refuses a drop
    # rate otherwise: unguided, dropped labels only train a null-label model nothing queries.
    if (c.name != "flow_matching" and c.label_drop > 0
            and not guide.guidance_active(c.guidance, float(c.guidance_scale))):
        raise ValueError(f"objective.label_drop={c.label_drop} with guidance={c.guidance!r} (scale "
                         f"{c.guidance_scale}): labels are dropped only for guided targets (SoFlow); set "
                         f"objective.label_drop=0, or guidance 'cfg'/'path_drop' with guidance_scale > 1.")
    if c.name == "eflow" and c.guidance == "path_drop" and c.weak_ratio == 0.0:
        raise ValueError("path_drop guidance needs weak_ratio > 0, else the weak path that "
                         "builds the targets is never trained.")


def dense_from_step(c: ml_collections.ConfigDict, total_steps: int) -> int:
    """Updates that run token-dropped before the dense fine-tune: step k (1-based) is dense iff k > this.

    total_steps when dense_finetune_frac is 0 (or the objective never drops tokens).
    """
    if not c.token_drop or c.dense_finetune_frac <= 0:
        return total_steps
    return total_steps - int(round(c.dense_finetune_frac * total_steps))


def dense_phase(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The objective of the dense fine-tune: the same settings with token drop off."""
    dense = ml_collections.ConfigDict(c.to_dict())
    dense.token_drop, dense.dense_finetune_frac = False, 0.0
    return dense


def split_sizes(c: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int]:
    """Static sub-batch sizes (n_full_velocity, n_weak, n_consistency) summing to batch_size.

    n_velocity = int(velocity_ratio * B) as in SoFlow; n_weak = int(weak_ratio * n_velocity).
    """
    n_vel = int(c.velocity_ratio * batch_size)
    n_weak = int(c.weak_ratio * n_vel)
    n_con = batch_size - n_vel
    too_small = (
        (c.velocity_ratio > 0 and n_vel - n_weak == 0)
        or (c.velocity_ratio < 1 and n_con == 0)
        or (c.weak_ratio > 0 and n_weak == 0)
    )
    if too_small:
        raise ValueError(
            f"A batch of {batch_size} is too small to split with velocity_ratio="
            f"{c.velocity_ratio} and weak_ratio={c.weak_ratio} (got full/weak/consistency = "
            f"{n_vel - n_weak}/{n_weak}/{n_con}); use a larger per-device batch or change the "
            "ratios."
        )
    return n_vel - n_weak, n_weak, n_con


def _guidance(c: ml_collections.ConfigDict) -> Guidance:
    return Guidance(mode=c.guidance, scale=float(c.guidance_scale), mix=float(c.mix),
                    tau_d=float(c.decay_tau), k=float(c.decay_k), weak_label=c.weak_label,
                    uncond_dropped=bool(c.cfg_uncond_dropped), weak_path=c.weak_path)


def _combine(vel_losses: list[jax.Array], con_loss: jax.Array | None, metrics: Metrics,
             c: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """L = (n_v / B) mean(velocity-sample losses) + (n_c / B) mean(consistency losses)."""
    vel = jnp.concatenate(vel_losses) if vel_losses else jnp.zeros((0,), jnp.float32)
    n_v, n_c = vel.shape[0], 0 if con_loss is None else con_loss.shape[0]
    total = n_v + n_c
    loss = jnp.zeros((), jnp.float32)
    if n_v:
        loss = loss + (n_v / total) * vel.mean()
    if n_c:
        loss = loss + (n_c / total) * con_loss.mean()
    active = guide.guidance_active(c.guidance, float(c.guidance_scale))
    metrics = dict(metrics, loss=loss, frac_velocity=jnp.float32(n_v / total),
                   guidance_scale=jnp.float32(c.guidance_scale if active else 1.0))
    return loss, metrics


def flow_matching_core(params: Params, net: Network, vel: VelocityBatch,
                       c: ml_collections.ConfigDict) -> tuple[jax.Array, Metrics]:
    """Plain flow matching: regress F(x_t, t, t, y') on v_t (MSE, or adaptive by flag)."""
    loss, metrics = br.velocity_branch(params, net, vel, Guidance(), p=c.p, eps=c.eps,
                                       adaptive=c.adaptive_weight, interpolant=c.interpolant)
    return _combine([loss], None, metrics, c)


def solution_flow_core(params: Params, net: Network, vel: VelocityBatch | None,
                       con: ConsistencyBatch | None, c: ml_collections.ConfigDict
                       ) -> tuple[jax.Array, Metrics]:
    """SoFlow: velocity loss on `vel` + consistency loss on `con`, every pass dense and full."""
    g, metrics, vel_losses, con_loss = _guidance(c), {}, [], None
    if vel is not None:
        loss, m = br.velocity_branch(params, net, vel, g, p=c.p, eps=c.eps,
                                     adaptive=c.adaptive_weight, interpolant=c.interpolant)
        vel_losses.append(loss)
        metrics.update(m)
    if con is not None:
        con_loss, m = br.consistency_branch(params, net, con, g, p=c.p, eps=c.eps,
                                            reuse_trunk=False, fm_on_con=c.fm_on_con,
                                            adaptive=c.adaptive_weight, interpolant=c.interpolant)
        metrics.update(m)
    return _combine(vel_losses, con_loss, metrics, c)


def eflow_core(params: Params, net: Network, vel: VelocityBatch | None, weak: VelocityBatch | None,
               con: ConsistencyBatch | None, c: ml_collections.ConfigDict
               ) -> tuple[jax.Array, Metrics]:
    """EFlow: token-dropped, path-drop-guided velocity + weak sub-batch + consistency with MVA.

    The keep masks inside `vel` and `con` are used by every pass of their samples. The graded
    passes of `vel` and `con` run as one (br.shared_graded_pass).
    """
    g, metrics, vel_losses, con_loss = _guidance(c), {}, [], None
    v_pred = graded = None
    if vel is not None and con is not None:
        v_pred, graded = br.shared_graded_pass(params, net, vel, con, c.interpolant)
    if vel is not None:
        loss, m = br.velocity_branch(params, net, vel, g, p=c.p, eps=c.eps,
                                     adaptive=c.adaptive_weight, interpolant=c.interpolant,
                                     v_pred=v_pred)
        vel_losses.append(loss)
        metrics.update(m)
    if weak is not None:
        loss, m = br.weak_branch(params, net, weak, p=c.p, eps=c.eps, adaptive=c.adaptive_weight,
                                 interpolant=c.interpolant, weak_label=c.weak_label,
                                 weak_path=c.weak_path)
        vel_losses.append(loss)
        metrics.update(m)
    if con is not None:
        con_loss, m = br.consistency_branch(
            params, net, con, g, p=c.p, eps=c.eps, reuse_trunk=True,
            mva_beta=float(c.mva.beta) if c.mva.enabled else 0.0, mva_weighting=c.mva.weighting,
            fm_on_con=c.fm_on_con, adaptive=c.adaptive_weight, interpolant=c.interpolant,
            graded=graded)
        metrics.update(m)
    n_weak = 0 if weak is None else weak.t.shape[0]
    n_all = sum(v.shape[0] for v in vel_losses) + (0 if con is None else con.t.shape[0])
    metrics["frac_weak"] = jnp.float32(n_weak / n_all)
    return _combine(vel_losses, con_loss, metrics, c)


def make_loss(obj_cfg: ml_collections.ConfigDict, net: Network, total_steps: int) -> LossFn:
    """Builds loss_fn(params, x0, y, rng, step) -> (loss, metrics) for the named objective.

    Args:
      obj_cfg: from `default_objective_config` (possibly overridden).
      net: the network's pure functions. total_steps: K of the l schedule.
    Returns:
      A pure, jit-able loss_fn. The batch split is static (from x0.shape[0]); all noise,
      times, label drops, token masks and MVA splits come from `rng`.
    """
    c = obj_cfg
    validate_config(c)
    tc = c.time

    def loss_fn(params: Params, x0: jax.Array, y: jax.Array, rng: jax.Array, step: jax.Array):
        batch = x0.shape[0]
        n_full, n_weak, n_con = split_sizes(c, batch)
        n_vel = n_full + n_weak
        k = dict(zip(("eps", "drop", "tv", "tc", "snap", "lam", "keep_v", "keep_c"),
                     jax.random.split(rng, 8), strict=True))
        eps = jax.random.normal(k["eps"], x0.shape, x0.dtype)
        uncond = jax.random.uniform(k["drop"], (batch,)) < c.label_drop
        y = y.astype(jnp.int32)

        def keep_for(key, n):
            return net.sample_keep(key, n) if c.token_drop else None

        vel = weak = con = None
        if n_vel:
            t_v = times.sample_velocity_times(k["tv"], n_vel, tc.velocity_mean, tc.velocity_std,
                                              tc.shift)
            vel = VelocityBatch(x0[:n_full], eps[:n_full], t_v[:n_full], y[:n_full],
                                uncond[:n_full], keep_for(k["keep_v"], n_full))
            if n_weak:
                sl = slice(n_full, n_vel)
                # 'independent': the weak samples' own label draw (path drop and label drop are
                # independent); else the mask is unused (weak_branch picks null or cond).
                weak_uncond = uncond[sl] if c.weak_label == "independent" else jnp.ones((n_weak,), bool)
                weak = VelocityBatch(x0[sl], eps[sl], t_v[n_full:], y[sl], weak_uncond)
        if n_con:
            t, s = times.sample_consistency_times(k["tc"], n_con, tc.s_mean, tc.s_std, tc.t_mean,
                                                  tc.t_std, tc.min_gap, tc.shift)
            t, s = times.snap_endpoints(k["snap"], t, s, float(c.mva.snap_prob), tc.min_gap)
            l = times.intermediate_time(t, s, times.l_ratio(step, total_steps, c.r0, c.r1),
                                        tc.min_gap)
            if c.mva.split == "half":
                lam = jnp.full((n_con,), 0.5, jnp.float32)
            else:  # keep m strictly inside (s, t)
                lam = jax.random.uniform(k["lam"], (n_con,), minval=1e-3, maxval=1.0 - 1e-3)
            con = ConsistencyBatch(x0[n_vel:], eps[n_vel:], t, s, l, y[n_vel:], uncond[n_vel:],
                                   lam, keep_for(k["keep_c"], n_con))

        if c.name == "flow_matching":
            return flow_matching_core(params, net, vel, c)
        if c.name == "solution_flow":
            return solution_flow_core(params, net, vel, con, c)
        return eflow_core(params, net, vel, weak, con, c)

    return loss_fn
