"""A quality gauge for runs on the synthetic moving shapes: it knows the ground truth.

Two data sets, two gauges (eval.metric, data.synthetic_kind; eflow_jax/data/synthetic.py):
  'shapes'       the colour set: each class fixes a shape kind, a colour and a direction of motion.
                 Colour alone tells classes apart, so a blurry blob of the right colour scores 1.00.
  'shapes_hard'  the hard set: one colour for all; a class is a shape kind x a direction. Its Frechet
                 features add sharpness statistics (eval/sharpness.py) to the classifier's, and it
                 reports hf_power_ratio and a blurred-real reference, so blur costs score.

Generated clips are scored against what their label asks for:

  class_accuracy      a small video classifier, trained here on held-out synthetic clips (seeds that
                      the training data never uses), agrees with the intended label.
  motion_consistency  classifier-free: the fraction of consecutive-frame pairs whose content shift
                      (phase correlation, sub-pixel) points within 45 degrees of the class's direction
                      (or its mirror image, when the data are randomly flipped) at a speed the data
                      can have (0.5x the slowest to 1.5x the fastest). Real clips score ~1; noise, a
                      static clip or a clip played backwards score ~0 (with random flips, a
                      horizontal motion played backwards is its mirror image, so it still passes).
  frechet             Frechet distance (float64, eval/fvd.py) between features of the clips and of
                      real clips with the same labels: the classifier's features (colour set), plus
                      the standardised log band powers of eval/sharpness.py (hard set).
  hf_power_ratio      (hard set) the clips' power above 0.25 cycles/px over that of real clips with
                      the same labels: ~1 as sharp as real, < 1 blurrier, > 1 noisier.

Every score comes with references at the same clip count: `*_real` (two disjoint real sets),
`*_noise` (clipped Gaussian noise) and, for the hard set, `*_blurred` (real clips blurred by a
Gaussian of BLUR_SIGMA px). The classifier and the references are cached on disk, keyed by the
data geometry and VERSION (HARD_VERSION), so later calls load in milliseconds:

    gauge = ShapesGauge.for_config(config)   # or .for_data(config.data): the data's gauge, unchecked
    gauge.score(videos_bthwc, labels)        # videos in [-1, 1], as the model produces them
    score_params(config, net, params)        # {num_steps: scores}, samples from sample.generate
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from eflow_jax.data import pipeline, synthetic
from eflow_jax.eval import fvd, sharpness

VERSION = "v1"  # Bump when the classifier, its training or the references change: old caches go stale.
HARD_VERSION = "v1"  # The same, for the hard set's gauge ('shapes_hard'); the two are cached apart.
METRICS = {"shapes": "colour", "shapes_hard": "hard"}  # eval.metric -> the data.synthetic_kind it scores.
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "eflow_jax", "shapes_gauge")
TRAIN_CLIPS, TRAIN_STEPS, TRAIN_BATCH = 1024, 150, 32
# Shape kinds at 16^2 take more examples than colours: 1024 clips / 150 steps reached 0.990 held-out
# accuracy at 4x16x16 (10 classes; 0.93 with radii from 2.9 px), 4096 / 600 reached 1.000 (1024 clips),
# for 21 s of CPU at 16x32x32. Generated clips are off the real distribution: a margin is worth it.
HARD_TRAIN_CLIPS, HARD_TRAIN_STEPS = 4096, 600
BLUR_SIGMA = 1.0  # Pixels: the hard gauge's blurred-real reference.
_SPEED_RANGE = synthetic.SPEED_RANGE  # Pixels per frame / short side, as both synthetic sets draw it.
_FEATURE_BATCH = 128
_PATCH = 4  # Pixels per token side, after pooling.
builds = 0  # Classifiers trained in this process (tests check that a cached gauge trains none).


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the training pipeline feeds the model (clips [T, R, R, C] in [-1, 1])."""

    num_frames: int
    resolution: int
    channels: int
    num_classes: int
    frame_stride: int = 1
    random_flip: bool = False
    kind: str = "colour"  # data.synthetic_kind: 'colour' (MovingShapesSource) | 'hard' (HardShapesSource).
    textured: bool = False  # data.synthetic_textured (hard set only).

    def __post_init__(self):
        if self.kind not in synthetic.SYNTHETIC_KINDS:
            raise ValueError(f"unknown synthetic kind {self.kind!r}; known: {synthetic.SYNTHETIC_KINDS}")
        if self.kind == "hard" and self.random_flip and synthetic.hard_layout(self.num_classes)[1] > 2:
            raise ValueError(f"the hard set with {self.num_classes} classes has horizontal motions, which "
                             f"a flip turns into another class: set data.random_flip=False")

    @classmethod
    def from_data(cls, data_cfg) -> Geometry:
        if data_cfg.source != "synthetic":
            raise ValueError(f"the shapes gauge needs data.source='synthetic' (got {data_cfg.source!r}): it "
                             f"scores against the moving-shapes ground truth. Evaluate other data with "
                             f"FVD: --eval.metric=fvd --eval.fvd.i3d_path=i3d.npz")
        # .get: run snapshots written before the hard set existed lack these fields.
        return cls(int(data_cfg.num_frames), int(data_cfg.resolution), int(data_cfg.channels),
                   int(data_cfg.num_classes), int(data_cfg.frame_stride), bool(data_cfg.random_flip),
                   str(data_cfg.get("synthetic_kind", "colour")), bool(data_cfg.get("synthetic_textured", False)))

    @property
    def version(self) -> str:
        return VERSION if self.kind == "colour" else HARD_VERSION

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.resolution, self.resolution, self.channels)

    def key(self, seed: int) -> str:
        t, r, _, c = self.clip_shape
        kind = "" if self.kind == "colour" else f"{self.kind}_tex{int(self.textured)}_"  # Colour keys as before.
        return (f"shapes_{kind}{self.version}_{t}x{r}x{r}x{c}_k{self.num_classes}_stride{self.frame_stride}"
                f"_flip{int(self.random_flip)}_seed{seed}")


