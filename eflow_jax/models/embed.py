"""Embeddings: timestep (t and t - s), class label with a null class, text with a null token, and 3D RoPE."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from eflow_jax.models.layers import Dense


def sinusoid(t: jax.Array, dim: int = 256, max_period: float = 1e4) -> jax.Array:
    """Sinusoidal features of raw t in [0, 1] (SoFlow uses no x1000 scale), float32 [B, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbed(nn.Module):
    """Sinusoid -> MLP, as in DiT/SoFlow (frequency dim 256, max period 1e4)."""

    width: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        h = Dense(self.width, ("freq", "embed"), dtype=self.dtype, name="fc1")(sinusoid(t))
        return Dense(self.width, ("embed", "embed_out"), dtype=self.dtype, name="fc2")(nn.silu(h))


class LabelEmbed(nn.Module):
    """Class labels 0..num_classes-1 plus the null label `num_classes` (dropout happens outside)."""

    num_classes: int
    width: int

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            (self.num_classes + 1, self.width),
        )
        return jnp.take(table, y, axis=0)


class TextEmbed(nn.Module):
    """Text-encoder states [B, L, Dc] -> tokens [B, L, W] for cross-attention and a pooled adaLN vector.

    The null condition (condition drop, CFG, the weak reference) is one learned token in the text
    encoder's space, at position 0 with every other position masked: `null` samples see it instead
    of their caption. Masks are prefixes (the tokenizer pads at the end), so attention takes
    per-sample lengths, which every attention kernel (cuDNN included) supports.
    """

    width: int
    context_dim: int
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, text_bld: jax.Array, mask_bl: jax.Array, null_b: jax.Array):
        """Returns (pooled [B, W] float32, (tokens [B, L, W] in dtype, lengths int32 [B]))."""
        null_token = self.param("null_text", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("context",)),
                                (self.context_dim,))
        first = jnp.arange(text_bld.shape[1]) == 0
        null_text = jnp.where(first[:, None], null_token, 0.0)[None]  # [1, L, Dc]
        text = jnp.where(null_b[:, None, None], null_text, text_bld.astype(jnp.float32))
        mask = jnp.where(null_b[:, None], first[None], mask_bl.astype(bool))
        h = Dense(self.width, ("context", "embed"), dtype=self.dtype, name="proj1")(text)
        tokens = Dense(self.width, ("embed", "embed_out"), dtype=self.dtype, name="proj2")(nn.gelu(h))
        weights = mask.astype(jnp.float32)[:, :, None]
        mean = jnp.sum(tokens.astype(jnp.float32) * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1.0)
        pooled = Dense(self.width, ("embed", "embed_out"), dtype=jnp.float32, name="pool")(mean)
        lengths = jnp.maximum(jnp.sum(mask, axis=1), 1).astype(jnp.int32)
        return pooled, (tokens, lengths)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Head-dim split across (t, h, w) rotary parts, each even: 64 -> (16, 24, 24), 72 -> (18, 26, 28)."""
    if head_dim % 8:
        raise ValueError(f"3D RoPE needs head_dim divisible by 8 (got {head_dim}); change model.heads/width.")
    dt = (head_dim // 8) * 2
    dh = ((head_dim - dt) // 4) * 2
    return dt, dh, head_dim - dt - dh


def rope_angles(coords: jax.Array, head_dim: int, theta: float = 1e4) -> jax.Array:
    """Rotation angles for tokens at integer (t, h, w) coords [..., 3] -> [..., head_dim // 2]."""
    parts = []
    for axis, d in enumerate(rope_split(head_dim)):
        freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
        parts.append(coords[..., axis : axis + 1].astype(jnp.float32) * freqs)
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x_bnhd: jax.Array, angles_bnf: jax.Array) -> jax.Array:
    """Rotates pairs (x[:d/2], x[d/2:]) of each head by the token's angles; keeps dtype."""
    cos = jnp.cos(angles_bnf)[:, :, None, :]
    sin = jnp.sin(angles_bnf)[:, :, None, :]
    x1, x2 = jnp.split(x_bnhd.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_bnhd.dtype)
