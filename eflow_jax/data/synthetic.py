"""Synthetic class-conditional moving shapes: a dataset that needs no files (CPU demo, tests).

The class decides what a model has to learn from the label: the shape kind (circle, square,
diamond), the colour and the direction of motion. The example index and the seed decide everything
else (start position, size, speed, background), so an example is a pure function of (index, seed).
"""

from __future__ import annotations

import functools

import numpy as np

_SHAPES = ("circle", "square", "diamond")


def _class_colour(label: int, channels: int) -> np.ndarray:
    """A bright, fixed colour per class (the same for every seed, so labels mean the same thing)."""
    rng = np.random.default_rng([7919, label])
    colour = rng.uniform(0.35, 1.0, size=channels)
    colour[label % channels] = 1.0  # One saturated channel keeps classes apart after rescaling.
    return colour


def _to_uint8(colour: np.ndarray) -> np.ndarray:
    return np.round(colour * 255).astype(np.uint8)


@functools.lru_cache(maxsize=4096)
def _class_colour_uint8(label: int, channels: int) -> np.ndarray:
    """_class_colour as stored pixels, made once per class (a fresh Generator costs ~20 us)."""
    colour = _to_uint8(_class_colour(label, channels))
    colour.setflags(write=False)  # Shared between examples.
    return colour


def _shape_mask(kind: str, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    if kind == "circle":
        return dy * dy + dx * dx <= radius * radius
    if kind == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= radius
    return np.abs(dy) + np.abs(dx) <= radius * 1.3


class MovingShapesSource:
    """Random-access synthetic video source: {'video': uint8 [T, H, W, C], 'label': int32}.

    Shapes move in a straight line and wrap around the frame edges (toroidally), so any T works.

    Args:
        num_examples: dataset length.
        num_frames, height, width, channels: clip shape (any positive sizes).
        num_classes: labels are in [0, num_classes).
        seed: dataset seed; example i is a pure function of (i, seed).
    """

    def __init__(
        self,
        num_examples: int,
        num_frames: int,
        height: int,
        width: int,
        channels: int = 3,
        num_classes: int = 10,
        seed: int = 0,
    ):
        if min(num_examples, num_frames, height, width, channels, num_classes) <= 0:
            raise ValueError(
                "MovingShapesSource sizes must be positive, got "
                f"{(num_examples, num_frames, height, width, channels, num_classes)}"
            )
        self.num_examples, self.num_classes, self.seed = num_examples, num_classes, seed
        self.clip_shape = (num_frames, height, width, channels)

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        num_frames, height, width, channels = self.clip_shape
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(self.num_classes))
        kind = _SHAPES[label % len(_SHAPES)]
        angle = 2 * np.pi * label / self.num_classes  # Direction of motion: a class signature.
        short_side = min(height, width)
        radius = short_side * rng.uniform(0.12, 0.22)
        speed = short_side * rng.uniform(0.04, 0.08)  # Pixels per frame.
        start = rng.uniform(0, (height, width))
        t = np.arange(num_frames)[:, None, None]
        center_y = start[0] + speed * np.sin(angle) * t
        center_x = start[1] + speed * np.cos(angle) * t
        yy = np.arange(height)[None, :, None]
        xx = np.arange(width)[None, None, :]
        # Wrapped offsets in [-size/2, size/2): the shape re-enters on the opposite edge.
        dy = (yy - center_y + height / 2) % height - height / 2
        dx = (xx - center_x + width / 2) % width - width / 2
        mask_thw = _shape_mask(kind, dy, dx, radius)
        # A two-entry uint8 palette indexed by the mask: building the clip in float64 and rounding
        # it (or np.where broadcasting over channels) made this source the bottleneck at 16x128^2.
        background = _to_uint8(rng.uniform(0.0, 0.25) * np.ones(channels))
        palette = np.stack([background, _class_colour_uint8(label, channels)])
        video = np.take(palette, mask_thw.view(np.uint8), axis=0)
        return {"video": video, "label": np.int32(label)}

    def __repr__(self) -> str:
        return (
            f"MovingShapesSource(num_examples={self.num_examples}, clip_shape={self.clip_shape}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )
