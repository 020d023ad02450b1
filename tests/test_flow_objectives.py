"""Objective-side invariants (docs/METHOD.md section 11, items 4, 5, 8, 10) and objective wiring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import make_linear_network

from eflow_jax.flow import branches as br
from eflow_jax.flow import guidance, interpolant, times
from eflow_jax.flow.network import Network
from eflow_jax.flow.objectives import (
    default_objective_config,
    make_loss,
    split_sizes,
    validate_config,
)

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def toy():
    """A cheap analytic network: the objectives' logic does not care what F is."""
    return make_linear_network(2, NUM_CLASSES)


def _batch(n=16, seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x0 = jax.random.normal(k[0], (n, 2))
    eps = jax.random.normal(k[1], (n, 2))
    y = jax.random.randint(k[2], (n,), 0, NUM_CLASSES)
    t, s = times.sample_consistency_times(k[3], n)
    return x0, eps, y, t, s


class Spy:
    """Wraps a Network and records every encode / decode call made while tracing.

    Tests trace with jax.make_jaxpr (no compile); `keep` is recorded as the traced object
    itself, so "the same mask" means literally the same array value in the program.
    """

    def __init__(self, net: Network, keep_shape=(3,)):
        self.net, self.calls, self.keep_shape = net, [], keep_shape

    def network(self) -> Network:
        def encode(params, x, t, y, keep, weak):
            self.calls.append(dict(kind="encode", n=x.shape[0], weak=weak, keep=keep))
            return self.net.encode(params, x, t, y, None, weak)  # the toy has no tokens

        def decode(params, trunk, t, s, y):
            self.calls.append(dict(kind="decode", n=t.shape[0]))
            return self.net.decode(params, trunk, t, s, y)

        def sample_keep(rng, n):  # a fake per-sample token mask
            return jax.random.randint(rng, (n,) + self.keep_shape, 0, 1000)

        return dataclasses.replace(self.net, encode=encode, decode=decode, sample_keep=sample_keep)

    def select(self, **match):
        return [c for c in self.calls if all(c.get(k) == v for k, v in match.items())]


def test_consistency_loss_gradient_equals_weighted_mse_gradient(toy):
    net, params = toy
    x0, eps, y, t, s = _batch()
    l = times.intermediate_time(t, s, 0.1)
    x_t, v_t = interpolant.interpolate(x0, eps, t)

    def soflow_form(p):
        N = net(p, x_t, t, s, y)
        loss, _ = br.solution_consistency(p, net, x_t, N, t, s, l, y, None, v_t, p=1.0, eps=0.01)
        return loss.mean()

    def mse_form(p):
        f_t = net.solution(p, x_t, t, s, y)
        x_l = x_t + (l - t)[:, None] * v_t
        f_l = jax.lax.stop_gradient(net.solution(p, x_l, l, s, y))
        dq = (f_t - f_l) / (t - l)[:, None]
        w_c = jax.lax.stop_gradient(1.0 / (jnp.mean(dq**2, axis=1) + 0.01))
        return jnp.mean(w_c * (t - l) / jnp.abs(s - t) * 0.5 * jnp.mean(dq**2, axis=1))

    g1, g2 = jax.jit(jax.grad(soflow_form))(params), jax.jit(jax.grad(mse_form))(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-3


def test_adaptive_weights_carry_no_gradient(toy):
    mse = jnp.array([0.1, 1.0, 5.0])
    grad_w = jax.grad(lambda m: br.adaptive_weight(m, 1.0, 0.01).sum())(mse)
    np.testing.assert_array_equal(grad_w, 0.0)
    net, params = toy
    x0, eps, y, t, _ = _batch()
    x_t, v_t = interpolant.interpolate(x0, eps, t)

    def adaptive(p):
        return br.velocity_loss(net(p, x_t, t, t, y), v_t, t, 1.0, 0.01, True)[0].mean()

    # The same loss with the weights frozen to plain constants: identical gradient.
    _, _, w_const = br.velocity_loss(net(params, x_t, t, t, y), v_t, t, 1.0, 0.01, True)

    def frozen(p):
        return jnp.mean(np.asarray(w_const) * br.per_sample_mse(net(p, x_t, t, t, y) - v_t))

    assert float(jnp.std(w_const)) > 0.01  # per-sample weights really differ

    grads = jax.jit(jax.grad(adaptive))(params), jax.jit(jax.grad(frozen))(params)
    for a, b in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


def test_decay_scale_shape():
    t = jnp.linspace(0.0, 1.0, 1001)
    c = guidance.decay_scale(t, 0.8, 0.025)
    assert bool(jnp.all(c[t <= 0.8] == 1.0))
    after = c[(t > 0.8) & (t < 1.0)]
    assert bool(jnp.all(jnp.diff(after) < 0))
    assert float(c[-1]) < 1e-6 and float(guidance.decay_scale(jnp.array([0.85]))[0]) < 0.2
    assert bool(jnp.all(guidance.decay_scale(t, 1.0) == 1.0))  # tau_d >= 1 disables the decay


@pytest.mark.parametrize("mode", ["path_drop", "cfg"])
def test_guided_target_uses_the_reference_forward(toy, mode):
    net, params = toy
    spy = Spy(net)
    snet = spy.network()
    x0, eps, y, t, _ = _batch()
    uncond = jnp.arange(16) % 4 == 0
    g = br.Guidance(mode=mode, scale=3.0, mix=0.25, tau_d=0.8, k=0.025)

    def branch(p, net):
        return br.velocity_branch(p, net, br.VelocityBatch(x0, eps, t, y, uncond), g,
                                  p=1.0, eps=0.01)[0]

    jax.make_jaxpr(branch, static_argnums=1)(params, snet)
    # One graded pass plus exactly one reference pass (weak path, or the dense full path).
    assert len(spy.select(kind="encode", weak=True)) == (mode == "path_drop")
    assert len(spy.select(kind="encode", weak=False)) == 1 + (mode == "cfg")
    loss = jax.jit(branch, static_argnums=1)(params, net)
    # Recompute the loss by hand from the reference network output at the null label.
    x_t, v_t = interpolant.interpolate(x0, eps, t)
    null = jnp.full((16,), NUM_CLASSES)
    v_ref = net.weak(params, x_t, t, null) if mode == "path_drop" else net(params, x_t, t, t, null)
    v_pred = net(params, x_t, t, t, jnp.where(uncond, NUM_CLASSES, y))
    assert float(jnp.abs(net.weak(params, x_t, t, null) - net(params, x_t, t, t, null)).max()) > 0.1
    c = guidance.decay_scale(t)[:, None]
    target = 0.25 * (v_t + c * 2.0 * (v_t - v_ref)) + 0.75 * v_pred
    target = jnp.where(uncond[:, None], v_t, target)
    mse = jnp.mean((v_pred - target) ** 2, axis=1)
    np.testing.assert_allclose(loss, mse / (mse + 0.01), rtol=1e-5)


def test_solution_flow_without_guidance_reduces_to_flow_matching(toy):
    net, params = toy
    x0, _, y, _, _ = _batch(32)
    rng = jax.random.PRNGKey(4)
    for adaptive in (True, False):
        fm = default_objective_config("flow_matching")
        fm.update(adaptive_weight=adaptive, label_drop=0.0)
        sf = default_objective_config("solution_flow")
        sf.update(guidance="none", label_drop=0.0, velocity_ratio=1.0, adaptive_weight=adaptive)
        l_fm, _ = jax.jit(make_loss(fm, net, 100))(params, x0, y, rng, 3)
        l_sf, _ = jax.jit(make_loss(sf, net, 100))(params, x0, y, rng, 3)
        np.testing.assert_allclose(l_sf, l_fm, rtol=1e-6)
    # With guidance on, the losses differ (so the check can fail).
    sf.guidance = "cfg"
    l_guided, _ = jax.jit(make_loss(sf, net, 100))(params, x0, y, rng, 3)
    assert abs(float(l_guided) - float(l_fm)) > 1e-4


def test_eflow_shares_one_keep_and_one_trunk_per_sample(toy):
    net, params = toy
    spy = Spy(net)
    x0, _, y, _, _ = _batch(16)
    cfg = default_objective_config("eflow")
    n_full, n_weak, n_con = split_sizes(cfg, 16)
    assert (n_full, n_weak, n_con) == (11, 1, 4)
    make_loss(cfg, spy.network(), 100)(params, x0, y, jax.random.PRNGKey(0), 5)  # Eager: masks are values.
    # One graded pass serves the velocity and the consistency samples, each with its own mask.
    shared = spy.select(kind="encode", n=n_full + n_con, weak=False)
    assert len(shared) == 1 and shared[0]["keep"] is not None
    assert len(spy.select(kind="decode", n=n_full + n_con)) == 1
    assert not spy.select(kind="encode", n=n_full, weak=False)  # No separate velocity pass.
    # Consistency samples: the target pass and the MVA u2 pass run as one pass over 2 x n_con
    # samples, and both halves reuse the graded pass's mask.
    assert not spy.select(kind="encode", n=n_con, weak=False)  # v_pred and u1 are decoder-only
    pair = spy.select(kind="encode", n=2 * n_con, weak=False)
    assert len(pair) == 1
    np.testing.assert_array_equal(shared[0]["keep"][n_full:], pair[0]["keep"][:n_con])
    np.testing.assert_array_equal(shared[0]["keep"][n_full:], pair[0]["keep"][n_con:])
    assert len(spy.select(kind="decode", n=n_con)) == 3  # v_pred, u1, weak ref
    # Velocity samples have a mask of their own; weak path passes are dense.
    assert not np.array_equal(shared[0]["keep"][:n_con], pair[0]["keep"][:n_con])
    assert all(c["keep"] is None for c in spy.select(kind="encode", weak=True))
    assert len(spy.select(kind="encode", n=n_weak, weak=True)) == 1


def test_merged_passes_equal_separate_passes():
    """eflow's merged passes (one graded pass over the velocity and consistency samples; one
    stop-gradient pass for the target and MVA's u2) give the loss and the gradient of every pass run
    on its own (float32; a tiny DiT with token drop, path-drop guidance, mix and MVA)."""
    from eflow_jax.models import dit

    cfg = dit.model_config("tiny", video_shape=(4, 16, 16, 3), patch=(1, 2, 2), tile=(2, 4, 4),
                           cell=(1, 4, 4), drop_group=(1, 2, 2), dtype="float32", num_classes=5,
                           attention_impl="xla")
    model, net = dit.make_network(cfg)
    params = jax.tree.map(lambda p: 0.05 * jax.random.normal(jax.random.key(1), p.shape),
                          jax.tree.map(lambda b: getattr(b, "value", b), dit.init_params(model, jax.random.key(0)),
                                       is_leaf=lambda b: hasattr(b, "value")))
    k = jax.random.split(jax.random.key(2), 8)
    n_v, n_c, shape = 3, 2, (4, 16, 16, 3)
    t_c, s_c = times.sample_consistency_times(k[4], n_c)
    vel = br.VelocityBatch(jax.random.normal(k[0], (n_v, *shape)), jax.random.normal(k[1], (n_v, *shape)),
                           jax.random.uniform(k[2], (n_v,), minval=0.1, maxval=0.9), jnp.array([0, 1, 2]),
                           jnp.array([False, True, False]), net.sample_keep(k[3], n_v))
    con = br.ConsistencyBatch(jax.random.normal(k[5], (n_c, *shape)), jax.random.normal(k[6], (n_c, *shape)),
                              t_c, s_c, 0.5 * (t_c + s_c), jnp.array([3, 4]), jnp.array([False, False]),
                              jnp.array([0.3, 0.6]), net.sample_keep(k[7], n_c))
    g = br.Guidance(mode="path_drop", scale=2.0, mix=0.5)
    opts = dict(p=1.0, eps=0.01)

    def merged(params):  # What eflow_core runs.
        v_pred, graded = br.shared_graded_pass(params, net, vel, con)
        l_v, _ = br.velocity_branch(params, net, vel, g, v_pred=v_pred, **opts)
        l_c, _ = br.consistency_branch(params, net, con, g, reuse_trunk=True, mva_beta=1.0, graded=graded,
                                       **opts)
        return l_v.sum() + l_c.sum()

    def separate(params):  # Every pass on its own, from the building blocks.
        l_v, _ = br.velocity_branch(params, net, vel, g, **opts)
        x_t, v_t = interpolant.interpolate(con.x0, con.eps, con.t)
        y_in = br.labels_in(con.y, con.uncond_mask, net.null_label)
        trunk = net.encode(params, x_t, con.t, y_in, con.keep, False)
        N = net.decode(params, trunk, con.t, con.s, y_in)

        def query(s_query):
            return jax.lax.stop_gradient(net.decode(params, jax.lax.stop_gradient(trunk), con.t, s_query, y_in))

        target = br._target(net, params, x_t, v_t, query(con.t), con.t, con.y, con.uncond_mask, con.keep, g)
        l_c, m = br.solution_consistency(params, net, x_t, N, con.t, con.s, con.l, y_in, con.keep, target, **opts)
        l_m, _ = br.mva_regularizer(params, net, x_t, N, query, con.t, con.s, con.lam, y_in, con.keep,
                                    con_weight=m["con_weight"], **opts)
        return l_v.sum() + (l_c + l_m).sum()

    (one, g_one), (two, g_two) = (jax.jit(jax.value_and_grad(f))(params) for f in (merged, separate))
    np.testing.assert_allclose(one, two, rtol=1e-5)
    flat_one, flat_two = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(x)]) for x in (g_one, g_two))
    assert np.linalg.norm(flat_one - flat_two) < 1e-5 * np.linalg.norm(flat_two)
    assert np.linalg.norm(flat_two) > 1e-3  # Not a comparison of zeros.


