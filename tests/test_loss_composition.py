"""Loss composition of the objectives against a hand computation (project issue 12).

A closed-form network (linear in x, with condition-, time-, token-mask- and weak-path-dependent
terms) lets every branch of flow_matching, solution_flow and eflow be recomputed here in
numpy float64 straight from the method's formulas. Each test compares the library's pure
core (explicit noise, times, conditions, masks) with that reference, for the loss value and for
the gradient, so a term that is dropped, swapped, mis-weighted, mis-conditioned or not under
stop-gradient changes a number and fails a test. Every test runs for class labels and for text
conditions (token states with a padding mask; the network's learned null token for null samples).

The gradient reference uses the fact that every weight and target is stop-gradient: the
gradient of the loss equals that of sum_branches <G, graded output>, where G = dL/d(output)
is computed by hand in numpy and only the network's own derivative comes from JAX.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax.flow.condition import Condition
from eflow_jax.flow.draw import ConsistencyBatch, Draw, VelocityBatch
from eflow_jax.flow.network import Network
from eflow_jax.flow.objectives import (
    Settings,
    default_objective_config,
    eflow_core,
    flow_matching_core,
    solution_flow_core,
)

D = 4  # data dim
NUM_CLASSES = 3
NULL = NUM_CLASSES
L, DT = 3, 5  # text tokens, text width
KINDS = ("label", "text")


def _draw_params(seed=0):
    rng = np.random.default_rng(seed)
    r = lambda *s: 0.6 * rng.standard_normal(s)  # noqa: E731
    return dict(W=r(D, D) + np.eye(D), W_weak=r(D, D), b=r(D), b_weak=r(D), E=r(NUM_CLASSES + 1, D),
                kv=r(D), a=r(D), c=r(D), Wt=r(DT, D), N=r(D))


P64 = _draw_params()


# ---- the closed-form network, in JAX (what the library sees) and numpy (the reference) ----

def _keep_term(keep):
    """Token masks enter as a per-sample scalar: the mean kept id / 100."""
    return None if keep is None else keep.astype(jnp.float32).mean(axis=-1) / 100.0


def _cond_term(p, cond):
    """The condition's vector: E[label] (null row for null samples), or the masked mean of the text
    tokens times Wt (the learned null vector N for null samples)."""
    if cond.label is not None:
        return p["E"][cond.labels(NULL)]
    m = cond.text_mask.astype(jnp.float32)[:, :, None]
    text = jnp.sum(cond.text * m, 1) / jnp.sum(m, 1)
    return jnp.where(cond.null[:, None], p["N"], text @ p["Wt"])


def _encode(p, x, t, cond, keep, weak):
    W, b = (p["W_weak"], p["b_weak"]) if weak else (p["W"], p["b"])
    h = x @ W + t[:, None] * b + _cond_term(p, cond)
    if keep is not None:
        h = h + _keep_term(keep)[:, None] * p["kv"]
    return h


def _decode(p, h, t, s):
    dt = (t - s)[:, None]
    return h * (1.0 + dt * p["a"]) + dt * p["c"]


NET = Network(encode=_encode, decode=_decode, sample_keep=lambda rng, n: None, decoupled=True)
PARAMS = {k: jnp.asarray(v, jnp.float32) for k, v in P64.items()}


def np_cond(b, null):
    """The numpy condition vector [n, D] of sub-batch b, null where `null` (bool [n] or a scalar)."""
    null = np.broadcast_to(null, b["t"].shape)
    if b["kind"] == "label":
        return P64["E"][np.where(null, NULL, b["y"])]
    m = b["mask"][:, :, None].astype(np.float64)
    text = (b["text"] * m).sum(1) / m.sum(1)
    return np.where(null[:, None], P64["N"], text @ P64["Wt"])


def np_F(x, t, s, cvec, keep=None, weak=False):
    """F(x, t, s, c) of the closed-form net in float64, given the condition vector cvec [n, D]."""
    W, b = (P64["W_weak"], P64["b_weak"]) if weak else (P64["W"], P64["b"])
    h = x @ W + t[:, None] * b + cvec
    if keep is not None:
        h = h + (np.asarray(keep, np.float64).mean(-1) / 100.0)[:, None] * P64["kv"]
    dt = (t - s)[:, None]
    return h * (1.0 + dt * P64["a"]) + dt * P64["c"]


def np_decay(t, tau=0.8, k=0.025):
    d = np.clip((1 - t) / (1 - tau), 0.0, 1 - 1e-6)
    return np.where(t <= tau, 1.0, 1.0 - np.exp(-k * d / (1 - d)))


# ---- explicit inputs ----

def _inputs(kind="label"):
    rng = np.random.default_rng(1)
    n_f, n_w, n_c = 3, 2, 4
    vel = dict(x0=rng.standard_normal((n_f, D)), eps=rng.standard_normal((n_f, D)),
               t=np.array([0.3, 0.9, 0.6]), y=np.array([0, 2, 1]),
               uncond=np.array([False, False, True]), keep=np.array([[1, 5], [7, 30], [2, 90]]))
    weak = dict(x0=rng.standard_normal((n_w, D)), eps=rng.standard_normal((n_w, D)),
                t=np.array([0.45, 0.85]), y=np.array([1, 2]), uncond=np.array([True, True]))
    con = dict(x0=rng.standard_normal((n_c, D)), eps=rng.standard_normal((n_c, D)),
               t=np.array([0.9, 0.7, 0.5, 0.95]), s=np.array([0.1, 0.0, 0.2, 0.4]),
               y=np.array([2, 0, 1, 1]), uncond=np.array([False, True, False, False]),
               lam=np.array([0.3, 0.5, 0.8, 0.6]), keep=np.array([[3, 8], [60, 61], [0, 10], [44, 2]]))
    con["l"] = con["t"] + (con["s"] - con["t"]) * 0.1
    for b in (vel, weak, con):
        n = len(b["t"])
        b["kind"] = kind
        b["text"] = rng.standard_normal((n, L, DT))
        b["mask"] = np.arange(L)[None] < rng.integers(1, L + 1, n)[:, None]  # Prefixes of 1..L tokens.
    return vel, weak, con


def _jax_cond(b):
    if b["kind"] == "label":
        return Condition.of_labels(jnp.asarray(b["y"], jnp.int32))
    return Condition.of_text(jnp.asarray(b["text"], jnp.float32), jnp.asarray(b["mask"]))


def _vel_batch(v, with_keep):
    return VelocityBatch(jnp.asarray(v["x0"], jnp.float32), jnp.asarray(v["eps"], jnp.float32),
                         jnp.asarray(v["t"], jnp.float32), _jax_cond(v), jnp.asarray(v["uncond"]),
                         jnp.asarray(v["keep"], jnp.int32) if with_keep else None)


def _con_batch(c, with_keep):
    f = lambda k: jnp.asarray(c[k], jnp.float32)  # noqa: E731
    return ConsistencyBatch(f("x0"), f("eps"), f("t"), f("s"), f("l"), _jax_cond(c), jnp.asarray(c["uncond"]),
                            f("lam"), jnp.asarray(c["keep"], jnp.int32) if with_keep else None)


# ---- the reference, written from the method's formulas ----

def _guided(x_t, v_t, v_pred, b, keep, cfg):
    """SoFlow's guided, mixed, masked target (and the reference velocity it used)."""
    if cfg.guidance == "none" or cfg.guidance_scale <= 1.0:
        return v_t
    t, uncond = b["t"], b["uncond"]
    if cfg.guidance == "path_drop":
        v_ref = np_F(x_t, t, t, np_cond(b, cfg.weak_label != "cond"), weak=True)
    else:
        v_ref = np_F(x_t, t, t, np_cond(b, True), keep if cfg.cfg_uncond_dropped else None)
    g = v_t + (np_decay(t, cfg.decay_tau, cfg.decay_k) * (cfg.guidance_scale - 1.0))[:, None] * (v_t - v_ref)
    g = cfg.mix * g + (1 - cfg.mix) * v_pred
    return np.where(uncond[:, None], v_t, g)


