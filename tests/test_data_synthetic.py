"""MovingShapesSource: deterministic, any shape, and the label is visible in the video."""

import time

import numpy as np
import pytest

from eflow_jax.data.synthetic import MovingShapesSource


def test_shapes_dtypes_and_determinism():
    source = MovingShapesSource(
        20, num_frames=5, height=7, width=13, channels=1, num_classes=4, seed=3
    )
    assert len(source) == 20
    example = source[11]
    assert example["video"].shape == (5, 7, 13, 1) and example["video"].dtype == np.uint8
    assert example["label"].dtype == np.int32 and 0 <= example["label"] < 4
    again = MovingShapesSource(20, 5, 7, 13, 1, num_classes=4, seed=3)[11]
    np.testing.assert_array_equal(example["video"], again["video"])
    other_seed = MovingShapesSource(20, 5, 7, 13, 1, num_classes=4, seed=4)[11]
    assert not np.array_equal(example["video"], other_seed["video"])
    assert not np.array_equal(source[0]["video"], source[1]["video"])


def test_every_class_appears_and_index_errors():
    source = MovingShapesSource(200, 2, 8, 8, num_classes=10)
    assert {int(source[i]["label"]) for i in range(len(source))} == set(range(10))
    with pytest.raises(IndexError):
        source[200]
    with pytest.raises(ValueError, match="positive"):
        MovingShapesSource(10, 0, 8, 8)


def _centroid_track(video_thwc):
    """Per-frame steps of the bright shape's mean (y, x), unwrapped over the torus (short hops)."""
    mask = video_thwc.max(-1) > 80
    height, width = mask.shape[1:]
    points = []
    for frame in mask:
        ys, xs = np.nonzero(frame)
        # Circular means: the shape may straddle the edge it wraps across.
        angle_y, angle_x = 2 * np.pi * ys / height, 2 * np.pi * xs / width
        points.append(
            [
                np.angle(np.exp(1j * angle_y).mean()) * height / (2 * np.pi),
                np.angle(np.exp(1j * angle_x).mean()) * width / (2 * np.pi),
            ]
        )
    steps = np.diff(np.array(points), axis=0)
    steps = (steps + [height / 2, width / 2]) % [height, width] - [height / 2, width / 2]
    return steps


def test_label_decides_colour_and_direction():
    num_classes = 8
    source = MovingShapesSource(
        400, num_frames=6, height=48, width=48, num_classes=num_classes, seed=1
    )
    by_label = {}
    for i in range(len(source)):
        by_label.setdefault(int(source[i]["label"]), []).append(source[i]["video"])
    for label, videos in by_label.items():
        colours = {tuple(v.reshape(-1, 3)[v.reshape(-1, 3).max(-1) > 80][0]) for v in videos}
        assert len(colours) == 1, f"class {label} has several colours"
        expected = 2 * np.pi * label / num_classes
        for video in videos[:3]:
            step_y, step_x = _centroid_track(video).mean(0)
            error = np.angle(np.exp(1j * (np.arctan2(step_y, step_x) - expected)))
            assert abs(error) < 0.35, (
                f"class {label}: moves at {np.arctan2(step_y, step_x):.2f} rad"
            )
    all_colours = {
        tuple(v.reshape(-1, 3)[v.reshape(-1, 3).max(-1) > 80][0])
        for vs in by_label.values()
        for v in vs[:1]
    }
    assert len(all_colours) == len(by_label)  # Classes are told apart by colour alone, too.


# ---- the hard set: one colour, a class is a shape kind x a direction of motion ----

from eflow_jax.data import synthetic  # noqa: E402
from eflow_jax.data.synthetic import HardShapesSource  # noqa: E402


def test_hard_layout_splits_classes_into_kinds_and_directions():
    assert synthetic.hard_layout(10) == (5, 2) and synthetic.hard_layout(4) == (2, 2)
    assert synthetic.hard_layout(20) == (5, 4) and synthetic.hard_layout(1) == (1, 1)
    # Every class is a distinct (kind, direction) pair.
    assert len({synthetic.hard_class(y, 10) for y in range(10)}) == 10


