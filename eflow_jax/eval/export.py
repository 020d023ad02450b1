"""Write sample videos: mp4 (H.264), gif, grids and frame strips for TensorBoard.

Everything here is host-side numpy plus PyAV (no PIL/imageio dependency). Videos arrive as float
arrays in [-1, 1] with layout [T, H, W, C] (one clip) or [N, T, H, W, C] (a batch).

Channels: C == 3 is shown as RGB; C == 1 (or 2) is shown as grey from channel 0; C >= 4 (e.g. raw
latents) shows channels 0..2 as RGB. Latents are roughly unit-variance, so values beyond [-1, 1]
saturate: such previews are a rough look, decode with the VAE for real samples.
"""

from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

GRID_BORDER_PX = 2  # Even, so a grid of even-sized tiles stays even for yuv420p.
_MP4_CODECS = ("libx264", "mpeg4")  # libx264 when the ffmpeg build has it, else MPEG-4 part 2.


def to_uint8(video: np.ndarray) -> np.ndarray:
    """Maps floats in [-1, 1] to uint8 [0, 255] (clipping values outside); keeps the shape."""
    video = np.asarray(video, dtype=np.float32)
    return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def as_rgb(frames: np.ndarray) -> np.ndarray:
    """Makes the last axis 3 channels: grey for C < 3, the first three for C >= 3."""
    channels = frames.shape[-1]
    if channels == 3:
        return frames
    if channels < 3:
        return np.repeat(frames[..., :1], 3, axis=-1)
    return frames[..., :3]


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, H, W, C], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}; convert with to_uint8 first")
    if frames.shape[0] == 0:
        raise ValueError("cannot write a video with zero frames")
    return as_rgb(frames)