def test_solution_flow_passes_are_dense_and_separate(toy):
    net, params = toy
    spy = Spy(net)
    x0, _, y, _, _ = _batch(16)
    jax.make_jaxpr(make_loss(default_objective_config("solution_flow"), spy.network(), 100))(
        params, x0, y, jax.random.PRNGKey(0), 5)
    assert all(c["keep"] is None for c in spy.select(kind="encode"))
    assert not spy.select(kind="encode", weak=True)
    # Velocity: graded + unconditional. Consistency: unconditional + mix + graded + target.
    assert len(spy.select(kind="encode", n=12)) == 2
    assert len(spy.select(kind="encode", n=4)) == 4


def test_loss_is_deterministic_and_jittable(toy):
    net, params = toy
    x0, _, y, _, _ = _batch(32)
    step_fn = jax.jit(jax.value_and_grad(make_loss(default_objective_config("eflow"), net, 100),
                                         has_aux=True))
    (loss_a, metrics), grads = step_fn(params, x0, y, jax.random.PRNGKey(1), 7)
    (loss_b, _), _ = step_fn(params, x0, y, jax.random.PRNGKey(1), 7)
    assert float(loss_a) == float(loss_b)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for key in ("vel_mse", "weak_mse", "con_mse", "mva_residual", "vel_weight", "con_weight",
                "frac_weak", "guidance_scale", "loss"):
        assert metrics[key].shape == () and bool(jnp.isfinite(metrics[key]))
    np.testing.assert_allclose(metrics["frac_weak"], 2 / 32)
    np.testing.assert_allclose(metrics["guidance_scale"], 3.0)


