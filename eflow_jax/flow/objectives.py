"""Training objectives as one table: `OBJECTIVES[name]` is the only place an objective's name is read.

- flow_matching: plain velocity regression with 10% condition drop (CFG happens in the sampler).
- solution_flow: SoFlow exactly as its official code (docs/METHOD.md section 3): a static 75/25
  velocity/consistency split, a CFG-guided target from a full dense unconditional pass, the 0.25
  mix with the model's own prediction, the decay c(t), adaptive weights, and the consistency loss
  with its intermediate time l. This is the throughput baseline.
- eflow (sections 5-8): the same losses, but one token-drop mask per sample shared by its online /
  target / MVA passes, path-drop guided targets from the weak path, a static weak sub-batch that
  trains the weak path, the MVA regularizer, and one shared trunk per sample decoded at several s.

A loss is drawing (flow/draw.py: times, noise, masks, condition drop) then scoring by the
objective's core, a pure function of explicit inputs that decides which network passes run and
which are merged, and hands their outputs to the formulas of flow/branches.py:

    loss_fn = make_loss(default_objective_config('eflow'), net, total_steps)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x0, cond, rng, step)

A new objective or ablation is one `Objective` entry plus one core (and its cost formula).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from eflow_jax.flow import branches as br
from eflow_jax.flow import guidance as guide
from eflow_jax.flow import interpolant as path
from eflow_jax.flow.condition import Condition, join
from eflow_jax.flow.draw import ConsistencyBatch, Draw, DrawSettings, VelocityBatch, draw, split_sizes
from eflow_jax.flow.guidance import WEAK_LABELS, Guidance
from eflow_jax.flow.network import WEAK_PATHS, Network, Params, frozen

Metrics = dict[str, jax.Array]
LossFn = Callable[[Params, jax.Array, Condition, jax.Array, jax.Array], tuple[jax.Array, Metrics]]


# ---- settings, frozen once per run ----


@dataclasses.dataclass(frozen=True)
class Settings:
    """An objective config as the loss reads it (built once by `Settings.of`)."""

    name: str
    draw: DrawSettings
    guidance: Guidance
    interpolant: str = "linear"
    p: float = 1.0
    eps: float = 0.01
    adaptive: bool = True
    mva_beta: float = 0.0  # 0: no MVA term.
    mva_weighting: str = "consistency"
    fm_on_con: bool = False

    @classmethod
    def of(cls, c: ml_collections.ConfigDict) -> Settings:
        tc = c.time
        d = DrawSettings(
            velocity_ratio=float(c.velocity_ratio), weak_ratio=float(c.weak_ratio), label_drop=float(c.label_drop),
            weak_label=c.weak_label, token_drop=bool(c.token_drop), velocity_mean=tc.velocity_mean,
            velocity_std=tc.velocity_std, s_mean=tc.s_mean, s_std=tc.s_std, t_mean=tc.t_mean, t_std=tc.t_std,
            min_gap=tc.min_gap, shift=tc.shift, r0=c.r0, r1=c.r1, snap_prob=float(c.mva.snap_prob),
            mva_split=c.mva.split)
        g = Guidance(mode=c.guidance, scale=float(c.guidance_scale), mix=float(c.mix), tau_d=float(c.decay_tau),
                     k=float(c.decay_k), weak_label=c.weak_label, uncond_dropped=bool(c.cfg_uncond_dropped),
                     weak_path=c.weak_path)
        return cls(c.name, d, g, c.interpolant, float(c.p), float(c.eps), bool(c.adaptive_weight),
                   float(c.mva.beta) if c.mva.enabled else 0.0, c.mva.weighting, bool(c.fm_on_con))


# ---- building blocks of the cores: passes and the terms they feed ----


def _reference(params: Params, net: Network, x_t, b: VelocityBatch | ConsistencyBatch, g: Guidance) -> jax.Array:
    """The stop-gradient velocity that guidance pushes away from: the full network at the null
    condition ('cfg'), or the weak path ('path_drop') at the null (or, 'cond', the own) condition."""
    if g.mode == "cfg":
        keep = b.keep if g.uncond_dropped else None
        return jax.lax.stop_gradient(net(frozen(params), x_t, b.t, b.t, b.cond.nulled(), keep))
    cond = b.cond if g.weak_label == "cond" else b.cond.nulled()
    return jax.lax.stop_gradient(net.weak(frozen(params), x_t, b.t, cond, path=g.weak_path))


def _target(params: Params, net: Network, x_t, v_t, v_pred, b, g: Guidance) -> jax.Array:
    """The training target: v_t when unguided, else SoFlow's guided, mixed, masked target."""
    if not g.active:
        return v_t
    v_ref = _reference(params, net, x_t, b, g)
    return guide.guided_target(v_t, v_ref, v_pred, b.t, b.uncond, scale=g.scale, mix=g.mix, tau_d=g.tau_d, k=g.k)