class Classifier(nn.Module):
    """Patch tokens per frame, a motion layer pairing each token with its 3x3 neighbourhood in the
    next frame (for up to ~4 frame pairs), mean+max pooling, a feature layer, class logits.

    Only matmuls (XLA:CPU ran small-channel 3D convs ~20x slower here): clips are average-pooled
    to ~16^2 (`pooled`; the caption gauge pools to 32^2) and cut into 4x4 patches, which keeps
    training to seconds on a CPU.
    """

    num_classes: int
    width: int = 32
    feature_dim: int = 64

    @nn.compact
    def __call__(self, x):  # [B, T, h, w, C] from `pooled` -> (features [B, D], logits [B, K])
        b, t, h, w, c = x.shape
        gh, gw = h // _PATCH, w // _PATCH
        x = x[:, :, : gh * _PATCH, : gw * _PATCH].reshape(b, t, gh, _PATCH, gw, _PATCH, c)
        x = x.transpose(0, 1, 2, 4, 3, 5, 6).reshape(b, t, gh, gw, _PATCH * _PATCH * c)
        tokens = nn.relu(nn.Dense(self.width)(x))  # [B, T, gh, gw, width]
        summary = [tokens.mean((1, 2, 3)), tokens.max((1, 2, 3))]
        if t > 1:  # At most ~4 frame pairs: long clips would cost 4x more for little gain.
            every = max(1, (t - 1) // 4)
            after = tokens[:, 1::every]  # Rolls wrap around like the data's shapes do.
            hood = [jnp.roll(after, (dy, dx), axis=(2, 3)) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            motion = nn.relu(nn.Dense(self.width)(jnp.concatenate([tokens[:, :-1:every], *hood], -1)))
            summary += [motion.mean((1, 2, 3)), motion.max((1, 2, 3))]
        features = nn.relu(nn.Dense(self.feature_dim)(jnp.concatenate(summary, -1)))
        return features, nn.Dense(self.num_classes)(features)


@functools.lru_cache(maxsize=8)
def _apply_fn(num_classes: int):
    model = Classifier(num_classes)
    return model, jax.jit(model.apply)


def pooled(videos: np.ndarray, side: int = 16) -> np.ndarray:
    """Clips [N, T, H, W, C] -> the classifier's input: clipped to [-1, 1], average-pooled to ~side^2.

    Done on the host, once per clip, so training never holds (or moves) full-size clips.
    """
    videos = np.clip(np.asarray(videos, np.float32), -1, 1)
    n, t, h, w, c = videos.shape
    p = max(1, min(h, w) // side)
    return videos[:, :, : h - h % p, : w - w % p].reshape(n, t, h // p, p, w // p, p, c).mean((3, 5))


def classify(params: dict, num_outputs: int, videos: np.ndarray, side: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Features [N, D] and logits [N, num_outputs] of Classifier(num_outputs) on clips in [-1, 1]."""
    _, apply = _apply_fn(num_outputs)
    feats, logits = [], []
    for i in range(0, len(videos), _FEATURE_BATCH):
        chunk = pooled(videos[i:i + _FEATURE_BATCH], side)
        pad = _FEATURE_BATCH - len(chunk)  # One compiled shape.
        f, y = apply({"params": params}, np.pad(chunk, ((0, pad),) + ((0, 0),) * 4))
        feats.append(np.asarray(f)[:len(chunk)])
        logits.append(np.asarray(y)[:len(chunk)])
    return np.concatenate(feats), np.concatenate(logits)


def save_cache(path: str, params: dict, meta: dict) -> None:
    """A gauge's classifier params and JSON meta in one .npz, written atomically."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:  # Write then rename: concurrent readers never see half a file.
        np.savez(f, meta=np.asarray(json.dumps(meta, sort_keys=True)), **flat)
    os.replace(tmp, path)


def load_cache(path: str) -> tuple[dict, dict]:
    """(params, meta) written by save_cache."""
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        params = traverse_util.unflatten_dict({tuple(k.split("/")): data[k] for k in data.files if k != "meta"})
    return params, meta


# ---- ground truth ----


def real_clips(geometry: Geometry, seed: int, num: int, *, start: int = 0):
    """(videos [num, T, R, R, C] float32 in [-1, 1], labels [num]) cut as the training pipeline does."""
    t, r, _, c = geometry.clip_shape
    span = (t - 1) * geometry.frame_stride + 1
    source = synthetic.make_synthetic_source(geometry.kind, start + num, span, r, r, c, geometry.num_classes,
                                             seed=seed, textured=geometry.textured)
    videos, labels = np.empty((num, t, r, r, c), np.float32), np.empty(num, np.int32)
    for i in range(num):
        example = source[start + i]
        rng = np.random.default_rng([seed, start + i, 1])  # Flips, as the train pipeline draws them.
        videos[i] = pipeline.sample_clip(example["video"], num_frames=t, frame_stride=geometry.frame_stride,
                                         resolution=r, random_flip=geometry.random_flip, rng=rng)
        labels[i] = example["label"]
    return videos * (2.0 / 255.0) - 1.0, labels


def noise_clips(geometry: Geometry, seed: int, num: int) -> np.ndarray:
    """Gaussian noise clipped to [-1, 1]: the floor every metric is reported against."""
    rng = np.random.default_rng([seed, 99])
    return np.clip(rng.normal(size=(num, *geometry.clip_shape)), -1, 1).astype(np.float32)


def class_directions(geometry: Geometry, label: int) -> np.ndarray:
    """Unit (dy, dx) motions a clip of `label` may show: [1 or 2, 2] (the mirror with random flips)."""
    if geometry.kind == "hard":
        angle = synthetic.hard_class(label, geometry.num_classes)[1]
    else:
        angle = 2 * np.pi * label / geometry.num_classes  # As MovingShapesSource moves the class.
    dirs = [(np.sin(angle), np.cos(angle))]
    if geometry.random_flip:
        dirs.append((np.sin(angle), -np.cos(angle)))
    return np.asarray(dirs)


def frame_shifts(videos: np.ndarray) -> np.ndarray:
    """Sub-pixel (dy, dx) shift from each frame to the next: [B, T-1, 2], by phase correlation.

    Frames are mean-removed per channel (the flat background drops out) and the whitened cross
    spectrum is summed over channels; the shift is the correlation peak refined by the centroid of
    its 3x3 neighbourhood. Frames wrap toroidally like the data, so circular shifts are exact.
    """
    x = np.asarray(videos, np.float64)
    x = x - x.mean(axis=(2, 3), keepdims=True)
    spec = np.fft.fft2(x, axes=(2, 3))
    cross = (np.conj(spec[:, :-1]) * spec[:, 1:]).sum(-1)  # [B, T-1, H, W]
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-12), axes=(2, 3)).real
    b, t1, h, w = corr.shape
    flat = corr.reshape(b, t1, -1).argmax(-1)
    py, px = flat // w, flat % w
    offsets = np.arange(-1, 2)
    ys = (py[..., None, None] + offsets[:, None]) % h
    xs = (px[..., None, None] + offsets[None, :]) % w
    hood = np.clip(np.take_along_axis(corr.reshape(b, t1, -1), (ys * w + xs).reshape(b, t1, 9), -1), 0, None)
    hood = hood.reshape(b, t1, 3, 3)
    mass = hood.sum((-1, -2)) + 1e-12
    dy = py + (hood.sum(-1) * offsets).sum(-1) / mass
    dx = px + (hood.sum(-2) * offsets).sum(-1) / mass
    # Peaks past the half-size are negative shifts.
    return np.stack([(dy + h / 2) % h - h / 2, (dx + w / 2) % w - w / 2], axis=-1)


def motion_consistency(geometry: Geometry, videos: np.ndarray, labels) -> float:
    """Fraction of frame pairs moving within 45 degrees of the class direction at a plausible speed."""
    # [B, 2, 2]: without flips the one direction twice, so every clip has the same shape.
    dirs = np.stack([class_directions(geometry, int(y))[[0, -1]] for y in labels])
    return direction_agreement(videos, dirs, geometry.resolution * geometry.frame_stride)


def direction_agreement(videos: np.ndarray, directions: np.ndarray, short_side_px: float) -> float:
    """Fraction of frame pairs whose shift is within 45 degrees of one of a clip's unit `directions`
    [B, K, 2] (dy, dx) at 0.5x the slowest to 1.5x the fastest speed of the synthetic data (short
    side per frame: the frame's short side times the frame stride). NaN for single frames."""
    if np.shape(videos)[1] < 2:
        return float("nan")
    shifts = frame_shifts(videos)  # [B, T-1, 2]
    lo, hi = 0.5 * _SPEED_RANGE[0] * short_side_px, 1.5 * _SPEED_RANGE[1] * short_side_px
    speed = np.linalg.norm(shifts, axis=-1)
    cos = np.einsum("btd,bkd->btk", shifts, directions).max(-1) / np.maximum(speed, 1e-12)
    ok = (cos >= np.cos(np.pi / 4)) & (speed >= lo) & (speed <= hi)
    return float(ok.mean())


# ---- the gauge ----


@dataclasses.dataclass
class ShapesGauge:
    """A trained classifier for one data geometry, plus the cached reference scores."""

    geometry: Geometry
    params: dict
    seed: int
    cache_path: str
    meta: dict  # version, build_seconds, heldout_accuracy, references {num_clips: {...}}
    _real_stats: dict = dataclasses.field(default_factory=dict, repr=False)  # labels bytes -> _real_reference

    @classmethod
    def for_config(cls, config) -> ShapesGauge:
        """The gauge eval.metric names for a run config, refused when it does not fit the data."""
        metric, data_cfg = config.eval.metric, config.data
        kind = data_cfg.get("synthetic_kind", "colour")
        if data_cfg.source == "synthetic" and METRICS.get(metric) != kind:
            fits = next(m for m, k in METRICS.items() if k == kind)
            raise ValueError(f"eval.metric={metric!r} does not score data.synthetic_kind={kind!r}; use "
                             f"--eval.metric={fits} (configs/shapes.py:hard=1 sets both for the hard set)")
        cfg = config.eval.shapes
        return cls.for_data(data_cfg, cfg.cache_dir or None, int(cfg.seed))

    @classmethod
    def for_data(cls, data_cfg, cache_dir: str | None = None, seed: int = 1) -> ShapesGauge:
        """The gauge for a run's data config: loaded from the cache, or trained (seconds) and cached."""
        return cls.for_geometry(Geometry.from_data(data_cfg), cache_dir, seed)

    @classmethod
    def for_geometry(cls, geometry: Geometry, cache_dir: str | None = None, seed: int = 1) -> ShapesGauge:
        if seed == 0:
            raise ValueError("shapes gauge seed 0 is the training data's MovingShapesSource seed; use another "
                             "(eval.shapes.seed) so the classifier and references see held-out clips")
        path = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), geometry.key(seed) + ".npz")
        if os.path.exists(path):
            params, meta = load_cache(path)
            return cls(geometry, params, seed, path, meta)
        logging.info("shapes gauge: training the classifier for %s (once; cached in %s)", geometry, path)
        start = time.perf_counter()
        params, train_power = train_classifier(geometry, seed)
        gauge = cls(geometry, params, seed, path, {"version": geometry.version, "references": {}})
        if geometry.kind == "hard":
            gauge.meta["sharpness"] = sharpness.fit_normaliser(train_power)
        videos, labels = real_clips(geometry, _seeds(seed)["test"], 256)
        gauge.meta["heldout_accuracy"] = float((gauge.logits(videos).argmax(-1) == labels).mean())
        gauge.meta["build_seconds"] = round(time.perf_counter() - start, 2)
        if gauge.meta["heldout_accuracy"] < 0.98:  # Scores against a weak classifier mislead.
            logging.warning("shapes gauge: held-out accuracy %.3f < 0.98 for %s; raise TRAIN_STEPS and VERSION",
                            gauge.meta["heldout_accuracy"], geometry)
        gauge._save()
        return gauge

    def features_and_logits(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classifier features [N, D] and logits [N, K] of clips [N, T, R, R, C] in [-1, 1]."""
        if np.shape(videos)[1:] != self.geometry.clip_shape:
            raise ValueError(f"clips are {np.shape(videos)[1:]}, the gauge was built for "
                             f"{self.geometry.clip_shape}; build it with ShapesGauge.for_data(the run's data config)")
        return classify(self.params, self.geometry.num_classes, videos)

    def logits(self, videos: np.ndarray) -> np.ndarray:
        return self.features_and_logits(videos)[1]

    def frechet_features(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(features [N, D'] the Frechet distance compares, logits [N, K], hf power [N] or None).

        Colour set: the classifier's features (no hf power). Hard set: those and the standardised
        band powers of eval/sharpness.py.
        """
        features, logits = self.features_and_logits(videos)
        if self.geometry.kind != "hard":
            return features, logits, None
        power = sharpness.band_power(videos)
        features = np.concatenate([features, sharpness.standardise(power, self.meta["sharpness"])], -1)
        return features, logits, sharpness.hf_power(power)

    def real_matching(self, labels, seed: int) -> np.ndarray:
        """Real clips with exactly these labels (in order), from the synthetic source at `seed`."""
        labels = np.asarray(labels)
        if labels.size and not 0 <= labels.min() <= labels.max() < self.geometry.num_classes:
            raise ValueError(f"labels must be in [0, {self.geometry.num_classes}), got {labels.min()}..{labels.max()}")
        counts = np.bincount(labels, minlength=self.geometry.num_classes)
        pools, start, chunk = [[] for _ in counts], 0, len(labels) + 8 * len(counts)  # Usually one pass.
        while any(len(p) < n for p, n in zip(pools, counts, strict=True)):
            for video, y in zip(*real_clips(self.geometry, seed, chunk, start=start), strict=True):
                pools[y].append(video)
            start += chunk
        by_class = [iter(p) for p in pools]
        return np.stack([next(by_class[y]) for y in labels])

    def references(self, num_clips: int) -> dict:
        """Real-vs-real and noise scores for `num_clips` clips with cycling labels; cached on disk."""
        key = str(num_clips)
        if key not in self.meta["references"]:
            seeds = _seeds(self.seed)
            labels = np.arange(num_clips) % self.geometry.num_classes
            real_a = self.real_matching(labels, seeds["real_a"])
            others = [("real", real_a), ("noise", noise_clips(self.geometry, seeds["noise"], num_clips))]
            if self.geometry.kind == "hard":
                others.insert(1, ("blurred", sharpness.gaussian_blur(real_a, BLUR_SIGMA)))
            real_ref = self._real_reference(self.real_matching(labels, seeds["real_b"]))
            refs = {}
            for name, videos in others:
                raw = self._raw_scores(videos, labels, real_ref)
                refs.update({f"{metric}_{name}": value for metric, value in raw.items()})
            self.meta["references"][key] = refs
            self._save()
        return self.meta["references"][key]

    def score(self, videos: np.ndarray, labels) -> dict:
        """class_accuracy, motion_consistency, frechet (and, hard set, hf_power_ratio) of clips
        [N, T, R, R, C] in [-1, 1] made for `labels` [N], with `*_real` / `*_noise` (/ `*_blurred`)
        references at the same N (cycling labels)."""
        labels = np.asarray(labels, np.int32)
        if len(labels) != len(videos) or len(labels) < 2:
            raise ValueError(f"need >= 2 clips and one label per clip, got {len(videos)} clips, {len(labels)} labels")
        key = labels.tobytes()
        if key not in self._real_stats:  # The train loop scores the same labels every time.
            self._real_stats[key] = self._real_reference(self.real_matching(labels, _seeds(self.seed)["real_b"]))
        scores = self._raw_scores(videos, labels, self._real_stats[key])
        scores.update(self.references(len(labels)))
        scores["num_clips"] = len(labels)
        return scores

    def _real_reference(self, real_videos: np.ndarray) -> dict:
        features, _, hf = self.frechet_features(real_videos)
        return {"stats": fvd.feature_stats(features), "hf_power": None if hf is None else float(hf.mean())}

    def _raw_scores(self, videos, labels, real_ref: dict) -> dict:
        features, logits, hf = self.frechet_features(videos)
        scores = {"class_accuracy": float((logits.argmax(-1) == labels).mean()),
                  "motion_consistency": motion_consistency(self.geometry, videos, labels),
                  "frechet": fvd.frechet_distance(*fvd.feature_stats(features), *real_ref["stats"])}
        if self.geometry.kind == "hard":
            scores["hf_power_ratio"] = float(hf.mean()) / real_ref["hf_power"]
        return scores

    def _save(self) -> None:
        save_cache(self.cache_path, self.params, self.meta)


def _seeds(seed: int) -> dict[str, int]:
    """Disjoint MovingShapesSource seeds per use; the training data use seed 0."""
    return {name: 1000 * (i + 1) + seed for i, name in enumerate(("train", "test", "real_a", "real_b", "noise"))}


def train_classifier(geometry: Geometry, seed: int) -> tuple[dict, np.ndarray]:
    """Adam on real clips (held-out seed); returns (params, band powers [N, B] of those clips)."""
    global builds
    builds += 1
    num, steps = (TRAIN_CLIPS, TRAIN_STEPS) if geometry.kind == "colour" else (HARD_TRAIN_CLIPS, HARD_TRAIN_STEPS)
    chunks = [real_clips(geometry, _seeds(seed)["train"], min(256, num - i), start=i)
              for i in range(0, num, 256)]  # Pooled chunk by chunk: 16x64x64 clips are big.
    videos = np.concatenate([pooled(v) for v, _ in chunks])
    power = np.concatenate([sharpness.band_power(v) for v, _ in chunks])
    labels = np.concatenate([y for _, y in chunks])
    return fit_classifier(videos, labels[:, None], (geometry.num_classes,), steps, seed), power


def fit_classifier(videos: np.ndarray, labels_nh: np.ndarray, head_sizes: tuple[int, ...], steps: int,
                   seed: int) -> dict:
    """A Classifier with one softmax head per attribute, trained by Adam (cosine schedule).

    Args:
      videos: [N, T, h, w, C] clips already `pooled`.
      labels_nh: int [N, H], one column per head.
      head_sizes: classes per head; the logits are their concatenation (one head: the class logits).
      steps, seed: Adam steps of TRAIN_BATCH clips; init and batch order.
    Returns:
      numpy params of Classifier(sum(head_sizes)).
    """
    model, _ = _apply_fn(sum(head_sizes))
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    bounds = np.cumsum((0,) + tuple(head_sizes))

    @jax.jit  # One compile: eager flax/optax init would compile each of its ops separately (~15 s).
    def init(key, x):
        params = model.init(key, x)["params"]
        return params, tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            logits = model.apply({"params": p}, x)[1]
            return sum(optax.softmax_cross_entropy_with_integer_labels(logits[:, lo:hi], y[:, h]).mean()
                       for h, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)))

        grads = jax.grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    num = len(videos)
    params, opt_state = init(jax.random.key(seed), videos[:1])
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(num) for _ in range(-(-steps * TRAIN_BATCH // num))])
    for i in range(steps):
        idx = order[i * TRAIN_BATCH:(i + 1) * TRAIN_BATCH]
        params, opt_state = step(params, opt_state, videos[idx], labels_nh[idx])
    return jax.tree.map(np.asarray, params)


# ---- generated samples ----


def score_params(config, net, params, *, num_steps=None, gauge: ShapesGauge | None = None, mesh=None) -> dict:
    """{num_steps: gauge.score(...)} for eval.shapes.num_clips samples of `params` (cycling labels).

    Samples come from sample.generate with the run's sampler; noise from eval.shapes.seed.
    """
    from eflow_jax import sample

    cfg = config.eval.shapes
    gauge = gauge or ShapesGauge.for_config(config)
    labels = [i % config.model.num_classes for i in range(int(cfg.num_clips))]
    results = {}
    for steps in num_steps or cfg.num_steps:
        videos = sample.generate(config, net, params, labels, int(steps), int(cfg.seed), int(cfg.batch_size),
                                 mesh=mesh)
        results[int(steps)] = gauge.score(videos, labels)
    return results


def _names(scores: dict) -> tuple[list[str], list[str]]:
    """(metrics, references) present in one gauge.score: the hard gauge reports more of both."""
    metrics = [m for m in ("class_accuracy", "motion_consistency", "frechet", "hf_power_ratio") if m in scores]
    return metrics, [r for r in ("real", "blurred", "noise") if f"frechet_{r}" in scores]


def scalars(results: dict, prefix: str = "shapes") -> dict[str, float]:
    """Flat {'shapes/class_accuracy/1_step': v, ...} for metric writers (references once, no step)."""
    out = {}
    for steps, scores in results.items():
        metrics, refs = _names(scores)
        for name in metrics:
            out[f"{prefix}/{name}/{steps}_step"] = scores[name]
            for ref in refs:
                out[f"{prefix}/{name}/{ref}"] = scores[f"{name}_{ref}"]
    return out


def format_table(results: dict) -> str:
    """One row per metric, one column per num_steps, then the real and noise references."""
    steps = sorted(results)
    first = results[steps[0]]
    metrics, refs = _names(first)
    head = f"{'metric':<20}" + "".join(f"{f'{s}-step':>10}" for s in steps) + "".join(f"{r:>10}" for r in refs)
    rows = [head]
    for name in metrics:
        values = [results[s][name] for s in steps] + [first[f"{name}_{r}"] for r in refs]
        rows.append(f"{name:<20}" + "".join(f"{v:>10.3f}" for v in values))
    return "\n".join(rows)
