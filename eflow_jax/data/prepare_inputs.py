"""What `prepare` reads: its numeric arguments (range-checked) and the list of videos under --src.

Every check here runs before anything is written to --out, and each error names the flag or the
file (with its line) to fix. Files that are not videos are counted and reported, never silently
dropped; broken symlinks stay in the list and are skipped (and listed) like any bad video.

Annotation files: a Kinetics CSV (labels), or captions (WebVid / MSR-VTT style) as a CSV with a
video column and a caption column (found by header name) or as JSON lines. A caption is kept as
read (undecodable bytes survive as surrogates) and judged per video by `caption_problem` when the
video is prepared, so a bad caption skips its clip and is counted, never stops the run.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
# Caption annotations: the first header name (case-insensitive) found in each list is used.
VIDEO_COLUMNS = ("video", "path", "video_path", "videoid", "video_id", "file", "filename")
CAPTION_COLUMNS = ("caption", "text", "name", "title", "sentence")
MAX_LISTED_DUPLICATES = 100  # The manifest lists this many duplicate rows; it counts them all.

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
    # Captioned datasets: the caption as read, "" when absent (JSON may give a non-string; caption_problem
    # judges it when the video is prepared). None: a label dataset.
    caption: Any = None


@dataclasses.dataclass(frozen=True)
class VideoList:
    items: list[VideoItem]  # Sorted by name.
    classes: list[str]  # Sorted; an item's label indexes this list. Empty for captioned datasets.
    ignored: dict[str, int]  # Files under --src that are not videos, counted by extension.
    captioned: bool = False
    duplicates: list[str] = dataclasses.field(default_factory=list)  # 'file:line: video' of rows dropped.
    relabelled: int = 0  # Of those, rows that gave the clip another label than its first row.
    skipped_out: bool = False  # --out is inside --src and was left out of the listing.


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


def _index_videos(src: str, skip: str | None = None) -> tuple[dict[str, str], Counter]:
    """(file stem -> path for every video under src at any depth, first in sorted order wins;
    the other files by extension). `skip`: a folder (real path) left out, --out when it is inside --src."""
    index: dict[str, str] = {}
    ignored: Counter = Counter()
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
        for file in sorted(files):
            if _is_video(file):
                index.setdefault(os.path.splitext(file)[0], os.path.join(root, file))
            else:
                ignored[_extension(file)] += 1
    return index, ignored


def _row_error(annotations: str, line: int, problem: str) -> ValueError:
    return ValueError(f"{annotations}:{line}: {problem}; fix or delete that line (columns "
                      f"{', '.join(KINETICS_COLUMNS)}).")


def list_kinetics_videos(src: str, annotations: str, skip: str | None = None) -> VideoList:
    """Reads a Kinetics annotation CSV (utf-8, with or without Excel's byte-order mark).

    A clip listed again is dropped (its first row, and so its first label, wins) and reported, with
    both labels when they differ."""
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
            rows.append((reader.line_num, row["label"], f"{row['youtube_id']}_{start:06d}_{end:06d}"))
    first: dict[str, tuple[int, str]] = {}
    kept, duplicates, relabelled = [], [], 0
    for line, label, stem in rows:
        if stem in first:
            first_line, first_label = first[stem]
            other = f", labelled {first_label!r} there, {label!r} here" if label != first_label else ""
            relabelled += bool(other)
            duplicates.append(f"{os.path.basename(annotations)}:{line}: {stem} (first on line {first_line}{other})")
            continue
        first[stem] = (line, label)
        kept.append((label, stem))
    classes = sorted({label for _, label, _ in rows})  # Every label of the file: ids do not hang on duplicates.
    label_of = {name: i for i, name in enumerate(classes)}
    index, ignored = _index_videos(src, skip)
    items = []
    for label, stem in kept:
        path = index.get(stem)
        name = os.path.relpath(path, src) if path else stem + ".mp4"
        items.append(VideoItem(path, name, label_of[label]))
    return VideoList(sorted(items, key=lambda item: item.name), classes, dict(ignored), duplicates=duplicates,
                     relabelled=relabelled)


def list_class_folder_videos(src: str, skip: str | None = None) -> VideoList:
    """Reads the src/<class_name>/<video> layout (`skip`: a folder, by real path, that is no class)."""
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d))
                     and os.path.realpath(os.path.join(src, d)) != skip)
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


def caption_problem(caption: Any) -> tuple[str, str] | None:
    """(skip category, reason) for a caption that cannot be stored, else None."""
    if caption is None:
        return "caption-empty", "no caption"
    if not isinstance(caption, str):
        return "caption-not-text", f"caption is a {type(caption).__name__}, not text: {caption!r:.100}"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        shown = caption.encode("utf-8", "surrogateescape" if _escapable(caption) else "backslashreplace")
        return "caption-not-utf8", f"caption is not valid UTF-8: {shown[:200]!r}"
    if not caption.strip():
        return "caption-empty", "caption is empty or whitespace only"
    return None


def _escapable(text: str) -> bool:
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _pick_column(fields: Sequence[str], wanted: Sequence[str]) -> str | None:
    by_name = {f.strip().lower(): f for f in fields}
    return next((by_name[w] for w in wanted if w in by_name), None)


def _read_caption_rows(annotations: str) -> list[tuple[int, str, Any]]:
    """(line, video, caption) from a caption CSV or JSON lines file. Undecodable bytes are kept as
    surrogates (the caption is judged later); a row without a video is an error naming its line."""
    with open(annotations, "rb") as f:
        text = f.read().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    rows = []
    if _is_json_lines(annotations, text):
        for line, raw in enumerate(text.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{annotations}:{line}: not a JSON object ({e.msg}); fix or delete that "
                                 f"line (one {{\"video\": ..., \"caption\": ...}} per line).") from None
            video_key = _pick_column(list(row), VIDEO_COLUMNS) if isinstance(row, dict) else None
            if video_key is None or row[video_key] in (None, ""):
                raise ValueError(f"{annotations}:{line}: no video (keys {list(VIDEO_COLUMNS)}); fix or delete "
                                 "that line.")
            caption_key = _pick_column(list(row), CAPTION_COLUMNS)
            rows.append((line, str(row[video_key]), row.get(caption_key) if caption_key else None))
        return rows
    reader = csv.DictReader(io.StringIO(text, newline=""))
    video_col = _pick_column(reader.fieldnames or [], VIDEO_COLUMNS)
    caption_col = _pick_column(reader.fieldnames or [], CAPTION_COLUMNS)
    if video_col is None or caption_col is None:
        raise ValueError(f"{annotations}: header {reader.fieldnames} has neither the Kinetics columns "
                         f"{list(KINETICS_COLUMNS)} nor a video column (one of {list(VIDEO_COLUMNS)}) and a "
                         f"caption column (one of {list(CAPTION_COLUMNS)})")
    for row in reader:
        video = (row.get(video_col) or "").strip()
        if not video:
            raise ValueError(f"{annotations}:{reader.line_num}: empty or missing {video_col!r}; fix or delete "
                             "that line.")
        rows.append((reader.line_num, video, row.get(caption_col)))
    return rows


def _is_json_lines(annotations: str, text: str) -> bool:
    if annotations.lower().endswith((".jsonl", ".json", ".ndjson")):
        return True
    return text.lstrip().startswith("{")


def _is_kinetics_csv(annotations: str) -> bool:
    with open(annotations, newline="", encoding="utf-8-sig", errors="replace") as f:
        header = next(csv.reader(f), [])
    return all(c in header for c in KINETICS_COLUMNS)


def list_caption_videos(src: str, annotations: str, skip: str | None = None) -> VideoList:
    """Reads caption annotations (CSV or JSON lines, see the module docstring).

    A video is a path relative to --src, an absolute path, or a file stem (WebVid's 'videoid')
    found anywhere under --src. A video listed again is dropped (its first row wins) and reported.
    """
    rows = _read_caption_rows(annotations)
    index: dict[str, str] | None = None
    ignored: Counter = Counter()
    items, first_line, duplicates = [], {}, []
    for line, video, caption in rows:
        candidate = video if os.path.isabs(video) else os.path.join(src, video)
        if os.path.lexists(candidate):
            path = candidate
        else:
            if index is None:  # Only when a row is not a path: walking a large --src takes a while.
                index, ignored = _index_videos(src, skip)
            path = index.get(os.path.splitext(os.path.basename(video))[0])
        name = os.path.relpath(path, src) if path else video
        if name.startswith(".." + os.sep):
            name = os.path.abspath(path)
        if name in first_line:
            duplicates.append(f"{os.path.basename(annotations)}:{line}: {name} (first on line {first_line[name]})")
            continue
        first_line[name] = line
        items.append(VideoItem(path, name, 0, "" if caption is None else caption))
    return VideoList(sorted(items, key=lambda item: item.name), [], dict(ignored), captioned=True,
                     duplicates=duplicates)


def list_videos(src: str, annotations: str | None, out: str | None = None) -> VideoList:
    """The videos of --src. `out` (--out) inside --src is left out: its shards are no videos, and in
    the class-folder layout it would become a class on the second run."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src={src} is not a directory")
    skip = None
    if out is not None:
        src_real, out_real = os.path.realpath(src), os.path.realpath(out)
        if out_real == src_real:
            raise ValueError(f"--out={out} is --src itself: the shards would land among the videos; use another "
                             f"--out (e.g. beside --src).")
        if os.path.commonpath([src_real, out_real]) == src_real:
            skip = out_real
    if not annotations:
        videos = list_class_folder_videos(src, skip)
    elif _is_kinetics_csv(annotations):
        videos = list_kinetics_videos(src, annotations, skip)
    else:
        videos = list_caption_videos(src, annotations, skip)
    if skip is not None:
        videos = dataclasses.replace(videos, skipped_out=True)
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
