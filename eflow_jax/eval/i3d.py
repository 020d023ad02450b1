"""Inception-I3D (Carreira & Zisserman 2017, Kinetics-400) in Flax Linen, inference only.

Channels-last (NDHWC) input in [-1, 1], float32. Batch norm is folded at conversion time into a
per-channel `scale` and `bias` after each conv (y = conv(x) * scale + bias), so the model holds no
batch statistics and `apply` is a pure function of (params, video). Padding is TensorFlow 'SAME'
(extra pad after, as in DeepMind's sonnet model and the piergiaj PyTorch port), max pools pad
with -inf (equal to the port's zero pad: every pool input follows a ReLU).

The head reproduces DeepMind's `Logits` endpoint: a VALID [2, 7, 7] average pool (clamped to the
feature map for small inputs), a 1x1x1 conv with bias, then the mean over the remaining positions.
Because that conv is linear we return the mean-pooled 1024-d vector too: logits = pooled @ W + b.
FVD uses the 400-d logits (see docs/EVAL.md and `eflow_jax.eval.fvd.fvd_protocol`).

Params file: a flat .npz of float32 arrays named like 'Conv3d_1a_7x7/kernel' ([t, h, w, in, out]),
'Mixed_3b/b1b/scale', 'Logits/bias'; made by `python -m eflow_jax.eval.convert_i3d`.
"""

import hashlib
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

I3D_NUM_CLASSES = 400
I3D_FEATURE_DIM = I3D_NUM_CLASSES  # FVD features: the time-averaged 400-d logits.
I3D_POOLED_DIM = 1024  # The average-pooled Mixed_5c output (pre-logit).
BATCH_NORM_EPS = 1e-3  # Both the sonnet original and the PyTorch port use 1e-3.

# Output channels of each Inception block's six convs, in the port's branch order:
# b0 (1x1), b1a (1x1) -> b1b (3x3x3), b2a (1x1) -> b2b (3x3x3), max pool -> b3b (1x1).
INCEPTION_BLOCKS: dict[str, tuple[int, int, int, int, int, int]] = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
BRANCH_CONVS = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")
_BRANCH_KERNELS = {"b0": 1, "b1a": 1, "b1b": 3, "b2a": 1, "b2b": 3, "b3b": 1}

