"""Small layers shared by the blocks: logically-partitioned Dense, RMSNorm, SwiGLU, adaLN."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = Sequence[str | None]


def Dense(  # noqa: N802 (a layer constructor, named like one)
    features: int | Sequence[int],
    axes: Axes,
    *,
    dtype=jnp.bfloat16,
    zero_init: bool = False,
    use_bias: bool = True,
    axis: int | Sequence[int] = -1,
    name: str | None = None,
) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel carries logical axis names (bias: the output axes)."""
    init = nn.initializers.zeros_init() if zero_init else nn.initializers.xavier_uniform()
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features,
        axis=axis,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[-n_out:])),
        name=name,
    )


class RMSNorm(nn.Module):
    """RMSNorm in float32, optionally with a learned scale over the last axis."""

    use_scale: bool = True
    axis_name: str = "embed"
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.use_scale:
            scale = self.param(
                "scale",
                nn.with_logical_partitioning(nn.initializers.ones_init(), (self.axis_name,)),
                (x.shape[-1],),
            )
            y = y * scale
        return y.astype(x.dtype)


def modulate(x_bnd: jax.Array, shift_bd: jax.Array, scale_bd: jax.Array) -> jax.Array:
    """adaLN modulation x * (1 + scale) + shift with per-sample vectors."""
    return x_bnd * (1 + scale_bd[:, None, :]) + shift_bd[:, None, :]


class AdaLN(nn.Module):
    """Per-sample (shift, scale, gate, ...) vectors from the conditioning, zero-initialised (adaLN-Zero)."""

    width: int
    num_chunks: int
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, c_bd: jax.Array) -> list[jax.Array]:
        out = Dense(
            (self.num_chunks, self.width), ("embed", None, "embed_out"), dtype=self.dtype,
            zero_init=True, name="proj",
        )(nn.silu(c_bd))
        return [out[:, i] for i in range(self.num_chunks)]


class SwiGLU(nn.Module):
    """SwiGLU MLP; hidden width is 2/3 of mlp_ratio * width (rounded to 64) to match a GELU MLP's size."""

    width: int
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.bfloat16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = swiglu_hidden(self.width, self.mlp_ratio)
        gate_up = Dense((2, hidden), ("embed", None, "mlp"), dtype=self.dtype, name="gate_up")(x)
        h = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        return Dense(self.width, ("mlp", "embed"), dtype=self.dtype, name="down")(h)


def swiglu_hidden(width: int, mlp_ratio: float) -> int:
    return int(round(2 * mlp_ratio * width / 3 / 64)) * 64 or 64
