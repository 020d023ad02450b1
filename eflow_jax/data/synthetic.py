"""Synthetic moving shapes: datasets that need no files and know their ground truth (demo, tests, gauges).

  MovingShapesSource     the colour set (data.synthetic_kind='colour'): the class decides the shape
                         kind (circle, square, diamond), the colour and the direction of motion.
  HardShapesSource       the hard set ('hard'): one grey colour for every class; the class is a shape
                         kind x a direction, so only shape and motion tell classes apart.
  CaptionedShapesSource  text-to-video: a caption states size, colour, shape and direction; 20% of
                         the combinations are held back from the 'train' split.

The example index and the seed decide everything else (start position, size, speed, background),
so an example is a pure function of (index, seed).
"""

from __future__ import annotations

import functools

import numpy as np

_SHAPES = ("circle", "square", "diamond")
SPEED_RANGE = (0.04, 0.08)  # Pixels per frame / short side, for every set here (the gauges read it).


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
        speed = short_side * rng.uniform(*SPEED_RANGE)  # Pixels per frame.
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
# Times the short side: 3.5-5.1 px at 16^2. Below ~3.2 px a disc and a square can cover the same
# pixels (a 5x5 block); from 3.5 px every two kinds differ in >= 4 px at any sub-pixel position.
RADIUS_RANGE = (0.22, 0.32)


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

    Extents are set so the kinds have comparable sizes; broadcasting keeps the separable ones cheap.
    """
    ady, adx = np.abs(dy), np.abs(dx)
    if kind == "disc":
        return dy * dy + dx * dx <= r * r
    if kind == "square":
        s = 0.9 * r
        return (ady <= s) & (adx <= s)
    if kind == "triangle":  # Equilateral, pointing up, circumradius 1.2 r.
        big = 1.2 * r
        return (dy <= big / 2) & (adx * np.sqrt(3.0) <= dy + big)
    if kind == "plus":
        w = max(0.25 * r, 0.6)  # Arms 1-2 px thick at 16^2: a fatter plus looks like a disc.
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
        # into the channel axis was 3-40x slower here (strided byte writes).
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


# ---- the captioned set: text-to-video with held-back attribute combinations ----

CAPTION_ATTRIBUTES = (  # (name, values); a caption states one value of each.
    ("size", ("small", "large")),
    ("colour", ("red", "green", "blue", "yellow", "white")),
    ("shape", ("circle", "square", "triangle", "cross")),
    ("direction", ("left", "right", "up", "down")),
)
CAPTION_SPLITS = ("train", "unseen", "all")
_CAPTION_SIZES = ((0.12, 0.16), (0.22, 0.28))  # Radius / short side: 3.8-5.1 px vs 7.0-9.0 px at 32^2.
_CAPTION_COLOURS = ((0.95, 0.15, 0.15), (0.15, 0.85, 0.2), (0.2, 0.35, 1.0), (0.95, 0.9, 0.15), (0.95, 0.95, 0.95))
_CAPTION_KINDS = ("disc", "square", "triangle", "plus")  # _hard_mask's names for circle ... cross.
CAPTION_ANGLES = (np.pi, 0.0, -np.pi / 2, np.pi / 2)  # left, right, up, down (y grows downwards).


def caption_attributes() -> np.ndarray:
    """int32 [num_captions, 4]: (size, colour, shape, direction) of caption id i, mixed radix."""
    sizes = [len(values) for _, values in CAPTION_ATTRIBUTES]
    return np.stack(np.unravel_index(np.arange(np.prod(sizes)), sizes), -1).astype(np.int32)


def all_captions() -> list[str]:
    """Every caption, indexed by caption id: 'a small red circle moving left', ..."""
    names = [values for _, values in CAPTION_ATTRIBUTES]
    return [f"a {names[0][s]} {names[1][c]} {names[2][k]} moving {names[3][d]}"
            for s, c, k, d in caption_attributes()]


def held_back() -> np.ndarray:
    """bool [num_captions]: combinations the 'train' split never contains (20%).

    Held back iff the attribute indices sum to 0 mod 5 (the number of colours): for every (size,
    shape, direction) exactly one colour is held back, so every single value, and every pair of
    values, is still seen in training; only the whole combination is new.
    """
    return caption_attributes().sum(-1) % len(CAPTION_ATTRIBUTES[1][1]) == 0


def caption_ids(split: str) -> np.ndarray:
    """int32 caption ids of a split: 'train' (seen), 'unseen' (held back) or 'all'."""
    if split not in CAPTION_SPLITS:
        raise ValueError(f"split must be one of {CAPTION_SPLITS}, got {split!r}")
    keep = {"train": ~held_back(), "unseen": held_back(), "all": np.ones_like(held_back())}[split]
    return np.flatnonzero(keep).astype(np.int32)


class CaptionedShapesSource:
    """Random-access captioned moving shapes: one shape per clip, its caption states every attribute.

    Example i: {'video': uint8 [T, H, W, 3], 'caption': str, 'attributes': int32 [4] (size, colour,
    shape, direction; CAPTION_ATTRIBUTES), 'caption_id': int32 (index into all_captions())}. The
    caption is drawn uniformly from the split's ids; position, exact radius, speed and background
    from (index, seed). Clips are not meant to be flipped (a flip turns 'left' into 'right'), and
    small shapes need >= 32x32 frames to show their kind.

    Args:
        num_examples: dataset length.
        num_frames, height, width: clip shape.
        split: 'train' (held-back combinations never appear), 'unseen' (only those), 'all'.
        seed: example i is a pure function of (i, seed, split).
    """

    def __init__(self, num_examples: int, num_frames: int, height: int, width: int, split: str = "train",
                 seed: int = 0):
        if min(num_examples, num_frames, height, width) <= 0:
            raise ValueError("CaptionedShapesSource sizes must be positive, got "
                             f"{(num_examples, num_frames, height, width)}")
        self.num_examples, self.split, self.seed = num_examples, split, seed
        self.clip_shape = (num_frames, height, width, 3)
        self.ids = caption_ids(split)
        self._captions, self._attributes = all_captions(), caption_attributes()

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        u = np.random.default_rng([self.seed, index]).random(6)
        caption_id = int(self.ids[min(int(u[0] * len(self.ids)), len(self.ids) - 1)])
        return {"video": self._render(caption_id, u), "caption": self._captions[caption_id],
                "attributes": self._attributes[caption_id].copy(), "caption_id": np.int32(caption_id)}

    def render(self, caption_id: int, index: int) -> np.ndarray:
        """The clip of `caption_id` with example `index`'s position, radius, speed and background
        (whatever caption that example draws): real clips for any attributes, e.g. a gauge's."""
        return self._render(int(caption_id), np.random.default_rng([self.seed, int(index)]).random(6))

    def _render(self, caption_id: int, u: np.ndarray) -> np.ndarray:
        size, colour, kind, direction = self._attributes[caption_id]
        num_frames, height, width, _ = self.clip_shape
        short_side = min(height, width)
        lo, hi = _CAPTION_SIZES[size]
        radius = short_side * (lo + u[1] * (hi - lo))
        speed = short_side * (SPEED_RANGE[0] + u[2] * (SPEED_RANGE[1] - SPEED_RANGE[0]))
        angle = CAPTION_ANGLES[direction]
        t = np.arange(num_frames, dtype=np.float32)
        center_y = u[3] * height + speed * np.sin(angle) * t
        center_x = u[4] * width + speed * np.cos(angle) * t
        dy = (np.arange(height, dtype=np.float32)[None, :, None] - center_y[:, None, None] + height / 2) % height
        dx = (np.arange(width, dtype=np.float32)[None, None, :] - center_x[:, None, None] + width / 2) % width
        mask_thw = _hard_mask(_CAPTION_KINDS[kind], dy - height / 2, dx - width / 2, radius)
        background = _to_uint8(np.asarray(0.12 * u[5]))  # <= 31 < 38, every colour's darkest channel:
        rgb = _to_uint8(np.asarray(_CAPTION_COLOURS[colour]))  # so `c - background` never wraps.
        mask = mask_thw.view(np.uint8)
        return np.stack([background + mask * (c - background) for c in rgb], axis=-1)

    def __repr__(self) -> str:
        return (f"CaptionedShapesSource(num_examples={self.num_examples}, clip_shape={self.clip_shape}, "
                f"split={self.split!r}, seed={self.seed})")
