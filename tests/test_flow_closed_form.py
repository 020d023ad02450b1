"""Closed-form invariants of the solution map (docs/METHOD.md section 11, items 1-3), in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import random_toy_params

from eflow_jax.bench.toy_data import gaussian_flow_map, marginal_std
from eflow_jax.flow import branches as br
from eflow_jax.flow import interpolant, samplers
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import Network
from eflow_jax.models.toy_net import ToyMLP, make_toy_network

MU = np.array([1.0, -0.5])
SIGMA = 0.5


def exact_velocity(x, t):
    """Marginal velocity of N(MU, SIGMA^2 I) data under the linear path."""
    mu = jnp.asarray(MU, x.dtype)
    rate = (t - (1.0 - t) * SIGMA**2) / marginal_std(t, SIGMA) ** 2
    return -mu + rate[:, None] * (x - (1.0 - t)[:, None] * mu)


def exact_network() -> Network:
    """F*(x, t, s) = (Phi_{t->s}(x) - x) / (s - t), and the exact velocity at s = t."""

    def encode(params, x, t, cond, keep, weak):
        return (x, t)

    def decode(params, trunk, t, s):
        x, _ = trunk
        same = s == t
        s_safe = jnp.where(same, t - 0.5, s)
        phi = gaussian_flow_map(x, t, s_safe, jnp.asarray(MU, x.dtype), SIGMA)
        F = (phi - x) / (s_safe - t)[:, None]
        return jnp.where(same[:, None], exact_velocity(x, t), F)

    return Network(encode, decode, lambda rng, n: None, decoupled=True)


def _points(n=64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(k1, (n, 2), jnp.float64)
    t = jax.random.uniform(k2, (n,), jnp.float64, 0.05, 1.0)
    s = t * jax.random.uniform(k3, (n,), jnp.float64, 0.0, 0.95)
    return x, t, s


def test_mva_residual_is_zero_for_the_exact_map():
    with jax.enable_x64(True):
        net = exact_network()
        x, t, s = _points()
        y = Condition.of_labels(jnp.zeros(t.shape, jnp.int32))
        N = net(None, x, t, s, y)

        def residual(N, lam):  # MVA's legs from the exact map: u1 = F(x, t, m), u2 = F(x_m, m, s).
            m = t + lam * (s - t)
            u1 = net(None, x, t, m, y)
            u2 = net(None, interpolant.euler_step(x, u1, t, m), m, s, y)
            _, res, _ = br.mva_loss(N, u1, u2, lam, weighting="none", con_weight=None, p=1.0, eps=0.01)
            return float(res.mean())

        lam_random = jax.random.uniform(jax.random.PRNGKey(3), t.shape, jnp.float64)
        for lam in (jnp.full(t.shape, 0.5), lam_random):
            assert residual(N, lam) < 1e-12  # mean of squares: |residual| < 1e-6
        # A wrong map (scaled F) must show a residual, so the check can fail.
        assert residual(1.1 * N, jnp.full(t.shape, 0.5)) > 1e-4


def test_consistency_residual_vanishes_as_l_approaches_t():
    with jax.enable_x64(True):
        net = exact_network()
        x, t, s = _points()
        y = Condition.of_labels(jnp.zeros(t.shape, jnp.int32))
        N = net(None, x, t, s, y)
        v = exact_velocity(x, t)
        rms = []
        for gap in (1e-2, 1e-3, 1e-4):
            l = t - gap * (t - s)
            x_l = interpolant.euler_step(x, v, t, l)
            _, dq_mse, _ = br.consistency_loss(N, net(None, x_l, l, s, y), x, x_l, t, s, l, p=1.0, eps=0.01)
            rms.append(float(jnp.sqrt(dq_mse.mean())))
        assert rms[0] < 0.1
        assert rms[1] < 0.2 * rms[0] and rms[2] < 0.2 * rms[1]  # O(t - l)
        assert rms[2] < 1e-4


def test_one_step_sampler_is_the_exact_flow_map():
    with jax.enable_x64(True):
        net = exact_network()
        noise = jax.random.normal(jax.random.PRNGKey(1), (32, 2), jnp.float64)
        y = Condition.of_labels(jnp.zeros((32,), jnp.int32))
        ones, zeros = jnp.ones((32,), jnp.float64), jnp.zeros((32,), jnp.float64)
        expected = gaussian_flow_map(noise, ones, zeros, jnp.asarray(MU), SIGMA)
        out = samplers.renoise_sample(net, None, noise, y, 1, jax.random.PRNGKey(2))
        np.testing.assert_allclose(out, expected, atol=1e-12)
        # Semigroup: the deterministic chain of exact maps lands on the same point.
        chained = samplers.chain_sample(net, None, noise, y, 4)
        np.testing.assert_allclose(chained, expected, atol=1e-12)
        # Data statistics: Phi_{1->0}(eps) ~ N(MU, SIGMA^2).
        np.testing.assert_allclose(np.std(np.asarray(expected), 0) / np.std(np.asarray(noise), 0),
                                   SIGMA, rtol=1e-12)


def _random_toy(decoupled=True, dtype=jnp.float32, seed=0):
    module = ToyMLP(2, 3, width=32, decoupled=decoupled)
    return make_toy_network(module), random_toy_params(module, seed, dtype)


@pytest.mark.parametrize("decoupled", [True, False])
def test_solution_map_is_identity_at_s_equals_t(decoupled):
    net, params = _random_toy(decoupled)
    x = jax.random.normal(jax.random.PRNGKey(5), (16, 2))
    t = jax.random.uniform(jax.random.PRNGKey(6), (16,))
    y = Condition.of_labels(jnp.arange(16) % 4)
    assert bool(jnp.all(jax.jit(net.solution)(params, x, t, t, y) == x))
    assert not bool(jnp.allclose(jax.jit(net)(params, x, t, t, y), 0.0))  # F itself is not trivial


def test_flow_matching_limit_by_finite_differences():
    """(f(x, t, t - d) - x) / (-d) -> F(x, t, t) with error O(d)."""
    with jax.enable_x64(True):
        net, params = _random_toy(dtype=jnp.float64)
        x = jax.random.normal(jax.random.PRNGKey(5), (16, 2), jnp.float64)
        t = jax.random.uniform(jax.random.PRNGKey(6), (16,), jnp.float64, 0.2, 0.9)
        y = Condition.of_labels(jnp.arange(16) % 4)
        v = jax.jit(net)(params, x, t, t, y)
        solution = jax.jit(net.solution)
        errors = []
        for d in (1e-4, 1e-5, 1e-6):
            quotient = (solution(params, x, t, t - d, y) - x) / (-d)
            errors.append(float(jnp.max(jnp.abs(quotient - v))))
        assert errors[0] > 1e-6  # F depends on s, so the check can fail
        for coarse, fine in zip(errors, errors[1:]):
            assert fine < 0.2 * coarse
