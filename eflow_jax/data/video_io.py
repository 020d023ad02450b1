"""Video decoding and frame codecs with PyAV: read mp4s, resample to a target fps, resize, JPEG.

Everything here is numpy in, numpy out; resizing goes through FFmpeg's swscale (``av`` reformat),
which is both fast and antialiased (AREA filter) and needs no PIL.
"""

from __future__ import annotations

import fractions
import io
import os
from collections.abc import Sequence

import av
import numpy as np

# A decoded stream may legitimately end a frame or two short of the container's declared count (edit
# lists, a dropped trailing B-frame); anything beyond this is a truncated file.
_TRUNCATION_SLACK_FRAMES = 2


class VideoDecodeError(ValueError):
    """A video could not be decoded. `kind` says why, for reports.

    Kinds: 'missing', 'zero-byte', 'permission-denied', 'unreadable' (container or bitstream corrupt; a
    truncated mp4 whose index sits at the end lands here too), 'truncated' (fewer frames than the
    container declares), 'no-video'.
    """

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


def _open_container(path_or_bytes: str | os.PathLike | bytes) -> av.container.InputContainer:
    """Opens a file path or in-memory bytes, turning every failure into a VideoDecodeError."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        name, source = "<bytes>", io.BytesIO(bytes(path_or_bytes))
        if not len(path_or_bytes):
            raise VideoDecodeError("zero-byte video (empty bytes)", "zero-byte")
    else:
        name = source = os.fspath(path_or_bytes)
        if not os.path.exists(name):
            raise VideoDecodeError(f"no such file: {name}", "missing")
        if os.path.getsize(name) == 0:
            raise VideoDecodeError(f"zero-byte file: {name}", "zero-byte")
    try:
        container = av.open(source)
    except PermissionError as e:  # Before the generic case: it is no damage to the file (av's is both).
        raise VideoDecodeError(f"permission denied reading {name} ({e.strerror or e}): make it readable by this "
                               f"user (chmod a+r)", "permission-denied") from e
    except (av.FFmpegError, EOFError, OSError) as e:
        raise VideoDecodeError(f"cannot open {name} (corrupt or truncated?): {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"no video stream in {name}", "no-video")
    return container


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _decode_frames(container, stream, name: str):
    """Yields decoded frames; raises VideoDecodeError on corrupt data."""
    try:
        yield from container.decode(stream)
    except (av.FFmpegError, EOFError) as e:
        raise VideoDecodeError(f"corrupt or truncated video {name}: {e}") from e


def _check_not_truncated(decoded: int, stream, name: str) -> None:
    declared = stream.frames or 0
    if decoded == 0:
        raise VideoDecodeError(f"no decodable frames in {name}")
    if declared and decoded < declared - _TRUNCATION_SLACK_FRAMES:
        raise VideoDecodeError(
            f"truncated video {name}: decoded {decoded} of {declared} frames", "truncated"
        )


def _display_name(path_or_bytes) -> str:
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return os.fspath(path_or_bytes)


def read_video(
    path_or_bytes: str | os.PathLike | bytes, *, max_frames: int | None = None
) -> tuple[np.ndarray, float]:
    """Decodes every frame (full resolution, RGB) of a video file or in-memory video.

    Args:
        path_or_bytes: a file path or the encoded bytes (mp4, webm, avi...).
        max_frames: stop after this many frames (no truncation check then).

    Returns:
        (frames uint8 [T, H, W, 3], fps of the stream).

    Raises:
        VideoDecodeError: zero-byte, corrupt, truncated input or no video stream.
    """
    name = _display_name(path_or_bytes)
    with _open_container(path_or_bytes) as container:
        stream = container.streams.video[0]
        frames = []
        for frame in _decode_frames(container, stream, name):
            frames.append(frame.to_ndarray(format="rgb24"))
            if max_frames is not None and len(frames) >= max_frames:
                break
        else:
            _check_not_truncated(len(frames), stream, name)
        fps = _stream_fps(stream)
    return np.stack(frames), fps


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(new_height, new_width) that scale the short side to `size`, keeping the aspect ratio."""
    scale = size / min(height, width)
    return max(size, round(height * scale)), max(size, round(width * scale))


def center_crop(frames_thwc: np.ndarray, size: int) -> np.ndarray:
    """Crops the central size x size window of [..., H, W, C] frames."""
    height, width = frames_thwc.shape[-3:-1]
    if height < size or width < size:
        raise ValueError(f"cannot crop {size}x{size} from {height}x{width} frames")
    top, left = (height - size) // 2, (width - size) // 2
    return frames_thwc[..., top : top + size, left : left + size, :]


