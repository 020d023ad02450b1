"""The hard shapes gauge ('shapes_hard'): classes differ by shape and motion only, and its Frechet
distance sees blur: real clips < blurred real clips < noise.

Gauges are built (15-30 s each on a 2-core CPU) in a temporary cache for three geometries: the
quality benchmark's (configs/shapes.py:hard=1, 16x32x32, 10 classes), the demo's test shape with the
hard set (4x16x16, 4 classes) and 4x16x16 with 10 classes (5 kinds at 16^2, the hardest to read).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import demo
from configs import shapes as shapes_config
from eflow_jax import monitor
from eflow_jax.eval import shapes, sharpness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 200  # Held-out clips per check: 20 per class.
HELD_OUT_SEED = 77  # Neither the training data's seed (0) nor one the gauge uses.


def demo_hard_config():
    config = demo.get_config("steps=2,test=1")
    config.data.synthetic_kind, config.eval.metric = "hard", "shapes_hard"
    return config


GEOMETRIES = {
    "bench_16x32x32_k10": shapes.Geometry.from_data(shapes_config.get_config("hard=1").data),
    "demo_4x16x16_k4": shapes.Geometry.from_data(demo_hard_config().data),
    "4x16x16_k10": shapes.Geometry(4, 16, 3, 10, kind="hard"),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hard_gauge_cache"))


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def gauge_and_clips(request, cache):
    geometry = GEOMETRIES[request.param]
    gauge = shapes.ShapesGauge.for_geometry(geometry, cache)
    videos, labels = shapes.real_clips(geometry, HELD_OUT_SEED, NUM)
    return gauge, videos, labels


def test_geometries_are_the_configs():
    assert GEOMETRIES["bench_16x32x32_k10"] == shapes.Geometry(16, 32, 3, 10, kind="hard")
    assert GEOMETRIES["demo_4x16x16_k4"] == shapes.Geometry(4, 16, 3, 4, kind="hard")


def test_classifier_is_accurate_on_held_out_real_clips(gauge_and_clips):
    gauge, videos, labels = gauge_and_clips
    assert gauge.meta["heldout_accuracy"] >= 0.95
    assert (gauge.logits(videos).argmax(-1) == labels).mean() >= 0.95


def test_frechet_ranks_real_then_blurred_then_noise(gauge_and_clips):
    gauge, videos, labels = gauge_and_clips
    real = gauge.score(videos, labels)
    mild = gauge.score(sharpness.gaussian_blur(videos, 0.5), labels)
    blurred = gauge.score(sharpness.gaussian_blur(videos, 1.0), labels)
    noise = gauge.score(shapes.noise_clips(gauge.geometry, 5, NUM), labels)
    frechet = [s["frechet"] for s in (real, mild, blurred, noise)]
    assert frechet == sorted(frechet), frechet
    assert mild["frechet"] > 5 * real["frechet"], frechet  # Even half a pixel of blur shows.
    assert noise["frechet"] > 1.3 * blurred["frechet"], frechet
    # The classifier alone barely sees blur at 32^2; hf_power_ratio is the classifier-free signal.
    assert 0.85 <= real["hf_power_ratio"] <= 1.2 and blurred["hf_power_ratio"] < 0.05 < 2 < noise["hf_power_ratio"]
    assert real["class_accuracy"] >= blurred["class_accuracy"]
    assert real["class_accuracy"] > noise["class_accuracy"] + 0.5
    if gauge.geometry.resolution == 16:  # At 16^2, blur merges the kinds (a blurred square is a disc).
        assert blurred["class_accuracy"] < real["class_accuracy"]
    chance = 1 / gauge.geometry.num_classes
    assert noise["class_accuracy"] <= chance + 0.15
    assert real["motion_consistency"] >= 0.9 and noise["motion_consistency"] <= 0.05


def test_references_put_blurred_between_real_and_noise(gauge_and_clips):
    gauge, videos, labels = gauge_and_clips
    refs = gauge.score(videos, labels)
    assert refs["frechet_real"] < refs["frechet_blurred"] < refs["frechet_noise"]
    assert refs["hf_power_ratio_blurred"] < refs["hf_power_ratio_real"] < refs["hf_power_ratio_noise"]
    table = shapes.format_table({1: refs})
    assert "blurred" in table and "hf_power_ratio" in table
    flat = shapes.scalars({1: refs})
    assert flat["shapes/frechet/blurred"] == refs["frechet_blurred"] and "shapes/hf_power_ratio/1_step" in flat
    line = monitor.summary_line({1: refs})
    assert "frechet" in line and "blurred clips: class accuracy" in line


def test_gauges_are_cached_apart_and_checked_against_the_data(cache):
    colour = shapes.Geometry(4, 16, 3, 4)
    hard = shapes.Geometry(4, 16, 3, 4, kind="hard")
    textured = shapes.Geometry(4, 16, 3, 4, kind="hard", textured=True)
    assert len({g.key(1) for g in (colour, hard, textured)}) == 3
    assert colour.key(1).startswith(f"shapes_{shapes.VERSION}_4x16x16x3")  # The colour gauge's key is unchanged.
    with pytest.raises(ValueError, match="random_flip=False"):
        shapes.Geometry(4, 16, 3, 20, random_flip=True, kind="hard")  # 4 directions: flips mix classes.
    shapes.Geometry(4, 16, 3, 10, random_flip=True, kind="hard")  # Vertical motions: a flip keeps the class.
    config = demo_hard_config()
    config.eval.metric = "shapes"
    with pytest.raises(ValueError, match="--eval.metric=shapes_hard"):
        shapes.ShapesGauge.for_config(config)
    config = demo.get_config("steps=2,test=1")
    config.eval.metric = "shapes_hard"
    with pytest.raises(ValueError, match="--eval.metric=shapes "):
        shapes.ShapesGauge.for_config(config)
    assert monitor.QualityMonitor.gauges.fget(type("M", (), {"_config": demo_hard_config()})())


def test_cached_gauge_loads_without_training(gauge_and_clips, cache):
    gauge, videos, _ = gauge_and_clips
    before = shapes.builds
    again = shapes.ShapesGauge.for_geometry(gauge.geometry, cache)
    assert shapes.builds == before and again.meta["sharpness"] == gauge.meta["sharpness"]
    np.testing.assert_array_equal(again.frechet_features(videos[:8])[0], gauge.frechet_features(videos[:8])[0])


def test_eval_mode_end_to_end(cache, tmp_path):
    """--mode=eval --eval.metric=shapes_hard on a run of the demo's test shape trained on the hard set
    (random weights: the scores' plumbing, not their values)."""
    from test_eval_shapes import _random_params

    from eflow_jax import checkpoint, sharding

    shapes.ShapesGauge.for_geometry(GEOMETRIES["demo_4x16x16_k4"], cache)
    config = demo_hard_config()
    workdir = tmp_path / "run"
    params = _random_params(config, sharding.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpointer(str(workdir / "ckpt"), save_every=1, async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": params, "ema_params": params}, force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json())
    cmd = [sys.executable, "-m", "eflow_jax.main", "--mode=eval", f"--workdir={workdir}",
           f"--eval.shapes.cache_dir={cache}", "--eval.shapes.num_clips=16"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((workdir / "eval" / "eval_shapes.json").read_text())
    assert result["metric"] == "shapes_hard" and result["gauge_version"] == shapes.HARD_VERSION
    scores = result["scores"]["1"]
    for name in ("class_accuracy", "frechet", "hf_power_ratio"):
        assert np.isfinite(scores[name]) and f"{name}_blurred" in scores and name in done.stdout
    assert "training the classifier" not in done.stderr  # Loaded the cached gauge.