def test_batch_split_and_config_errors():
    with pytest.raises(ValueError, match="too small"):
        split_sizes(default_objective_config("eflow"), 4)
    assert split_sizes(default_objective_config("solution_flow"), 256) == (192, 0, 64)
    assert split_sizes(default_objective_config("eflow"), 256) == (173, 19, 64)
    bad = default_objective_config("solution_flow")
    bad.mva.enabled = True
    with pytest.raises(ValueError, match="eflow"):
        validate_config(bad)
    bad = default_objective_config("eflow")
    bad.weak_ratio = 0.0
    with pytest.raises(ValueError, match="weak_ratio"):
        validate_config(bad)
    with pytest.raises(ValueError, match="Unknown objective"):
        default_objective_config("meanflow")


def test_time_samplers():
    t, s = times.sample_consistency_times(jax.random.PRNGKey(0), 4096)
    assert bool(jnp.all(s <= t - 1e-4 + 1e-7)) and bool(jnp.all(s >= 0)) and bool(jnp.all(t <= 1))
    # logit-normal medians: sigmoid(0.2) for t's draw, sigmoid(-1) for s's.
    np.testing.assert_allclose(jnp.median(t), jax.nn.sigmoid(0.2), atol=0.02)
    np.testing.assert_allclose(times.l_ratio(0, 100), 0.1)
    np.testing.assert_allclose(times.l_ratio(100, 100), 0.002, rtol=1e-6)
    l = times.intermediate_time(t, s, times.l_ratio(50, 100))
    assert bool(jnp.all((l < t) & (l >= s)))
    np.testing.assert_allclose(times.shift_time(jnp.array([0.5]), 3.0), [0.75])
    t2, s2 = times.snap_endpoints(jax.random.PRNGKey(1), t, s, 0.1)
    assert 0.05 < float(jnp.mean(t2 == 1.0)) < 0.15 and bool(jnp.all(s2 < t2))