@pytest.mark.parametrize("textured", [False, True])
def test_hard_set_is_deterministic_and_pure_per_index(textured):
    source = HardShapesSource(500, 6, 32, 32, num_classes=10, seed=3, textured=textured)
    forward = [source[i] for i in range(0, 500, 7)]
    backward = [HardShapesSource(5000, 6, 32, 32, num_classes=10, seed=3, textured=textured)[i]
                for i in reversed(range(0, 500, 7))][::-1]  # Other length, other order, fresh object.
    for a, b in zip(forward, backward, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["label"] == b["label"] and a["label"].dtype == np.int32
    assert forward[0]["video"].shape == (6, 32, 32, 3) and forward[0]["video"].dtype == np.uint8
    other_seed = HardShapesSource(500, 6, 32, 32, num_classes=10, seed=4, textured=textured)[0]
    assert not np.array_equal(forward[0]["video"], other_seed["video"])
    assert not np.array_equal(source[0]["video"], source[1]["video"])
    with pytest.raises(IndexError):
        source[500]


@pytest.mark.parametrize("textured", [False, True])
def test_hard_set_colour_says_nothing_about_the_class(textured):
    """Every class draws its shape in the one colour HARD_COLOUR, grey (all channels equal)."""
    source = HardShapesSource(400, 4, 32, 32, num_classes=10, seed=1, textured=textured)
    colour = round(synthetic.HARD_COLOUR * 255)
    shape_colours = {}
    for i in range(len(source)):
        example = source[i]
        video = example["video"].astype(int)
        assert (video == video[..., :1]).all(), "channels differ: the hard set is grey"
        brightest = video[..., 0].max()
        assert brightest == colour  # The shape, whatever the class (backgrounds stay below).
        shape_colours.setdefault(int(example["label"]), set()).add(brightest)
    assert set(shape_colours) == set(range(10))
    assert all(c == {colour} for c in shape_colours.values())


def _mask_centroid_steps(video_thwc, threshold):
    mask = video_thwc[..., 0] > threshold
    height, width = mask.shape[1:]
    points = []
    for frame in mask:
        ys, xs = np.nonzero(frame)
        points.append([np.angle(np.exp(2j * np.pi * ys / height).mean()) * height / (2 * np.pi),
                       np.angle(np.exp(2j * np.pi * xs / width).mean()) * width / (2 * np.pi)])
    steps = np.diff(np.array(points), axis=0)
    return (steps + [height / 2, width / 2]) % [height, width] - [height / 2, width / 2]


def test_hard_set_label_decides_kind_and_direction():
    num_classes = 10
    source = HardShapesSource(300, 6, 48, 48, num_classes=num_classes, seed=2)
    areas = {}
    for i in range(len(source)):
        example = source[i]
        label = int(example["label"])
        kind, angle = synthetic.hard_class(label, num_classes)
        step_y, step_x = _mask_centroid_steps(example["video"], 200).mean(0)
        error = np.angle(np.exp(1j * (np.arctan2(step_y, step_x) - angle)))
        assert abs(error) < 0.35, f"class {label} moves at {np.arctan2(step_y, step_x):.2f} rad, not {angle:.2f}"
        areas.setdefault(kind, []).append((example["video"][0, ..., 0] > 200).mean())
    assert set(areas) == set(range(5))
    # A class's size is drawn like every other class's: no kind is told apart by area alone.
    mean_area = {k: np.mean(v) for k, v in areas.items()}
    assert max(mean_area.values()) < 3.5 * min(mean_area.values()), mean_area


@pytest.mark.parametrize("offset", [(0.0, 0.0), (0.25, 0.5), (0.5, 0.5), (0.5, 0.0)])
def test_hard_kinds_differ_at_16x16(offset):
    """Every two kinds differ in >= 4 pixels, at the smallest and largest radius, at sub-pixel positions."""
    dy = (np.arange(16, dtype=np.float32) - 8 - offset[0])[None, :, None]
    dx = (np.arange(16, dtype=np.float32) - 8 - offset[1])[None, None, :]
    for r in 16 * np.asarray(synthetic.RADIUS_RANGE):
        masks = {kind: synthetic._hard_mask(kind, dy, dx, r) for kind in synthetic.HARD_KINDS}
        for a in synthetic.HARD_KINDS:
            assert masks[a].sum() >= 12, f"{a} covers {masks[a].sum()} px at radius {r:.1f}"
            for b in synthetic.HARD_KINDS:
                if a < b:
                    assert (masks[a] != masks[b]).sum() >= 4, f"{a} and {b} differ in < 4 px at radius {r:.1f}"


@pytest.mark.parametrize("name, make", [
    ("hard", lambda: HardShapesSource(10**6, 16, 32, 32, num_classes=10)),
    ("hard_textured", lambda: HardShapesSource(10**6, 16, 32, 32, num_classes=10, textured=True)),
    ("captioned", lambda: synthetic.CaptionedShapesSource(10**6, 16, 32, 32)),
])
def test_throughput_at_16x32x32(name, make):
    # ~10k (hard), ~5k (textured, captioned) clips/s on a shared 2-core CPU; the floor leaves room for load.
    source = make()
    source[0]
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        for i in range(1, 501):
            source[i]
        best = max(best, 500 / (time.perf_counter() - start))
    assert best >= 2000, f"{name}: {best:.0f} clips/s"


def test_make_synthetic_source_and_pipeline_pick_the_set():
    from configs import shapes as shapes_config
    from eflow_jax.data import pipeline

    assert isinstance(synthetic.make_synthetic_source("hard", 4, 2, 8, 8), HardShapesSource)
    assert isinstance(synthetic.make_synthetic_source("colour", 4, 2, 8, 8), MovingShapesSource)
    with pytest.raises(ValueError, match="synthetic_kind='hard'"):
        synthetic.make_synthetic_source("colour", 4, 2, 8, 8, textured=True)
    with pytest.raises(ValueError, match="synthetic_kind must be one of"):
        synthetic.make_synthetic_source("colours", 4, 2, 8, 8)
    config = shapes_config.get_config("hard=1")
    assert config.data.synthetic_kind == "hard" and config.eval.metric == "shapes_hard"
    assert shapes_config.get_config().data.synthetic_kind == "colour"
    config.data.num_examples = 8
    pipeline.validate_data_config(config.data, model_frames=16, model_size=32, model_channels=3)
    source = pipeline.make_source(config.data)
    assert isinstance(source, HardShapesSource) and source.clip_shape == (16, 32, 32, 3)
    held = pipeline.heldout_batch(config.data, 4)
    clips, labels = held["video"], held["label"]
    assert clips.shape == (4, 16, 32, 32, 3) and np.allclose(clips[..., 0], clips[..., 2])  # Grey: hard set.
    batch = next(pipeline.make_train_iterator(config.data, global_batch_size=4, seed=0))
    assert batch["video"].shape == (4, 16, 32, 32, 3)


# ---- the captioned set ----

from eflow_jax.data.synthetic import CaptionedShapesSource  # noqa: E402


def test_caption_list_and_held_back_combinations():
    captions, attributes, back = synthetic.all_captions(), synthetic.caption_attributes(), synthetic.held_back()
    assert len(captions) == len(set(captions)) == len(attributes) == 160
    assert captions[0] == "a small red circle moving left" and back.mean() == 0.2
    for i in (0, 37, 159):
        words = captions[i].split()
        for (name, values), value in zip(synthetic.CAPTION_ATTRIBUTES, attributes[i], strict=True):
            assert values[value] in words, (name, captions[i])
    train = attributes[~back]
    for column, (name, values) in enumerate(synthetic.CAPTION_ATTRIBUTES):
        assert set(train[:, column]) == set(range(len(values))), f"a {name} value never appears in training"
        for other in range(column + 1, 4):  # Every pair of values is seen too: only triples+ are new.
            pairs = {(a, b) for a, b in train[:, [column, other]]}
            assert len(pairs) == len(values) * len(synthetic.CAPTION_ATTRIBUTES[other][1])
    ids = {s: set(synthetic.caption_ids(s)) for s in ("train", "unseen", "all")}
    assert ids["train"].isdisjoint(ids["unseen"]) and ids["train"] | ids["unseen"] == ids["all"]


def test_captioned_train_split_never_shows_a_held_back_combination():
    back = synthetic.held_back()
    train = CaptionedShapesSource(20_000, 1, 8, 8, split="train", seed=5)
    seen = {int(train[i]["caption_id"]) for i in range(len(train))}
    assert not any(back[list(seen)]) and seen == set(synthetic.caption_ids("train"))
    unseen = CaptionedShapesSource(2_000, 1, 8, 8, split="unseen", seed=5)
    assert all(back[int(unseen[i]["caption_id"])] for i in range(len(unseen)))


def test_captioned_examples_are_deterministic_and_consistent():
    source = CaptionedShapesSource(300, 5, 32, 32, seed=2)
    again = CaptionedShapesSource(9_999, 5, 32, 32, seed=2)
    captions, attributes = synthetic.all_captions(), synthetic.caption_attributes()
    for i in (0, 1, 150, 299):
        a, b = source[i], again[i]
        np.testing.assert_array_equal(a["video"], b["video"])
        assert a["caption"] == b["caption"] == captions[a["caption_id"]]
        np.testing.assert_array_equal(a["attributes"], attributes[a["caption_id"]])
        assert a["attributes"].dtype == np.int32 and a["caption_id"].dtype == np.int32
        assert a["video"].shape == (5, 32, 32, 3) and a["video"].dtype == np.uint8
        np.testing.assert_array_equal(source.render(a["caption_id"], i), a["video"])
    assert not np.array_equal(source[0]["video"], CaptionedShapesSource(300, 5, 32, 32, seed=3)[0]["video"])
    with pytest.raises(ValueError, match="split"):
        CaptionedShapesSource(4, 2, 8, 8, split="test")


def test_captioned_video_shows_colour_and_direction():
    source = CaptionedShapesSource(200, 6, 48, 48, seed=1)
    for i in range(0, 200, 5):
        example = source[i]
        _, colour, _, direction = example["attributes"]
        video = example["video"]
        shape = video.max(-1) > 40  # Backgrounds are <= 31.
        rgb = video[shape].astype(int)
        expected = np.round(np.asarray(synthetic._CAPTION_COLOURS[colour]) * 255)
        assert (np.abs(rgb - expected) <= 1).all(), example["caption"]
        step_y, step_x = _mask_centroid_steps(shape[..., None].astype(np.uint8) * 255, 128).mean(0)
        angle = synthetic.CAPTION_ANGLES[direction]
        error = np.angle(np.exp(1j * (np.arctan2(step_y, step_x) - angle)))
        assert abs(error) < 0.35, example["caption"]
