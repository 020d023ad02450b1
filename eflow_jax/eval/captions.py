"""A text-to-video gauge on the captioned moving shapes: does a clip show what its caption says?

The captioned set (data/synthetic.py CaptionedShapesSource) states four attributes per caption
("a small red circle moving left"); 20% of the combinations are held back from its 'train' split.
A generator trained on 'train' is scored on captions of both splits:

  <attr>_accuracy     per attribute (size, colour, shape, direction): one small classifier with a
                      head per attribute (shapes.Classifier) agrees with the caption. It is trained
                      here on real clips of every combination, seen and held back: the scorer must
                      know what an unseen combination looks like; only the generator never saw it.
  all_accuracy        every attribute right at once (chance 1/160).
  motion_consistency  classifier-free: frame pairs moving the caption's way (shapes.direction_agreement).
  frechet             Frechet distance between [classifier features, standardised log band powers
                      (eval/sharpness.py)] of the clips and of real clips with the same captions:
                      blur and noise cost score even where the attributes are right.
  hf_power_ratio      power above 0.25 cycles/px over that of the matching real clips (~1 when as sharp).

`report` groups the clips by seen / unseen combination and puts each group beside references at the
same count and captions: real clips (another seed) and clipped Gaussian noise.

    captions, ids, attributes = prompts("unseen")           # what to generate
    gauge = CaptionGauge.for_geometry(num_frames=16, resolution=32)
    print(summary_line(gauge.report(videos, attributes)))   # videos in [-1, 1], [N, T, R, R, 3]
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time

import numpy as np
from absl import logging

from eflow_jax.data import synthetic
from eflow_jax.eval import fvd, shapes, sharpness

VERSION = "v1"  # Bump when the classifier, its training or the references change: old caches go stale.
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "eflow_jax", "captions_gauge")
ATTRIBUTES = tuple(name for name, _ in synthetic.CAPTION_ATTRIBUTES)
HEAD_SIZES = tuple(len(values) for _, values in synthetic.CAPTION_ATTRIBUTES)
TRAIN_CLIPS, TRAIN_STEPS = 4096, 600
# Small shapes (radius ~4 px at 32^2) lose their kind when pooled to 16^2 (shape accuracy 0.85 at
# 4x32x32); at 32^2 every head reached 1.00.
POOLED_SIDE = 32
builds = 0  # Classifiers trained in this process (tests check that a cached gauge trains none).


def prompts(split: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(captions, caption ids int32 [n], attributes int32 [n, 4]) of 'train' | 'unseen' | 'all'."""
    ids = synthetic.caption_ids(split)
    captions = synthetic.all_captions()
    return [captions[i] for i in ids], ids, synthetic.caption_attributes()[ids]


def caption_ids_of(attributes: np.ndarray) -> np.ndarray:
    """int32 [N] caption ids of attributes [N, 4] (the inverse of synthetic.caption_attributes)."""
    attributes = np.asarray(attributes, np.int64).reshape(-1, len(HEAD_SIZES))
    if (attributes < 0).any() or (attributes >= HEAD_SIZES).any():
        raise ValueError(f"attributes must lie in [0, {HEAD_SIZES}) per column")
    return np.ravel_multi_index(attributes.T, HEAD_SIZES).astype(np.int32)


def real_clips(num_frames: int, resolution: int, seed: int, caption_ids, start: int = 0) -> np.ndarray:
    """float32 [N, T, R, R, 3] in [-1, 1]: clip i shows caption_ids[i] with example start+i's nuisances."""
    caption_ids = np.asarray(caption_ids)
    source = synthetic.CaptionedShapesSource(start + len(caption_ids), num_frames, resolution, resolution,
                                             split="all", seed=seed)
    videos = np.stack([source.render(c, start + i) for i, c in enumerate(caption_ids)])
    return videos.astype(np.float32) * (2.0 / 255.0) - 1.0


def _seeds(seed: int) -> dict[str, int]:
    """Disjoint CaptionedShapesSource seeds per use; a generator's training data use seed 0."""
    return {name: 1000 * (i + 1) + seed for i, name in enumerate(("train", "test", "real_a", "real_b", "noise"))}


