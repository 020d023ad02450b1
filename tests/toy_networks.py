"""Cheap networks for tests of objective, sampler and cost logic (test-only: not in the library).

    random_toy_params   ToyMLP variables with no zero anywhere, drawn with numpy (no init compile)
    make_linear_network an analytic Network of a few ops (and its params)
"""

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.flow.network import Network
from eflow_jax.models.toy_net import ToyMLP, init_toy_params


def random_toy_params(module: ToyMLP, seed: int = 0, dtype=jnp.float32, scale: float = 1.0):
    """Random (non-zero everywhere, including the output layer) variables, drawn with numpy.

    No parameter is zero, so every path of the network is exercised, and no
    per-parameter PRNG program has to be compiled (flax init compiles one per layer).
    """
    shapes = jax.eval_shape(lambda: init_toy_params(module, jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = leaf.shape[0] if len(leaf.shape) == 2 else 1
        return jnp.asarray(scale * rng.standard_normal(leaf.shape) / np.sqrt(fan_in), dtype)

    return jax.tree.map(draw, shapes)


def make_linear_network(data_dim: int, num_classes: int, seed: int = 0):
    """A cheap analytic Network (and its params) for tests of objective and sampler logic.

    trunk h = x W + t b_t + E[y] (weak path: x W_weak + t b_t + E[y]; null samples: E[num_classes]); decoder
    F = tanh(h) * (1 + (t - s) a) + (t - s) c. Nonlinear in x and s, a few ops to compile.
    """
    rng = np.random.default_rng(seed)

    def draw(*shape):
        return jnp.asarray(0.5 * rng.standard_normal(shape), jnp.float32)

    params = dict(W=draw(data_dim, data_dim), W_weak=draw(data_dim, data_dim), b_t=draw(data_dim),
                  E=draw(num_classes + 1, data_dim), a=draw(data_dim), c=draw(data_dim))

    def encode(p, x, t, cond, keep, weak):
        w = p["W_weak"] if weak else p["W"]
        return x @ w.astype(x.dtype) + t[:, None] * p["b_t"] + p["E"][cond.labels(num_classes)]

    def decode(p, h, t, s):
        dt = (t - s)[:, None]
        return jnp.tanh(h) * (1.0 + dt * p["a"]) + dt * p["c"]

    net = Network(encode=encode, decode=decode, sample_keep=lambda rng, n: None, decoupled=True)
    return net, params
