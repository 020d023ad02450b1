"""Samplers: grids, determinism, batched CFG, ODE order; plus one tiny toy-benchmark smoke run."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from toy_networks import make_linear_network

from eflow_jax.bench import toy
from eflow_jax.flow import samplers
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import Network

NUM_CLASSES = 3


@pytest.fixture(scope="module")
def lin():
    return make_linear_network(2, NUM_CLASSES)


def _inputs(n=8):
    noise = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
    return noise, Condition.of_labels(jnp.arange(n) % NUM_CLASSES)


def test_time_grid():
    assert samplers.time_grid(1) == [1.0, 0.0]
    assert samplers.time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        samplers.time_grid(0)


def test_renoise_sampler_matches_the_recipe_and_is_deterministic(lin):
    net, params = lin
    noise, y = _inputs()
    rng = jax.random.PRNGKey(3)
    sample = jax.jit(samplers.renoise_sample, static_argnums=(0, 4))
    out = sample(net, params, noise, y, 2, rng)
    np.testing.assert_array_equal(out, sample(net, params, noise, y, 2, rng))
    assert not np.allclose(out, sample(net, params, noise, y, 2, jax.random.PRNGKey(4)))
    # By hand: x0 = f(x, 1, 0); x = 0.5 x0 + 0.5 eps_0; return f(x, 0.5, 0).
    ones, zeros = jnp.ones(8), jnp.zeros(8)
    x0 = net.solution(params, noise, ones, zeros, y)
    fresh = jax.random.normal(jax.random.split(rng, 1)[0], noise.shape)
    expected = net.solution(params, 0.5 * x0 + 0.5 * fresh, 0.5 * ones, zeros, y)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_chain_sampler_by_hand(lin):
    net, params = lin
    noise, y = _inputs()
    out = samplers.chain_sample(net, params, noise, y, 2)
    half = 0.5 * jnp.ones(8)
    x_half = net.solution(params, noise, 2 * half, half, y)
    expected = net.solution(params, x_half, half, 0 * half, y)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def _count_encodes(net: Network):
    calls = []

    def encode(params, x, t, cond, keep, weak):
        calls.append((x.shape[0], weak))
        return net.encode(params, x, t, cond, keep, weak)

    return dataclasses.replace(net, encode=encode), calls


@pytest.mark.parametrize("guidance", ["cfg", "path_drop"])
def test_euler_guidance_is_batched_and_correct(lin, guidance):
    net, params = lin
    noise, y = _inputs()
    spy, calls = _count_encodes(net)
    sample = lambda p, x: samplers.euler_sample(spy, p, x, y, 50, 3.0, guidance)  # noqa: E731
    jax.make_jaxpr(sample)(params, noise)
    # One velocity evaluation per step inside a fori_loop: cfg = one 2B call, PDG = full + weak.
    assert calls == ([(16, False)] if guidance == "cfg" else [(8, False), (8, True)])
    out = jax.jit(lambda p, x: samplers.euler_sample(net, p, x, y, 2, 3.0, guidance))(params, noise)
    x, null = noise, y.nulled()
    for t in (1.0, 0.5):
        tt = jnp.full((8,), t)
        v_c = net(params, x, tt, tt, y)
        v_u = net(params, x, tt, tt, null) if guidance == "cfg" else net.weak(params, x, tt, null)
        x = x - 0.5 * (v_u + 3.0 * (v_c - v_u))
    np.testing.assert_allclose(out, x, rtol=1e-5, atol=1e-6)


def test_heun_is_second_order_and_euler_first_order():
    # dx/dt = x (F = x): integrating from t = 1 to 0 gives x(0) = x(1) / e.
    net = Network(encode=lambda p, x, t, cond, keep, weak: x, decode=lambda p, h, t, s: h,
                  sample_keep=lambda rng, n: None)
    x1 = jnp.ones((1, 1))
    y = Condition.of_labels(jnp.zeros((1,), jnp.int32))
    exact = float(jnp.exp(-1.0))
    err = {}
    for name, fn in (("euler", samplers.euler_sample), ("heun", samplers.heun_sample)):
        finals = [float(fn(net, None, x1, y, n, 1.0, "none")[0, 0]) for n in (10, 20)]
        err[name] = [abs(v - exact) for v in finals]
    assert 1.8 < err["euler"][0] / err["euler"][1] < 2.2  # O(h)
    assert 3.6 < err["heun"][0] / err["heun"][1] < 4.4  # O(h^2)
    assert err["heun"][1] < 0.05 * err["euler"][1]


def test_toy_benchmark_smoke(capsys):
    """The benchmark end to end at toy size (the real table is in docs/TOY.md)."""
    toy.main(["--runs", "gaussian:flow_matching:1", "--steps", "10", "--batch", "32",
              "--width", "8", "--n_per_class", "64", "--sampler_steps", "1", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert "noise_floor_swd" in lines[0]
    results = lines[1:]
    assert {(r["sampler"], r["steps"]) for r in results} == {("euler", 1), ("euler", 2)}
    assert all(np.isfinite(r["swd_data"]) and r["swd_data"] > 0 for r in results)
    assert "map_rmse" in results[0]


# ---- fori_loop samplers vs the unrolled Python loops they replaced ----


def _unrolled(name, net, params, noise, y, n, rng):
    """The samplers as they were: one traced network call per step (a Python loop)."""
    grid = [1.0 - i / n for i in range(n + 1)]
    full = lambda v: jnp.full((noise.shape[0],), v, jnp.float32)  # noqa: E731
    x = noise
    if name == "renoise":
        keys = jax.random.split(rng, max(n - 1, 1))
        for i in range(n - 1):
            x0 = net.solution(params, x, full(grid[i]), full(0.0), y)
            x = (1 - grid[i + 1]) * x0 + grid[i + 1] * jax.random.normal(keys[i], x.shape)
        return net.solution(params, x, full(grid[n - 1]), full(0.0), y)
    if name == "chain":
        for i in range(n):
            x = net.solution(params, x, full(grid[i]), full(grid[i + 1]), y)
        return x
    velocity = samplers.guided_velocity_fn(net, params, y, 2.0, "cfg")
    for i in range(n):
        t, s = full(grid[i]), full(grid[i + 1])
        v1 = velocity(x, t)
        if name == "euler":
            x = x + (s - t)[:, None] * v1
        else:
            v2 = velocity(x + (s - t)[:, None] * v1, s)
            x = x + (s - t)[:, None] * 0.5 * (v1 + v2)
    return x


def _looped(name, net, params, noise, y, n, rng):
    if name == "renoise":
        return samplers.renoise_sample(net, params, noise, y, n, rng)
    if name == "chain":
        return samplers.chain_sample(net, params, noise, y, n)
    fn = samplers.euler_sample if name == "euler" else samplers.heun_sample
    return fn(net, params, noise, y, n, 2.0, "cfg")


@pytest.mark.parametrize("name", ["renoise", "chain", "euler", "heun"])
def test_looped_samplers_equal_the_unrolled_loops(lin, name):
    net, params = lin
    noise, y = _inputs()
    rng = jax.random.PRNGKey(7)
    for n in (1, 2, 5):
        np.testing.assert_allclose(_looped(name, net, params, noise, y, n, rng),
                                   _unrolled(name, net, params, noise, y, n, rng), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["renoise", "chain", "euler", "heun"])
def test_sampler_program_size_does_not_grow_with_steps(lin, name):
    # An unrolled loop traces one network call per step: 200 steps would be ~50x the 4-step jaxpr.
    net, params = lin
    noise, y = _inputs()
    rng = jax.random.PRNGKey(7)

    def size(n):
        jaxpr = jax.make_jaxpr(lambda p, x: _looped(name, net, p, x, y, n, rng))(params, noise)
        return len(str(jaxpr))

    assert size(200) < 1.2 * size(4)


def test_renoise_with_per_sample_keys_does_not_depend_on_the_batch(lin):
    net, params = lin
    noise, y = _inputs()
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(1), i))(jnp.arange(8))
    whole = samplers.renoise_sample(net, params, noise, y, 3, keys)
    halves = [samplers.renoise_sample(net, params, noise[s], jax.tree.map(lambda a, s=s: a[s], y), 3, keys[s])
              for s in (slice(0, 3), slice(3, 8))]
    np.testing.assert_allclose(whole, np.concatenate(halves), rtol=1e-6, atol=1e-6)
    assert not np.allclose(whole, samplers.renoise_sample(net, params, noise, y, 3, keys[::-1]))