def _vel_ref(v, cfg, keep):
    """Per-sample velocity losses and dL_i/d(v_pred_i) (before the batch share)."""
    t = v["t"]
    x_t = (1 - t)[:, None] * v["x0"] + t[:, None] * v["eps"]
    v_t = v["eps"] - v["x0"]
    k = v["keep"] if keep else None
    pred = np_F(x_t, t, t, np_cond(v, v["uncond"]), k)
    target = _guided(x_t, v_t, pred, v, k, cfg)
    mse = np.mean((pred - target) ** 2, axis=1)
    w = 1.0 / (mse + cfg.eps) ** cfg.p if cfg.adaptive_weight else np.ones_like(mse)
    return w * mse, w[:, None] * 2 * (pred - target) / D


def _weak_ref(v, cfg):
    t = v["t"]
    x_t = (1 - t)[:, None] * v["x0"] + t[:, None] * v["eps"]
    v_t = v["eps"] - v["x0"]
    pred = np_F(x_t, t, t, np_cond(v, cfg.weak_label != "cond"), weak=True)
    mse = np.mean((pred - v_t) ** 2, axis=1)
    w = 1.0 / (mse + cfg.eps) ** cfg.p if cfg.adaptive_weight else np.ones_like(mse)
    return w * mse, w[:, None] * 2 * (pred - v_t) / D


