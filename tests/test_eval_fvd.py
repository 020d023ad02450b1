"""FVD maths: Frechet distance vs scipy and closed forms, streaming stats, stats cache, resize."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from eflow_jax.eval import fvd


def _random_features(rng, n, d, shift=0.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def _scipy_frechet(mu1, sigma1, mu2, sigma2):
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2)
                 - 2 * np.trace(covmean.real))


def test_frechet_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(0)
    for d in (4, 32):
        stats_a = fvd.feature_stats(_random_features(rng, 300, d))
        stats_b = fvd.feature_stats(_random_features(rng, 250, d, shift=0.3))
        ours = fvd.frechet_distance(*stats_a, *stats_b)
        ref = _scipy_frechet(*stats_a, *stats_b)
        assert ours > 0.1
        np.testing.assert_allclose(ours, ref, rtol=1e-8)


def test_frechet_closed_form_diagonal_gaussians():
    # For commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
    got = fvd.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_frechet_zero_for_identical_sets_even_rank_deficient():
    rng = np.random.default_rng(1)
    features = _random_features(rng, 20, 64)  # N < D: singular covariance, as with few clips.
    mu, sigma = fvd.feature_stats(features)
    assert abs(fvd.frechet_distance(mu, sigma, mu, sigma)) < 1e-8 * np.trace(sigma)


def test_frechet_grows_with_mean_shift_as_squared_norm():
    rng = np.random.default_rng(2)
    features = _random_features(rng, 500, 8)
    mu, sigma = fvd.feature_stats(features)
    direction = rng.normal(size=8)
    direction /= np.linalg.norm(direction)
    distances = [fvd.frechet_distance(mu, sigma, mu + s * direction, sigma)
                 for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(distances, distances[1:], strict=False))
    # Equal covariances: only |dmu|^2 remains.
    np.testing.assert_allclose(distances, [0.0, 0.25, 1.0, 4.0, 16.0], atol=1e-8)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        fvd.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_accumulator_equals_one_shot_stats_with_uneven_batches_and_large_offset():
    rng = np.random.default_rng(3)
    features = _random_features(rng, 257, 16, shift=1e3)  # Large mean: tests cancellation.
    acc = fvd.StatsAccumulator()
    start = 0
    for size in (1, 100, 0, 63, 93):
        acc.update(features[start: start + size].astype(np.float32))
        start += size
    assert start == 257 and acc.count == 257
    mu, sigma = acc.finalize()
    mu_ref, sigma_ref = fvd.feature_stats(features.astype(np.float32))
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float32).T), rtol=1e-9, atol=1e-9)


def test_accumulator_needs_two_rows():
    acc = fvd.StatsAccumulator()
    acc.update(np.ones((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize()


def _protocol(**overrides):
    kwargs = dict(num_gen_clips=2048, num_real_clips=10000, real_source="kinetics700",
                  real_split="train", seed=0, i3d_weights_sha256="abc")
    return fvd.fvd_protocol(**{**kwargs, **overrides})


def test_stats_cache_round_trip_and_protocol_guard(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = fvd.feature_stats(_random_features(rng, 50, 5))
    path = fvd.save_stats(tmp_path / "real_stats.npz", mu, sigma, 50, _protocol())
    assert path.name == "real_stats.npz"
    loaded_mu, loaded_sigma = fvd.load_stats(path, expect_protocol=_protocol(num_gen_clips=10000))
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with pytest.raises(ValueError, match="i3d_weights_sha256"):
        fvd.load_stats(path, expect_protocol=_protocol(i3d_weights_sha256="other"))
    with pytest.raises(ValueError, match="real_split"):
        fvd.load_stats(path, expect_protocol=_protocol(real_split="validation"))


def test_protocol_is_json_and_pins_the_choices():
    protocol = _protocol()
    line = fvd.format_protocol(protocol)
    assert json.loads(line.removeprefix("fvd_protocol ")) == protocol
    assert protocol["frames"] == "first 16"
    assert protocol["feature_layer"] == fvd.FVD_FEATURE_LAYER
    assert "224x224 bilinear" in protocol["resize"]
    assert fvd.real_stats_filename(protocol) == (
        "fvd_real_kinetics700_train_n10000_f16_r224_i3dabc.npz")


def _bilinear_half_pixel_reference(image_hw, out_h, out_w):
    """Separable bilinear, half-pixel centres, edge clamp, no antialias (numpy, float64)."""

    def weights(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        src = np.clip(src, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        matrix = np.zeros((n_out, n_in))
        matrix[np.arange(n_out), lo] += 1 - frac
        matrix[np.arange(n_out), hi] += frac
        return matrix

    return weights(image_hw.shape[0], out_h) @ image_hw @ weights(image_hw.shape[1], out_w).T


def test_preprocess_resizes_bilinear_half_pixel_without_antialias():
    rng = np.random.default_rng(5)
    video = rng.uniform(-0.9, 0.9, size=(1, 2, 256, 200, 3)).astype(np.float32)
    out = np.asarray(fvd.preprocess_for_i3d(jnp.asarray(video), quantize=False))
    assert out.shape == (1, 2, 224, 224, 3) and out.dtype == np.float32
    ref = _bilinear_half_pixel_reference(video[0, 1, :, :, 2].astype(np.float64), 224, 224)
    np.testing.assert_allclose(out[0, 1, :, :, 2], ref, atol=1e-4)  # float32 weights.


def test_preprocess_quantizes_clips_and_validates():
    row = np.zeros(224, np.float32)
    row[:5] = [-3.0, -1.0, 0.3, 1.0, 5.0]
    video = jnp.asarray(np.broadcast_to(row[None, :, None], (224, 224, 3))[None, None])
    out = np.asarray(fvd.preprocess_for_i3d(video))  # Already 224: no resize, only quantise.
    levels = (out + 1) * 127.5
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # On the 8-bit grid.
    np.testing.assert_allclose(out[0, 0, 0, :5, 0], [-1, -1, 166 / 127.5 - 1, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        fvd.preprocess_for_i3d(jnp.zeros((1, 2, 8, 8, 4)))
