"""Wan 2.1's causal 3-D video VAE in JAX: encode clips to latents, decode latents to clips.

The architecture and numerics follow diffusers' `AutoencoderKLWan` (and the Wan 2.1 release it
converts), channels-last ([B, T, H, W, C]) throughout:

    encoder:  CausalConv3d -> [ResidualBlock x num_res_blocks, Resample(down)] per level
              -> MidBlock (residual, single-head spatial attention, residual) -> RMSNorm, SiLU
              -> CausalConv3d -> quant_conv (1x1x1): mean | log-variance (2 * z_dim channels)
    decoder:  post_quant_conv (1x1x1) -> CausalConv3d -> MidBlock
              -> [ResidualBlock x (num_res_blocks + 1), Resample(up)] per level -> RMSNorm, SiLU
              -> CausalConv3d -> RGB, clamped to [-1, 1]

Compression is 4x in time (the first frame alone, then 4 frames per latent: T = 1 + 4 (T' - 1))
and 2^(levels - 1) = 8x in space. Time is causal everywhere: every 3-D conv pads time on the
left only, so latent frame i depends on pixel frames <= 4i and nothing later.

Chunking (as the reference): the encoder sees the first frame alone, then 4 frames at a time; the
decoder one latent frame at a time. Each causal conv keeps the last 2 frames of its input in a
cache that the next chunk continues from (flax's mutable 'cache' collection here, carried through
a `lax.scan` over chunks); the temporal down/upsamplers skip their time conv in the first chunk and
carry their own context after it. A zero cache is the same as the zero padding of a clip start,
so the first chunk and every later one run the same code. Memory therefore grows with the batch
and the frame size, not with the clip length. Space is not tiled: by the compiled programs'
memory analysis a 17x480x832 clip needs ~3.8 GiB to encode and ~4.6 GiB to decode in bf16 (mostly
the decoder's full-resolution conv caches), so a batch of 8 fits an H200 whole (docs/DATA.md).

    vae = VideoVAE.load("/models/Wan2.1-T2V-1.3B-Diffusers/vae", dtype=jnp.bfloat16)
    latents = vae.encode(videos_bthwc)        # [-1, 1] -> normalised [B, 1 + (T-1)/4, H/8, W/8, 16]
    videos = vae.decode(latents)              # -> float32 [B, T, H, W, 3] in [-1, 1]

Latents are normalised per channel with the checkpoint's published statistics:
z = (mu - latents_mean) / latents_std, mu the posterior mean (deterministic; no sampling).
Convs run in `dtype` (bf16 by default); norms, the attention softmax and the latent statistics
run in float32. dtype=float32 also pins the conv/matmul precision to full float32 (the parity
tests compare float32 against diffusers at 1e-4).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eflow_jax import sharding
from eflow_jax.models import attention, pretrained

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CACHE_T = 2  # Frames of context a causal 3x3x3 conv carries from one chunk to the next.
FRAMES_PER_CHUNK = 4  # Encoder chunk after the first frame (= the temporal compression).


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


# Wan 2.1's per-channel latent statistics (diffusers' AutoencoderKLWan defaults, as published).
_WAN21_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
_WAN21_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKLWan config.json that define a Wan 2.1 VAE."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = _WAN21_MEAN
    latents_std: tuple[float, ...] = _WAN21_STD

    def __post_init__(self):
        levels = len(self.dim_mult)
        if len(self.temperal_downsample) != levels - 1:
            raise ValueError(f"temperal_downsample needs {levels - 1} entries for dim_mult "
                             f"{list(self.dim_mult)}, got {list(self.temperal_downsample)}")
        if self.temporal_factor != FRAMES_PER_CHUNK:
            raise ValueError(f"only Wan 2.1's 4x temporal compression is supported (two True in "
                             f"temperal_downsample), got {list(self.temperal_downsample)}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} values, z_dim is {self.z_dim}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive, got {list(self.latents_std)}")

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(map(bool, self.temperal_downsample))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, clip_shape_thwc: Sequence[int]) -> tuple[int, int, int, int]:
        """[T', h, w, z_dim] of the latents of a [T, H, W, C] clip."""
        t, h, w = clip_shape_thwc[:3]
        return 1 + (t - 1) // self.temporal_factor, h // self.spatial_factor, w // self.spatial_factor, self.z_dim

    @classmethod
    def from_diffusers(cls, config: dict, where: str = "config.json") -> VAEConfig:
        """Reads an AutoencoderKLWan config dict; refuses the Wan 2.2 variants (residual, patchified)."""
        name = config.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"{where} describes a {name}, not an AutoencoderKLWan (Wan 2.1 video VAE)")
        if config.get("is_residual") or config.get("patch_size"):
            raise ValueError(f"{where} is a Wan 2.2 VAE (is_residual/patch_size set); only Wan 2.1's "
                             "VAE is implemented")
        defaults = cls()  # Wan 2.1 as published.
        z_dim = int(config.get("z_dim", 16))
        # diffusers' defaults for the statistics are Wan 2.1's published 16 values.
        mean = config.get("latents_mean") or (_WAN21_MEAN if z_dim == 16 else None)
        std = config.get("latents_std") or (_WAN21_STD if z_dim == 16 else None)
        if mean is None or std is None:
            raise ValueError(f"{where} has no latents_mean/latents_std for z_dim={z_dim}")
        return cls(
            base_dim=int(config.get("base_dim", defaults.base_dim)),
            decoder_base_dim=config.get("decoder_base_dim"),
            z_dim=z_dim,
            dim_mult=tuple(config.get("dim_mult", defaults.dim_mult)),
            num_res_blocks=int(config.get("num_res_blocks", defaults.num_res_blocks)),
            attn_scales=tuple(config.get("attn_scales", ())),
            temperal_downsample=tuple(bool(b) for b in config.get("temperal_downsample",
                                                                  defaults.temperal_downsample)),
            in_channels=int(config.get("in_channels", 3)),
            out_channels=int(config.get("out_channels", 3)),
            latents_mean=tuple(float(v) for v in mean),
            latents_std=tuple(float(v) for v in std),
        )

    def to_diffusers(self) -> dict:
        """The config.json AutoencoderKLWan.from_pretrained reads."""
        return {
            "_class_name": "AutoencoderKLWan", "_diffusers_version": "0.33.0",
            "attn_scales": list(self.attn_scales), "base_dim": self.base_dim,
            "decoder_base_dim": self.decoder_base_dim, "dim_mult": list(self.dim_mult), "dropout": 0.0,
            "in_channels": self.in_channels, "is_residual": False, "latents_mean": list(self.latents_mean),
            "latents_std": list(self.latents_std), "num_res_blocks": self.num_res_blocks,
            "out_channels": self.out_channels, "patch_size": None, "scale_factor_spatial": self.spatial_factor,
            "scale_factor_temporal": self.temporal_factor, "temperal_downsample": list(self.temperal_downsample),
            "z_dim": self.z_dim,
        }


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def _precision(dtype) -> jax.lax.Precision | None:
    # float32 means "as exact as the reference" (parity tests); GPUs would otherwise use TF32.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


