"""Train/eval iterators over every source kind, corrupt records, config validation."""

import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from eflow_jax.data import pipeline, prepare, sources
from eflow_jax.data.synthetic import MovingShapesSource

NUM_EXAMPLES = 12
CLIP = dict(num_frames=4, height=16, width=16)
LATENT_SHAPE = (2, 4, 4, 8)


class TinyMovingShapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TF-free TFDS builder: plain Tensor features, written as array_record."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(shape=(4, 16, 16, 3), dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=(), dtype=np.int64),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        shapes = MovingShapesSource(NUM_EXAMPLES, **CLIP, seed=5)
        for i in range(NUM_EXAMPLES):
            yield i, shapes[i]


def _latent_examples():
    rng = np.random.default_rng(0)
    for i in range(NUM_EXAMPLES):
        yield {
            "latent": rng.normal(size=LATENT_SHAPE).astype(np.float16),
            "label": i % 3,
            "text_embedding": rng.normal(size=(3, 5)).astype(np.float32),
            "text_mask": np.array([1, 1, i % 2], np.int32),
        }


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """One data config per source kind, each over NUM_EXAMPLES examples."""
    root = tmp_path_factory.mktemp("sources")
    settings = prepare.PrepareSettings(frames=4, size=16)
    shapes = MovingShapesSource(NUM_EXAMPLES, **CLIP, seed=9)
    prepare.write_clips(
        str(root / "clips"),
        (shapes[i] for i in range(NUM_EXAMPLES)),
        settings=settings,
        classes=[str(c) for c in range(10)],
        examples_per_shard=5,
    )
    tfds.disable_progress_bar()
    TinyMovingShapes(data_dir=str(root / "tfds"), file_format="array_record").download_and_prepare()
    sources.write_latents(root / "latents_ar", _latent_examples(), examples_per_shard=5)
    examples = list(_latent_examples())
    (root / "latents_npy").mkdir()
    np.save(root / "latents_npy" / "latents.npy", np.stack([e["latent"] for e in examples]))
    np.save(root / "latents_npy" / "labels.npy", np.array([e["label"] for e in examples]))
    np.save(root / "latents_npy" / "text_masks.npy", np.stack([e["text_mask"] for e in examples]))

    def config(**fields):
        cfg = pipeline.default_data_config()
        cfg.update(dict(num_frames=4, resolution=16, read_threads=1, random_flip=False), **fields)
        return cfg

    latent_dims = dict(num_frames=2, resolution=4, channels=8)
    return {
        "synthetic": config(source="synthetic", num_examples=NUM_EXAMPLES),
        "arrayrecord": config(source="arrayrecord", path=str(root / "clips")),
        "tfds": config(source="tfds", tfds_name="tiny_moving_shapes", path=str(root / "tfds")),
        "latents_ar": config(source="latents", path=str(root / "latents_ar"), **latent_dims),
        "latents_npy": config(source="latents", path=str(root / "latents_npy"), **latent_dims),
    }


KINDS = ["synthetic", "arrayrecord", "tfds", "latents_ar", "latents_npy"]


def _example_ids(cfg):
    """Maps the exact model input of each stored example (no augmentation) to its index."""
    source = pipeline.make_source(cfg)
    return {_key(cfg, source[i]["video"]): i for i in range(len(source))}


def _key(cfg, video):
    if cfg.source == "latents":
        return np.asarray(
            video, np.float16
        ).tobytes()  # Stored as float16: the round trip is exact.
    if video.dtype == np.float32:
        video = np.round((video + 1) * 127.5).astype(np.uint8)
    return video.tobytes()