def _con_ref(c, cfg, keep, mva):
    """Per-sample consistency (+ beta MVA) losses and dL_i/dN_i."""
    t, s, l, lam = c["t"], c["s"], c["l"], c["lam"]
    x_t = (1 - t)[:, None] * c["x0"] + t[:, None] * c["eps"]
    v_t = c["eps"] - c["x0"]
    y_in = np_cond(c, c["uncond"])
    k = c["keep"] if keep else None
    N = np_F(x_t, t, s, y_in, k)
    v_pred = np_F(x_t, t, t, y_in, k)
    target = _guided(x_t, v_t, v_pred, c, k, cfg)
    x_l = x_t + (l - t)[:, None] * target
    f_l = x_l + (s - l)[:, None] * np_F(x_l, l, s, y_in, k)
    f_t = x_t + (s - t)[:, None] * N
    dq = (f_t - f_l) / (t - l)[:, None]
    w_c = 1.0 / (np.mean(dq**2, axis=1) + cfg.eps) ** cfg.p
    sign = np.sign(s - t)
    loss = sign * w_c * np.mean(N * dq, axis=1)
    grad = (sign * w_c)[:, None] * dq / D
    if mva:
        m = t + lam * (s - t)
        u1 = np_F(x_t, t, m, y_in, k)
        x_m = x_t + (m - t)[:, None] * u1
        u2 = np_F(x_m, m, s, y_in, k)
        r = N - (lam[:, None] * u1 + (1 - lam)[:, None] * u2)
        res = np.mean(r**2, axis=1)
        w_m = {"consistency": w_c, "adaptive": 1.0 / (res + cfg.eps) ** cfg.p,
               "none": np.ones_like(res)}[cfg.mva.weighting]
        beta = cfg.mva.beta
        loss = loss + beta * w_m * res
        grad = grad + (beta * w_m)[:, None] * 2 * r / D
    return loss, grad


def _total(vel_losses, con_losses):
    """L = (n_v / n) mean(velocity-sample losses) + (n_c / n) mean(consistency losses)."""
    vel = np.concatenate(vel_losses) if vel_losses else np.zeros(0)
    n = len(vel) + (0 if con_losses is None else len(con_losses))
    total = 0.0
    if len(vel):
        total += len(vel) / n * vel.mean()
    if con_losses is not None:
        total += len(con_losses) / n * con_losses.mean()
    return total, n


# ---- checks ----

def _assert_grads_close(loss_fn, surrogate):
    g = jax.grad(lambda p: loss_fn(p)[0])(PARAMS)
    g_ref = jax.grad(surrogate)(PARAMS)
    for name in PARAMS:
        np.testing.assert_allclose(g[name], g_ref[name], rtol=2e-4, atol=1e-6, err_msg=name)
    assert max(float(jnp.abs(a).max()) for a in g.values()) > 1e-2  # not a vacuous 0 == 0


def _graded(p, x_t, t, s, b, null, keep=None, weak=False):
    """The JAX network's output at fixed (stop-gradient) inputs, for the gradient surrogate."""
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    k = None if keep is None else jnp.asarray(keep, jnp.int32)
    cond = _jax_cond(b).nulled(jnp.broadcast_to(jnp.asarray(null), (len(b["t"]),)))
    return NET.decode(p, NET.encode(p, f32(x_t), f32(t), cond, k, weak), f32(t), f32(s))


def _x_t(b):
    return (1 - b["t"])[:, None] * b["x0"] + b["t"][:, None] * b["eps"]


