"""eval/sharpness.py: band powers add up to the variance, sit in the right band, fall with blur."""

import numpy as np
import pytest

from eflow_jax.eval import sharpness


@pytest.mark.parametrize("size", [(16, 16), (15, 17), (32, 32)])
def test_band_powers_sum_to_the_luminance_variance(size):
    rng = np.random.default_rng(0)
    videos = rng.uniform(-1, 1, size=(3, 4, *size, 3)).astype(np.float32)
    power = sharpness.band_power(videos)
    assert power.shape == (3, len(sharpness.BANDS) - 1)
    np.testing.assert_allclose(power.sum(-1), videos.mean(-1).var(axis=(2, 3)).mean(1), rtol=1e-5)


@pytest.mark.parametrize("cycles_per_px, band", [(2 / 32, 0), (6 / 32, 1), (10 / 32, 2), (14 / 32, 3)])
def test_a_grating_lands_in_its_band(cycles_per_px, band):
    x = np.arange(32)
    frame = 0.5 * np.cos(2 * np.pi * cycles_per_px * x)[None, :] * np.ones((32, 1))
    power = sharpness.band_power(np.broadcast_to(frame[None, None, :, :, None], (1, 2, 32, 32, 3)))[0]
    assert power.argmax() == band and power[band] > 0.99 * power.sum()


def test_blur_removes_high_frequencies_monotonically_and_keeps_the_mean():
    rng = np.random.default_rng(1)
    videos = np.where(rng.random((8, 2, 32, 32, 1)) > 0.8, 0.9, -0.8).repeat(3, -1).astype(np.float32)
    hf = [sharpness.hf_power(sharpness.band_power(sharpness.gaussian_blur(videos, s))).mean()
          for s in (0.0, 0.5, 1.0, 2.0)]
    assert hf == sorted(hf, reverse=True) and hf[2] < 0.05 * hf[0]
    np.testing.assert_allclose(sharpness.gaussian_blur(videos, 0.0), videos, atol=1e-6)
    np.testing.assert_allclose(sharpness.gaussian_blur(videos, 1.0).mean((2, 3)), videos.mean((2, 3)), atol=1e-5)


def test_standardise_centres_real_clips_and_floors_missing_bands():
    rng = np.random.default_rng(2)
    real = rng.lognormal(mean=-3, sigma=0.4, size=(512, 5))
    normaliser = sharpness.fit_normaliser(real)
    z = sharpness.standardise(real, normaliser)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(z.std(0), sharpness.WEIGHT, rtol=1e-6)
    blurred = sharpness.standardise(np.zeros_like(real), normaliser)  # No power at all: a bounded cost.
    assert np.isfinite(blurred).all() and (blurred < -1).all() and (blurred > -20).all()
