"""grain input pipelines: source -> shuffle -> per-process slice -> repeat -> clip crop -> batch.

Order matters for three properties:
  * determinism and exact resumption: every random choice is a function of (seed, element index),
    and the iterator state (get_state/set_state, or orbax's grain handler) is just a position;
  * disjoint hosts: every process shuffles the same global permutation and takes its contiguous
    block of each global batch, so the processes read disjoint examples that together cover the
    epoch, and the global batches (augmentation included) do not depend on the process count;
  * fresh epochs: `repeat` after the shuffle reseeds it each epoch.
Videos stay uint8 through the workers (4x less to move between processes). The training iterator
keeps them uint8 all the way to the accelerator (4x less host->device traffic; the train step
scales them to [-1, 1]); the evaluation iterator, and the training one by default, make float32 in
[-1, 1] in the consuming process.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags

from eflow_jax.data import synthetic, video_io
from eflow_jax.data.sources import (
    PREPARE_HINT,
    ArrayRecordClipSource,
    LatentSource,
    MovingShapesSource,
    TfdsSource,
)

SOURCES = ("synthetic", "arrayrecord", "tfds", "latents")


def default_data_config() -> ml_collections.ConfigDict:
    """The data fields every config carries (configs/ override them)."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "synthetic"  # 'synthetic' | 'arrayrecord' | 'tfds' | 'latents'.
    cfg.path = ""  # Prepared shards / latents directory / TFDS data_dir.
    cfg.tfds_name = ""
    cfg.split = "train"  # TFDS split.
    cfg.tfds_video_key = "video"
    cfg.tfds_label_key = "label"
    cfg.num_frames = 16  # T fed to the model (latents: the latent T).
    cfg.frame_stride = 1  # Take every k-th stored frame.
    cfg.resolution = 64  # H = W fed to the model.
    cfg.channels = 3
    cfg.num_classes = 10
    cfg.num_examples = 1024  # Synthetic only.
    # Synthetic only: 'colour' (a class = colour + shape + direction) | 'hard' (one colour; a class =
    # shape kind x direction: eval.metric='shapes_hard' scores it). data/synthetic.py.
    # 'colour' | 'hard' (class-conditional, eflow_jax/data/synthetic.py) | 'captions' (text-to-video: captioned
    # shapes, 20% of the attribute combinations held back from 'train'; see caption_split).
    cfg.synthetic_kind = "colour"
    cfg.synthetic_textured = False  # 'hard' only: a static grating behind the shapes.
    cfg.caption_split = "train"  # 'captions' only: 'train' | 'unseen' (only held-back combinations) | 'all'.
    cfg.random_flip = True  # Horizontal flips (pixel sources only).
    # grain mp_prefetch processes; 0 = decode in the training process; -1 = auto (worker_count below:
    # none for clips under 16 KiB, else min(8, cores - 2)). An explicit count is used as given.
    cfg.worker_count = AUTO_WORKERS
    cfg.read_threads = (
        4  # Threads per process reading + decoding examples (FFmpeg runs without the GIL).
    )
    cfg.prefetch_buffer = 2  # Batches' worth of examples buffered per process / worker.
    cfg.on_corrupt = "skip"  # 'skip' (count + warn) | 'fail' (raise with the record index).
    # Text-conditioned runs (model.context_dim > 0): the embeddings `python -m eflow_jax.data.embed_text`
    # wrote for data.path ('' = data.path/text_embeddings, its default --out).
    cfg.text_embeddings = ""
    # Latent runs: the VAE (a diffusers-layout dir, eflow_jax/models/wan_vae.py) that samples are decoded
    # with; '' = the one the latents' manifest records. Training refuses latents another VAE made.
    cfg.vae = ""
    return cfg


AUTO_WORKERS = -1
SMALL_CLIP_BYTES = 16 * 1024  # Below this, making a clip in-process beats shipping it from a worker.
MAX_AUTO_WORKERS = 8


def worker_count(data_cfg: ml_collections.ConfigDict, cores: int | None = None) -> int:
    """data.worker_count, with -1 ('auto', the default) resolved for this host.

    auto: 0 for clips under 16 KiB as the model sees them (the demo's 4x16x16 clips, 3 KiB, and the
    tests'; starting processes costs seconds and each example a pickle), else min(8, cores - 2),
    where cores are those this process may run on: two stay free for the training loop's thread and
    the runtime, so a 2-core machine decodes in-process. Eight workers kept EFlow-B's step fed on an
    H200 host (docs/BENCHMARKS.md); `python -m eflow_jax.bench.data --cases=demand` shows clips/s per
    worker count against the step's demand. With several training processes on one host, each
    starts its own workers: set the count explicitly there.
    """
    n = int(data_cfg.worker_count)
    if n >= 0:
        return n
    if n != AUTO_WORKERS:
        raise ValueError(f"data.worker_count={n}: use -1 (auto), 0 (in-process) or a number of worker processes.")
    itemsize = 4 if data_cfg.source == "latents" else 1
    clip = data_cfg.num_frames * data_cfg.resolution**2 * data_cfg.channels * itemsize
    if clip < SMALL_CLIP_BYTES:
        return 0
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(MAX_AUTO_WORKERS, cores - 2))