# eps = 0.5 keeps the adaptive weights away from saturation (w mse = mse / (mse + eps) ~ 1 when
# mse >> eps, which would hide errors in what is regressed); 'default' keeps every default.
EFLOW_VARIANTS = {
    "default": {},
    "eps_half": dict(eps=0.5),
    "beta_half_adaptive": dict(eps=0.5, mva=dict(beta=0.5, weighting="adaptive")),
    "beta2_plain": dict(eps=0.5, mva=dict(beta=2.0, weighting="none")),
    "weak_cond_label": dict(eps=0.5, weak_label="cond"),
    "no_mva": dict(eps=0.5, mva=dict(enabled=False)),
    "cfg_dropped_uncond": dict(eps=0.5, guidance="cfg", cfg_uncond_dropped=True),
}


def _eflow_cfg(overrides):
    cfg = default_objective_config("eflow")
    cfg.update(overrides)
    return cfg


def _eflow(p, vb, wb, cb, cfg):
    return eflow_core(p, NET, Draw(vb, wb, cb), Settings.of(cfg))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", sorted(EFLOW_VARIANTS))
def test_eflow_loss_value_matches_hand_computation(variant, kind):
    """eflow_core = (n_v/n) mean(vel + weak losses) + (n_c/n) mean(L_con + beta L_mva), by hand."""
    cfg = _eflow_cfg(EFLOW_VARIANTS[variant])
    v, w, c = _inputs(kind)
    loss, _ = _eflow(PARAMS, _vel_batch(v, True), _vel_batch(w, False), _con_batch(c, True), cfg)
    l_v, _ = _vel_ref(v, cfg, keep=True)
    l_w, _ = _weak_ref(w, cfg)
    l_c, _ = _con_ref(c, cfg, keep=True, mva=cfg.mva.enabled)
    expected, _ = _total([l_v, l_w], l_c)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["default", "eps_half", "beta_half_adaptive", "beta2_plain",
                                     "weak_cond_label"])
def test_eflow_gradient_matches_hand_computation(variant, kind):
    """The gradient flows only through the graded outputs, with every weight and target sg."""
    cfg = _eflow_cfg(EFLOW_VARIANTS[variant])
    v, w, c = _inputs(kind)
    _, g_v = _vel_ref(v, cfg, keep=True)
    _, g_w = _weak_ref(w, cfg)
    _, g_c = _con_ref(c, cfg, keep=True, mva=cfg.mva.enabled)
    n = len(v["t"]) + len(w["t"]) + len(c["t"])  # each sample's share is 1 / n

    def surrogate(p):
        terms = [(g_v, _graded(p, _x_t(v), v["t"], v["t"], v, v["uncond"], v["keep"])),
                 (g_w, _graded(p, _x_t(w), w["t"], w["t"], w, cfg.weak_label != "cond", weak=True)),
                 (g_c, _graded(p, _x_t(c), c["t"], c["s"], c, c["uncond"], c["keep"]))]
        return sum(jnp.sum(jnp.asarray(gr, jnp.float32) * out) for gr, out in terms) / n

    _assert_grads_close(
        lambda p: _eflow(p, _vel_batch(v, True), _vel_batch(w, False), _con_batch(c, True), cfg), surrogate)


