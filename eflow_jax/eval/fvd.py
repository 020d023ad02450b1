"""Frechet Video Distance: I3D preprocessing, feature statistics, the distance, the pinned protocol.

FVD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), computed in float64 from
I3D features of generated and real clips. Every reported number carries `fvd_protocol(...)`,
because FVD moves with the clip count, frames, resize, real split and I3D weights (docs/EVAL.md).
"""

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.eval import i3d

FVD_NUM_FRAMES = 16  # The first 16 frames of each clip (docs/METHOD.md section 10).
FVD_RESOLUTION = 224
FVD_FEATURE_LAYER = "i3d_logits_400_time_mean"  # Pre-softmax logits, as TF-Hub FVD / StyleGAN-V.


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh; round-off negatives are clamped to 0."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2) (same eigenvalues, but symmetric PSD) and the
    square roots of that matrix's eigenvalues are the singular values of S1^1/2 S2^1/2, so we sum
    those. Only `eigh` and `svd` are needed, nothing goes complex (unlike `scipy.linalg.sqrtm(S1 @
    S2)`), and round-off in the near-null space of rank-deficient covariances (N < D clips) stays
    at ~1e-15 instead of the ~1e-8 per direction a second square root would give it.

    Args:
      mu1, mu2: means [D].
      sigma1, sigma2: covariances [D, D].
    Returns:
      The distance (>= 0 up to round-off).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, "
                         f"mu2 {mu2.shape}, sigma2 {sigma2.shape}")
    trace_sqrt = np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (divides by N - 1) of features [N, D], float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


