"""A tiny MLP with the EFlow layout: the 2-D toy benchmark's model (bench/toy.py), also used by tests.

Layout (mirrors docs/METHOD.md section 4.1 on vectors instead of tokens):
    x [B, D] -> in-projection -> encoder blocks (c_trunk) -> h_enc
    middle blocks (c_trunk), or the frozen vector mu on the weak path
    fuse = Linear([middle ; h_enc]) -> decoder blocks (c_dec) -> zero-init out-projection -> F
Decoupled conditioning: c_trunk = e_t(t) + e_y(y), c_dec = e_t(t) + e_dt(t - s) + e_y(y), so
`encode` (trunk) never sees s; the trunk carries y to the decoder. The condition's labels are read
with the null row for null samples (flow/condition.py). Joint conditioning: every block sees e_t + e_dt + e_y; then
`encode` only packs its inputs and `decode` runs the whole network.
There are no tokens, so `sample_keep` returns None and `keep` is ignored.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import Network


@struct.dataclass
class JointTrunk:
    """What `encode` hands to `decode` under joint conditioning: just the inputs."""

    x: jax.Array
    t: jax.Array
    y: jax.Array  # labels as the label table sees them (null samples: the null row)
    keep: object = None
    weak: bool = struct.field(pytree_node=False, default=False)


@struct.dataclass
class DecoupledTrunk:
    """The fused trunk and the labels the decoder's conditioning needs."""

    h: jax.Array
    y: jax.Array


def time_features(t: jax.Array, dim: int, scale: float = 1.0, max_period: float = 1e4) -> jax.Array:
    """Sinusoidal features of scale * t, [B] -> [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=t.dtype) / half)
    angles = (scale * t)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class TimeEmbed(nn.Module):
    """Sinusoidal features followed by a 2-layer MLP."""

    width: int
    freq_dim: int = 64
    scale: float = 1.0

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = nn.Dense(self.width)(time_features(t, self.freq_dim, self.scale))
        return nn.Dense(self.width)(nn.silu(h))


class Block(nn.Module):
    """Residual MLP block conditioned additively on c."""

    width: int

    @nn.compact
    def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
        u = nn.LayerNorm()(h)
        u = nn.silu(nn.Dense(self.width)(u) + nn.Dense(self.width)(nn.silu(c)))
        return h + nn.Dense(self.width)(u)


class ToyMLP(nn.Module):
    """F_theta(x, t, s, y) for vectors x [B, D]; see the module docstring for the layout."""

    data_dim: int
    num_classes: int
    width: int = 128
    encoder_depth: int = 1
    middle_depth: int = 2
    decoder_depth: int = 2
    decoupled: bool = True
    # Sinusoids of time_scale * t. 1 = SoFlow's raw t: smooth in (t, t - s), which is what
    # lets the map extrapolate to the sampler's (1 -> 0) query; 1000 (DiT-style) does not.
    time_scale: float = 1.0

    def setup(self):
        self.embed_t = TimeEmbed(self.width, scale=self.time_scale)
        self.embed_dt = TimeEmbed(self.width, scale=self.time_scale)
        self.embed_y = nn.Embed(self.num_classes + 1, self.width)  # last index = null label
        self.proj_in = nn.Dense(self.width)
        self.encoder = [Block(self.width) for _ in range(self.encoder_depth)]
        self.middle = [Block(self.width) for _ in range(self.middle_depth)]
        self.fuse = nn.Dense(self.width)
        self.decoder = [Block(self.width) for _ in range(self.decoder_depth)]
        self.norm_out = nn.LayerNorm()
        self.proj_out = nn.Dense(self.data_dim, kernel_init=nn.initializers.zeros)
        # Frozen stand-in for the middle output on the weak path (SPRINT's mu ~ N(0, 0.02^2)).
        mu = 0.02 * np.random.default_rng(17).standard_normal(self.width)
        self.mu = jnp.asarray(mu, jnp.float32)

    def _trunk(self, x, t, y, weak: bool, dt=None) -> jax.Array:
        c = self.embed_t(t) + self.embed_y(y)
        if dt is not None:
            c = c + self.embed_dt(dt)
        h = self.proj_in(x)
        for block in self.encoder:
            h = block(h, c)
        if weak:
            mid = jnp.broadcast_to(self.mu.astype(h.dtype), h.shape)
        else:
            mid = h
            for block in self.middle:
                mid = block(mid, c)
        return self.fuse(jnp.concatenate([mid, h], axis=-1))

    def encode(self, x, t, cond: Condition, keep=None, weak: bool = False):
        y = cond.labels(self.num_classes)  # The last row of the label table is the null label.
        if self.decoupled:
            return DecoupledTrunk(self._trunk(x, t, y, weak), y)
        return JointTrunk(x, t, y, keep, weak)

    def decode(self, trunk, t, s) -> jax.Array:
        if self.decoupled:
            h = trunk.h
        else:
            h = self._trunk(trunk.x, trunk.t, trunk.y, trunk.weak, dt=t - s)
        c = self.embed_t(t) + self.embed_dt(t - s) + self.embed_y(trunk.y)
        for block in self.decoder:
            h = block(h, c)
        return self.proj_out(self.norm_out(h))

    def __call__(self, x, t, s, cond: Condition):
        """Full forward, also used to create every parameter at init."""
        return self.decode(self.encode(x, t, cond), t, s)


def make_toy_network(module: ToyMLP) -> Network:
    """Wrap a ToyMLP as the objectives' `Network` (params = the flax variables dict)."""

    def encode(params, x, t, cond, keep, weak):
        return module.apply(params, x, t, cond, keep, weak, method=ToyMLP.encode)

    def decode(params, trunk, t, s):
        return module.apply(params, trunk, t, s, method=ToyMLP.decode)

    return Network(encode=encode, decode=decode, sample_keep=lambda rng, n: None, decoupled=module.decoupled)


def init_toy_params(module: ToyMLP, rng: jax.Array, dtype=jnp.float32):
    """Initial variables for `module` (built on a batch of 2)."""
    x = jnp.zeros((2, module.data_dim), dtype)
    t = jnp.ones((2,), jnp.float32)
    return jax.jit(module.init)(rng, x, t, 0.5 * t, Condition.of_labels(jnp.zeros((2,), jnp.int32)))