@pytest.mark.parametrize("kind", KINDS)
def test_eflow_branch_shares_are_their_batch_fractions(kind):
    """Each sub-batch alone, then together: the shares are n_branch / n, not swapped or equal."""
    cfg = _eflow_cfg(dict(eps=0.5))
    v, w, c = _inputs(kind)
    vb, wb, cb = _vel_batch(v, True), _vel_batch(w, False), _con_batch(c, True)
    l_v, _ = _vel_ref(v, cfg, keep=True)
    l_w, _ = _weak_ref(w, cfg)
    l_c, _ = _con_ref(c, cfg, keep=True, mva=True)
    np.testing.assert_allclose(float(_eflow(PARAMS, vb, None, None, cfg)[0]), l_v.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(_eflow(PARAMS, None, wb, None, cfg)[0]), l_w.mean(), rtol=1e-4)
    np.testing.assert_allclose(float(_eflow(PARAMS, None, None, cb, cfg)[0]), l_c.mean(), rtol=1e-4)
    both = float(_eflow(PARAMS, vb, wb, cb, cfg)[0])
    np.testing.assert_allclose(both, (l_v.sum() + l_w.sum() + l_c.sum()) / 9, rtol=1e-4)
    # The velocity-side and consistency means differ, so swapped shares would show.
    assert abs(np.concatenate([l_v, l_w]).mean() - l_c.mean()) > 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_solution_flow_loss_and_gradient_match_hand_computation(kind):
    """SoFlow: dense passes, CFG target from the full net at the null condition, no weak, no MVA."""
    cfg = default_objective_config("solution_flow")
    cfg.eps = 0.5
    st = Settings.of(cfg)
    v, _, c = _inputs(kind)
    vb, cb = _vel_batch(v, False), _con_batch(c, False)
    loss, _ = solution_flow_core(PARAMS, NET, Draw(vb, None, cb), st)
    l_v, g_v = _vel_ref(v, cfg, keep=False)
    l_c, g_c = _con_ref(c, cfg, keep=False, mva=False)
    expected, n = _total([l_v], l_c)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-4)

    def surrogate(p):
        return (jnp.sum(jnp.asarray(g_v, jnp.float32) * _graded(p, _x_t(v), v["t"], v["t"], v, v["uncond"]))
                + jnp.sum(jnp.asarray(g_c, jnp.float32) * _graded(p, _x_t(c), c["t"], c["s"], c, c["uncond"]))) / n

    _assert_grads_close(lambda p: solution_flow_core(p, NET, Draw(vb, None, cb), st), surrogate)
    # phi = 0 (pure consistency, CIFAR) and phi = 1 (velocity only) are the branch means.
    np.testing.assert_allclose(float(solution_flow_core(PARAMS, NET, Draw(None, None, cb), st)[0]), l_c.mean(),
                               rtol=1e-4)
    np.testing.assert_allclose(float(solution_flow_core(PARAMS, NET, Draw(vb, None, None), st)[0]), l_v.mean(),
                               rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adaptive", [False, True])
def test_flow_matching_loss_and_gradient_match_hand_computation(adaptive, kind):
    """Flow matching: (adaptively weighted) MSE of F(x_t, t, t, c') to v_t, no guidance."""
    cfg = default_objective_config("flow_matching")
    cfg.update(adaptive_weight=adaptive, eps=0.5)
    st = Settings.of(cfg)
    v, _, _ = _inputs(kind)
    vb = _vel_batch(v, False)
    loss, _ = flow_matching_core(PARAMS, NET, Draw(vb, None, None), st)
    l_v, g_v = _vel_ref(v, cfg, keep=False)
    np.testing.assert_allclose(float(loss), l_v.mean(), rtol=1e-4)

    def surrogate(p):
        out = _graded(p, _x_t(v), v["t"], v["t"], v, v["uncond"])
        return jnp.sum(jnp.asarray(g_v, jnp.float32) * out) / len(v["t"])

    _assert_grads_close(lambda p: flow_matching_core(p, NET, Draw(vb, None, None), st), surrogate)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_network_matches_jax_network(kind):
    """The numpy reference evaluates the same network as the JAX one (guards the tests above)."""
    v, _, c = _inputs(kind)
    x = _x_t(c)
    for keep, weak in ((None, False), (c["keep"], False), (None, True)):
        null = weak  # The weak path at the null condition, the others at the own condition.
        np.testing.assert_allclose(_graded(PARAMS, x, c["t"], c["s"], c, null, keep, weak),
                                   np_F(x, c["t"], c["s"], np_cond(c, null), keep, weak), rtol=1e-5, atol=1e-5)
    # The condition, the weak path, the token mask and s all change F here.
    own = np_cond(c, False)
    base = np_F(x, c["t"], c["s"], own, c["keep"])
    for other in (np_F(x, c["t"], c["s"], np_cond(c, True), c["keep"]),
                  np_F(x, c["t"], c["s"], own, c["keep"], weak=True),
                  np_F(x, c["t"], c["s"], own, None),
                  np_F(x, c["t"], c["s"] + 0.05, own, c["keep"])):
        assert np.abs(other - base).max(axis=1).min() > 1e-3  # every sample
    if kind == "text":  # The padding mask matters: every token counted would change the condition.
        full = dict(c, mask=np.ones_like(c["mask"]))
        assert np.abs(np_cond(full, False) - own).max() > 1e-3 and not c["mask"].all()