@dataclasses.dataclass
class CaptionGauge:
    """Per-attribute classifier for one clip geometry, its sharpness normaliser and cached references."""

    num_frames: int
    resolution: int
    params: dict
    seed: int
    cache_path: str
    meta: dict  # version, build_seconds, heldout_accuracy, sharpness, references {key: {...}}
    _real_refs: dict = dataclasses.field(default_factory=dict, repr=False)  # attributes bytes -> reference

    @classmethod
    def for_geometry(cls, num_frames: int, resolution: int, cache_dir: str | None = None,
                     seed: int = 1) -> CaptionGauge:
        """Loaded from the cache, or trained (about a minute on a CPU at 16x32x32) and cached."""
        if seed == 0:
            raise ValueError("caption gauge seed 0 is the training data's seed; use another")
        name = f"captions_{VERSION}_{num_frames}x{resolution}x{resolution}x3_seed{seed}.npz"
        path = os.path.join(os.path.expanduser(cache_dir or DEFAULT_CACHE_DIR), name)
        if os.path.exists(path):
            params, meta = shapes.load_cache(path)
            return cls(num_frames, resolution, params, seed, path, meta)
        logging.info("caption gauge: training the classifier for %dx%d^2 (once; cached in %s)",
                     num_frames, resolution, path)
        start = time.perf_counter()
        params, power = _train(num_frames, resolution, seed)
        gauge = cls(num_frames, resolution, params, seed, path,
                    {"version": VERSION, "sharpness": sharpness.fit_normaliser(power), "references": {}})
        ids = np.arange(len(synthetic.all_captions())).repeat(2)  # Every combination, twice.
        test_logits = gauge.features_and_logits(real_clips(num_frames, resolution, _seeds(seed)["test"], ids))[1]
        correct = _correct(test_logits, synthetic.caption_attributes()[ids])
        gauge.meta["heldout_accuracy"] = dict(zip(ATTRIBUTES, correct.mean(0).round(4).tolist(), strict=True))
        gauge.meta["build_seconds"] = round(time.perf_counter() - start, 2)
        if correct.mean(0).min() < 0.98:  # Scores against a weak classifier mislead.
            logging.warning("caption gauge: held-out accuracy %s < 0.98; raise TRAIN_STEPS and VERSION",
                            gauge.meta["heldout_accuracy"])
        shapes.save_cache(path, params, gauge.meta)
        return gauge

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        return (self.num_frames, self.resolution, self.resolution, 3)

    def features_and_logits(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classifier features [N, D] and the heads' logits, concatenated [N, sum(HEAD_SIZES)]."""
        if np.shape(videos)[1:] != self.clip_shape:
            raise ValueError(f"clips are {np.shape(videos)[1:]}, the gauge was built for {self.clip_shape}")
        return shapes.classify(self.params, sum(HEAD_SIZES), videos, POOLED_SIDE)

    def predict(self, videos: np.ndarray) -> np.ndarray:
        """int [N, 4]: the classifier's attributes of each clip."""
        logits = self.features_and_logits(videos)[1]
        return np.stack([part.argmax(-1) for part in _heads(logits)], -1)

    def score(self, videos: np.ndarray, attributes) -> dict:
        """Scores of clips [N, T, R, R, 3] in [-1, 1] made for `attributes` [N, 4] (no references).

        Returns:
          {'<attr>_accuracy', 'all_accuracy', 'motion_consistency', 'frechet', 'hf_power_ratio', 'num_clips'}.
        """
        attributes = np.asarray(attributes, np.int32).reshape(-1, len(HEAD_SIZES))
        if len(attributes) != len(videos) or len(attributes) < 2:
            raise ValueError(f"need >= 2 clips and one attribute row per clip, got {len(videos)} clips, "
                             f"{len(attributes)} rows")
        return self._raw_scores(videos, attributes, self._real_reference(attributes))

    def report(self, videos: np.ndarray, attributes) -> dict:
        """{'seen': ..., 'unseen': ...} (groups present only): each group's `score` plus '*_real' and
        '*_noise' references at the same count and captions. Seen / unseen: the 'train' split has /
        lacks the combination."""
        attributes = np.asarray(attributes, np.int32).reshape(-1, len(HEAD_SIZES))
        unseen = synthetic.held_back()[caption_ids_of(attributes)]
        out = {}
        for group, members in (("seen", ~unseen), ("unseen", unseen)):
            if members.sum() >= 2:
                out[group] = self.score(videos[members], attributes[members]) | self.references(attributes[members])
        return out

    def references(self, attributes: np.ndarray) -> dict:
        """Scores of real clips (seed real_a) and of noise for these attributes; cached on disk."""
        key = hashlib.sha256(np.asarray(attributes, np.int32).tobytes()).hexdigest()[:16]
        if key not in self.meta["references"]:
            seeds, ids = _seeds(self.seed), caption_ids_of(attributes)
            rng = np.random.default_rng([seeds["noise"], len(ids)])
            noise = np.clip(rng.normal(size=(len(ids), *self.clip_shape)), -1, 1).astype(np.float32)
            real = real_clips(self.num_frames, self.resolution, seeds["real_a"], ids)
            ref = self._real_reference(attributes)
            refs = {}
            for name, videos in (("real", real), ("noise", noise)):
                refs |= {f"{k}_{name}": v for k, v in self._raw_scores(videos, attributes, ref).items()
                         if k != "num_clips"}
            self.meta["references"][key] = refs
            shapes.save_cache(self.cache_path, self.params, self.meta)
        return self.meta["references"][key]

    def _features(self, videos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        features, logits = self.features_and_logits(videos)
        power = sharpness.band_power(videos)
        features = np.concatenate([features, sharpness.standardise(power, self.meta["sharpness"])], -1)
        return features, logits, sharpness.hf_power(power)

    def _real_reference(self, attributes: np.ndarray) -> dict:
        key = attributes.tobytes()
        if key not in self._real_refs:  # A loop scores the same prompts every time.
            real = real_clips(self.num_frames, self.resolution, _seeds(self.seed)["real_b"], caption_ids_of(attributes))
            features, _, hf = self._features(real)
            self._real_refs[key] = {"stats": fvd.feature_stats(features), "hf_power": float(hf.mean())}
        return self._real_refs[key]

    def _raw_scores(self, videos, attributes, real_ref: dict) -> dict:
        features, logits, hf = self._features(videos)
        correct = _correct(logits, attributes)
        scores = {f"{name}_accuracy": float(c) for name, c in zip(ATTRIBUTES, correct.mean(0), strict=True)}
        angles = np.asarray(synthetic.CAPTION_ANGLES)[attributes[:, 3]]
        directions = np.stack([np.sin(angles), np.cos(angles)], -1)[:, None]  # [N, 1, 2] (dy, dx)
        scores |= {"all_accuracy": float(correct.all(-1).mean()),
                   "motion_consistency": shapes.direction_agreement(videos, directions, self.resolution),
                   "frechet": fvd.frechet_distance(*fvd.feature_stats(features), *real_ref["stats"]),
                   "hf_power_ratio": float(hf.mean()) / real_ref["hf_power"],
                   "num_clips": len(videos)}
        return scores


def _heads(logits: np.ndarray) -> list[np.ndarray]:
    return np.split(logits, np.cumsum(HEAD_SIZES)[:-1], axis=-1)


def _correct(logits: np.ndarray, attributes: np.ndarray) -> np.ndarray:
    """bool [N, 4]: each head's argmax equals the attribute."""
    return np.stack([part.argmax(-1) == attributes[:, h] for h, part in enumerate(_heads(logits))], -1)


def training_caption_ids() -> np.ndarray:
    """Caption ids of the classifier's TRAIN_CLIPS clips: cycling over every combination, the held-back
    ones included (the scorer must know them; only the generator never sees them)."""
    return np.arange(TRAIN_CLIPS) % len(synthetic.all_captions())


def _train(num_frames: int, resolution: int, seed: int) -> tuple[dict, np.ndarray]:
    """(params, band powers of the training clips): real clips of training_caption_ids()."""
    global builds
    builds += 1
    ids = training_caption_ids()
    videos, power = [], []
    for i in range(0, TRAIN_CLIPS, 256):  # Pooled chunk by chunk: full-size clips are big.
        chunk = real_clips(num_frames, resolution, _seeds(seed)["train"], ids[i:i + 256], start=i)
        videos.append(shapes.pooled(chunk, POOLED_SIDE))
        power.append(sharpness.band_power(chunk))
    params = shapes.fit_classifier(np.concatenate(videos), synthetic.caption_attributes()[ids], HEAD_SIZES,
                                   TRAIN_STEPS, seed)
    return params, np.concatenate(power)


def scalars(report: dict, prefix: str = "captions") -> dict[str, float]:
    """Flat {'captions/seen/all_accuracy': v, 'captions/seen/frechet_real': v, ...} for metric writers."""
    return {f"{prefix}/{group}/{name}": float(value) for group, scores in report.items()
            for name, value in scores.items()}


def summary_line(report: dict) -> str:
    """One line per report: each group's accuracies and Frechet, then its real and noise references.

    "captions: seen (128 clips) size 1.00 colour 0.98 shape 0.91 direction 0.97 all 0.87 frechet 8.1
    [real all 1.00 frechet 1.9, noise all 0.00 frechet 912] | unseen (32 clips) ..."
    """
    parts = []
    for group, s in report.items():
        accs = " ".join(f"{name} {s[f'{name}_accuracy']:.2f}" for name in ATTRIBUTES)
        refs = ", ".join(f"{ref} all {s[f'all_accuracy_{ref}']:.2f} frechet {s[f'frechet_{ref}']:.1f}"
                         for ref in ("real", "noise"))
        parts.append(f"{group} ({s['num_clips']} clips) {accs} all {s['all_accuracy']:.2f} "
                     f"frechet {s['frechet']:.1f} [{refs}]")
    return "captions: " + " | ".join(parts)
