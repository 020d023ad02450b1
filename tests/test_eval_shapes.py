"""The moving-shapes gauge: classifier accuracy, references, planted failures, cache, eval mode.

One gauge is built (seconds) for the demo's test geometry (4x16x16, 4 classes, random flips) in a
temporary cache; the end-to-end test's subprocess loads it from there.
"""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from eflow_jax import checkpoint, evaluate, sample, sharding
from eflow_jax.eval import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM = 128  # Held-out clips per check: 32 per class.
HELD_OUT_SEED = 77  # Neither the training data's seed (0) nor one the gauge uses.


def run_config():
    return demo.get_config("steps=2,test=1")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("gauge_cache"))
    before = shapes.builds
    start = time.perf_counter()
    gauge = shapes.ShapesGauge.for_data(run_config().data, cache_dir=cache)
    seconds = time.perf_counter() - start
    assert shapes.builds == before + 1 and os.path.exists(gauge.cache_path)
    return gauge, cache, seconds


@pytest.fixture(scope="module")
def held_out(built):
    gauge, _, _ = built
    return shapes.real_clips(gauge.geometry, HELD_OUT_SEED, NUM)


def test_classifier_is_accurate_on_real_clips_and_at_chance_on_noise(built, held_out):
    gauge, _, _ = built
    videos, labels = held_out
    assert (gauge.logits(videos).argmax(-1) == labels).mean() >= 0.98
    scores = gauge.score(videos, labels)
    assert scores["class_accuracy"] >= 0.98 and scores["class_accuracy_real"] >= 0.98
    chance = 1 / gauge.geometry.num_classes
    assert scores["class_accuracy_noise"] <= chance + 0.15
    noise = shapes.noise_clips(gauge.geometry, 5, NUM)
    assert gauge.score(noise, labels)["class_accuracy"] <= chance + 0.15


def test_frechet_real_vs_real_is_far_below_noise(built, held_out):
    gauge, _, _ = built
    videos, labels = held_out
    scores = gauge.score(videos, labels)
    assert scores["frechet"] >= 0 and scores["frechet_real"] >= 0
    assert scores["frechet"] < 0.1 * scores["frechet_noise"]
    assert scores["frechet_real"] < 0.1 * scores["frechet_noise"]
    # A planted failure the classifier can see: every clip drawn as the next class.
    assert gauge.score(videos, (labels + 1) % 4)["frechet"] > 10 * scores["frechet"]


def test_permuted_labels_drop_accuracy_and_motion(built, held_out):
    gauge, _, _ = built
    videos, labels = held_out
    right = gauge.score(videos, labels)
    wrong = gauge.score(videos, (labels + 1) % gauge.geometry.num_classes)
    assert wrong["class_accuracy"] <= 0.1 < right["class_accuracy"]
    assert wrong["motion_consistency"] <= 0.3 < right["motion_consistency"]
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\)"):
        gauge.score(videos, labels + 4)


def test_frame_shifts_recover_a_circular_shift():
    rng = np.random.default_rng(0)
    frame = rng.normal(size=(16, 16, 3))
    clip = np.stack([frame, np.roll(frame, (2, -3), axis=(0, 1))])[None]
    np.testing.assert_allclose(shapes.frame_shifts(clip)[0, 0], [2, -3], atol=1e-6)


@pytest.mark.parametrize("size", [16, 32])
def test_motion_consistency_real_noise_backwards_static(size):
    geometry = shapes.Geometry(6, size, 3, 4, frame_stride=1, random_flip=False)
    videos, labels = shapes.real_clips(geometry, HELD_OUT_SEED, NUM)
    assert shapes.motion_consistency(geometry, videos, labels) >= 0.95
    assert shapes.motion_consistency(geometry, shapes.noise_clips(geometry, 1, NUM), labels) <= 0.05
    assert shapes.motion_consistency(geometry, videos[:, ::-1], labels) <= 0.05  # Played backwards.
    static = np.repeat(videos[:, :1], geometry.num_frames, axis=1)
    assert shapes.motion_consistency(geometry, static, labels) <= 0.05


