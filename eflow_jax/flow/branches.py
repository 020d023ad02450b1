"""Per-branch losses shared by the objectives: velocity, weak velocity, consistency, MVA.

Each branch is a pure function of (params, net, batch of explicit inputs, settings) that
returns a per-sample loss vector [n] and a dict of scalar metrics; objectives.py combines
branches into `flow_matching`, `solution_flow` and `eflow`. All reductions are per sample
over every non-batch axis, so the same code serves [B, D] toys and [B, T, H, W, C] video.

Passes whose output is stop-gradient also take stop-gradient params (network.frozen).

Weights follow SoFlow (docs/METHOD.md section 3), with sg = stop-gradient:
  velocity     w_v = sg 1 / (|d_s b(t,t)| (mean_d D^2 + eps)^p),   L_v = w_v mean_d D^2
  consistency  dq = sg (f_t - f_l) / (t - l),  w_c = sg 1 / (mean_d dq^2 + eps)^p,
               L_con = sgn(b(t,s)) w_c mean_d(N * dq)   (its gradient equals that of
               w_c (t - l) / |b| * 0.5 mean_d((f_t - sg f_l) / (t - l))^2)
  MVA          D = N - (lam u1 + (1 - lam) u2),  L_mva = w_m mean_d D^2 with w_m = w_c by
               default (the residual relative to the regressed velocity; docs/METHOD.md section 6)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from eflow_jax.flow import guidance as guide
from eflow_jax.flow import interpolant as path
from eflow_jax.flow.network import Keep, Network, Params, frozen

Metrics = dict[str, jax.Array]


class VelocityBatch(NamedTuple):
    """Inputs of a velocity (flow-matching) branch; all arrays lead with the batch axis."""

    x0: jax.Array  # clean data [n, ...]
    eps: jax.Array  # noise like x0
    t: jax.Array  # float [n]
    y: jax.Array  # int [n] class labels
    uncond_mask: jax.Array  # bool [n]: label dropped -> null label, unguided target
    keep: Keep = None  # per-sample kept-token ids, or None for dense


class ConsistencyBatch(NamedTuple):
    """Inputs of a consistency branch (SoFlow section 3 plus the MVA split point lam)."""

    x0: jax.Array
    eps: jax.Array
    t: jax.Array  # float [n], t > s
    s: jax.Array  # float [n]
    l: jax.Array  # float [n], s <= l < t: the near-t point of the consistency loss
    y: jax.Array
    uncond_mask: jax.Array
    lam: jax.Array  # float [n] in (0, 1): MVA split m = t + lam (s - t)
    keep: Keep = None


class Guidance(NamedTuple):
    """Static guidance settings of a branch (mode 'none' means unguided targets)."""

    mode: str = "none"  # 'none' | 'cfg' | 'path_drop'
    scale: float = 1.0
    mix: float = 1.0
    tau_d: float = 1.0
    k: float = 0.025
    weak_label: str = "null"  # 'null' (SPRINT), 'cond' (pure autoguidance ablation) or 'independent'
    uncond_dropped: bool = False  # cfg ablation: run the unconditional pass token-dropped
    weak_path: str = "drop_middle"  # or 'skip_half' (STG-style ablation): see Network.weak


def per_sample_mse(delta: jax.Array) -> jax.Array:
    """mean over all non-batch axes of delta^2, in float32 [n]."""
    d = delta.astype(jnp.float32)
    return jnp.mean(jnp.square(d), axis=tuple(range(1, d.ndim)))


def per_sample_mean(v: jax.Array) -> jax.Array:
    """mean over all non-batch axes, in float32 [n]."""
    return jnp.mean(v.astype(jnp.float32), axis=tuple(range(1, v.ndim)))


def adaptive_weight(
    mse: jax.Array, p: float, eps: float, scale: jax.Array | float = 1.0
) -> jax.Array:
    """sg 1 / (scale (mse + eps)^p): down-weights samples with large residuals."""
    return jax.lax.stop_gradient(1.0 / (scale * (mse + eps) ** p))


def labels_in(y: jax.Array, uncond_mask: jax.Array, null_label: int) -> jax.Array:
    """The label the network sees: the null label where the label was dropped."""
    return jnp.where(uncond_mask, null_label, y).astype(jnp.int32)


def _reference(net: Network, params: Params, x_t, t, y, keep, g: Guidance) -> jax.Array:
    """The stop-gradient velocity that guidance pushes away from (unconditional or weak)."""
    if g.mode == "cfg":
        return guide.cfg_reference(net, params, x_t, t, keep if g.uncond_dropped else None)
    label = y if g.weak_label == "cond" else None  # 'independent' guides from null, like SPRINT's PDG
    return guide.path_drop_reference(net, params, x_t, t, label, path=g.weak_path)


def _target(net, params, x_t, v_t, v_pred, t, y, uncond, keep, g: Guidance) -> jax.Array:
    """The training target: v_t when unguided, else SoFlow's guided, mixed, masked target."""
    if not guide.guidance_active(g.mode, g.scale):
        return v_t
    v_ref = _reference(net, params, x_t, t, y, keep, g)
    return guide.guided_target(
        v_t, v_ref, v_pred, t, uncond, scale=g.scale, mix=g.mix, tau_d=g.tau_d, k=g.k
    )