def _velocity_terms(pred, target, t, st: Settings, prefix: str) -> tuple[jax.Array, Metrics]:
    loss, mse, weight = br.velocity_loss(pred, target, t, st.p, st.eps, st.adaptive)
    return loss, {f"{prefix}_mse": mse.mean(), f"{prefix}_weight": weight.mean(), f"{prefix}_loss": loss.mean()}


def _consistency_terms(params: Params, net: Network, b: ConsistencyBatch, x_t, v_t, N, query,
                       v_pred_graded, st: Settings) -> tuple[jax.Array, Metrics]:
    """Consistency loss (+ beta MVA, + FM with fm_on_con) of a sub-batch whose graded output N is given.

    query(s') = sg F(x_t, t, s'), however the core computes it (a decoder-only pass on a shared
    trunk, or a full pass). The target pass F(x_l, l, s) and MVA's second leg F(x_m, m, s) share
    the sample's mask, condition and s, so they run as one stop-gradient pass.
    """
    g = st.guidance
    if v_pred_graded is not None:
        v_pred = jax.lax.stop_gradient(v_pred_graded)
    else:
        v_pred = query(b.t) if g.active and g.mix != 1.0 else None
    target = _target(params, net, x_t, v_t, v_pred, b, g)
    x_l = path.euler_step(x_t, jax.lax.stop_gradient(target), b.t, b.l)
    cond_in, n = b.cond_in, b.t.shape[0]
    if st.mva_beta > 0.0:
        m = b.t + b.lam * (b.s - b.t)
        u1 = jax.lax.stop_gradient(query(m))
        x_m = path.euler_step(x_t, u1, b.t, m)
        out = net(frozen(params), _join(x_l, x_m), _join(b.l, m), _join(b.s, b.s), join(cond_in, cond_in),
                  _join(b.keep, b.keep))
        out = jax.lax.stop_gradient(out)
        F_l, u2 = out[:n], out[n:]
    else:
        F_l = net(frozen(params), x_l, b.l, b.s, cond_in, b.keep)
    loss, dq_mse, con_weight = br.consistency_loss(N, F_l, x_t, x_l, b.t, b.s, b.l, st.p, st.eps)
    metrics = {"con_mse": dq_mse.mean(), "con_loss": loss.mean(), "con_weight": con_weight.mean()}
    if st.mva_beta > 0.0:
        l_mva, residual, weight = br.mva_loss(N, u1, u2, b.lam, weighting=st.mva_weighting, con_weight=con_weight,
                                              p=st.p, eps=st.eps)
        loss = loss + st.mva_beta * l_mva
        metrics |= {"mva_residual": residual.mean(), "mva_weight": weight.mean(), "mva_loss": l_mva.mean()}
    if v_pred_graded is not None:
        l_fm, mse, _ = br.velocity_loss(v_pred_graded, target, b.t, st.p, st.eps, st.adaptive)
        loss = loss + l_fm
        metrics["con_fm_mse"] = mse.mean()
    return loss, metrics


def _join(*parts):
    """Sub-batches' inputs as one batch for a merged pass (None: no token mask in any)."""
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("Merged sub-batches must all be token-dropped, or none.")
    return jnp.concatenate(parts)