def test_motion_consistency_accepts_mirrored_motion_only_with_random_flips():
    plain = shapes.Geometry(4, 32, 3, 8, frame_stride=2, random_flip=False)
    videos, labels = shapes.real_clips(plain, HELD_OUT_SEED, NUM)
    mirrored = videos[:, :, :, ::-1]
    diagonal = labels % 2 == 1  # Angles 45, 135, ... degrees: the mirror is 90 degrees away.
    assert shapes.motion_consistency(plain, mirrored[diagonal], labels[diagonal]) <= 0.05
    flipped = shapes.Geometry(4, 32, 3, 8, frame_stride=2, random_flip=True)
    assert shapes.motion_consistency(flipped, mirrored, labels) >= 0.95


def test_cache_round_trips_without_training(built, held_out):
    gauge, cache, build_seconds = built
    videos, labels = held_out
    refs = gauge.references(NUM)
    before = shapes.builds
    start = time.perf_counter()
    again = shapes.ShapesGauge.for_data(run_config().data, cache_dir=cache)
    load_seconds = time.perf_counter() - start
    assert shapes.builds == before, "a cached gauge was retrained"
    assert load_seconds < min(1.0, build_seconds / 5)
    for a, b in zip(jax.tree.leaves(gauge.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert again.meta["references"][str(NUM)] == refs  # References cached with the classifier.
    np.testing.assert_array_equal(again.logits(videos), gauge.logits(videos))
    other = run_config().data
    other.num_classes = 3
    assert shapes.Geometry.from_data(other).key(1) != gauge.geometry.key(1)  # Geometry is in the key.


def test_refuses_other_data_and_seed_zero(tmp_path):
    config = run_config()
    config.data.source = "arrayrecord"
    with pytest.raises(ValueError, match="FVD"):
        evaluate.run_shapes(config, str(tmp_path), str(tmp_path), mesh=None)
    with pytest.raises(ValueError, match="eval.shapes.seed"):
        shapes.ShapesGauge.for_data(run_config().data, cache_dir=str(tmp_path), seed=0)
    assert not os.listdir(tmp_path)


def _random_params(config, mesh):
    rng = np.random.default_rng(0)

    def leaf(path, abstract):
        scale = 1 / np.sqrt(np.prod(abstract.shape[:-1])) if abstract.ndim >= 2 else 0.05
        value = rng.normal(size=abstract.shape) * scale + ("scale" in jax.tree_util.keystr(path))
        return jax.device_put(value.astype(abstract.dtype), jax.devices()[0])

    return jax.tree_util.tree_map_with_path(leaf, sample.abstract_params(config, mesh))


def test_eval_mode_end_to_end(built, tmp_path):
    # A run in the layout training writes (random weights: test_train covers training itself),
    # evaluated through the command line with the gauge the fixture cached.
    _, cache, _ = built
    config = run_config()
    config.eval.metric = "fvd"  # The flag below must switch it.
    workdir = tmp_path / "run"
    params = _random_params(config, sharding.make_mesh(config.mesh))
    ckpt = checkpoint.Checkpointer(str(workdir / "ckpt"), save_every=1, async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": params, "ema_params": params}, force=True)
    ckpt.close()
    (workdir / "config.json").write_text(config.to_json())
    cmd = [sys.executable, "-m", "eflow_jax.main", "--mode=eval", f"--workdir={workdir}",
           "--eval.metric=shapes", f"--eval.shapes.cache_dir={cache}", "--eval.shapes.num_clips=16"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((workdir / "eval" / "eval_shapes.json").read_text())
    assert result["checkpoint_step"] == 3 and result["num_clips"] == 16 and result["params"] == "ema"
    assert list(result["scores"]) == ["1"]
    scores = result["scores"]["1"]
    for name in ("class_accuracy", "motion_consistency", "frechet"):
        assert np.isfinite(scores[name]) and f"{name}_real" in scores and f"{name}_noise" in scores
        assert name in done.stdout
    assert "1-step" in done.stdout and "noise" in done.stdout
    flat = shapes.scalars({1: scores})  # What the train loop logs.
    assert flat["shapes/frechet/1_step"] == scores["frechet"]
    assert flat["shapes/frechet/noise"] == scores["frechet_noise"]
    assert "training the classifier" not in done.stderr  # Loaded the cached gauge.

    config.data.source = "tfds"
    (workdir / "config.json").write_text(config.to_json())
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and "--eval.metric=fvd" in done.stderr