def velocity_loss(
    pred: jax.Array, target: jax.Array, t: jax.Array, p: float, eps: float, adaptive: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample velocity loss. Returns (loss [n], mse [n], weight [n])."""
    mse = per_sample_mse(pred - jax.lax.stop_gradient(target))
    if adaptive:
        weight = adaptive_weight(mse, p, eps, jnp.abs(path.dbds_at_diagonal(t)))
    else:
        weight = jnp.ones_like(mse)
    return weight * mse, mse, weight


def velocity_branch(
    params: Params, net: Network, b: VelocityBatch, g: Guidance, *, p: float, eps: float,
    adaptive: bool = True, interpolant: str = "linear", v_pred: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Velocity loss on the full path: graded v_pred = F(x_t, t, t, y') vs the guided target.

    The graded pass doubles as SoFlow's mix prediction (under stop-gradient). v_pred: that
    pass's output when the caller ran it (`shared_graded_pass`); None runs it here.
    """
    x_t, v_t = path.interpolate(b.x0, b.eps, b.t, interpolant)
    y_in = labels_in(b.y, b.uncond_mask, net.null_label)
    if v_pred is None:
        v_pred = net(params, x_t, b.t, b.t, y_in, b.keep)
    target = _target(net, params, x_t, v_t, jax.lax.stop_gradient(v_pred), b.t, b.y,
                     b.uncond_mask, b.keep, g)
    loss, mse, weight = velocity_loss(v_pred, target, b.t, p, eps, adaptive)
    return loss, {"vel_mse": mse.mean(), "vel_weight": weight.mean(), "vel_loss": loss.mean()}


def _join(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
    """Two sub-batches' inputs as one batch for a merged pass (None: no token mask in either)."""
    if (a is None) != (b is None):
        raise ValueError("Both sub-batches must be token-dropped, or neither.")
    return None if a is None else jnp.concatenate([a, b])


def shared_graded_pass(
    params: Params, net: Network, vel: VelocityBatch, con: ConsistencyBatch, interpolant: str = "linear",
) -> tuple[jax.Array, tuple[Any, jax.Array]]:
    """The velocity and consistency sub-batches' graded passes as one (EFlow's shared trunk).

    Both are F(x_t, t, ., y') through the full, token-dropped path; they differ only in the query
    time (s = t for velocity samples, s for consistency samples), which the decoder takes per
    sample. One pass over both sub-batches computes the same function as two, and halves the
    differentiated network code the step compiles (its largest part).
    Returns (v_pred for `vel`, (trunk, N) for `con`): the arguments `velocity_branch(v_pred=)`
    and `consistency_branch(graded=)` take.
    """
    n = vel.t.shape[0]
    x_v, _ = path.interpolate(vel.x0, vel.eps, vel.t, interpolant)
    x_c, _ = path.interpolate(con.x0, con.eps, con.t, interpolant)
    y = _join(labels_in(vel.y, vel.uncond_mask, net.null_label),
            labels_in(con.y, con.uncond_mask, net.null_label))
    t = _join(vel.t, con.t)
    trunk = net.encode(params, _join(x_v, x_c), t, y, _join(vel.keep, con.keep), False)
    out = net.decode(params, trunk, t, _join(vel.t, con.s), y)
    con_trunk = jax.tree.map(lambda a: a[n:], trunk)
    return out[:n], (con_trunk, out[n:])


def weak_branch(
    params: Params, net: Network, b: VelocityBatch, *, p: float, eps: float,
    adaptive: bool = True, interpolant: str = "linear", weak_label: str = "null",
    weak_path: str = "drop_middle",
) -> tuple[jax.Array, Metrics]:
    """Trains the weak path: graded F^weak(x_t, t, t, null) vs the unguided v_t (PDG, section 5).

    weak_label: 'null' always the null label; 'cond' always b.y; 'independent' b.y with the null
    label where b.uncond_mask (a label drop drawn independently of the path drop, as SPRINT).
    """
    x_t, v_t = path.interpolate(b.x0, b.eps, b.t, interpolant)
    if weak_label == "cond":
        label = b.y.astype(jnp.int32)
    elif weak_label == "independent":
        label = labels_in(b.y, b.uncond_mask, net.null_label)
    else:
        label = jnp.full(b.t.shape, net.null_label, jnp.int32)
    v_pred = net.weak(params, x_t, b.t, label, path=weak_path)
    loss, mse, weight = velocity_loss(v_pred, v_t, b.t, p, eps, adaptive)
    return loss, {"weak_mse": mse.mean(), "weak_weight": weight.mean(), "weak_loss": loss.mean()}


def solution_consistency(
    params: Params, net: Network, x_t: jax.Array, N: jax.Array, t, s, l, y_in, keep: Keep,
    v_step: jax.Array, *, p: float, eps: float, F_l: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SoFlow's consistency loss given the graded online output N = F(x_t, t, s, y').

    Args:
      x_t: noised input [n, ...]. N: online output with gradient. t, s, l: times [n].
      y_in: labels the online pass saw. keep: the online pass's token mask (reused by the
        target pass, SoFlow's "same dropout RNG"). v_step: stop-gradient velocity of the
        Euler step x_l = x_t + (l - t) v_step (the guided target, or the exact velocity in
        closed-form tests).
      F_l: the target pass's output F(x_l, l, s, y') when the caller ran it (`target_and_split_passes`);
        None runs it here.
    Returns:
      (loss [n], metrics) with con_mse = mean dq^2 and con_weight = w_c [n] (the caller averages
      it; the MVA term reuses it per sample).
    """
    x_l = path.euler_step(x_t, jax.lax.stop_gradient(v_step), t, l)
    if F_l is None:
        F_l = net(frozen(params), x_l, l, s, y_in, keep)
    f_l = path.solution_map(x_l, jax.lax.stop_gradient(F_l), l, s)  # Only in sg dq.
    f_t = path.solution_map(x_t, N, t, s)
    dq = jax.lax.stop_gradient((f_t - f_l) / path.bcast(t - l, f_t))
    dq_mse = per_sample_mse(dq)
    weight = adaptive_weight(dq_mse, p, eps)
    sign_b = jnp.sign(s - t).astype(jnp.float32)
    loss = sign_b * weight * per_sample_mean(N * dq)
    return loss, {"con_mse": dq_mse.mean(), "con_weight": weight, "con_loss": loss.mean()}


MVA_WEIGHTINGS = ("consistency", "adaptive", "none")


def mva_regularizer(
    params: Params, net: Network, x_t: jax.Array, N: jax.Array, query, t, s, lam, y_in, keep: Keep,
    *, p: float, eps: float, weighting: str = "consistency", con_weight: jax.Array | None = None,
    u: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Mean-velocity additivity: N should equal lam u1 + (1 - lam) u2 (docs/METHOD.md section 6).

    Args:
      query: s_query -> sg F(x_t, t, s_query, y'); with decoupled conditioning this is a
        decoder-only pass on the shared (stop-gradient) trunk.
      lam: split fractions [n]; m = t + lam (s - t).
      u: (u1, u2) when the caller ran those passes (`target_and_split_passes`); None runs them here.
      weighting: how the residual is weighted per sample.
        'consistency' (default): by the consistency loss's weight w_c = sg 1/(mean dq^2 + eps)^p
          (`con_weight`), i.e. the residual is measured relative to the size of the velocity the
          sample regresses. 'adaptive': sg 1/(residual + eps)^p, the residual relative to itself;
          at init F = 0 satisfies additivity exactly, so this weight starts at 1/eps = 100 and the
          term pins F to the trivially additive (s- and label-blind) solution: eflow then does not
          learn (kept only as an ablation). 'none': plain mean squares.
    Returns:
      (loss [n], metrics) with mva_residual = mean Delta^2.
    """
    if u is None:
        m = t + lam * (s - t)
        u1 = jax.lax.stop_gradient(query(m))
        x_m = path.euler_step(x_t, u1, t, m)
        u = u1, net(frozen(params), x_m, m, s, y_in, keep)
    u1, u2 = (jax.lax.stop_gradient(v) for v in u)
    lam_b = path.bcast(lam, N)
    residual = per_sample_mse(N - (lam_b * u1 + (1.0 - lam_b) * u2))
    if weighting == "consistency":
        if con_weight is None:
            raise ValueError("weighting='consistency' needs the consistency weight con_weight.")
        weight = jax.lax.stop_gradient(con_weight)
    elif weighting == "adaptive":
        weight = adaptive_weight(residual, p, eps)
    elif weighting == "none":
        weight = jnp.ones_like(residual)
    else:
        raise ValueError(f"mva weighting={weighting!r}; use one of {MVA_WEIGHTINGS}.")
    loss = weight * residual
    return loss, {"mva_residual": residual.mean(), "mva_weight": weight.mean(),
                  "mva_loss": loss.mean()}


def target_and_split_passes(
    params: Params, net: Network, x_t: jax.Array, v_step: jax.Array, query, t, s, l, lam, y_in, keep: Keep,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The consistency target pass F(x_l, l, s) and MVA's u2 = F(x_m, m, s) as one stop-gradient pass.

    Both run the sample's mask and labels to the same s from two points on its path (x_l after the
    Euler step with v_step, x_m after the step with u1 = query(m)), so one pass over the two gives
    both, with one copy of the network in the compiled step instead of two.
    Returns (F_l, (u1, u2)): the arguments `solution_consistency(F_l=)` and `mva_regularizer(u=)` take.
    """
    n = t.shape[0]
    m = t + lam * (s - t)
    u1 = jax.lax.stop_gradient(query(m))
    x_l = path.euler_step(x_t, jax.lax.stop_gradient(v_step), t, l)
    x_m = path.euler_step(x_t, u1, t, m)
    out = net(frozen(params), _join(x_l, x_m), _join(l, m), _join(s, s), _join(y_in, y_in), _join(keep, keep))
    out = jax.lax.stop_gradient(out)
    return out[:n], (u1, out[n:])


def consistency_branch(
    params: Params, net: Network, b: ConsistencyBatch, g: Guidance, *, p: float, eps: float,
    reuse_trunk: bool, mva_beta: float = 0.0, mva_weighting: str = "consistency",
    fm_on_con: bool = False, adaptive: bool = True, interpolant: str = "linear",
    graded: tuple[Any, jax.Array] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Consistency loss (+ beta MVA, + optional FM) on one sub-batch.

    reuse_trunk=True (EFlow): the trunk h = encode(x_t, t, y', keep) is computed once; the
    graded N decodes it at s, and the stop-gradient queries at s = t (mix prediction) and at
    m (MVA u1) decode sg(h). reuse_trunk=False (SoFlow): every query is a separate full pass.
    graded: (trunk, N) when the caller ran that graded pass (`shared_graded_pass`; needs
    reuse_trunk); None runs it here.
    """
    x_t, v_t = path.interpolate(b.x0, b.eps, b.t, interpolant)
    y_in = labels_in(b.y, b.uncond_mask, net.null_label)
    if graded is not None and not reuse_trunk:
        raise ValueError("A precomputed graded pass (trunk, N) needs reuse_trunk=True.")
    if reuse_trunk:
        if graded is None:
            trunk = net.encode(params, x_t, b.t, y_in, b.keep, False)
            N = net.decode(params, trunk, b.t, b.s, y_in)
        else:
            trunk, N = graded
        trunk_sg = jax.lax.stop_gradient(trunk)

        def query(s_query):
            return jax.lax.stop_gradient(net.decode(frozen(params), trunk_sg, b.t, s_query, y_in))
    else:
        N = net(params, x_t, b.t, b.s, y_in, b.keep)

        def query(s_query):
            return jax.lax.stop_gradient(net(frozen(params), x_t, b.t, s_query, y_in, b.keep))

    metrics: Metrics = {}
    v_pred_graded = None
    if fm_on_con:  # the velocity at s = t with gradient; with a shared trunk it is decoder-only
        v_pred_graded = (net.decode(params, trunk, b.t, b.t, y_in) if reuse_trunk
                         else net(params, x_t, b.t, b.t, y_in, b.keep))
    needs_pred = guide.guidance_active(g.mode, g.scale) and g.mix != 1.0
    if v_pred_graded is not None:
        v_pred = jax.lax.stop_gradient(v_pred_graded)
    else:
        v_pred = query(b.t) if needs_pred else None
    target = _target(net, params, x_t, v_t, v_pred, b.t, b.y, b.uncond_mask, b.keep, g)

    F_l = u = None
    if mva_beta > 0.0:
        F_l, u = target_and_split_passes(params, net, x_t, target, query, b.t, b.s, b.l, b.lam, y_in, b.keep)
    loss, m_con = solution_consistency(params, net, x_t, N, b.t, b.s, b.l, y_in, b.keep, target,
                                       p=p, eps=eps, F_l=F_l)
    con_weight = m_con.pop("con_weight")
    metrics.update(m_con, con_weight=con_weight.mean())
    if mva_beta > 0.0:
        l_mva, m_mva = mva_regularizer(params, net, x_t, N, query, b.t, b.s, b.lam, y_in, b.keep,
                                       p=p, eps=eps, weighting=mva_weighting, con_weight=con_weight, u=u)
        loss = loss + mva_beta * l_mva
        metrics.update(m_mva)
    if v_pred_graded is not None:
        l_fm, mse, _ = velocity_loss(v_pred_graded, target, b.t, p, eps, adaptive)
        loss = loss + l_fm
        metrics["con_fm_mse"] = mse.mean()
    return loss, metrics