def resize_frames(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resizes uint8 RGB frames [T, H, W, 3] with swscale's AREA filter (antialiased downscale)."""
    if frames_thwc.shape[1:3] == (height, width):
        return frames_thwc
    out = np.empty((frames_thwc.shape[0], height, width, 3), np.uint8)
    for i, frame in enumerate(frames_thwc):
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out[i] = video_frame.reformat(
            width=width, height=height, format="rgb24", interpolation="AREA"
        ).to_ndarray()
    return out


def read_video_resampled(
    path_or_bytes: str | os.PathLike | bytes,
    *,
    fps: float,
    size: int,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Decodes a video at `fps`, short-side resized to `size` and center cropped to size x size.

    Only the frames that are kept get converted and scaled (straight from YUV, one swscale call
    each), so a 30 fps 720p video costs little more than its decode.

    Args:
        path_or_bytes: a file path or the encoded bytes.
        fps: target frame rate.
        size: output height and width.
        max_seconds: decode at most this many seconds from the start (None: the whole video).

    Returns:
        (frames uint8 [M, size, size, 3], source frame index of each output frame [M], source fps).

    Raises:
        VideoDecodeError: zero-byte, corrupt, truncated input or no video stream.
    """
    name = _display_name(path_or_bytes)
    with _open_container(path_or_bytes) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # Frame threads: decode is the cost here.
        src_fps = _stream_fps(stream)
        if src_fps <= 0:
            raise VideoDecodeError(f"unknown frame rate in {name}")
        half_period = 0.5 / src_fps
        frames, indices = [], []
        start_time, next_target, decoded = None, 0, 0
        for decoded, frame in enumerate(_decode_frames(container, stream, name), start=1):
            time_s = frame.time if frame.time is not None else (decoded - 1) / src_fps
            start_time = time_s if start_time is None else start_time
            offset = time_s - start_time
            if max_seconds is not None and offset >= max_seconds:
                break
            repeats = 0
            # Output time k/fps takes the nearest source frame: this one while k/fps < t + P/2.
            while next_target / fps < offset + half_period:
                next_target, repeats = next_target + 1, repeats + 1
            if repeats:
                new_h, new_w = short_side_size(frame.height, frame.width, size)
                rgb = frame.reformat(
                    width=new_w, height=new_h, format="rgb24", interpolation="AREA"
                )
                cropped = center_crop(rgb.to_ndarray(), size)
                frames.extend([cropped] * repeats)
                indices.extend([decoded - 1] * repeats)
        else:
            _check_not_truncated(decoded, stream, name)
    if not frames:
        raise VideoDecodeError(f"no decodable frames in {name}")
    return np.stack(frames), np.asarray(indices, np.int64), src_fps


def encode_jpeg_frames(frames_thwc: np.ndarray, *, quality: int = 2) -> list[bytes]:
    """Encodes each RGB frame as a baseline JPEG (4:2:0) with FFmpeg's mjpeg encoder.

    Args:
        frames_thwc: uint8 [T, H, W, 3].
        quality: JPEG quantiser scale, 1 (best, largest) to 31; 2 keeps 38-40 dB on real clips.

    Returns:
        one JPEG byte string per frame.
    """
    _, height, width, channels = frames_thwc.shape
    if channels != 3 or frames_thwc.dtype != np.uint8:
        raise ValueError(
            f"JPEG frames must be uint8 RGB, got {frames_thwc.dtype} {frames_thwc.shape}"
        )
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width, encoder.height, encoder.pix_fmt = width, height, "yuvj420p"
    encoder.time_base = fractions.Fraction(1, 25)
    # Pinning qmin = qmax fixes the quantiser; mjpeg ignores global_quality unless set per frame.
    encoder.qmin = encoder.qmax = quality
    encoder.open()
    encoded = []
    for frame in frames_thwc:
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        packets = encoder.encode(video_frame.reformat(format="yuvj420p"))
        encoded.append(b"".join(bytes(p) for p in packets))
    return encoded


def decode_jpeg_frames(encoded: Sequence[bytes]) -> np.ndarray:
    """Decodes JPEG frames (as written by encode_jpeg_frames) to uint8 RGB [T, H, W, 3].

    Raises:
        VideoDecodeError: a frame is not a decodable JPEG.
    """
    decoder = av.CodecContext.create("mjpeg", "r")
    frames = []
    for i, data in enumerate(encoded):
        try:
            decoded = decoder.decode(av.Packet(bytes(data)))
        except (av.FFmpegError, ValueError) as e:
            raise VideoDecodeError(f"JPEG frame {i} is corrupt: {e}") from e
        if len(decoded) != 1:
            raise VideoDecodeError(f"JPEG frame {i} decoded to {len(decoded)} images")
        frames.append(decoded[0].to_ndarray(format="rgb24"))
    if len({f.shape for f in frames}) > 1:
        raise VideoDecodeError("JPEG frames of one clip have different sizes")
    return np.stack(frames)


def encode_mp4(frames_thwc: np.ndarray, fps: float, *, crf: int = 18) -> bytes:
    """Encodes uint8 RGB frames [T, H, W, 3] as an H.264 (yuv420p) mp4, returned as bytes.

    H and W must be even (4:2:0 chroma).
    """
    _, height, width, _ = frames_thwc.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream(
            "libx264", rate=fractions.Fraction(fps).limit_denominator(1001)
        )
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "fast"}
        for frame in frames_thwc:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), "rgb24"))
            )
        container.mux(stream.encode())
    return buffer.getvalue()
