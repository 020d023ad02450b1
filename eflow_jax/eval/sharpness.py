"""Classifier-free sharpness statistics of clips: luminance power per spatial-frequency band.

A classifier trained to tell shapes apart is robust to blur by design, so a blurry blob of the right
kind scores like a sharp one on its features. These statistics see what it ignores. Per clip:
the power of the mean-removed luminance in radial frequency bands (BANDS, cycles per pixel),
averaged over frames. Blur removes the upper bands (a Gaussian of sigma 1 px keeps ~2% of the
power above 0.25 cycles/px); noise raises every band; low-amplitude noise (0.05) moves them ~5%.

For a Frechet distance the band powers go through `standardise`: log power, floored at
FLOOR_FRACTION of real clips' median power per band (so a blurred band costs a bounded amount
instead of log(0)), centred and scaled to WEIGHT times the real clips' standard deviation. Beside a
gauge classifier's features, WEIGHT = 0.5 puts real clips blurred by sigma = 1 px between real
clips and noise at every geometry measured (0.08x-0.6x noise's Frechet distance; at weight 1 they
passed noise for 4 classes at 4x16x16, where the classifier's features spread less), while a
sigma = 0.5 px blur still scores ~9x-40x real clips (docs/EVAL.md).
"""

from __future__ import annotations

import numpy as np

BANDS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75)  # Radial band edges, cycles per pixel (corners reach 0.707).
HIGH_BANDS = slice(2, None)  # Bands above 0.25 cycles/px: what `hf_power` sums.
FLOOR_FRACTION = 0.05
WEIGHT = 0.5


def band_power(videos: np.ndarray) -> np.ndarray:
    """Power per pixel of each frame's mean-removed luminance in each band, averaged over frames.

    Args:
      videos: [N, T, H, W, C], values in [-1, 1] (clipped here).
    Returns:
      float64 [N, len(BANDS) - 1].
    """
    y = np.clip(np.asarray(videos, np.float32), -1, 1).mean(-1)  # [N, T, H, W]
    h, w = y.shape[-2:]
    spectrum = np.fft.rfft2(y - y.mean((2, 3), keepdims=True), axes=(2, 3))
    power = np.abs(spectrum) ** 2 / (h * w) ** 2  # Parseval: sums to the frame's variance.
    # rfft2 stores half the columns: every column but the first (and the Nyquist one at even w) is
    # the conjugate twin of a dropped one, so it counts twice.
    twice = np.full(w // 2 + 1, 2.0)
    twice[0] = 1.0
    if w % 2 == 0:
        twice[-1] = 1.0
    radius = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    bands = [(radius > lo) & (radius <= hi) for lo, hi in zip(BANDS[:-1], BANDS[1:], strict=True)]
    per_band = np.stack([(power * (twice * m)).sum((2, 3)) for m in bands], -1)  # [N, T, B]
    return per_band.mean(1).astype(np.float64)


def hf_power(power: np.ndarray) -> np.ndarray:
    """[N] power above 0.25 cycles/px, from `band_power`'s [N, B]."""
    return power[:, HIGH_BANDS].sum(-1)


def fit_normaliser(real_power: np.ndarray) -> dict[str, list[float]]:
    """Floor, mean and std per band from real clips' `band_power` (JSON-ready, for a gauge's cache)."""
    floor = FLOOR_FRACTION * np.median(real_power, axis=0)
    logs = np.log(real_power + floor)
    return {"floor": floor.tolist(), "mean": logs.mean(0).tolist(), "std": np.maximum(logs.std(0), 1e-3).tolist()}


def standardise(power: np.ndarray, normaliser: dict) -> np.ndarray:
    """[N, B] band powers -> features [N, B] with real clips at ~zero mean and std WEIGHT."""
    floor, mean, std = (np.asarray(normaliser[k]) for k in ("floor", "mean", "std"))
    return WEIGHT * (np.log(power + floor) - mean) / std


def gaussian_blur(videos: np.ndarray, sigma: float) -> np.ndarray:
    """Each frame blurred by a Gaussian of `sigma` px (in the Fourier domain, so edges wrap as the
    synthetic data do). [N, T, H, W, C] -> float32, same shape."""
    videos = np.asarray(videos, np.float32)
    h, w = videos.shape[2:4]
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))[:, :, None]  # [H, W//2+1, 1]
    out = np.fft.irfft2(np.fft.rfft2(videos, axes=(2, 3)) * gain, s=(h, w), axes=(2, 3))
    return out.astype(np.float32)