class CausalConv3d(nn.Module):
    """A 3-D conv, causal in time: 2 * padding[0] frames of left context, none on the right.

    The context is the cache (the last frames of the previous chunk's input; zeros before the
    clip starts, i.e. the reference's zero padding). padding[0] == 0: no context, no cache (1x1x1
    convs, and the resamplers' time convs, which carry their own).
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    strides: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (1, 1, 1)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x_bthwc.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        x = x_bthwc.astype(self.dtype)
        context = 2 * self.padding[0]
        if context:
            cache = self.variable("cache", "context", jnp.zeros, (x.shape[0], context, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.value, x], axis=1)
            cache.value = x[:, -context:]
        _, ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x, kernel.astype(self.dtype), window_strides=self.strides, padding=((0, 0), (ph, ph), (pw, pw)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=_precision(self.dtype))
        return y + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """x / ||x||_2 over channels * sqrt(C) * gamma (the reference's F.normalize), in float32."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.initializers.ones, (channels,), jnp.float32)
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        return (x32 / jnp.maximum(norm, 1e-12) * (channels**0.5) * gamma).astype(self.dtype)


def _conv2d(features: int, name: str, dtype, kernel=(3, 3), strides=(1, 1), padding=((1, 1), (1, 1))):
    """A per-frame 2-D conv (time and batch are batch dims), float32 params."""
    return nn.Conv(features, kernel, strides=strides, padding=padding, dtype=dtype, param_dtype=jnp.float32,
                   precision=_precision(dtype), name=name)


class ResidualBlock(nn.Module):
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = x if x.shape[-1] == self.out_dim else CausalConv3d(
            self.out_dim, (1, 1, 1), padding=(0, 0, 0), dtype=self.dtype, name="conv_shortcut")(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm1")(x))
        x = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv1")(x)
        x = nn.silu(RMSNorm(self.dtype, name="norm2")(x))
        x = CausalConv3d(self.out_dim, dtype=self.dtype, name="conv2")(x)  # (Dropout 0: omitted.)
        return x + h.astype(x.dtype)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> jax.Array:
        b, t, h, w, c = x_bthwc.shape
        x = RMSNorm(self.dtype, name="norm")(x_bthwc)
        qkv = _conv2d(3 * c, "to_qkv", self.dtype, kernel=(1, 1), padding="VALID")(x)
        q, k, v = (a.reshape(b * t, h * w, 1, c) for a in jnp.split(qkv, 3, axis=-1))
        # The XLA path of the one dispatch: the single 384-wide head is beyond cuDNN's head_dim
        # limit of 128; logits and softmax are float32 there.
        with jax.default_matmul_precision("highest" if jnp.dtype(self.dtype) == jnp.float32 else None):
            out = attention.attend(q, k, v, implementation="xla")
        out = _conv2d(c, "proj", self.dtype, kernel=(1, 1), padding="VALID")(out.reshape(b, t, h, w, c))
        return out + x_bthwc.astype(out.dtype)


class MidBlock(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = ResidualBlock(dim, self.dtype, name="resnets_0")(x)
        x = AttentionBlock(self.dtype, name="attentions_0")(x)
        return ResidualBlock(dim, self.dtype, name="resnets_1")(x)


class Resample(nn.Module):
    """2x spatial down/upsampling, and 2x in time for the '3d' modes (causal, chunk-aware).

    downsample3d: after the spatial conv, a stride-2 time conv over [last frame of the previous
      chunk, this chunk]; the first chunk (the first frame) passes through it untouched.
    upsample3d: before the spatial upsampling, a causal time conv to 2C channels, interleaved as
      2 frames per input frame; the first chunk (the first latent frame) stays one frame.
    The first chunk is recognised as the reference does: the module has no cache yet.
    """

    mode: str  # 'downsample2d' | 'downsample3d' | 'upsample2d' | 'upsample3d'
    out_dim: int | None = None  # Upsampling output channels (Wan 2.1: dim // 2).
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        if self.mode == "upsample3d":
            first = not self.has_variable("cache", "context")
            context = self.variable("cache", "context", jnp.zeros, (b, CACHE_T, h, w, c), x.dtype)
            if not first:
                x_ctx = jnp.concatenate([context.value, x], axis=1)
                context.value = x_ctx[:, -CACHE_T:]
                y = CausalConv3d(2 * c, (3, 1, 1), padding=(0, 0, 0), dtype=self.dtype, name="time_conv")(x_ctx)
                # Channels [0, c) are the first frame of each pair, [c, 2c) the second.
                x = y.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # 'nearest-exact' at scale 2.
            return _conv2d(self.out_dim or c // 2, "resample_1", self.dtype)(x)
        # Zero pad right and bottom by one, then a stride-2 3x3 conv.
        x = _conv2d(c, "resample_1", self.dtype, strides=(2, 2), padding=((0, 1), (0, 1)))(x)
        if self.mode == "downsample3d":
            first = not self.has_variable("cache", "last")
            last = self.variable("cache", "last", lambda: x[:, -1:])
            if not first:
                x_ctx = jnp.concatenate([last.value, x], axis=1)
                last.value = x[:, -1:]
                x = CausalConv3d(c, (3, 1, 1), strides=(2, 1, 1), padding=(0, 0, 0), dtype=self.dtype,
                                 name="time_conv")(x_ctx)
        return x


def _head(x: jax.Array, features: int, dtype) -> jax.Array:
    x = nn.silu(RMSNorm(dtype, name="norm_out")(x))
    return CausalConv3d(features, dtype=dtype, name="conv_out")(x)


class Encoder3d(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        x = CausalConv3d(dims[0], dtype=dtype, name="conv_in")(x_bthwc)
        index, scale, levels = 0, 1.0, len(cfg.dim_mult)
        for level, out_dim in enumerate(dims[1:]):
            for _ in range(cfg.num_res_blocks):
                x = ResidualBlock(out_dim, dtype, name=f"down_blocks_{index}")(x)
                index += 1
                if scale in cfg.attn_scales:
                    x = AttentionBlock(dtype, name=f"down_blocks_{index}")(x)
                    index += 1
            if level != levels - 1:
                mode = "downsample3d" if cfg.temperal_downsample[level] else "downsample2d"
                x = Resample(mode, dtype=dtype, name=f"down_blocks_{index}")(x)
                index, scale = index + 1, scale / 2.0
        x = MidBlock(dtype, name="mid_block")(x)
        return _head(x, 2 * cfg.z_dim, dtype)


class UpBlock(nn.Module):
    out_dim: int
    num_res_blocks: int
    upsample_mode: str | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_res_blocks + 1):
            x = ResidualBlock(self.out_dim, self.dtype, name=f"resnets_{j}")(x)
        if self.upsample_mode:
            x = Resample(self.upsample_mode, dtype=self.dtype, name="upsamplers_0")(x)
        return x


class Decoder3d(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z_bthwc: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        x = CausalConv3d(dims[0], dtype=dtype, name="conv_in")(z_bthwc)
        x = MidBlock(dtype, name="mid_block")(x)
        levels = len(cfg.dim_mult)
        for level, out_dim in enumerate(dims[1:]):
            mode = None
            if level != levels - 1:
                mode = "upsample3d" if temperal_upsample[level] else "upsample2d"
            x = UpBlock(out_dim, cfg.num_res_blocks, mode, dtype, name=f"up_blocks_{level}")(x)
        return _head(x, cfg.out_channels, dtype)


class WanVAE(nn.Module):
    """Encoder, decoder and the 1x1x1 (post-)quant convs; methods run one time chunk."""

    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config, self.dtype)
        self.quant_conv = CausalConv3d(2 * z, (1, 1, 1), padding=(0, 0, 0), dtype=self.dtype)
        self.post_quant_conv = CausalConv3d(z, (1, 1, 1), padding=(0, 0, 0), dtype=self.dtype)
        self.decoder = Decoder3d(self.config, self.dtype)

    def encode_chunk(self, x_bthwc: jax.Array) -> jax.Array:
        """Pixels in [-1, 1] -> the posterior mean (un-normalised), one chunk."""
        moments = self.quant_conv(self.encoder(x_bthwc))
        return moments[..., : self.config.z_dim]  # [mean | log-variance]: the mean.

    def decode_chunk(self, z_bthwc: jax.Array) -> jax.Array:
        """Un-normalised latents -> pixels (unclamped), one chunk."""
        return self.decoder(self.post_quant_conv(z_bthwc))

    def init_all(self, x_bthwc: jax.Array, z_bthwc: jax.Array) -> None:
        """Runs a first and a second chunk each way, so every parameter (time convs too) exists."""
        for _ in range(2):
            self.encode_chunk(x_bthwc)
            self.decode_chunk(z_bthwc)


# ---------------------------------------------------------------------------------------------
# Checkpoint layout: diffusers' names <-> flax params
# ---------------------------------------------------------------------------------------------


def param_shapes(config: VAEConfig) -> dict:
    """The flax param tree of `config` as ShapeDtypeStructs (no memory allocated)."""
    model = WanVAE(config)
    x = jax.ShapeDtypeStruct((1, 1, 8, 8, config.in_channels), jnp.float32)
    z = jax.ShapeDtypeStruct((1, 1, 1, 1, config.z_dim), jnp.float32)
    init = functools.partial(model.init, method=WanVAE.init_all)
    return jax.eval_shape(init, jax.random.key(0), x, z)["params"]


def _flax_path(torch_name: str) -> tuple[tuple[str, ...], str]:
    """'decoder.up_blocks.0.upsamplers.0.resample.1.weight' -> (('decoder', 'up_blocks_0',
    'upsamplers_0', 'resample_1'), 'weight'): list indices join the name before them."""
    parts = torch_name.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path), parts[-1]


def _to_flax(name: str, leaf: str, array: np.ndarray) -> tuple[str, np.ndarray]:
    if leaf == "weight":  # torch conv [O, I, (T,) H, W] -> flax [(T,) H, W, I, O].
        return "kernel", np.transpose(array, (*range(2, array.ndim), 1, 0))
    if leaf == "gamma":  # [C, 1, 1(, 1)] -> [C].
        return "gamma", array.reshape(-1)
    if leaf == "bias":
        return "bias", array
    raise ValueError(f"tensor {name!r} is not part of a Wan 2.1 VAE")


def _to_torch(path: tuple[str, ...], array: np.ndarray) -> tuple[str, np.ndarray]:
    """Inverse of the above: a flax param -> its diffusers name and layout."""
    parts = []
    for part in path[:-1]:
        base, _, index = part.rpartition("_")
        parts += [base, index] if index.isdigit() and base else [part]
    leaf = path[-1]
    if leaf == "kernel":
        return ".".join(parts + ["weight"]), np.transpose(array, (array.ndim - 1, array.ndim - 2,
                                                                   *range(array.ndim - 2)))
    if leaf == "gamma":  # The attention norm is 2-D (images=True), the others 3-D.
        trailing = (1, 1) if path[-2] == "norm" else (1, 1, 1)
        return ".".join(parts + ["gamma"]), array.reshape(-1, *trailing)
    return ".".join(parts + [leaf]), array


def params_from_torch(tensors: dict[str, np.ndarray], config: VAEConfig, where: str = "checkpoint") -> dict:
    """diffusers-named tensors -> the flax param tree (float32 numpy), checked against `config`."""
    expected = {path: leaf for path, leaf in _flatten(param_shapes(config)).items()}
    params: dict = {}
    got = {}
    for name, array in tensors.items():
        path, leaf = _flax_path(name)
        leaf, value = _to_flax(name, leaf, np.asarray(array))
        got[(*path, leaf)] = (name, value)
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    if missing or unexpected:
        missing_names = [_to_torch(p, np.zeros(expected[p].shape))[0] for p in missing]
        raise ValueError(
            f"{where} does not match its config.json: {len(missing)} tensor(s) missing"
            + (f" (e.g. {missing_names[0]})" if missing else "")
            + f", {len(unexpected)} unexpected" + (f" (e.g. {got[unexpected[0]][0]})" if unexpected else ""))
    for path, spec in expected.items():
        name, value = got[path]
        if value.shape != spec.shape:
            raise ValueError(f"{where}: tensor {name} has shape {tuple(value.shape)} in flax layout, "
                             f"the config implies {tuple(spec.shape)}")
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = np.asarray(value, np.float32)
    return params


def _flatten(tree: dict, prefix: tuple = ()) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, (*prefix, key)))
        else:
            out[(*prefix, key)] = value
    return out


def params_to_torch(params: dict) -> dict[str, np.ndarray]:
    """The flax param tree -> diffusers-named float32 tensors (for writing checkpoints)."""
    return dict(_to_torch(path, np.asarray(v, np.float32)) for path, v in _flatten(params).items())


def vae_digest(directory: str | os.PathLike) -> str:
    """sha256 over config.json and the weight files (names and bytes): which VAE made a latent."""
    directory = os.fspath(directory)
    pretrained.read_config(directory, "VAE")  # Clear errors for a missing dir / config.json.
    digest = hashlib.sha256()
    for path in [os.path.join(directory, "config.json"), *pretrained.safetensors_files(directory, "VAE")]:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def write_random_vae(
    directory: str | os.PathLike,
    *,
    base_dim: int = 8,
    z_dim: int = 4,
    dim_mult: Sequence[int] = (1, 2, 4, 4),
    num_res_blocks: int = 1,
    seed: int = 0,
) -> VAEConfig:
    """Writes a random, deterministic VAE in the published layout (config.json + safetensors).

    Loadable by VideoVAE.load and by diffusers' AutoencoderKLWan.from_pretrained, so tests and
    the CPU demo can run the whole latent pipeline without a download. The weights are scaled so
    activations stay O(1) and decoded pixels mostly inside [-1, 1]; latents_mean/std are random
    too (so the normalisation is exercised). base_dim=96, z_dim=16, num_res_blocks=2: the
    published size (for speed measurements).

    Returns:
        the config written.
    """
    rng = np.random.default_rng(seed)
    config = VAEConfig(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
                       latents_mean=tuple(np.round(rng.normal(0.0, 0.5, z_dim), 4).tolist()),
                       latents_std=tuple(np.round(rng.uniform(0.5, 2.0, z_dim), 4).tolist()))
    params = {}
    for path, spec in sorted(_flatten(param_shapes(config)).items()):
        shape = spec.shape
        if path[-1] == "kernel":
            fan_in = math.prod(shape[:-1])
            value = rng.standard_normal(shape, np.float32) / np.sqrt(fan_in)
            if path[-2] == "conv_out" and path[0] == "decoder":
                value *= 0.3  # Keep most decoded pixels inside the [-1, 1] clamp.
        elif path[-1] == "gamma":
            value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
        else:
            value = 0.05 * rng.standard_normal(shape, np.float32)
        params[path] = value.astype(np.float32)
    tensors = dict(_to_torch(path, v) for path, v in params.items())
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    pretrained.write_safetensors(os.path.join(directory, WEIGHTS_NAME), tensors)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    return config


def vae_record(directory: str | os.PathLike) -> dict:
    """What a latent dataset records about the VAE that made it (see check_latents_match_vae)."""
    directory = os.fspath(directory)
    config = VAEConfig.from_diffusers(pretrained.read_config(directory, "VAE"),
                                      where=os.path.join(directory, "config.json"))
    return {
        "class": "AutoencoderKLWan", "dir": os.path.abspath(directory), "digest": vae_digest(directory),
        "z_dim": config.z_dim, "temporal_factor": config.temporal_factor,
        "spatial_factor": config.spatial_factor, "latents_mean": list(config.latents_mean),
        "latents_std": list(config.latents_std),
    }


# ---------------------------------------------------------------------------------------------
# The loaded VAE: chunked, jitted, data-parallel encode / decode
# ---------------------------------------------------------------------------------------------


def _run_chunk(model: WanVAE, method, params):
    """(cache or None, chunk) -> (new cache, output): one time chunk through `method`."""
    def run(cache, chunk):
        variables = {"params": params} if cache is None else {"params": params, "cache": cache}
        out, new = model.apply(variables, chunk, method=method, mutable=["cache"])
        return new["cache"], out
    return run


def _scan_chunks(run, cache, x_bthwc, frames: int):
    """Runs `run` over time chunks of `frames` (a lax.scan), then over any shorter remainder."""
    b, t = x_bthwc.shape[:2]
    outs, n = [], t // frames
    if n:
        chunks = jnp.moveaxis(x_bthwc[:, : n * frames].reshape(b, n, frames, *x_bthwc.shape[2:]), 1, 0)
        cache, out = jax.lax.scan(run, cache, chunks)  # [n, B, t_out, ...]
        outs.append(jnp.moveaxis(out, 0, 1).reshape(b, -1, *out.shape[3:]))
    if t % frames:
        cache, out = run(cache, x_bthwc[:, n * frames :])
        outs.append(out)
    return cache, outs


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def encode_chunks(config: VAEConfig, dtype: str, latents_per_step: int, return_cache: bool, params, stats,
                  videos, cache):
    """Videos [B, T, H, W, C] (uint8, or float in [-1, 1]) -> (normalised latents float32, cache).

    cache None: a clip start (the first frame alone, then chunks of 4 frames per latent); else
    the cache of the clip's earlier frames. latents_per_step: latents per scan step (the
    reference: 1; more is the same function in fewer, larger steps). stats: (latents_mean,
    latents_std). return_cache False: the cache comes back as None (XLA then frees it: at
    480x832 it is ~1 GB per clip). Jitted; the first four arguments are static.
    """
    if videos.dtype == jnp.uint8:  # As train.to_model_input.
        videos = videos.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    run = _run_chunk(WanVAE(config, jnp.dtype(dtype)), WanVAE.encode_chunk, params)
    mus = []
    if cache is None:
        cache, mu = run(None, videos[:, :1])
        mus, videos = [mu], videos[:, 1:]
    cache, rest = _scan_chunks(run, cache, videos, FRAMES_PER_CHUNK * latents_per_step)
    mean, std = stats
    mus += rest
    return (jnp.concatenate(mus, axis=1).astype(jnp.float32) - mean) / std, cache if return_cache else None


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def decode_chunks(config: VAEConfig, dtype: str, latents_per_step: int, return_cache: bool, params, stats,
                  latents, cache):
    """Normalised latents [B, T', h, w, z] -> (pixels float32 in [-1, 1], cache).

    cache None: a clip start (the first latent alone -> 1 frame, then 4 frames per latent).
    """
    mean, std = stats
    z = latents.astype(jnp.float32) * std + mean
    run = _run_chunk(WanVAE(config, jnp.dtype(dtype)), WanVAE.decode_chunk, params)
    outs = []
    if cache is None:
        cache, x = run(None, z[:, :1])
        outs, z = [x], z[:, 1:]
    cache, rest = _scan_chunks(run, cache, z, latents_per_step)
    outs += rest
    videos = jnp.clip(jnp.concatenate(outs, axis=1).astype(jnp.float32), -1.0, 1.0)
    return videos, cache if return_cache else None


class VideoVAE:
    """A Wan 2.1 VAE with its params on the device(s): jitted, batched, chunked over time.

    Batches are split over the local devices (the ('data', 'fsdp') axes of `mesh`; params
    replicated) and padded to a multiple of their count. `encode` / `decode` wrap the jitted
    pure functions `encode_chunks` / `decode_chunks` (module level, so VAEs of one architecture
    share their compiles); `jit_args()` gives their leading arguments, for AOT lowering.
    """

    def __init__(self, config: VAEConfig, params: dict, *, dtype: Any = jnp.bfloat16,
                 directory: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 latents_per_step: int = 1):
        self.config, self.dtype, self.directory = config, jnp.dtype(dtype), directory
        if latents_per_step < 1:
            raise ValueError(f"latents_per_step must be >= 1, got {latents_per_step}")
        self.latents_per_step = int(latents_per_step)
        self.model = WanVAE(config, self.dtype)
        self.mesh = mesh if mesh is not None else sharding.make_mesh(sharding.mesh_config(), jax.local_devices())
        self.batch_multiple = sharding.data_parallel_size(self.mesh)
        self._batch_sharding = sharding.batch_sharding(self.mesh)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        self.latents_mean = np.asarray(config.latents_mean, np.float32)
        self.latents_std = np.asarray(config.latents_std, np.float32)
        # The statistics are arguments, not part of the static key: VAEs that differ only in
        # them (and in weights) share compiled code.
        z = config.z_dim
        self._static = (dataclasses.replace(config, latents_mean=(0.0,) * z, latents_std=(1.0,) * z),
                        self.dtype.name)
        self._stats = jax.device_put((self.latents_mean, self.latents_std), NamedSharding(self.mesh, P()))

    @classmethod
    def load(cls, directory: str | os.PathLike, *, dtype: Any = jnp.bfloat16,
             mesh: jax.sharding.Mesh | None = None, latents_per_step: int = 1) -> VideoVAE:
        """Loads a diffusers-layout AutoencoderKLWan dir (config.json + *.safetensors).

        Args:
            directory: the checkpoint dir (e.g. Wan2.1-T2V-1.3B-Diffusers/vae).
            dtype: compute dtype of the convs (params stay float32; norms and softmax float32).
            mesh: devices to split batches over; default: all local devices.
            latents_per_step: latents per time step of the scan (1: the reference's chunks).

        Raises:
            pretrained.CheckpointDirError: the dir, its config.json or its weights are missing.
            ValueError: not a Wan 2.1 VAE, or weights that do not match the config.
        """
        directory = os.fspath(directory)
        config = VAEConfig.from_diffusers(pretrained.read_config(directory, "VAE"),
                                          where=os.path.join(directory, "config.json"))
        params = params_from_torch(pretrained.read_tensors(directory, "VAE"), config, where=f"VAE {directory}")
        return cls(config, params, dtype=dtype, directory=directory, mesh=mesh,
                   latents_per_step=latents_per_step)

    def jit_args(self, latents_per_step: int | None = None, return_cache: bool = False) -> tuple:
        """encode/decode_chunks' leading args: (config, dtype name, latents per step, return_cache,
        params, stats); the clip and the cache follow."""
        return (*self._static, latents_per_step or self.latents_per_step, return_cache, self.params,
                self._stats)

    def latent_shape(self, clip_shape_thwc: Sequence[int]) -> tuple[int, int, int, int]:
        return self.config.latent_shape(clip_shape_thwc)

    # -- the API ---------------------------------------------------------------------------------

    def _put(self, array):
        b = array.shape[0]
        pad = -b % self.batch_multiple
        if pad:  # Repeat the last example: every device gets a full share, one compile per size.
            array = jnp.concatenate([array, jnp.repeat(array[-1:], pad, axis=0)]) if isinstance(
                array, jax.Array) else np.concatenate([array, np.repeat(array[-1:], pad, axis=0)])
        return jax.device_put(array, self._batch_sharding), b

    def encode(self, videos_bthwc, *, cache=None, return_cache: bool = False,
               latents_per_step: int | None = None):
        """Videos -> normalised latents (the posterior mean, deterministic).

        Args:
            videos_bthwc: [B, T, H, W, 3], float in [-1, 1] or uint8 (scaled as training does).
              T = 1 + 4k for a clip start; with `cache`, T = 4k frames continuing that clip.
              H and W multiples of 8.
            cache: the cache returned by a previous call on the clip's earlier frames.
            return_cache: also return the cache, to continue the clip in a later call.
            latents_per_step: overrides the VAE's (same result, other speed/memory).

        Returns:
            float32 [B, T', H/8, W/8, z_dim] (T' = 1 + (T - 1) / 4 from a clip start, T / 4 after),
            and the cache if asked.
        """
        b, t, h, w, c = _check_shape(videos_bthwc, "videos", 5)
        f, s = FRAMES_PER_CHUNK, self.config.spatial_factor
        if (t - 1) % f if cache is None else (t == 0 or t % f):
            raise ValueError(f"videos have {t} frames; encode takes 1 + 4k frames at a clip start "
                             f"(e.g. 17) and 4k frames when continuing one (cache=...)")
        if h % s or w % s or c != self.config.in_channels:
            raise ValueError(f"videos are [B, T, H, W, C]={list(videos_bthwc.shape)}; H and W must be "
                             f"multiples of {s} and C={self.config.in_channels}")
        x, b = self._put(videos_bthwc)
        latents, cache = encode_chunks(*self.jit_args(latents_per_step, return_cache), x, cache)
        return (latents[:b], cache) if return_cache else latents[:b]

    def decode(self, latents_bthwc, *, cache=None, return_cache: bool = False,
               latents_per_step: int | None = None):
        """Normalised latents -> videos float32 [B, T, H, W, 3] in [-1, 1].

        From a clip start T = 1 + 4 (T' - 1); continuing one (`cache` from an earlier call on its
        first latents) T = 4 T'.
        """
        _, t, _, _, c = _check_shape(latents_bthwc, "latents", 5)
        if c != self.config.z_dim or t == 0:
            raise ValueError(f"latents are {list(latents_bthwc.shape)}; expected [B, T'>0, h, w, "
                             f"{self.config.z_dim}]")
        z, b = self._put(latents_bthwc)
        videos, cache = decode_chunks(*self.jit_args(latents_per_step, return_cache), z, cache)
        return (videos[:b], cache) if return_cache else videos[:b]


def _check_shape(array, what: str, ndim: int) -> tuple[int, ...]:
    if len(array.shape) != ndim:
        raise ValueError(f"{what} must be {ndim}-D [B, T, H, W, C], got shape {list(array.shape)}")
    return tuple(array.shape)


def decode_to_pixels(vae: VideoVAE, latents, *, chunk: int = 8) -> np.ndarray:
    """Decodes a batch of normalised latents `chunk` clips at a time (bounded device memory).

    Args:
        vae: the VAE the latents were encoded with.
        latents: process-local [N, T', h, w, z] (numpy or a fully addressable jax.Array).
        chunk: clips per decode call; the last call is padded to it (one compile).

    Returns:
        float32 numpy [N, T, H, W, 3] in [-1, 1].
    """
    latents = np.asarray(latents, np.float32)
    chunk = max(1, int(chunk))
    out = []
    for start in range(0, len(latents), chunk):
        piece = latents[start : start + chunk]
        padded = np.concatenate([piece, np.repeat(piece[-1:], chunk - len(piece), axis=0)])
        out.append(np.asarray(vae.decode(padded))[: len(piece)])
    if not out:
        raise ValueError("decode_to_pixels got 0 latents")
    return np.concatenate(out)
