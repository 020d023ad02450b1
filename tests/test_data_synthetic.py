"""MovingShapesSource: deterministic, any shape, and the label is visible in the video."""

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