@pytest.mark.parametrize("overrides", [
    dict(fm_on_con=True),
    dict(guidance="cfg", cfg_uncond_dropped=True),
    dict(weak_label="cond"),
    dict(mva=dict(enabled=True, beta=0.5, split="half", snap_prob=0.1)),
    dict(interpolant="trig", time=dict(shift=3.0)),
    dict(guidance="none", label_drop=0.0, mva=dict(enabled=False)),
])
def test_eflow_ablation_switches_trace(toy, overrides):
    """Every ablation switch builds a valid program (traced only, so this stays cheap)."""
    net, params = toy
    spy = Spy(net)
    cfg = default_objective_config("eflow")
    cfg.update(overrides)
    x0, _, y, _, _ = _batch(16)
    jaxpr = jax.make_jaxpr(make_loss(cfg, spy.network(), 100))(params, x0, y,
                                                                 jax.random.PRNGKey(0), 5)
    assert jaxpr.out_avals[0].shape == ()
    decodes = len(spy.select(kind="decode", n=4))
    # The online N of the consistency samples is decoded in the shared graded pass (n = 15).
    assert len(spy.select(kind="decode", n=15)) == 1
    if overrides.get("fm_on_con"):
        assert decodes == 3  # graded v_pred replaces the stop-gradient mix query; u1; weak ref
    if overrides.get("guidance") == "none":
        assert decodes == 1  # unguided, no MVA: just the target pass


def test_shared_graded_pass_refuses_one_dropped_sub_batch(toy):
    net, params = toy
    x0, eps, y, t, s = _batch(4)
    no = jnp.zeros((4,), bool)
    vel = br.VelocityBatch(x0, eps, t, y, no, None)
    con = br.ConsistencyBatch(x0, eps, t, s, s, y, no, 0.5 * t, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="token-dropped"):
        br.shared_graded_pass(params, net, vel, con)