def text_embeddings_dir(data_cfg: ml_collections.ConfigDict) -> str:
    """Where a text-conditioned run reads its precomputed caption embeddings."""
    return data_cfg.text_embeddings or os.path.join(data_cfg.path, "text_embeddings")


Encode = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # captions -> (text states [N, L, D], mask [N, L])


def make_source(data_cfg: ml_collections.ConfigDict, text: Encode | None = None):
    """The random-access source named by data_cfg.source (see sources.py).

    text: for text-conditioned runs, the run's caption encoder (eflow_jax/text.py): each example gets
    its caption's embedding ('text_embedding', 'text_mask'), precomputed (data.text_embeddings) for
    prepared data, or computed once per caption here for the synthetic captioned set.
    """
    source = data_cfg.source
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {source!r}")
    if source == "synthetic":
        return _synthetic_source(data_cfg, data_cfg.num_examples, seed=0, text=text)
    if source == "tfds":
        if not data_cfg.tfds_name:
            raise ValueError(
                "data.source='tfds' needs data.tfds_name (and data.path = its data_dir)"
            )
        return TfdsSource(
            data_cfg.tfds_name,
            split=data_cfg.split,
            data_dir=data_cfg.path or None,
            video_key=data_cfg.tfds_video_key,
            label_key=data_cfg.tfds_label_key,
        )
    if not data_cfg.path:
        hint = (
            PREPARE_HINT.format(path="OUT")
            if source == "arrayrecord"
            else "eflow_jax.data.sources.write_latents"
        )
        raise ValueError(f"data.source={source!r} needs data.path; create the data with:\n  {hint}")
    text_dir = text_embeddings_dir(data_cfg) if text is not None else None
    if source == "arrayrecord":
        return ArrayRecordClipSource(data_cfg.path, on_corrupt=data_cfg.on_corrupt, text_dir=text_dir)
    return LatentSource(data_cfg.path, on_corrupt=data_cfg.on_corrupt, text_dir=text_dir)