def _combine(vel_losses: list[jax.Array], con_loss: jax.Array | None, metrics: Metrics,
             st: Settings) -> tuple[jax.Array, Metrics]:
    """L = (n_v / B) mean(velocity-sample losses) + (n_c / B) mean(consistency losses)."""
    vel = jnp.concatenate(vel_losses) if vel_losses else jnp.zeros((0,), jnp.float32)
    n_v, n_c = vel.shape[0], 0 if con_loss is None else con_loss.shape[0]
    total = n_v + n_c
    loss = jnp.zeros((), jnp.float32)
    if n_v:
        loss = loss + (n_v / total) * vel.mean()
    if n_c:
        loss = loss + (n_c / total) * con_loss.mean()
    metrics = dict(metrics, loss=loss, frac_velocity=jnp.float32(n_v / total),
                   guidance_scale=jnp.float32(st.guidance.scale if st.guidance.active else 1.0))
    return loss, metrics


# ---- the cores: which passes run, and which are merged ----


def flow_matching_core(params: Params, net: Network, d: Draw, st: Settings) -> tuple[jax.Array, Metrics]:
    """Plain flow matching: regress F(x_t, t, t, cond) on v_t (MSE, or adaptive by flag)."""
    b = d.vel
    x_t, v_t = path.interpolate(b.x0, b.eps, b.t, st.interpolant)
    loss, metrics = _velocity_terms(net(params, x_t, b.t, b.t, b.cond_in, b.keep), v_t, b.t, st, "vel")
    return _combine([loss], None, metrics, st)


def solution_flow_core(params: Params, net: Network, d: Draw, st: Settings) -> tuple[jax.Array, Metrics]:
    """SoFlow: every pass dense and full; each query at another s is a separate full pass."""
    metrics, vel_losses, con_loss = {}, [], None
    if (b := d.vel) is not None:
        x_t, v_t = path.interpolate(b.x0, b.eps, b.t, st.interpolant)
        v_pred = net(params, x_t, b.t, b.t, b.cond_in, b.keep)
        target = _target(params, net, x_t, v_t, jax.lax.stop_gradient(v_pred), b, st.guidance)
        loss, m = _velocity_terms(v_pred, target, b.t, st, "vel")
        vel_losses.append(loss)
        metrics |= m
    if (b := d.con) is not None:
        x_t, v_t = path.interpolate(b.x0, b.eps, b.t, st.interpolant)
        cond_in = b.cond_in
        N = net(params, x_t, b.t, b.s, cond_in, b.keep)
        fm = net(params, x_t, b.t, b.t, cond_in, b.keep) if st.fm_on_con else None

        def query(s_query):
            return jax.lax.stop_gradient(net(frozen(params), x_t, b.t, s_query, cond_in, b.keep))

        con_loss, m = _consistency_terms(params, net, b, x_t, v_t, N, query, fm, st)
        metrics |= m
    return _combine(vel_losses, con_loss, metrics, st)


