"""Reference forms of what eflow_jax/data/video_io.py does while streaming (test-only oracles).

read_video_resampled picks frames and resizes them one at a time as it decodes; these compute the
same results from whole arrays, in the plainest way, so the tests can compare the two.
"""

from collections.abc import Sequence

import numpy as np

from eflow_jax.data.video_io import center_crop, resize_frames, short_side_size


def resize_short_side_center_crop(frames_thwc: np.ndarray, size: int) -> np.ndarray:
    """Scales the short side to `size`, then takes the central size x size crop."""
    new_h, new_w = short_side_size(*frames_thwc.shape[1:3], size)
    return center_crop(resize_frames(frames_thwc, new_h, new_w), size)


def resample_indices(
    timestamps_s: Sequence[float], target_fps: float, source_fps: float | None = None
) -> np.ndarray:
    """Source frame index for each output frame, sampling at `target_fps` (nearest frame in time).

    Output frame k shows time k / target_fps after the first frame; it takes the first source
    frame i with k / target_fps < t_i + period / 2 (the nearest one for a constant rate). Frames
    repeat when target_fps exceeds the source rate. read_video_resampled streams the same rule.

    Args:
        timestamps_s: presentation times of the source frames in seconds (increasing).
        target_fps: the output frame rate.
        source_fps: the nominal source rate (default: from the median timestamp step).

    Returns:
        int64 indices into the source frames, one per output frame.
    """
    times = np.asarray(timestamps_s, np.float64) - timestamps_s[0]
    if source_fps is None:
        source_fps = 1.0 / float(np.median(np.diff(times))) if len(times) > 1 else target_fps
    half_period = 0.5 / source_fps
    num_outputs = int(np.ceil((times[-1] + half_period) * target_fps))
    targets = np.arange(num_outputs) / target_fps
    return np.searchsorted(times + half_period, targets, side="right").astype(np.int64)
