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


# ---- the hard set: one colour, classes told apart by shape and motion only ----

HARD_KINDS = ("disc", "square", "triangle", "plus", "ring")
HARD_COLOUR = 0.9  # Every class, every channel: colour carries no label information.
RADIUS_RANGE = (0.18, 0.30)  # Times the short side: 2.9-4.8 px at 16^2, legible kinds.
SPEED_RANGE = (0.04, 0.08)  # Pixels per frame / short side, as MovingShapesSource draws it.


def hard_layout(num_classes: int) -> tuple[int, int]:
    """(kinds, directions) with kinds * directions == num_classes: the fewest directions >= 2 that
    leave at most len(HARD_KINDS) kinds (10 -> 5 kinds x 2 directions, 4 -> 2 x 2)."""
    for dirs in range(2 if num_classes > 1 else 1, num_classes + 1):
        if num_classes % dirs == 0 and num_classes // dirs <= len(HARD_KINDS):
            return num_classes // dirs, dirs
    raise AssertionError("unreachable: dirs == num_classes always fits")


def hard_class(label: int, num_classes: int) -> tuple[int, float]:
    """(kind index into HARD_KINDS, angle of motion in radians) of a hard-set class.

    Directions start at pi/2 (down: y grows downwards) so the default two are vertical: a horizontal
    flip keeps them, and every kind is mirror-symmetric, so flips never change a clip's class.
    """
    kinds, dirs = hard_layout(num_classes)
    return label % kinds, np.pi / 2 + 2 * np.pi * (label // kinds) / dirs


def _hard_mask(kind: str, dy: np.ndarray, dx: np.ndarray, r: float) -> np.ndarray:
    """Boolean [T, H, W] from wrapped offsets dy [T, H, 1], dx [T, 1, W]; r is the shape's radius.

    Extents are set so the kinds cover comparable areas; broadcasting keeps the separable ones cheap.
    """
    ady, adx = np.abs(dy), np.abs(dx)
    if kind == "disc":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        s = 0.85 * r
        return (ady <= s) & (adx <= s)
    if kind == "triangle":  # Equilateral, pointing up, circumradius 1.2 r.
        big = 1.2 * r
        return (dy <= big / 2) & (adx * np.sqrt(3.0) <= dy + big)
    if kind == "plus":
        w = max(0.3 * r, 0.6)  # Arms >= 1 px thick at the smallest radius.
        return ((ady <= w) & (adx <= r)) | ((adx <= w) & (ady <= r))
    if kind == "ring":
        d2 = dy * dy + dx * dx
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown hard-set shape kind {kind!r}")


class HardShapesSource:
    """Random-access synthetic video source where only shape and motion tell classes apart.

    {'video': uint8 [T, H, W, C], 'label': int32}. Every class draws the same colour (HARD_COLOUR),
    radius, speed, start position and background from the same ranges; the label picks a shape
    kind and a direction of motion (`hard_class`). Shapes wrap around the frame edges.

    Args:
        num_examples: dataset length.
        num_frames, height, width, channels: clip shape.
        num_classes: labels in [0, num_classes); see hard_layout for the kinds x directions split.
        seed: dataset seed; example i is a pure function of (i, seed).
        textured: a static random grating behind the shape (fine detail that blur removes).
    """

    def __init__(self, num_examples: int, num_frames: int, height: int, width: int, channels: int = 3,
                 num_classes: int = 10, seed: int = 0, textured: bool = False):
        if min(num_examples, num_frames, height, width, channels, num_classes) <= 0:
            raise ValueError("HardShapesSource sizes must be positive, got "
                             f"{(num_examples, num_frames, height, width, channels, num_classes)}")
        hard_layout(num_classes)
        self.num_examples, self.num_classes, self.seed, self.textured = num_examples, num_classes, seed, textured
        self.clip_shape = (num_frames, height, width, channels)
        self._colour = _to_uint8(np.asarray(HARD_COLOUR))

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        num_frames, height, width, channels = self.clip_shape
        # One draw for every random choice: a Generator call costs more than the arithmetic here.
        u = np.random.default_rng([self.seed, index]).random(12)
        label = min(int(u[0] * self.num_classes), self.num_classes - 1)
        kind, angle = hard_class(label, self.num_classes)
        short_side = min(height, width)
        radius = short_side * (RADIUS_RANGE[0] + u[1] * (RADIUS_RANGE[1] - RADIUS_RANGE[0]))
        speed = short_side * (SPEED_RANGE[0] + u[2] * (SPEED_RANGE[1] - SPEED_RANGE[0]))
        t = np.arange(num_frames, dtype=np.float32)
        center_y = u[3] * height + speed * np.sin(angle) * t
        center_x = u[4] * width + speed * np.cos(angle) * t
        # Wrapped offsets in [-size/2, size/2), separable: [T, H, 1] and [T, 1, W].
        dy = (np.arange(height, dtype=np.float32)[None, :, None] - center_y[:, None, None] + height / 2) % height
        dx = (np.arange(width, dtype=np.float32)[None, None, :] - center_x[:, None, None] + width / 2) % width
        mask_thw = _hard_mask(HARD_KINDS[kind], dy - height / 2, dx - width / 2, radius)
        # Grey levels [T, H, W], then one stack over channels: indexing a palette or broadcasting
        # into the channel axis was 5x slower (strided byte writes).
        background = _to_uint8(0.25 * u[5] + (_texture(height, width, u[6:12]) if self.textured else 0.0))
        grey = background + mask_thw.view(np.uint8) * (self._colour - background)  # No overflow: colour > bg.
        return {"video": np.stack([grey] * channels, axis=-1), "label": np.int32(label)}

    def __repr__(self) -> str:
        return (f"HardShapesSource(num_examples={self.num_examples}, clip_shape={self.clip_shape}, "
                f"num_classes={self.num_classes}, seed={self.seed}, textured={self.textured})")


def _texture(height: int, width: int, u: np.ndarray) -> np.ndarray:
    """Two static gratings (periods 2.5-6 px, random orientation and phase), 0..0.32: [H, W]."""
    yy = np.arange(height, dtype=np.float32)[:, None]
    xx = np.arange(width, dtype=np.float32)[None, :]
    out = np.zeros((height, width), np.float32)
    for period, orientation, phase in u.reshape(2, 3):
        k = 2 * np.pi / (2.5 + 3.5 * period)
        theta = np.pi * orientation
        out += 0.08 * (1 + np.cos(k * (np.sin(theta) * yy + np.cos(theta) * xx) + 2 * np.pi * phase))
    return out


SYNTHETIC_KINDS = ("colour", "hard")  # data.synthetic_kind: which class-conditional set data.source='synthetic' is.


def make_synthetic_source(kind: str, num_examples: int, num_frames: int, height: int, width: int,
                          channels: int = 3, num_classes: int = 10, seed: int = 0, textured: bool = False):
    """MovingShapesSource ('colour': class = colour + shape + direction) or HardShapesSource ('hard').

    textured (a static grating behind the shapes) exists for the hard set only.
    """
    if kind == "colour":
        if textured:
            raise ValueError("data.synthetic_textured needs data.synthetic_kind='hard'")
        return MovingShapesSource(num_examples, num_frames, height, width, channels, num_classes, seed)
    if kind == "hard":
        return HardShapesSource(num_examples, num_frames, height, width, channels, num_classes, seed, textured)
    raise ValueError(f"data.synthetic_kind must be one of {SYNTHETIC_KINDS}, got {kind!r}")