def eflow_core(params: Params, net: Network, d: Draw, st: Settings) -> tuple[jax.Array, Metrics]:
    """EFlow: token-dropped, path-drop-guided velocity + weak sub-batch + consistency with MVA.

    The velocity and consistency samples' graded passes run as one (the same function with a
    per-sample query time: s = t for velocity samples, s for consistency samples); the
    consistency samples' stop-gradient queries (mix prediction at t, MVA's first leg at m) decode
    the same trunk. Each sample's keep mask is used by every pass of that sample.
    """
    metrics, vel_losses, con_loss = {}, [], None
    graded = [b for b in (d.vel, d.con) if b is not None]
    inputs = [path.interpolate(b.x0, b.eps, b.t, st.interpolant) for b in graded]
    if graded:
        t = _join(*(b.t for b in graded))
        trunk = net.encode(params, _join(*(x for x, _ in inputs)), t, join(*(b.cond_in for b in graded)),
                           _join(*(b.keep for b in graded)), False)
        out = net.decode(params, trunk, t, _join(*(b.t if b is d.vel else b.s for b in graded)))
    n_vel = 0 if d.vel is None else d.vel.t.shape[0]
    if (b := d.vel) is not None:
        (x_t, v_t), v_pred = inputs[0], out[:n_vel]
        target = _target(params, net, x_t, v_t, jax.lax.stop_gradient(v_pred), b, st.guidance)
        loss, m = _velocity_terms(v_pred, target, b.t, st, "vel")
        vel_losses.append(loss)
        metrics |= m
    if (b := d.weak) is not None:
        x_t, v_t = path.interpolate(b.x0, b.eps, b.t, st.interpolant)
        cond = b.cond if st.guidance.weak_label == "cond" else b.cond_in  # 'null': uncond is all True.
        loss, m = _velocity_terms(net.weak(params, x_t, b.t, cond, path=st.guidance.weak_path), v_t, b.t, st, "weak")
        vel_losses.append(loss)
        metrics |= m
    if (b := d.con) is not None:
        (x_t, v_t), N = inputs[-1], out[n_vel:]
        con_trunk = jax.lax.stop_gradient(jax.tree.map(lambda a: a[n_vel:], trunk))
        fm = net.decode(params, jax.tree.map(lambda a: a[n_vel:], trunk), b.t, b.t) if st.fm_on_con else None

        def query(s_query):
            return jax.lax.stop_gradient(net.decode(frozen(params), con_trunk, b.t, s_query))

        con_loss, m = _consistency_terms(params, net, b, x_t, v_t, N, query, fm, st)
        metrics |= m
    n_weak = 0 if d.weak is None else d.weak.t.shape[0]
    n_all = sum(v.shape[0] for v in vel_losses) + (0 if d.con is None else d.con.t.shape[0])
    metrics["frac_weak"] = jnp.float32(n_weak / n_all)
    return _combine(vel_losses, con_loss, metrics, st)


# ---- cost of each core's passes, per example (flow/cost.py has the units) ----


def _flow_matching_costs(st: Settings, pc: dict[str, float]) -> dict[str, float]:
    return {"velocity": 3.0 * pc["dropped"], "weak": 0.0, "consistency": 0.0}


def _solution_flow_costs(st: Settings, pc: dict[str, float]) -> dict[str, float]:
    """Dense, every query a separate full pass: 3 + [1 unc] and [1 unc] + [1 mix] + 3 + 1 (+ 3 FM)."""
    g = st.guidance
    ref = 1.0 if g.active else 0.0
    mix_pass = 1.0 if g.active and g.mix != 1.0 and not st.fm_on_con else 0.0
    fm = 3.0 if st.fm_on_con else 0.0
    return {"velocity": 3.0 + ref, "weak": 0.0, "consistency": ref + mix_pass + 3.0 + 1.0 + fm}


def _eflow_costs(st: Settings, pc: dict[str, float]) -> dict[str, float]:
    """3 c_d + [ref] per velocity sample; 3 c_w per weak sample; [ref] + [q mix] + 3 c_d + c_d target
    + [q + c_d MVA] (+ 3q FM) per consistency sample, with q a decoder-only query when decoupled."""
    g = st.guidance
    c_d, q = pc["dropped"], pc["query"]
    if not g.active:
        ref = 0.0
    elif g.mode == "path_drop":
        ref = pc["weak"]
    else:
        ref = c_d if g.uncond_dropped else 1.0
    mix_pass = q if g.active and g.mix != 1.0 and not st.fm_on_con else 0.0
    mva = q + c_d if st.mva_beta > 0 else 0.0
    fm = 3.0 * q if st.fm_on_con else 0.0
    return {"velocity": 3.0 * c_d + ref, "weak": 3.0 * pc["weak"],
            "consistency": ref + mix_pass + 3.0 * c_d + c_d + mva + fm}


# ---- per-objective validation ----


def _validate_flow_matching(c: ml_collections.ConfigDict) -> None:
    if c.guidance != "none" or c.velocity_ratio != 1.0 or c.weak_ratio or c.mva.enabled:
        raise ValueError("flow_matching trains unguided velocity only: set guidance='none', velocity_ratio=1, "
                         "weak_ratio=0, mva.enabled=False (CFG is a sampler option).")