@pytest.mark.parametrize("kind", KINDS)
def test_batches_are_deterministic_and_typed(configs, kind):
    cfg = configs[kind].copy_and_resolve_references()
    cfg.random_flip = cfg.source != "latents"  # Exercise every random choice.

    def batches(seed):
        it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=seed)
        return [next(it) for _ in range(5)]  # 20 examples from 12: crosses an epoch.

    first, same, different = batches(1), batches(1), batches(2)
    batch = first[0]
    want = LATENT_SHAPE if cfg.source == "latents" else (4, 16, 16, 3)
    assert batch["video"].shape == (4, *want) and batch["video"].dtype == np.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    if cfg.source != "latents":
        assert (
            batch["video"].min() >= -1 and batch["video"].max() <= 1 and batch["video"].max() > 0.3
        )
    if kind == "latents_ar":
        assert batch["text_embedding"].shape == (4, 3, 5) and batch["text_mask"].shape == (4, 3)
    for a, b in zip(first, same, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(
        not np.array_equal(a["video"], b["video"]) for a, b in zip(first, different, strict=True)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_process_slices_are_disjoint_and_cover_each_epoch(configs, kind):
    cfg = configs[kind]
    ids = _example_ids(cfg)
    per_process = []
    for process_index in range(3):
        it = pipeline.make_train_iterator(
            cfg, global_batch_size=6, seed=4, process_index=process_index, process_count=3
        )
        epochs = [[], []]
        for step in range(4):  # b = 2 per process, 4 examples per process-epoch: 2 epochs.
            epochs[step // 2] += [ids[_key(cfg, v)] for v in next(it)["video"]]
        per_process.append(epochs)
    for epoch in range(2):
        slices = [set(p[epoch]) for p in per_process]
        assert sum(map(len, slices)) == NUM_EXAMPLES and set.union(*slices) == set(
            range(NUM_EXAMPLES)
        )
    assert per_process[0][0] != per_process[0][1]  # Each epoch is reshuffled.


@pytest.mark.parametrize("kind", KINDS)
def test_state_restore_resumes_at_the_next_batch(configs, kind):
    cfg = configs[kind]
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0)
    for _ in range(2):
        next(it)
    state = it.get_state()
    expected = [
        next(it) for _ in range(4)
    ]  # Crosses an epoch boundary (12 examples, batches of 4).
    fresh = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["video"], want["video"])
        np.testing.assert_array_equal(got["label"], want["label"])


@pytest.mark.parametrize("kind", ["arrayrecord", "latents_npy"])
def test_eval_iterator_is_one_ordered_pass(configs, kind):
    cfg = configs[kind]
    ids = _example_ids(cfg)
    batches = list(pipeline.make_eval_iterator(cfg, batch_size=5))
    assert [len(b["label"]) for b in batches] == [5, 5, 2]
    assert [ids[_key(cfg, v)] for b in batches for v in b["video"]] == list(range(NUM_EXAMPLES))
    subset = list(pipeline.make_eval_iterator(cfg, batch_size=4, num_examples=4))
    assert [ids[_key(cfg, v)] for b in subset for v in b["video"]] == [0, 3, 6, 9]  # Evenly spaced.
    halves = [
        [
            ids[_key(cfg, v)]
            for b in pipeline.make_eval_iterator(
                cfg, batch_size=4, process_index=p, process_count=2
            )
            for v in b["video"]
        ]
        for p in range(2)
    ]
    assert sorted(halves[0] + halves[1]) == list(range(NUM_EXAMPLES))


def test_eval_uses_center_crops():
    video = np.arange(10 * 6 * 8 * 3, dtype=np.uint8).reshape(10, 6, 8, 3)
    clip = pipeline.sample_clip(video, num_frames=3, frame_stride=2, resolution=6)
    np.testing.assert_array_equal(
        clip, video[2:7:2, :, 1:7]
    )  # (10 - 5) // 2 = 2; (8 - 6) // 2 = 1.


def test_corrupt_records_skip_or_fail(tmp_path):
    shapes = MovingShapesSource(6, **CLIP)
    settings = prepare.PrepareSettings(frames=4, size=16)
    manifest = prepare.write_clips(
        str(tmp_path),
        (shapes[i] for i in range(6)),
        settings=settings,
        classes=list("0123456789"),
        examples_per_shard=6,
    )
    # Rewrite the shard with record 2 garbage and record 4's JPEG frames cut short.
    path = tmp_path / manifest["shards"][0]["file"]
    records = list(sources.ArrayRecordClipSource(tmp_path)._records)
    broken = sources.unpack_record(records[4])
    records[2] = b"EFV1\x10\x00\x00\x00not json at all!"
    records[4] = sources.pack_record(
        meta=broken["meta"], blobs={"frames": [f[:40] for f in broken["frames"]]}
    )
    writer = sources.array_record_module.ArrayRecordWriter(
        str(path), sources.WRITER_OPTIONS["uncompressed"]
    )
    for record in records:
        writer.write(record)
    writer.close()
    cfg = pipeline.default_data_config()
    cfg.update(
        dict(source="arrayrecord", path=str(tmp_path), num_frames=4, resolution=16, read_threads=1)
    )
    skip_source = sources.ArrayRecordClipSource(tmp_path, on_corrupt="skip")
    assert skip_source[2] is None and skip_source[4] is None and skip_source.num_corrupt == 2
    labels = [label for b in pipeline.make_eval_iterator(cfg, batch_size=2) for label in b["label"]]
    assert labels == [shapes[i]["label"] for i in (0, 1, 3, 5)]
    cfg.on_corrupt = "fail"
    with pytest.raises(sources.CorruptRecordError, match="record 2 .*on_corrupt='skip'"):
        list(pipeline.make_eval_iterator(cfg, batch_size=2))


def test_validate_accepts_matching_configs(configs):
    for kind in KINDS:
        cfg = configs[kind]
        pipeline.validate_data_config(
            cfg, model_frames=cfg.num_frames, model_size=cfg.resolution, model_channels=cfg.channels
        )


@pytest.mark.parametrize(
    "change, model, message",
    [
        (dict(path="/nonexistent/k700"), None, "eflow_jax.data.prepare --src="),
        (dict(path=""), None, "needs data.path"),
        (dict(source="youtube"), None, "must be one of"),
        (
            dict(num_frames=3, frame_stride=2),
            dict(model_frames=3),
            "stored clips have 4 frames.*--frames=5",
        ),
        (dict(frame_stride=2), None, "needs 7: lower frame_stride"),
        (
            dict(resolution=32),
            dict(model_size=32),
            "smaller than resolution=32: re-prepare with --size=32",
        ),
        (dict(channels=1), dict(model_channels=1), "3 channels, the model takes 1"),
        (dict(num_classes=5), None, "10 classes, data.num_classes=5"),
        (
            None,
            dict(model_size=8),
            r"\(num_frames, resolution, channels\) = \(4, 16, 3\).*\(4, 8, 3\)",
        ),
    ],
)
def test_validate_errors_name_the_fix(configs, change, model, message):
    cfg = configs["arrayrecord"].copy_and_resolve_references()
    cfg.update(change or {})
    dims = dict(model_frames=cfg.num_frames, model_size=cfg.resolution, model_channels=cfg.channels)
    dims.update(model or {})
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipeline.validate_data_config(cfg, **dims)


def test_validate_empty_dataset_and_latent_mismatch(configs, tmp_path):
    prepare.write_clips(
        str(tmp_path / "empty"),
        [],
        settings=prepare.PrepareSettings(frames=4, size=16),
        classes=["a"],
    )
    cfg = configs["arrayrecord"].copy_and_resolve_references()
    cfg.path = str(tmp_path / "empty")
    with pytest.raises(ValueError, match="is empty"):
        pipeline.validate_data_config(cfg, model_frames=4, model_size=16, model_channels=3)
    latents = configs["latents_ar"].copy_and_resolve_references()
    latents.channels = 16
    with pytest.raises(
        ValueError, match=r"\[T,h,w,c\]=\[2, 4, 4, 8\], the model takes \[2, 4, 4, 16\]"
    ):
        pipeline.validate_data_config(latents, model_frames=2, model_size=4, model_channels=16)
    missing = configs["tfds"].copy_and_resolve_references()
    missing.tfds_name = "no_such_dataset"
    with pytest.raises(FileNotFoundError, match="no_such_dataset"):
        pipeline.validate_data_config(missing, model_frames=4, model_size=16, model_channels=3)


def test_flipped_clips_leave_the_transform_contiguous():
    cfg = pipeline.default_data_config()
    cfg.update(source="synthetic", num_examples=8, num_frames=4, resolution=16, random_flip=True)
    source, transform = pipeline.make_source(cfg), pipeline._transform(cfg, train=True)
    rng = np.random.default_rng(0)
    videos = [transform.random_map(source[i % 8], rng)["video"] for i in range(16)]
    assert all(v.flags.c_contiguous for v in videos)  # Else grain's workers pickle them through a pipe.


def test_closing_ends_the_data_workers_at_once():
    # Strided (flipped) clips went through the workers' result pipes; at close the pipes stayed
    # full and grain waited its 25 s kill timeout per worker (200 s after every 8-worker H200 run).
    cfg = pipeline.default_data_config()
    cfg.update(source="synthetic", num_examples=64, num_frames=8, resolution=64, random_flip=True,
               worker_count=2, read_threads=1)  # 98 KB clips: one fills a pipe.
    it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, float_video=False)
    for _ in range(3):
        assert next(it)["video"].shape == (4, 8, 64, 64, 3)
    start = time.perf_counter()
    it.close()
    assert time.perf_counter() - start < 20, "a data worker outlived close() (its result pipe was full)"


_KILLED_PARENT = """
import os, sys
from eflow_jax.data import pipeline
cfg = pipeline.default_data_config()
cfg.update(source="synthetic", num_examples=64, num_frames=4, resolution=16, worker_count=2, read_threads=1)
it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=0, float_video=False)
next(it)
print("ready", flush=True)
sys.stdin.read()  # Until killed.
"""


def test_kill_9_of_the_training_process_ends_its_data_workers(tmp_path):
    """Issue 25.8: grain's workers are daemon processes, ended by the parent's exit handlers; after a
    kill -9 they stayed alive for minutes (~250 MB each)."""
    import contextlib
    import os
    import signal
    import subprocess
    import sys

    import psutil

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], cwd=repo, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu"))
    workers = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "resource_tracker" not in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, f"data workers {[p.pid for p in alive]} outlived their killed parent"
    finally:
        proc.kill()
        for worker in workers:  # Orphans of a failed run: the ones this test started, by pid.
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
