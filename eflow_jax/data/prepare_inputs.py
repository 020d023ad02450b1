"""What `prepare` reads: its numeric arguments (range-checked) and the list of videos under --src.

Every check here runs before anything is written to --out, and each error names the flag or the
file (with its line) to fix. Files that are not videos are counted and reported, never silently
dropped; broken symlinks stay in the list and are skipped (and listed) like any bad video.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections import Counter
from typing import Any

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")

# flag -> (lowest allowed, highest allowed or None, whether the lowest is excluded)
NUMERIC_LIMITS = {
    "frames": (1, None, False),
    "fps": (0, None, True),
    "size": (1, None, False),
    "clips_per_video": (1, None, False),
    "jpeg_quality": (1, 31, False),
    "max_seconds": (0, None, True),
    "workers": (1, None, False),
    "videos_per_shard": (1, None, False),
}


@dataclasses.dataclass(frozen=True)
class VideoItem:
    path: str | None  # None: listed in the annotations but not found under --src.
    name: str  # Path relative to --src (or the expected file name when missing).
    label: int


@dataclasses.dataclass(frozen=True)
class VideoList:
    items: list[VideoItem]  # Sorted by name.
    classes: list[str]  # Sorted; an item's label indexes this list.
    ignored: dict[str, int]  # Files under --src that are not videos, counted by extension.


def check_numeric_args(values: dict[str, Any]) -> None:
    """Raises ValueError naming every out-of-range numeric argument (e.g. --fps=-8, --size=0)."""
    problems = []
    for name, (low, high, exclusive) in NUMERIC_LIMITS.items():
        if name not in values:
            continue
        value = values[name]
        bad = (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
               or value < low or (exclusive and value == low) or (high is not None and value > high))
        if bad:
            allowed = f"> {low}" if exclusive else f">= {low}" if high is None else f"in [{low}, {high}]"
            problems.append(f"--{name}={value!r} (must be {allowed})")
    if problems:
        raise ValueError(f"prepare: {', '.join(problems)}; nothing was written.")


def _readable(path: str) -> bool:
    return os.path.isfile(path)  # False for dangling or looping symlinks (os.stat fails).


def file_size(path: str | None) -> int:
    """Size for the source hash: -1 for a missing file, -2 for an unreadable one (broken link)."""
    if path is None:
        return -1
    try:
        return os.path.getsize(path)
    except OSError:
        return -2


def _is_video(file: str) -> bool:
    return os.path.splitext(file)[1].lower() in VIDEO_EXTENSIONS


def _extension(file: str) -> str:
    return os.path.splitext(file)[1].lower() or "(none)"


def _index_videos(src: str) -> tuple[dict[str, str], Counter]:
    """(file stem -> path for every video under src at any depth, first in sorted order wins;
    the other files by extension)."""
    index: dict[str, str] = {}
    ignored: Counter = Counter()
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for file in sorted(files):
            if _is_video(file):
                index.setdefault(os.path.splitext(file)[0], os.path.join(root, file))
            else:
                ignored[_extension(file)] += 1
    return index, ignored


def _row_error(annotations: str, line: int, problem: str) -> ValueError:
    return ValueError(f"{annotations}:{line}: {problem}; fix or delete that line (columns "
                      f"{', '.join(KINETICS_COLUMNS)}).")


def list_kinetics_videos(src: str, annotations: str) -> VideoList:
    """Reads a Kinetics annotation CSV (utf-8, with or without Excel's byte-order mark)."""
    rows = []
    with open(annotations, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing_columns = [c for c in KINETICS_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise ValueError(f"{annotations} lacks Kinetics columns {missing_columns} (needs "
                             f"{KINETICS_COLUMNS}); its header is {reader.fieldnames}")
        for row in reader:
            empty = [c for c in KINETICS_COLUMNS if not (row.get(c) or "").strip()]
            if empty:
                raise _row_error(annotations, reader.line_num, f"empty or missing {empty}")
            try:
                start, end = int(float(row["time_start"])), int(float(row["time_end"]))
            except ValueError:
                raise _row_error(annotations, reader.line_num, f"time_start={row['time_start']!r}, "
                                 f"time_end={row['time_end']!r} are not numbers") from None
            rows.append((row["label"], f"{row['youtube_id']}_{start:06d}_{end:06d}"))
    classes = sorted({label for label, _ in rows})
    label_of = {name: i for i, name in enumerate(classes)}
    index, ignored = _index_videos(src)
    items = []
    for label, stem in rows:
        path = index.get(stem)
        name = os.path.relpath(path, src) if path else stem + ".mp4"
        items.append(VideoItem(path, name, label_of[label]))
    return VideoList(sorted(items, key=lambda item: item.name), classes, dict(ignored))


def list_class_folder_videos(src: str) -> VideoList:
    """Reads the src/<class_name>/<video> layout."""
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    items, ignored = [], Counter()
    for label, class_name in enumerate(classes):
        for file in sorted(os.listdir(os.path.join(src, class_name))):
            if _is_video(file):
                items.append(VideoItem(os.path.join(src, class_name, file), f"{class_name}/{file}", label))
            elif not os.path.isdir(os.path.join(src, class_name, file)):
                ignored[_extension(file)] += 1
    ignored["(outside a class folder)"] = sum(
        1 for f in os.listdir(src) if not os.path.isdir(os.path.join(src, f)))
    return VideoList(items, classes, {k: v for k, v in ignored.items() if v})


def list_videos(src: str, annotations: str | None) -> VideoList:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src} is not a directory")
    videos = list_kinetics_videos(src, annotations) if annotations else list_class_folder_videos(src)
    if not videos.items:
        raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) found for --src={src} "
                         f"--annotations={annotations} (ignored files by extension: {videos.ignored})")
    return videos


def broken_link_reason(path: str) -> str | None:
    """Why a listed video cannot be opened as a file (dangling or looping symlink), or None."""
    if _readable(path):
        return None
    if os.path.islink(path):
        try:
            os.stat(path)
        except OSError as e:
            return f"broken symlink -> {os.readlink(path)} ({e.strerror})"
    return "not a regular file"