def _validate_solution_flow(c: ml_collections.ConfigDict) -> None:
    if c.guidance == "path_drop" or c.weak_ratio or c.mva.enabled or c.token_drop:
        raise ValueError("solution_flow is SoFlow as published (dense, CFG target, no weak sub-batch, no MVA); "
                         "use objective 'eflow' for path-drop guidance, weak_ratio, mva or token_drop.")
    _validate_guided_drop(c)


def _validate_eflow(c: ml_collections.ConfigDict) -> None:
    if c.guidance == "path_drop" and c.weak_ratio == 0.0:
        raise ValueError("path_drop guidance needs weak_ratio > 0, else the weak path that builds the targets is "
                         "never trained.")
    _validate_guided_drop(c)


def _validate_guided_drop(c: ml_collections.ConfigDict) -> None:
    # SoFlow draws the condition-drop mask only when its guidance scale is above 1 and refuses a drop
    # rate otherwise: unguided, dropped conditions only train a null model nothing queries.
    if c.label_drop > 0 and not guide.guidance_active(c.guidance, float(c.guidance_scale)):
        raise ValueError(f"objective.label_drop={c.label_drop} with guidance={c.guidance!r} (scale "
                         f"{c.guidance_scale}): conditions are dropped only for guided targets (SoFlow); set "
                         f"objective.label_drop=0, or guidance 'cfg'/'path_drop' with guidance_scale > 1.")


# ---- the table ----


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective: its config defaults (deltas on the shared ones), validation, core, cost formula
    and few-step sampler ('renoise' for solution maps; None: sampled by ODE solvers with guidance)."""

    defaults: dict[str, Any]
    validate: Callable[[ml_collections.ConfigDict], None]
    core: Callable[[Params, Network, Draw, Settings], tuple[jax.Array, Metrics]]
    costs: Callable[[Settings, dict[str, float]], dict[str, float]]
    few_step_sampler: str | None


OBJECTIVES: dict[str, Objective] = {
    "flow_matching": Objective(
        defaults=dict(velocity_ratio=1.0, guidance="none", adaptive_weight=False),
        validate=_validate_flow_matching, core=flow_matching_core, costs=_flow_matching_costs,
        few_step_sampler=None),
    "solution_flow": Objective(
        defaults=dict(guidance="cfg"),
        validate=_validate_solution_flow, core=solution_flow_core, costs=_solution_flow_costs,
        few_step_sampler="renoise"),
    "eflow": Objective(
        defaults={"guidance": "path_drop", "weak_ratio": 0.1, "token_drop": True, "mva.enabled": True},
        validate=_validate_eflow, core=eflow_core, costs=_eflow_costs, few_step_sampler="renoise"),
}


def objective(name: str) -> Objective:
    """The table's entry for `name`, or an error listing the known names."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; use one of {tuple(OBJECTIVES)}.")
    return OBJECTIVES[name]


