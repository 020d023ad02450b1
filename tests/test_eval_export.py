"""Sample export: uint8 mapping, mp4/gif written and decoded back with PyAV, grids and strips."""

import os

import av
import numpy as np
import pytest

from eflow_jax.eval import export


def _smooth_video(t, h, w, c=3, seed=0):
    """Float [-1, 1] gradients that drift over time: easy for lossy codecs, not constant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    frames = []
    for i in range(t):
        phase = rng.uniform(0, 2 * np.pi, size=c)
        chans = [np.sin(2.0 * xx + 1.5 * yy + 0.3 * i + phase[k]) * 0.9 for k in range(c)]
        frames.append(np.stack(chans, axis=-1))
    return np.stack(frames).astype(np.float32)


def _decode(path):
    """Returns (frames uint8 [T, H, W, 3], stream average rate, frame times in seconds)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        rate = stream.average_rate
        times = [float(f.pts * stream.time_base) for f in decoded]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in decoded])
    return frames, rate, times


def test_to_uint8_maps_range_and_clips():
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32)
    np.testing.assert_array_equal(export.to_uint8(x), [0, 0, 128, 191, 255, 255])
    assert export.to_uint8(x).dtype == np.uint8


def test_as_rgb_channel_rules():
    grey = np.arange(6, dtype=np.uint8).reshape(1, 1, 6, 1)
    np.testing.assert_array_equal(export.as_rgb(grey), np.repeat(grey, 3, axis=-1))
    latent = np.arange(16, dtype=np.uint8).reshape(1, 1, 1, 16)
    np.testing.assert_array_equal(export.as_rgb(latent), latent[..., :3])


def test_write_mp4_odd_size_decodes_with_frames_size_fps(tmp_path):
    video = export.to_uint8(_smooth_video(7, 33, 47))
    path = export.write_mp4(tmp_path / "sub" / "a.mp4", video, fps=8)
    frames, rate, pts = _decode(path)
    assert frames.shape == (7, 34, 48, 3)  # Padded to even by one edge pixel.
    assert rate == 8
    np.testing.assert_allclose(np.diff(pts), 1 / 8, atol=1e-6)
    err = np.abs(frames[:, :33, :47].astype(float) - video.astype(float)).mean()
    assert err < 6.0, err  # crf 18 + 4:2:0 chroma on saturated gradients (measured 3.9).
    edge_gap = np.abs(frames[:, 33, :47].astype(int) - frames[:, 32, :47].astype(int)).max()
    assert edge_gap <= 4, edge_gap  # The pad row repeats the edge (up to codec loss).


def test_write_mp4_falls_back_to_mpeg4(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "_pick_mp4_codec", lambda: "mpeg4")
    video = export.to_uint8(_smooth_video(4, 16, 20))
    frames, rate, _ = _decode(export.write_mp4(tmp_path / "b.mp4", video, fps=12))
    assert frames.shape == (4, 16, 20, 3) and rate == 12
    assert np.abs(frames.astype(float) - video.astype(float)).mean() < 8.0


def test_write_gif_decodes_with_frames_size_and_colours(tmp_path):
    video = export.to_uint8(_smooth_video(6, 20, 30, seed=1))
    path = export.write_gif(tmp_path / "a.gif", video, fps=10)
    frames, _, pts = _decode(path)
    assert frames.shape == (6, 20, 30, 3)
    np.testing.assert_allclose(np.diff(pts), 0.1, atol=0.011)  # Centisecond delays.
    err = np.abs(frames.astype(float) - video.astype(float)).mean()
    assert err < 6.0, err  # 256-colour palette of 4-bit bins.


def test_writers_reject_float_or_malformed_frames(tmp_path):
    with pytest.raises(ValueError, match="to_uint8"):
        export.write_mp4(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=4)
    with pytest.raises(ValueError, match=r"\[T, H, W, C\]"):
        export.write_gif(tmp_path / "x.gif", np.zeros((8, 8, 3), np.uint8), fps=4)


def test_video_grid_shape_and_placement():
    rng = np.random.default_rng(0)
    videos = rng.uniform(-1, 1, size=(5, 3, 4, 6, 3)).astype(np.float32)
    grid = export.video_grid(videos, ncols=3, border=2)
    assert grid.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2, 3)
    np.testing.assert_array_equal(grid[:, 2:6, 2:8], videos[0])
    np.testing.assert_array_equal(grid[:, 8:12, 10:16], videos[4])  # Row 1, column 1.
    np.testing.assert_array_equal(grid[:, 8:12, 18:24], 1.0)  # Empty sixth cell: border.
    np.testing.assert_array_equal(grid[:, :2], 1.0)
    uint8_grid = export.video_grid(export.to_uint8(videos), ncols=10, border=1)
    assert uint8_grid.shape == (3, 4 + 2, 5 * 7 + 1, 3) and uint8_grid[0, 0, 0, 0] == 255


def test_image_strip_picks_even_frames():
    video = np.arange(9)[:, None, None, None] * np.ones((9, 2, 3, 1))
    strip = export.image_strip(video, 3)
    assert strip.shape == (2, 9, 1)
    np.testing.assert_array_equal(strip[0, ::3, 0], [0, 4, 8])
    assert export.image_strip(video, 50).shape == (2, 27, 1)


def test_save_samples_names_and_files(tmp_path):
    videos = np.concatenate([_smooth_video(5, 16, 16, c=1, seed=s)[None] for s in range(3)])
    paths = export.save_samples(tmp_path, videos, labels=[3, 17, 3], seeds=[0, 0, 1], steps=2,
                                fps=6)
    names = [p.name for p in paths]
    assert names == ["label0003_seed0_steps2.mp4", "label0003_seed0_steps2.gif",
                     "label0017_seed0_steps2.mp4", "label0017_seed0_steps2.gif",
                     "label0003_seed1_steps2.mp4", "label0003_seed1_steps2.gif",
                     "grid_steps2.mp4", "grid_steps2.gif"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    grid_frames, _, _ = _decode(tmp_path / "grid_steps2.gif")
    assert grid_frames.shape == (5, 2 * 18 + 2, 2 * 18 + 2, 3)  # ceil(sqrt(3)) = 2 columns.
    sample, _, _ = _decode(paths[0])
    assert sample.shape == (5, 16, 16, 3)
    assert np.abs(sample[..., 0].astype(int) - sample[..., 2].astype(int)).max() <= 6  # Grey.
    with pytest.raises(ValueError, match="one label and seed"):
        export.save_samples(tmp_path, videos, labels=[1], seeds=[0, 1, 2], steps=1, fps=6)


def test_save_samples_gives_repeated_labels_their_own_files(tmp_path):
    # --sample.labels=0,5,17 --sample.num=16 repeats (label, seed): every clip needs its own file.
    videos = np.concatenate([_smooth_video(3, 8, 8, c=3, seed=s)[None] for s in range(4)])
    done = []
    paths = export.save_samples(tmp_path, videos, labels=[0, 5, 0, 5], seeds=[1] * 4, steps=2, fps=6,
                                indices=range(4), on_written=lambda: done.append(1))
    assert len(set(paths)) == len(paths) == 10 and all(p.is_file() for p in paths)
    assert len(os.listdir(tmp_path)) == 10 and len(done) == 4
    assert paths[4].name == "clip00002_label0000_seed1_steps2.mp4"
    with pytest.raises(ValueError, match="repeat .*indices="):
        export.save_samples(tmp_path / "b", videos, labels=[0, 5, 0, 5], seeds=[1] * 4, steps=2, fps=6)