# The trunk in order: ("conv", name, out, kernel, stride) | ("pool", name, window, stride)
# | ("mixed", name).
STEM_AND_TRUNK: tuple[tuple[Any, ...], ...] = (
    ("conv", "Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
    ("pool", "MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    ("conv", "Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
    ("conv", "Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
    ("pool", "MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"),
    ("mixed", "Mixed_3c"),
    ("pool", "MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"),
    ("mixed", "Mixed_4c"),
    ("mixed", "Mixed_4d"),
    ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", "MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"),
    ("mixed", "Mixed_5c"),
)
LOGITS_POOL_WINDOW = (2, 7, 7)  # Exactly covers the [2, 7, 7] map of a 16 x 224 x 224 clip.


def conv_unit_names() -> list[str]:
    """Names of every conv unit with folded batch norm, in forward order ('Mixed_3b/b1b', ...)."""
    names = []
    for layer in STEM_AND_TRUNK:
        if layer[0] == "conv":
            names.append(layer[1])
        elif layer[0] == "mixed":
            names.extend(f"{layer[1]}/{branch}" for branch in BRANCH_CONVS)
    return names


class Unit3D(nn.Module):
    """Conv3d (no bias, SAME padding) -> folded batch norm (scale, bias) -> ReLU."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1, 1)
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (*self.kernel_size, x_bthwc.shape[-1], self.features))
        scale = self.param("scale", nn.initializers.ones, (self.features,))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        y = jax.lax.conv_general_dilated(
            x_bthwc, kernel, window_strides=tuple(self.strides), padding="SAME",
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"), precision=self.precision)
        return nn.relu(y * scale + bias)


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1 | 1x1->3x3 | 1x1->3x3 | maxpool->1x1), concatenated."""

    channels: tuple[int, int, int, int, int, int]
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> jax.Array:
        out = dict(zip(BRANCH_CONVS, self.channels, strict=True))

        def unit(name: str, inputs: jax.Array) -> jax.Array:
            k = _BRANCH_KERNELS[name]
            return Unit3D(out[name], (k, k, k), precision=self.precision, name=name)(inputs)

        branch_0 = unit("b0", x_bthwc)
        branch_1 = unit("b1b", unit("b1a", x_bthwc))
        branch_2 = unit("b2b", unit("b2a", x_bthwc))
        pooled = nn.max_pool(x_bthwc, (3, 3, 3), strides=(1, 1, 1), padding="SAME")
        branch_3 = unit("b3b", pooled)
        return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


class LogitsHead(nn.Module):
    """DeepMind's 'Logits' endpoint: VALID [2, 7, 7] average pool, 1x1x1 conv, mean over positions.

    Returns (logits [B, K], pooled [B, 1024]) with logits = pooled @ W + b exactly.
    """

    num_classes: int
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x_bthwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Small inputs leave a map smaller than [2, 7, 7]: clamp the window so they still run.
        window = tuple(min(w, s) for w, s in zip(LOGITS_POOL_WINDOW, x_bthwc.shape[1:4],
                                                 strict=True))
        pooled_bd = jnp.mean(nn.avg_pool(x_bthwc, window, strides=(1, 1, 1), padding="VALID"),
                             axis=(1, 2, 3))
        # A 1x1x1 conv per position then a mean over positions == this matmul on the mean.
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (1, 1, 1, pooled_bd.shape[-1], self.num_classes))
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
        logits_bk = jnp.dot(pooled_bd, kernel.reshape(-1, self.num_classes),
                            precision=self.precision) + bias
        return logits_bk, pooled_bd


class InceptionI3D(nn.Module):
    """RGB Inception-I3D. Call on [B, T, H, W, 3] in [-1, 1]; returns (logits [B, 400],
    pooled [B, 1024]). Any T, H, W >= 1 run; the standard FVD input is 16 x 224 x 224."""

    num_classes: int = I3D_NUM_CLASSES
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, video_bthwc: jax.Array) -> tuple[jax.Array, jax.Array]:
        if video_bthwc.ndim != 5 or video_bthwc.shape[-1] != 3:
            raise ValueError(f"I3D expects RGB video [B, T, H, W, 3], got {video_bthwc.shape}")
        x = video_bthwc.astype(jnp.float32)
        for layer in STEM_AND_TRUNK:
            kind, name = layer[0], layer[1]
            if kind == "conv":
                x = Unit3D(layer[2], layer[3], layer[4], precision=self.precision, name=name)(x)
            elif kind == "pool":
                x = nn.max_pool(x, layer[2], strides=layer[3], padding="SAME")
            else:
                x = InceptionBlock(INCEPTION_BLOCKS[name], precision=self.precision,
                                   name=name)(x)
        return LogitsHead(self.num_classes, precision=self.precision, name="Logits")(x)


def expected_param_shapes(num_classes: int = I3D_NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """Flat 'a/b/kernel' -> shape for every parameter (traced abstractly, no compute)."""
    model = InceptionI3D(num_classes=num_classes)
    dummy = jax.ShapeDtypeStruct((1, 1, 8, 8, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]
    return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict[str, Any]:
    """Flat npz naming -> the nested params pytree `InceptionI3D.apply` expects."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        node = nested
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value, jnp.float32)
    return nested


def load_i3d_params(path: str | Path, num_classes: int = I3D_NUM_CLASSES) -> dict[str, Any]:
    """Loads converted I3D weights from a local .npz (no download) and checks every shape.

    Args:
      path: file written by `python -m eflow_jax.eval.convert_i3d`.
      num_classes: logits width (400 for the Kinetics-400 weights).
    Returns:
      The params pytree for `InceptionI3D(num_classes).apply({'params': params}, video)`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I3D weights not found at {path}; convert them first, see docs/EVAL.md "
            "(python -m eflow_jax.eval.convert_i3d --src=rgb_imagenet.pt --out=i3d.npz)")
    fix = ("make one from the PyTorch checkpoint with python -m eflow_jax.eval.convert_i3d "
           "--src=rgb_imagenet.pt --out=i3d.npz (docs/EVAL.md) and pass that file")
    try:
        data = np.load(path)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        # np.load takes any non-.npz file for a pickle and advises allow_pickle: never the fix here.
        raise ValueError(f"{path} is not a converted I3D weights .npz ({type(e).__name__}); {fix}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):  # A .npy array.
        raise ValueError(f"{path} holds one array, not converted I3D weights; {fix}")
    with data:
        flat = {k: data[k] for k in data.files if not k.startswith("__")}
    expected = expected_param_shapes(num_classes)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    wrong = sorted(k for k in set(expected) & set(flat) if flat[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} is not an I3D params file for num_classes={num_classes}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shapes "
            f"{[(k, flat[k].shape, expected[k]) for k in wrong[:5]]}; re-run convert_i3d")
    return unflatten_params(flat)


def weights_sha256(path: str | Path) -> str:
    """Hex sha256 of a weights file, printed with every FVD number so runs can be compared."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