def default_objective_config(name: str) -> ml_collections.ConfigDict:
    """All objective settings, with SoFlow's ImageNet values (docs/METHOD.md sections 3, 5-8)."""
    entry = objective(name)
    c = ml_collections.ConfigDict()
    c.name = name
    c.interpolant = "linear"
    c.velocity_ratio = 0.75  # phi: velocity share of the batch
    c.weak_ratio = 0.0  # share of velocity samples on the weak path
    c.label_drop = 0.1  # cfg_mask ~ Bernoulli(0.1): null condition, unguided target
    c.guidance = "none"
    c.guidance_scale = 3.0
    c.mix = 0.25  # target <- m * guided + (1 - m) * sg v_pred
    c.decay_tau = 0.8
    c.decay_k = 0.025
    # Condition of the weak sub-batch: 'null' (SPRINT: always null), 'cond' (PDG with the own
    # condition, autoguidance ablation), or 'independent' (keeps the condition, dropped with
    # label_drop independently of the path drop, as SPRINT draws the two). The weak reference in
    # guided targets uses the null condition unless 'cond'.
    c.weak_label = "null"
    # 'drop_middle' (the middle replaced by mu) | 'skip_half' (STG-style: run every other middle
    # block, ablation d of docs/METHOD.md section 5).
    c.weak_path = "drop_middle"
    c.cfg_uncond_dropped = False  # eflow + guidance='cfg': token-dropped unconditional pass
    c.adaptive_weight = True
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
        # ablation only) | 'none'. See branches.mva_loss.
        dict(enabled=False, beta=1.0, split="uniform", snap_prob=0.0, weighting="consistency")
    )
    c.token_drop = False  # one net.sample_keep mask per sample
    # SPRINT's full-token fine-tune: the last fraction of the steps trains dense (token_drop off);
    # 0 = never. Inference is always dense. See dense_from_step.
    c.dense_finetune_frac = 0.0
    c.fm_on_con = False  # also regress the velocity on consistency samples (free with a trunk)
    for field, value in entry.defaults.items():
        section, _, key = field.rpartition(".")
        (c[section] if section else c)[key] = value
    return c


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Reject settings that an objective would silently ignore or that cannot work."""
    entry = objective(c.name)
    if c.guidance not in guide.GUIDANCE_MODES:
        raise ValueError(f"guidance={c.guidance!r}; use one of {guide.GUIDANCE_MODES}.")
    if c.mva.split not in ("uniform", "half"):
        raise ValueError(f"mva.split={c.mva.split!r}; use 'uniform' or 'half'.")
    if c.mva.weighting not in br.MVA_WEIGHTINGS:
        raise ValueError(f"mva.weighting={c.mva.weighting!r}; use one of {br.MVA_WEIGHTINGS}.")
    if not 0.0 <= c.label_drop <= 1.0:
        raise ValueError(f"objective.label_drop={c.label_drop}: it is a probability; set it in [0, 1] (0.1 is "
                         f"SoFlow's).")
    if not 0.0 <= c.velocity_ratio <= 1.0 or not 0.0 <= c.weak_ratio < 1.0:
        raise ValueError("velocity_ratio must be in [0, 1] and weak_ratio in [0, 1).")
    if c.weak_label not in WEAK_LABELS:
        raise ValueError(f"objective.weak_label={c.weak_label!r}; use one of {WEAK_LABELS}.")
    if c.weak_path not in WEAK_PATHS:
        raise ValueError(f"objective.weak_path={c.weak_path!r}; use one of {WEAK_PATHS}.")
    if not 0.0 <= c.dense_finetune_frac < 1.0:
        raise ValueError(f"objective.dense_finetune_frac={c.dense_finetune_frac}: use a fraction in [0, 1) "
                         f"(0 = no dense fine-tune; SPRINT uses ~0.1).")
    if c.dense_finetune_frac > 0 and not c.token_drop:
        raise ValueError("objective.dense_finetune_frac > 0 switches token drop off late in the run, but "
                         "objective.token_drop=False never drops: set token_drop=True or dense_finetune_frac=0.")
    entry.validate(c)


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


def batch_split(c: ml_collections.ConfigDict, batch_size: int) -> tuple[int, int, int]:
    """(n_full_velocity, n_weak, n_consistency) of a batch under objective config c."""
    return split_sizes(float(c.velocity_ratio), float(c.weak_ratio), batch_size)


def make_loss(obj_cfg: ml_collections.ConfigDict, net: Network, total_steps: int) -> LossFn:
    """Builds loss_fn(params, x0, cond, rng, step) -> (loss, metrics) for the named objective.

    Args:
      obj_cfg: from `default_objective_config` (possibly overridden).
      net: the network's pure functions. total_steps: K of the l schedule.
    Returns:
      A pure, jit-able loss_fn. The batch split is static (from x0.shape[0]); all noise, times,
      condition drops, token masks and MVA splits come from `rng` (flow/draw.py).
    """
    validate_config(obj_cfg)
    st, core = Settings.of(obj_cfg), objective(obj_cfg.name).core

    def loss_fn(params: Params, x0: jax.Array, cond: Condition, rng: jax.Array, step: jax.Array):
        return core(params, net, draw(st.draw, net, x0, cond, rng, step, total_steps), st)

    return loss_fn