class StatsAccumulator:
    """Streaming mean/covariance (Chan et al. pairwise merge), so 10k clips never sit in memory.

    acc = StatsAccumulator(); acc.update(batch_features) ...; mu, sigma = acc.finalize()
    Matches `feature_stats` on the concatenated features up to float64 round-off.
    """

    def __init__(self) -> None:
        self.count = 0
        self._mean: np.ndarray | None = None
        self._sq_dev: np.ndarray | None = None  # Sum of outer products of deviations [D, D].

    def update(self, features: np.ndarray) -> None:
        """Adds a batch of features [n, D] (any float dtype; accumulated in float64)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected features [n, D], got shape {x.shape}")
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(axis=0)
        centred = x - batch_mean
        batch_sq_dev = centred.T @ centred
        if self._mean is None:
            self.count, self._mean, self._sq_dev = n, batch_mean, batch_sq_dev
            return
        if self._mean.shape != batch_mean.shape:
            raise ValueError(f"feature dim changed: {self._mean.shape[0]} -> {x.shape[1]}")
        total = self.count + n
        delta = batch_mean - self._mean
        self._mean = self._mean + delta * (n / total)
        cross = np.outer(delta, delta) * (self.count * n / total)
        self._sq_dev = self._sq_dev + batch_sq_dev + cross
        self.count = total

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        """Returns (mu [D], sigma [D, D]) with the unbiased (N - 1) covariance."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature rows, have {self.count}")
        return self._mean.copy(), self._sq_dev / (self.count - 1)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num_samples: int,
               protocol: dict[str, Any] | None = None) -> Path:
    """Caches real-data statistics (and the protocol they were made under) in an .npz."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # A file object keeps numpy from appending '.npz'.
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                 num_samples=np.asarray(num_samples),
                 protocol=np.asarray(json.dumps(protocol or {}, sort_keys=True)))
    return path


def real_stats_filename(protocol: dict[str, Any]) -> str:
    """Cache name for real statistics that encodes what they depend on, e.g.
    'fvd_real_kinetics700_train_n10000_f16_r224_i3d1a2b3c4d.npz'."""
    frames = protocol["frames"].removeprefix("first ")
    side = protocol["resize"].split("x", 1)[0]
    return (f"fvd_real_{protocol['real_source']}_{protocol['real_split']}"
            f"_n{protocol['num_real_clips']}_f{frames}_r{side}"
            f"_i3d{protocol['i3d_weights_sha256'][:8]}.npz")


def load_stats(path: str | Path, expect_protocol: dict[str, Any] | None = None,
               ignore_keys: tuple[str, ...] = ("num_gen_clips", "seed"),
               ) -> tuple[np.ndarray, np.ndarray]:
    """Loads (mu, sigma) saved by `save_stats`.

    Args:
      path: the .npz.
      expect_protocol: if given, every key except `ignore_keys` must equal the stored protocol,
        so generated clips are never compared with real statistics made another way.
      ignore_keys: protocol keys allowed to differ (they describe the generated side).
    Returns:
      (mu [D], sigma [D, D]) in float64.
    """
    with np.load(path) as data:
        mu, sigma = data["mu"], data["sigma"]
        stored = json.loads(str(data["protocol"]))
    if expect_protocol is not None:
        keys = (set(stored) | set(expect_protocol)) - set(ignore_keys)
        differ = {k: (stored.get(k), expect_protocol.get(k)) for k in sorted(keys)
                  if stored.get(k) != expect_protocol.get(k)}
        if differ:
            raise ValueError(f"real stats in {path} were made under another protocol "
                             f"(key: (stored, expected)): {differ}; recompute them")
    return mu, sigma


def fvd_protocol(*, num_gen_clips: int, num_real_clips: int, real_source: str, real_split: str,
                 seed: int, i3d_weights_sha256: str, num_frames: int = FVD_NUM_FRAMES,
                 resolution: int = FVD_RESOLUTION) -> dict[str, Any]:
    """The pinned FVD protocol as a flat dict; print it beside every FVD number.

    Args:
      num_gen_clips: generated clips (10000 headline, 2048 sweeps).
      num_real_clips: real clips behind the cached statistics.
      real_source: dataset name of the real clips (e.g. 'kinetics700').
      real_split: split the real clips come from (e.g. 'train').
      seed: sampling seed of the generated clips (labels and noise).
      i3d_weights_sha256: `i3d.weights_sha256` of the converted weights file.
      num_frames: frames per clip fed to I3D, taken from the start of each clip.
      resolution: square side the frames are resized to.
    Returns:
      A JSON-serialisable dict.
    """
    return {
        "metric": "fvd",
        "num_gen_clips": int(num_gen_clips),
        "num_real_clips": int(num_real_clips),
        "real_source": real_source,
        "real_split": real_split,
        "seed": int(seed),
        "frames": f"first {int(num_frames)}",
        "resize": f"{int(resolution)}x{int(resolution)} bilinear, half-pixel centres, no antialias",
        "quantize": "uint8 levels before resize",
        "input_range": "[-1, 1]",
        "feature_layer": FVD_FEATURE_LAYER,
        "stats": "float64 mean, unbiased covariance",
        "i3d_weights_sha256": i3d_weights_sha256,
        "precision": "float32 convs, HIGHEST",
    }


def format_protocol(protocol: dict[str, Any]) -> str:
    """One line, stable key order: `fvd_protocol {...}` for logs next to the number."""
    return "fvd_protocol " + json.dumps(protocol, sort_keys=True)


def preprocess_for_i3d(video: jax.Array, resolution: int = FVD_RESOLUTION,
                       quantize: bool = True) -> jax.Array:
    """Prepares float videos in [-1, 1] for I3D: clip, (8-bit quantise), bilinear resize.

    The resize is half-pixel-centre bilinear without antialiasing (= torch `F.interpolate(...,
    mode='bilinear', align_corners=False)` as StyleGAN-V's FVD uses; the original TF FVD used
    TF1 `resize_bilinear`, which differs by a sub-pixel shift). Quantising to 256 levels first
    makes generated clips match real ones, which were decoded from 8-bit video.

    Args:
      video: [B, T, H, W, 3] floats in [-1, 1] (values outside are clipped).
      resolution: output side.
      quantize: round to uint8 levels before resizing.
    Returns:
      [B, T, resolution, resolution, 3] float32 in [-1, 1].
    """
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected RGB video [B, T, H, W, 3], got {video.shape}; decode latents "
                         "with the VAE first")
    x = jnp.clip(video.astype(jnp.float32), -1.0, 1.0)
    if quantize:
        x = jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
    b, t, h, w, c = x.shape
    if (h, w) != (resolution, resolution):
        x = jax.image.resize(x, (b, t, resolution, resolution, c), method="bilinear",
                             antialias=False)
    return jnp.clip(x, -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("num_frames", "resolution"))
def i3d_features(params: dict[str, Any], video: jax.Array, num_frames: int = FVD_NUM_FRAMES,
                 resolution: int = FVD_RESOLUTION) -> jax.Array:
    """FVD features [B, 400] of videos [B, T >= num_frames, H, W, 3] in [-1, 1].

    Takes the first `num_frames` frames, runs `preprocess_for_i3d`, then I3D (params are an
    argument, not a closure, so 12.7M weights are not baked into the compiled program).
    """
    if video.shape[1] < num_frames:
        raise ValueError(f"FVD needs >= {num_frames} frames per clip, got {video.shape[1]}")
    x = preprocess_for_i3d(video[:, :num_frames], resolution)
    logits, _ = i3d.InceptionI3D().apply({"params": params}, x)
    return logits


def make_i3d_feature_fn(params: dict[str, Any], num_frames: int = FVD_NUM_FRAMES,
                        resolution: int = FVD_RESOLUTION) -> Callable[[jax.Array], jax.Array]:
    """Binds params: `features(video) -> [B, 400]`, rows for `StatsAccumulator.update`."""
    return functools.partial(i3d_features, params, num_frames=num_frames, resolution=resolution)
