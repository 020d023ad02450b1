"""The caption gauge (eval/captions.py): per-attribute accuracy on real clips of seen and held-back
combinations, noise near chance, a Frechet distance that sees blur, grouping, cache.

One gauge is built (~40 s on a 2-core CPU) at 4x32x32 in a temporary cache.
"""

import time

import numpy as np
import pytest

from eflow_jax.data import synthetic
from eflow_jax.eval import captions, sharpness

HELD_OUT_SEED = 77  # Neither the training data's seed (0) nor one the gauge uses.
CHANCE = {name: 1 / len(values) for name, values in synthetic.CAPTION_ATTRIBUTES}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("caption_gauge_cache"))
    before, start = captions.builds, time.perf_counter()
    gauge = captions.CaptionGauge.for_geometry(4, 32, cache_dir=cache)
    assert captions.builds == before + 1
    return gauge, cache, time.perf_counter() - start


@pytest.fixture(scope="module")
def real(built):
    """Two real clips of every caption (held-out seed): 256 seen-combination clips, 64 unseen."""
    ids = np.repeat(synthetic.caption_ids("all"), 2)
    return captions.real_clips(4, 32, HELD_OUT_SEED, ids), synthetic.caption_attributes()[ids]


def test_the_scorer_trains_on_every_combination_held_back_ones_included():
    counts = np.bincount(captions.training_caption_ids(), minlength=160)
    assert len(counts) == 160 and counts.min() >= 0.9 * counts.max() and counts[synthetic.held_back()].min() > 0


def test_prompts_expose_captions_ids_and_attributes():
    texts, ids, attributes = captions.prompts("unseen")
    assert len(texts) == len(ids) == len(attributes) == 32 and synthetic.held_back()[ids].all()
    assert texts[0] == synthetic.all_captions()[ids[0]]
    np.testing.assert_array_equal(captions.caption_ids_of(attributes), ids)
    _, train_ids, _ = captions.prompts("train")
    assert not synthetic.held_back()[train_ids].any() and len(train_ids) == 128
    with pytest.raises(ValueError, match="attributes must lie"):
        captions.caption_ids_of([[2, 0, 0, 0]])


def test_real_clips_score_high_on_every_attribute_seen_and_unseen(built, real):
    gauge, _, _ = built
    assert min(gauge.meta["heldout_accuracy"].values()) >= 0.95
    report = gauge.report(*real)
    assert set(report) == {"seen", "unseen"}
    assert report["seen"]["num_clips"] == 256 and report["unseen"]["num_clips"] == 64
    for group, scores in report.items():
        for name in captions.ATTRIBUTES:
            assert scores[f"{name}_accuracy"] >= 0.95, (group, name, scores[f"{name}_accuracy"])
            assert scores[f"{name}_accuracy_real"] >= 0.95
            assert scores[f"{name}_accuracy_noise"] <= CHANCE[name] + 0.2, (group, name)
        assert scores["all_accuracy"] >= 0.9 and scores["all_accuracy_noise"] <= 0.05
        assert scores["motion_consistency"] >= 0.9 and scores["motion_consistency_noise"] <= 0.05


def test_frechet_ranks_real_then_blurred_then_noise(built, real):
    gauge, _, _ = built
    videos, attributes = real
    clean = gauge.report(videos, attributes)
    blurred = gauge.report(sharpness.gaussian_blur(videos, 1.0), attributes)
    for group in ("seen", "unseen"):
        frechet = [clean[group]["frechet"], blurred[group]["frechet"], clean[group]["frechet_noise"]]
        assert frechet == sorted(frechet) and frechet[1] > 5 * frechet[0], (group, frechet)
        assert blurred[group]["hf_power_ratio"] < 0.05 < 0.85 < clean[group]["hf_power_ratio"] < 1.2
    flat = captions.scalars(clean)
    assert flat["captions/unseen/frechet"] == clean["unseen"]["frechet"] and "captions/seen/all_accuracy_noise" in flat
    line = captions.summary_line(clean)
    assert line.startswith("captions: seen (256 clips) size ") and "| unseen (64 clips)" in line and "\n" not in line


def test_frechet_features_carry_the_band_powers(built, real):
    """Here the classifier's own features see much of the blur (Frechet 60 for blur 1 without the band
    powers, 70 with them, at 4x32x32), so the ranking alone would not notice the band block missing."""
    gauge, _, _ = built
    videos = real[0][::5]  # 64 clips spread over every size, colour, shape and direction.
    features, _, _ = gauge._features(videos)
    blurred, _, _ = gauge._features(sharpness.gaussian_blur(videos, 1.0))
    bands = len(sharpness.BANDS) - 1
    assert features.shape[1] == gauge.features_and_logits(videos[:2])[0].shape[1] + bands
    assert abs(features[:, -bands:].mean()) < 0.5 * sharpness.WEIGHT  # Real clips: centred.
    assert blurred[:, -bands:][:, sharpness.HIGH_BANDS].mean() < -3 * sharpness.WEIGHT  # Blur: far below.


def test_a_wrong_attribute_is_caught_by_its_own_head(built, real):
    gauge, _, _ = built
    videos, attributes = real
    wrong = attributes.copy()
    wrong[:, 1] = (wrong[:, 1] + 1) % len(synthetic.CAPTION_ATTRIBUTES[1][1])  # Every clip the next colour.
    scores = gauge.score(videos, wrong)
    assert scores["colour_accuracy"] <= 0.05 and scores["all_accuracy"] <= 0.05
    assert min(scores[f"{n}_accuracy"] for n in ("size", "shape", "direction")) >= 0.95
    # The Frechet distance compares distributions: shifting every colour by one maps this set of
    # captions (each twice) onto itself, so it cannot see this; the heads can.


def test_cached_gauge_loads_without_training(built, real):
    gauge, cache, build_seconds = built
    videos, attributes = real
    refs = gauge.references(attributes[:64])
    before, start = captions.builds, time.perf_counter()
    again = captions.CaptionGauge.for_geometry(4, 32, cache_dir=cache)
    assert captions.builds == before and time.perf_counter() - start < build_seconds / 5
    assert refs in again.meta["references"].values()  # References cached with the classifier.
    np.testing.assert_array_equal(again.predict(videos[:16]), gauge.predict(videos[:16]))
    with pytest.raises(ValueError, match="built for"):
        gauge.score(videos[:, :2], attributes)
    with pytest.raises(ValueError, match="seed 0"):
        captions.CaptionGauge.for_geometry(4, 32, cache_dir=cache, seed=0)
