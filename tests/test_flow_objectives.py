"""Objective-side invariants (docs/METHOD.md section 11, items 4, 5, 8, 10) and objective wiring."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import make_linear_network

from eflow_jax.flow import branches as br
from eflow_jax.flow import guidance, interpolant, objectives, times
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.draw import ConsistencyBatch, Draw, VelocityBatch
from eflow_jax.flow.network import Network
from eflow_jax.flow.objectives import (
    Settings,
    batch_split,
    default_objective_config,
    make_loss,
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
    y = Condition.of_labels(jax.random.randint(k[2], (n,), 0, NUM_CLASSES))
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
        def encode(params, x, t, cond, keep, weak):
            self.calls.append(dict(kind="encode", n=x.shape[0], weak=weak, keep=keep, null=cond.null))
            return self.net.encode(params, x, t, cond, None, weak)  # the toy has no tokens

        def decode(params, trunk, t, s):
            self.calls.append(dict(kind="decode", n=t.shape[0]))
            return self.net.decode(params, trunk, t, s)

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
        x_l = interpolant.euler_step(x_t, v_t, t, l)
        F_l = jax.lax.stop_gradient(net(p, x_l, l, s, y))
        loss, _, _ = br.consistency_loss(N, F_l, x_t, x_l, t, s, l, p=1.0, eps=0.01)
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
    cfg = default_objective_config("eflow")
    cfg.update(guidance=mode, guidance_scale=3.0, mix=0.25, decay_tau=0.8, decay_k=0.025)
    st = Settings.of(cfg)
    d = Draw(VelocityBatch(x0, eps, t, y, uncond), None, None)

    def velocity_only(p, net):
        return objectives.eflow_core(p, net, d, st)[1]["vel_loss"]

    jax.make_jaxpr(velocity_only, static_argnums=1)(params, snet)
    # One graded pass plus exactly one reference pass (weak path, or the dense full path), the
    # reference at the null condition everywhere.
    assert len(spy.select(kind="encode", weak=True)) == (mode == "path_drop")
    assert len(spy.select(kind="encode", weak=False)) == 1 + (mode == "cfg")
    reference = [c for c in spy.calls if c["kind"] == "encode"][-1 if mode == "cfg" else 1]
    assert reference["null"].shape == (16,)
    loss = jax.jit(velocity_only, static_argnums=1)(params, net)
    # Recompute the loss by hand from the reference network output at the null condition.
    x_t, v_t = interpolant.interpolate(x0, eps, t)
    null = y.nulled()
    v_ref = net.weak(params, x_t, t, null) if mode == "path_drop" else net(params, x_t, t, t, null)
    v_pred = net(params, x_t, t, t, y.nulled(uncond))
    assert float(jnp.abs(net.weak(params, x_t, t, null) - net(params, x_t, t, t, null)).max()) > 0.1
    c = guidance.decay_scale(t)[:, None]
    target = 0.25 * (v_t + c * 2.0 * (v_t - v_ref)) + 0.75 * v_pred
    target = jnp.where(uncond[:, None], v_t, target)
    mse = jnp.mean((v_pred - target) ** 2, axis=1)
    np.testing.assert_allclose(loss, jnp.mean(mse / (mse + 0.01)), rtol=1e-5)


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
    n_full, n_weak, n_con = batch_split(cfg, 16)
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
    vel = VelocityBatch(jax.random.normal(k[0], (n_v, *shape)), jax.random.normal(k[1], (n_v, *shape)),
                        jax.random.uniform(k[2], (n_v,), minval=0.1, maxval=0.9),
                        Condition.of_labels(jnp.array([0, 1, 2])), jnp.array([False, True, False]),
                        net.sample_keep(k[3], n_v))
    con = ConsistencyBatch(jax.random.normal(k[5], (n_c, *shape)), jax.random.normal(k[6], (n_c, *shape)),
                           t_c, s_c, 0.5 * (t_c + s_c), Condition.of_labels(jnp.array([3, 4])),
                           jnp.array([False, False]), jnp.array([0.3, 0.6]), net.sample_keep(k[7], n_c))
    cfg = default_objective_config("eflow")
    cfg.update(guidance_scale=2.0, mix=0.5)
    st = Settings.of(cfg)

    def merged(params):  # What eflow_core runs.
        loss, _ = objectives.eflow_core(params, net, Draw(vel, None, con), st)
        return loss

    def separate(params):  # Every pass on its own, straight from the method's formulas.
        def reference(x_t, b):
            return jax.lax.stop_gradient(net.weak(params, x_t, b.t, b.cond.nulled()))

        def target(x_t, v_t, v_pred, b):
            return guidance.guided_target(v_t, reference(x_t, b), v_pred, b.t, b.uncond, scale=2.0, mix=0.5,
                                          tau_d=0.8, k=0.025)

        x_v, v_v = interpolant.interpolate(vel.x0, vel.eps, vel.t)
        pred = net(params, x_v, vel.t, vel.t, vel.cond_in, vel.keep)
        l_v, _, _ = br.velocity_loss(pred, target(x_v, v_v, jax.lax.stop_gradient(pred), vel), vel.t, 1.0, 0.01,
                                     True)
        x_t, v_t = interpolant.interpolate(con.x0, con.eps, con.t)
        N = net(params, x_t, con.t, con.s, con.cond_in, con.keep)
        sg = jax.lax.stop_gradient

        def query(s_query):
            return sg(net(params, x_t, con.t, s_query, con.cond_in, con.keep))

        tgt = target(x_t, v_t, query(con.t), con)
        x_l = interpolant.euler_step(x_t, tgt, con.t, con.l)
        F_l = sg(net(params, x_l, con.l, con.s, con.cond_in, con.keep))
        l_c, _, w_c = br.consistency_loss(N, F_l, x_t, x_l, con.t, con.s, con.l, 1.0, 0.01)
        m = con.t + con.lam * (con.s - con.t)
        u1 = query(m)
        u2 = sg(net(params, interpolant.euler_step(x_t, u1, con.t, m), m, con.s, con.cond_in, con.keep))
        l_m, _, _ = br.mva_loss(N, u1, u2, con.lam, weighting="consistency", con_weight=w_c, p=1.0, eps=0.01)
        return (l_v.sum() + (l_c + l_m).sum()) / (n_v + n_c)

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
        batch_split(default_objective_config("eflow"), 4)
    assert batch_split(default_objective_config("solution_flow"), 256) == (192, 0, 64)
    assert batch_split(default_objective_config("eflow"), 256) == (173, 19, 64)
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
    vel = VelocityBatch(x0, eps, t, y, no, None)
    con = ConsistencyBatch(x0, eps, t, s, s, y, no, 0.5 * t, jnp.zeros((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="token-dropped"):
        objectives.eflow_core(params, net, Draw(vel, None, con), Settings.of(default_objective_config("eflow")))


def test_objective_names_are_read_from_the_table_only():
    """Every objective is one table entry: its defaults, validation, core, costs and sampler."""
    assert set(objectives.OBJECTIVES) == {"flow_matching", "solution_flow", "eflow"}
    for name, entry in objectives.OBJECTIVES.items():
        cfg = default_objective_config(name)
        assert cfg.name == name and all(callable(f) for f in (entry.validate, entry.core, entry.costs))
        validate_config(cfg)
    assert objectives.OBJECTIVES["flow_matching"].few_step_sampler is None
    with pytest.raises(ValueError, match="Unknown objective"):
        objectives.objective("meanflow")