def sample_clip(
    video_thwc: np.ndarray,
    *,
    num_frames: int,
    frame_stride: int,
    resolution: int,
    random_flip: bool = False,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Temporal crop with stride, short-side resize, square crop, optional flip; uint8 in and out.

    Returns a view of the input where possible.

    With rng=None every choice is central and nothing is flipped (evaluation).
    """
    span = (num_frames - 1) * frame_stride + 1
    length, height, width, _ = video_thwc.shape
    if length < span:
        raise ValueError(
            f"clip has {length} frames, num_frames={num_frames} x frame_stride={frame_stride} "
            f"needs {span}"
        )
    start = (length - span) // 2 if rng is None else int(rng.integers(length - span + 1))
    video = video_thwc[start : start + span : frame_stride]
    if min(height, width) != resolution:
        video = video_io.resize_frames(video, *video_io.short_side_size(height, width, resolution))
        height, width = video.shape[1:3]
    if rng is None:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top, left = (
            int(rng.integers(height - resolution + 1)),
            int(rng.integers(width - resolution + 1)),
        )
    video = video[:, top : top + resolution, left : left + resolution]
    if random_flip and rng is not None and rng.random() < 0.5:
        video = video[:, :, ::-1]
    return video  # A view: batching copies it once (a contiguous copy here would be a second one).


@dataclasses.dataclass(frozen=True)
class _ClipTransform(grain.transforms.RandomMap):
    """Picklable per-example transform (mp_prefetch workers re-import it by name)."""

    num_frames: int
    frame_stride: int
    resolution: int
    random_flip: bool
    train: bool
    latents: bool

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = dict(element)
        if self.train:  # Training batches go to the device: arrays only (captions are strings).
            out.pop("caption", None)
        out["label"] = np.int32(element["label"])
        if not self.latents:  # Latents are used as stored: no crop, resize or flip.
            # C-contiguous, or grain's workers pickle the clip through their result pipe instead
            # of shared memory (a flip is a strided view): 0.8 MB per 16x128x128 clip, and at
            # close each worker's pipe is left full, so closing waits 25 s per worker for it.
            out["video"] = np.ascontiguousarray(sample_clip(
                element["video"],
                num_frames=self.num_frames,
                frame_stride=self.frame_stride,
                resolution=self.resolution,
                random_flip=self.random_flip,
                rng=rng if self.train else None,
            ))
        return out


@dataclasses.dataclass(frozen=True)
class _ToModelInput(grain.transforms.Map):
    """uint8 video -> float32 in [-1, 1]; latents -> float32 as stored."""

    latents: bool

    def map(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        out["video"] = video = batch["video"].astype(np.float32)
        if not self.latents:
            video *= 2.0 / 255.0  # In place: a batch of 128^2 clips is tens of MB.
            video -= 1.0
        return out


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
    """mp_prefetch's worker_init_fn: the worker ends when the process that started it ends, however it ends.

    grain's workers are daemon processes, ended by their parent's exit handlers; a kill -9 (or the OOM
    killer) runs none, and the workers stayed alive for minutes, ~250 MB each. A daemon thread waits on
    the parent's sentinel (a pipe the kernel closes when the parent dies) and ends the worker.
    PR_SET_PDEATHSIG would not do: it fires when the *thread* that spawned the worker ends, and grain
    spawns its workers from short-lived threads.
    """
    import multiprocessing
    import multiprocessing.connection
    import threading
    import time

    del worker_index, worker_count
    parent = multiprocessing.parent_process()
    parent_pid = os.getppid()

    def watch() -> None:
        if parent is not None:  # spawn and forkserver (grain uses spawn).
            multiprocessing.connection.wait([parent.sentinel])
        else:  # Started some other way: poll for the reparenting that follows the parent's death.
            while os.getppid() == parent_pid:
                time.sleep(1.0)
        os._exit(1)  # The parent is gone: nobody reads what this worker makes.

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _to_iterator(ds: grain.MapDataset, data_cfg, batch_size: int, *, drop_remainder: bool,
                 float_video: bool = True):
    latents = data_cfg.source == "latents"
    buffer = max(1, data_cfg.prefetch_buffer * batch_size)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=data_cfg.read_threads, prefetch_buffer_size=buffer)
    )
    workers = worker_count(data_cfg)
    if workers > 0:
        # grain reads absl flags when it starts workers; a plain script (no app.run) hasn't parsed.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Workers prefetch examples, not batches: they interleave back into the original order, so
        # the batches are the same for any worker_count (0 replays exactly what training saw).
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=buffer
            ),
            worker_init_fn=exit_with_parent,
        )
    it_ds = it_ds.batch(batch_size, drop_remainder=drop_remainder)
    return iter(it_ds.map(_ToModelInput(latents)) if float_video or latents else it_ds)


def _transform(data_cfg, *, train: bool) -> _ClipTransform:
    return _ClipTransform(
        num_frames=data_cfg.num_frames,
        frame_stride=data_cfg.frame_stride,
        resolution=data_cfg.resolution,
        random_flip=data_cfg.random_flip,
        train=train,
        latents=data_cfg.source == "latents",
    )


class _ProcessBlocks(grain.MapDataset):
    """Element j of process i = global position (j // b) * B + i * b + j % b, with b = B / P."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        self._global, self._local, self._index = global_batch, global_batch // count, index

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, j):
        if isinstance(j, slice):
            return self.slice(j)
        block, offset = divmod(j, self._local)
        return self._parent[block * self._global + self._index * self._local + offset]

    def __str__(self) -> str:
        return f"ProcessBlocks(global_batch={self._global}, index={self._index})"


def make_train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    float_video: bool = True,
    text: Encode | None = None,
) -> grain.DatasetIterator:
    """Infinite, shuffled per-process batches {'video': float32 [b,T,H,W,C], 'label': int32 [b]}.

    Args:
        data_cfg: see default_data_config().
        global_batch_size: batch over all processes; each yields global_batch_size // process_count.
        seed: shuffle and augmentation seed; the same seed gives the same batches.
        process_index, process_count: this process's slice of every epoch.
        float_video: False leaves pixel videos uint8 as stored (train.to_model_input scales them
          on the device); latents are float32 either way.
        text: the run's caption encoder (text-conditioned runs): see make_source.

    Returns:
        a grain DatasetIterator; save/restore its position with get_state()/set_state().
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} outside [0, {process_count})")
    source = make_source(data_cfg, text)
    # One global stream (shuffle, reshuffled each epoch; augmentation a function of the global
    # position), cut into global batches; this process takes its contiguous block of every one. The
    # global batches are thus the same for any process count (2 processes train like 1).
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
    augment_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])  # As before: 1 process unchanged.
    ds = ds.random_map(_transform(data_cfg, train=True), seed=augment_seed)
    ds = _ProcessBlocks(ds, global_batch_size, process_index, process_count)
    return _to_iterator(ds, data_cfg, global_batch_size // process_count, drop_remainder=True,
                        float_video=float_video)


def make_eval_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    num_examples: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = False,
    text: Encode | None = None,
) -> grain.DatasetIterator:
    """One pass, in order, central crops: real clips for FVD statistics.

    Args:
        data_cfg: see default_data_config() (point `split`/`path` at the evaluation data).
        batch_size: per-process batch; the last one may be smaller unless drop_remainder.
        num_examples: use this many examples, evenly spaced over the dataset (all classes, ordered).
        process_index, process_count: this process reads examples process_index::process_count.
    """
    source = make_source(data_cfg, text)
    ds = grain.MapDataset.source(source)
    if num_examples is not None and num_examples < len(ds):
        ds = ds[:: len(ds) // num_examples][:num_examples]
    ds = ds[process_index::process_count].random_map(_transform(data_cfg, train=False), seed=0)
    return _to_iterator(ds, data_cfg, batch_size, drop_remainder=drop_remainder)


HELDOUT_SEED = 1_000_003  # Synthetic held-out clips: a dataset seed no training run uses.


def heldout_batch(data_cfg: ml_collections.ConfigDict, num: int, text: Encode | None = None) -> dict[str, np.ndarray]:
    """`num` held-out clips as one batch, deterministic: 'video' float32 [num, T, H, W, C] in model space,
    'label', and with `text` (the run's caption encoder) 'text_embedding' and 'text_mask'.

    Synthetic data draws them from another dataset seed (never seen in training); other sources
    take the first `num` clips of `data.split` (central crops), so point that at a held-out split.
    """
    if data_cfg.source != "synthetic":
        batch = next(make_eval_iterator(data_cfg, batch_size=num, num_examples=num, text=text))
    else:
        source = _synthetic_source(data_cfg, num, seed=HELDOUT_SEED, text=text)
        transform = _transform(data_cfg, train=False)
        items = [transform.random_map(source[i], None) for i in range(num)]
        batch = _ToModelInput(latents=False).map({k: np.stack([e[k] for e in items]) for k in items[0]
                                                  if k not in ("caption",)})
    out = {"video": np.asarray(batch["video"], np.float32), "label": np.asarray(batch["label"], np.int32)}
    return out | {k: np.asarray(batch[k]) for k in ("text_embedding", "text_mask") if k in batch}


def heldout_captions(data_cfg: ml_collections.ConfigDict, num: int) -> list[str]:
    """Captions of `num` held-out clips (prompts for a text run's samples when none are given)."""
    if data_cfg.source == "synthetic":
        source = _synthetic_source(data_cfg, num, seed=HELDOUT_SEED)
    else:
        source = make_source(data_cfg)
    captions = [str(source[i].get("caption", "")) for i in range(min(num, len(source)))]
    return [c for c in captions if c.strip()]


class CaptionedTextSource:
    """The synthetic captioned set as training reads it: each example's caption id as its 'label', and,
    given the run's encoder, its caption's embedding (the 160 captions are encoded once, here)."""

    def __init__(self, captions: synthetic.CaptionedShapesSource, encode: Encode | None = None):
        self.captions, self.clip_shape, self.text = captions, captions.clip_shape, None
        if encode is not None:
            emb, mask = encode(synthetic.all_captions())
            self.text = CaptionTable(np.asarray(emb), np.asarray(mask, bool))

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = self.captions[index]
        out = {"video": example["video"], "label": example["caption_id"], "caption": example["caption"]}
        if self.text is not None:
            out |= {"text_embedding": self.text.embeddings[example["caption_id"]],
                    "text_mask": self.text.masks[example["caption_id"]]}
        return out


@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """Embeddings of a finite caption list, by caption id (what TextEmbeddings is for prepared data)."""

    embeddings: np.ndarray  # [num_captions, L, D]
    masks: np.ndarray  # bool [num_captions, L]

    @property
    def max_len(self) -> int:
        return self.embeddings.shape[1]

    @property
    def d_model(self) -> int:
        return self.embeddings.shape[2]

    path = "the synthetic captions' table"


def _check_text(source, data_cfg, text_shape: tuple[int, int]) -> None:
    """The joined caption embeddings must have the model's (context_len, context_dim)."""
    text = getattr(source, "text", None)
    if text is None:
        raise ValueError(f"the model takes text (model.context_dim > 0) but data.source={data_cfg.source!r} has no "
                         f"caption embeddings; prepare captioned clips and run python -m eflow_jax.data.embed_text.")
    if (text.max_len, text.d_model) != tuple(text_shape):
        raise ValueError(f"text embeddings in {text.path} are [{text.max_len}, {text.d_model}] per caption, the "
                         f"model takes [model.context_len, model.context_dim] = {list(text_shape)}; set those to "
                         f"{text.max_len}, {text.d_model}.")


def _synthetic_source(data_cfg: ml_collections.ConfigDict, num_examples: int, seed: int, text: Encode | None = None):
    """The synthetic set data_cfg names, with clips long enough for num_frames x frame_stride."""
    span = (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1
    if data_cfg.get("synthetic_kind") == "captions":
        captions = synthetic.CaptionedShapesSource(num_examples, span, data_cfg.resolution, data_cfg.resolution,
                                                   split=data_cfg.get("caption_split", "train"), seed=seed)
        return CaptionedTextSource(captions, text)
    # .get: run snapshots written before the hard set existed lack these fields.
    return synthetic.make_synthetic_source(
        data_cfg.get("synthetic_kind", "colour"), num_examples, span, data_cfg.resolution, data_cfg.resolution,
        data_cfg.channels, data_cfg.num_classes, seed=seed, textured=data_cfg.get("synthetic_textured", False))


def _stored_shape(source) -> tuple[int, ...]:
    if isinstance(source, ArrayRecordClipSource):
        return source.clip_shape
    if isinstance(source, LatentSource):
        return source.latent_shape
    if isinstance(source, MovingShapesSource | synthetic.HardShapesSource):
        return source.clip_shape
    return tuple(source[0]["video"].shape)


def validate_data_config(
    data_cfg: ml_collections.ConfigDict, *, model_frames: int, model_size: int, model_channels: int,
    text_shape: tuple[int, int] | None = None, text: Encode | None = None,
) -> None:
    """Fails early, with the fix in the message, when the data cannot feed the model.

    Checks: known source, the path exists (else names the prepare command), the dataset is not
    empty, the config matches the model (frames, size, channels), stored clips are long and large
    enough.
    """
    expected = (model_frames, model_size, model_channels)
    configured = (data_cfg.num_frames, data_cfg.resolution, data_cfg.channels)
    if configured != expected:
        raise ValueError(
            f"data (num_frames, resolution, channels) = {configured} but the model takes "
            f"{expected}; set data.num_frames/resolution/channels to match"
        )
    if data_cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt must be 'skip' or 'fail', got {data_cfg.on_corrupt!r}")
    source = make_source(data_cfg, text)  # Raises for unknown sources and missing paths.
    if not len(source):
        raise ValueError(f"data source {data_cfg.source!r} at {data_cfg.path!r} is empty")
    if text_shape is not None:
        _check_text(source, data_cfg, text_shape)
    stored = _stored_shape(source)
    if data_cfg.source == "latents":
        want = (model_frames, model_size, model_size, model_channels)
        if stored != want:
            raise ValueError(
                f"latents in {data_cfg.path} are [T,h,w,c]={list(stored)}, the model takes "
                f"{list(want)}; re-encode them or change the model config"
            )
        return
    length, height, width, channels = stored
    span = (data_cfg.num_frames - 1) * data_cfg.frame_stride + 1
    if length < span:
        raise ValueError(
            f"stored clips have {length} frames; num_frames={data_cfg.num_frames} x "
            f"frame_stride={data_cfg.frame_stride} needs {span}: lower frame_stride or "
            f"re-prepare with --frames={span}"
        )
    if channels != model_channels:
        raise ValueError(f"stored clips have {channels} channels, the model takes {model_channels}")
    if min(height, width) < model_size:
        raise ValueError(
            f"stored clips are {height}x{width}, smaller than resolution={model_size}: "
            f"re-prepare with --size={model_size} (upsampling would blur the data)"
        )
    if channels != 3 and min(height, width) != model_size:
        raise ValueError(
            f"resizing needs RGB; {channels}-channel clips must be stored at {model_size}"
        )
    num_stored_classes = getattr(source, "manifest", {}).get("num_classes", 0)
    if num_stored_classes > data_cfg.num_classes:
        raise ValueError(
            f"the dataset has {num_stored_classes} classes, data.num_classes="
            f"{data_cfg.num_classes}; raise it"
        )