def _pad_to_even(frames_thwc: np.ndarray) -> np.ndarray:
    # yuv420p subsamples chroma 2x2, so H.264 / MPEG-4 need even sizes; repeat the edge pixel.
    _, h, w, _ = frames_thwc.shape
    return np.pad(frames_thwc, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _pick_mp4_codec() -> str:
    for name in _MP4_CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises different error types across versions.
            continue
    raise RuntimeError(f"this PyAV/ffmpeg build has none of the encoders {_MP4_CODECS}")


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> Path:
    """Writes uint8 frames [T, H, W, C] as an mp4 (H.264 if available, else MPEG-4).

    Odd heights/widths are padded by one edge pixel to even (yuv420p needs it).

    Args:
      path: output file; parent folders are created.
      frames: uint8 [T, H, W, C]; C is mapped to RGB by `as_rgb`.
      fps: frames per second (may be fractional, e.g. 29.97).
      crf: H.264 constant rate factor (lower is better quality; 18 is visually lossless).
    Returns:
      The path written.
    """
    frames = _pad_to_even(_check_frames(frames))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = _pick_mp4_codec()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        else:
            stream.bit_rate = 8_000_000  # MPEG-4's 200 kb/s default would blur samples.
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # Flush delayed frames (B-frames / lookahead).
            container.mux(packet)
    return path


def _palette_256(frames_thwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One palette for the whole clip: the 256 most used 4-bit-per-channel colour bins.

    Returns (palette [256, 3] uint8, lut [4096] uint8 mapping each bin to its nearest entry), so
    every frame shares the palette (no flicker) and mapping a frame is one table lookup.
    """
    bins = _colour_bins(frames_thwc)
    counts = np.bincount(bins.ravel(), minlength=4096)
    sums = np.stack(
        [np.bincount(bins.ravel(), weights=frames_thwc[..., c].ravel(), minlength=4096)
         for c in range(3)], axis=-1)
    used = np.argsort(-counts, kind="stable")[:256]
    used = used[counts[used] > 0]
    palette = np.zeros((256, 3), np.float64)
    palette[: len(used)] = sums[used] / counts[used, None]  # Mean colour of each kept bin.
    bin_centres = _bin_centres()
    dist = ((bin_centres[:, None, :] - palette[None, : len(used), :]) ** 2).sum(-1)
    lut = np.argmin(dist, axis=1).astype(np.uint8)
    return np.round(palette).astype(np.uint8), lut


def _colour_bins(frames_thwc: np.ndarray) -> np.ndarray:
    q = frames_thwc.astype(np.int32) >> 4
    return (q[..., 0] << 8) | (q[..., 1] << 4) | q[..., 2]


def _bin_centres() -> np.ndarray:
    idx = np.arange(4096)
    return np.stack([(idx >> 8) & 15, (idx >> 4) & 15, idx & 15], axis=-1) * 16.0 + 7.5


def write_gif(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Writes uint8 frames [T, H, W, C] as a looping gif through PyAV's gif encoder.

    GIF stores frame delays in whole centiseconds, so e.g. 24 fps plays at ~25 fps. One 256-colour
    palette is built for the whole clip (see `_palette_256`).

    Args:
      path: output file; parent folders are created.
      frames: uint8 [T, H, W, C]; C is mapped to RGB by `as_rgb`.
      fps: frames per second.
    Returns:
      The path written.
    """
    frames = _check_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    palette_rgb, lut = _palette_256(frames)
    palette_argb = np.concatenate([np.full((256, 1), 255, np.uint8), palette_rgb], axis=1)
    indices = lut[_colour_bins(frames)]
    with av.open(str(path), mode="w", format="gif") as container:
        stream = container.add_stream("gif", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "pal8"
        for frame_idx in indices:
            frame = av.VideoFrame.from_ndarray((frame_idx, palette_argb), format="pal8")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def video_grid(videos: np.ndarray, ncols: int, border: int = GRID_BORDER_PX,
               border_value: float | int | None = None) -> np.ndarray:
    """Tiles N videos [N, T, H, W, C] into one [T, H', W', C] video, row-major, with borders.

    H' = rows * (H + border) + border, W' = ncols * (W + border) + border; empty cells stay border.

    Args:
      videos: [N, T, H, W, C], float or uint8 (the dtype is kept).
      ncols: videos per row (clamped to N).
      border: border width in pixels between and around tiles.
      border_value: fill value; default white (1.0 for floats, 255 for uint8).
    Returns:
      The grid video [T, H', W', C].
    """
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"expected videos [N, T, H, W, C], got shape {videos.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    n, t, h, w, c = videos.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    if border_value is None:
        border_value = 255 if videos.dtype == np.uint8 else 1.0
    grid = np.full((t, nrows * (h + border) + border, ncols * (w + border) + border, c),
                   border_value, dtype=videos.dtype)
    for i in range(n):
        top = border + (i // ncols) * (h + border)
        left = border + (i % ncols) * (w + border)
        grid[:, top: top + h, left: left + w] = videos[i]
    return grid


def image_strip(video: np.ndarray, num_frames: int) -> np.ndarray:
    """Picks `num_frames` evenly spaced frames of [T, H, W, C] and lays them side by side.

    Returns:
      [H, W * k, C] with k = min(num_frames, T), same dtype; for TensorBoard image summaries.
    """
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"expected video [T, H, W, C], got shape {video.shape}")
    k = max(1, min(num_frames, video.shape[0]))
    picks = np.linspace(0, video.shape[0] - 1, k).round().astype(int)
    return np.concatenate(list(video[picks]), axis=1)


def sample_stem(label: int, seed: int, steps: int, index: int | None = None, what: str = "label",
                train_step: int | None = None) -> str:
    """File name stem shared by a sample's mp4 and gif: prefixed by the clip index and ended by
    `_trainstep<n>` (the training step of the params) when given; what='prompt': `label` is the index
    of the clip's prompt."""
    stem = f"{what}{int(label):04d}_seed{int(seed)}_steps{int(steps)}" + _step_suffix(train_step)
    return stem if index is None else f"clip{int(index):05d}_{stem}"


def _step_suffix(train_step: int | None) -> str:
    return "" if train_step is None else f"_trainstep{int(train_step)}"


def save_samples(out_dir: str | Path, videos: np.ndarray, labels: Sequence[int],
                 seeds: Sequence[int], steps: int, fps: float, grid_cols: int | None = None,
                 indices: Sequence[int] | None = None,
                 on_written: Callable[[], None] | None = None,
                 prompts: Sequence[str] | None = None, train_step: int | None = None) -> list[Path]:
    """Writes one mp4 + gif per sample, plus `grid_steps{n}.mp4/.gif` of all samples.

    With `prompts` (text runs), `labels` are prompt indices: names say `prompt0003`, and
    `prompts.txt` (index<TAB>prompt) and `grid_steps{n}_prompts.png` (each clip's frames beside its
    prompt) are written too. With `train_step`, every name but prompts.txt carries
    `_trainstep<step>` (`grid_steps2_trainstep12.mp4`, `grid_steps2_trainstep12_prompts.png`): files
    copied elsewhere still say which params made them.

    Args:
      out_dir: destination folder (created).
      videos: float [N, T, H, W, C] in [-1, 1].
      labels: class label per sample (N).
      seeds: sampling seed per sample (N).
      steps: number of sampler steps (NFE schedule length), used in the names.
      fps: playback frame rate.
      grid_cols: grid columns; default ceil(sqrt(N)).
      indices: clip index per sample (N), put in the names; needed when (label, seed) repeats.
      on_written: called after each sample's two files are written (progress).
      train_step: the training step of the params that made them, put in the names.
    Returns:
      Paths written: per-sample mp4, gif (in sample order), then the grid mp4 and gif.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"expected videos [N, T, H, W, C], got shape {videos.shape}")
    n = videos.shape[0]
    indices = [None] * n if indices is None else list(indices)
    if len(labels) != n or len(seeds) != n or len(indices) != n:
        raise ValueError(f"need one label and seed (and index, if given) per video: {n} videos, "
                         f"{len(labels)} labels, {len(seeds)} seeds, {len(indices)} indices")
    what = "label" if prompts is None else "prompt"
    stems = [sample_stem(label, seed, steps, i, what, train_step)
             for label, seed, i in zip(labels, seeds, indices, strict=True)]
    repeated = sorted(stem for stem, k in Counter(stems).items() if k > 1)
    if repeated:  # Would silently overwrite one clip with another.
        raise ValueError(f"samples {repeated[:3]} repeat (label, seed): pass indices= to name each clip.")
    out_dir = Path(out_dir)
    frames = as_rgb(to_uint8(videos))
    paths = []
    for video, stem in zip(frames, stems, strict=True):
        paths.append(write_mp4(out_dir / f"{stem}.mp4", video, fps))
        paths.append(write_gif(out_dir / f"{stem}.gif", video, fps))
        if on_written is not None:
            on_written()
    grid = video_grid(frames, grid_cols or int(np.ceil(np.sqrt(n))))
    grid_stem = f"grid_steps{int(steps)}{_step_suffix(train_step)}"
    paths.append(write_mp4(out_dir / f"{grid_stem}.mp4", grid, fps))
    paths.append(write_gif(out_dir / f"{grid_stem}.gif", grid, fps))
    if prompts is not None:
        listing = out_dir / "prompts.txt"
        listing.write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(prompts)), encoding="utf-8")
        paths.append(listing)
        paths.append(prompt_sheet(out_dir / f"{grid_stem}_prompts.png", frames,
                                  [prompts[int(label)] for label in labels]))
    return paths


def prompt_sheet(path: str | Path, frames_nthwc: np.ndarray, captions: Sequence[str], frames: int = 4,
                 cell: int = 96) -> Path:
    """A PNG with one row per clip: `frames` evenly spaced frames (upscaled to `cell` px) and its caption."""
    from PIL import Image, ImageDraw

    n, t = frames_nthwc.shape[:2]
    picks = np.linspace(0, t - 1, min(frames, t)).round().astype(int)
    text_w, pad = 8 * max((len(c) for c in captions), default=1) + 2 * GRID_BORDER_PX, GRID_BORDER_PX
    sheet = Image.new("RGB", (len(picks) * (cell + pad) + pad + text_w, n * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (clip, caption) in enumerate(zip(frames_nthwc, captions, strict=True)):
        top = pad + row * (cell + pad)
        for col, f in enumerate(picks):
            tile = Image.fromarray(clip[f]).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (pad + col * (cell + pad), top))
        draw.text((len(picks) * (cell + pad) + pad, top + cell // 2 - 6), caption, fill="black")
    path = Path(path)
    sheet.save(path)
    return path
