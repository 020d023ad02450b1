r"""Videos -> random-access ArrayRecord clips, once, before training.

  python -m eflow_jax.data.prepare --src=/data/k700/train --annotations=/data/k700/train.csv \
      --out=/data/k700_17x128 --frames=17 --fps=8 --size=128 --workers=32

Layouts: with --annotations, a Kinetics CSV (label, youtube_id, time_start, time_end, split) whose
clips are files named {youtube_id}_{start:06d}_{end:06d}.<ext> anywhere under --src, or captions
(WebVid / MSR-VTT style: a CSV with a video and a caption column, or JSON lines {"video", "caption"});
without it, --src/<class>/<video>. Each video is decoded once (PyAV), resampled to --fps, short-side
resized and center cropped to --size, cut into --clips_per_video clips of --frames frames, and stored
with JPEG frames (docs/DATA.md has the measurements behind the choice). Output: shards, labels.json,
manifest.json (counts, classes, shape, source hash, skipped files with reasons). Rerunning resumes:
finished shards (written to a temp name, renamed, then marked done by a report file) are kept. Bad
videos and bad captions are skipped and listed, never fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from array_record.python import array_record_module

from eflow_jax.data import video_io
from eflow_jax.data.prepare_inputs import (  # noqa: F401 (VIDEO_EXTENSIONS, VideoItem: part of this API)
    MAX_LISTED_DUPLICATES,
    VIDEO_EXTENSIONS,
    VideoItem,
    broken_link_reason,
    caption_problem,
    check_numeric_args,
    file_size,
    list_videos,
)
from eflow_jax.data.sources import MANIFEST_NAME, WRITER_OPTIONS, pack_record
from eflow_jax.data.tfds_export import export_tfds  # noqa: F401 (part of this command's API)


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """What every clip looks like. Part of the source hash: changing any of it needs a new --out."""

    frames: int = 17
    fps: float = 8.0
    size: int = 128
    clips_per_video: int = 1
    # 'jpeg' (per frame, quantiser `jpeg_quality`) or 'raw' (uint8, zstd-compressed ArrayRecord).
    codec: str = "jpeg"
    jpeg_quality: int = 2
    max_seconds: float = 60.0  # Decode at most this much of each video (Kinetics clips are 10 s).


def source_hash(
    items: Sequence[VideoItem], settings: PrepareSettings, classes: Sequence[str]
) -> str:
    """Hash of the inputs (names, sizes, labels) and settings; a resumed run must match it."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(settings), list(classes)]).encode())
    for item in items:
        size = file_size(item.path)
        line = f"{item.name}\t{size}\t{item.label}"
        if item.caption is not None:  # Label datasets hash as they always did (resumable across versions).
            line += f"\t{item.caption!r}"
        digest.update((line + "\n").encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def clip_starts(num_available: int, clip_frames: int, clips_per_video: int) -> list[int]:
    """Starts of up to clips_per_video non-overlapping clips, spread evenly (one: the center)."""
    count = min(clips_per_video, num_available // clip_frames)
    if count == 1:
        return [(num_available - clip_frames) // 2]
    return [int(s) for s in np.linspace(0, num_available - clip_frames, count).round()]


def encode_clip(clip_thwc: np.ndarray, *, settings: PrepareSettings, meta: dict[str, Any]) -> bytes:
    """One prepared clip as a record (see sources.decode_clip_record for the reader)."""
    meta = dict(meta, codec=settings.codec, shape=list(clip_thwc.shape))
    if settings.codec == "jpeg":
        frames = video_io.encode_jpeg_frames(clip_thwc, quality=settings.jpeg_quality)
        return pack_record(meta=meta, blobs={"frames": frames})
    return pack_record(meta=meta, arrays={"video": clip_thwc})


def prepare_video(item: VideoItem, settings: PrepareSettings) -> tuple[list[bytes], dict | None]:
    """Decodes one video into clip records: (records, None), or ([], skip entry with reason)."""

    def skip(category: str, reason: str):
        return [], {"file": item.name, "category": category, "reason": reason}

    if item.caption is not None and caption_problem(item.caption):
        return skip(*caption_problem(item.caption))
    if item.path is None:
        return skip("missing", "listed in the annotations, not found under --src")
    broken = broken_link_reason(item.path)
    if broken:
        return skip("broken-link", broken)
    try:
        frames, indices, src_fps = video_io.read_video_resampled(
            item.path, fps=settings.fps, size=settings.size, max_seconds=settings.max_seconds
        )
    except video_io.VideoDecodeError as e:
        return skip(e.kind, str(e))
    except Exception as e:  # noqa: BLE001 - one odd file must never stop a 600k-video run.
        return skip("error", f"{type(e).__name__}: {e}")
    if len(frames) < settings.frames:
        return skip(
            "too-short",
            f"{len(frames)} frames at {settings.fps:g} fps < {settings.frames} "
            f"(source {src_fps:.3g} fps)",
        )
    records = []
    for start in clip_starts(len(frames), settings.frames, settings.clips_per_video):
        meta = {
            "label": item.label,
            "source": item.name,
            "clip_start": start,
            "source_frame_indices": indices[start : start + settings.frames].tolist(),
        }
        if item.caption is not None:
            meta["caption"] = item.caption.strip()
        records.append(
            encode_clip(frames[start : start + settings.frames], settings=settings, meta=meta)
        )
    return records, None


def _shard_name(index: int, count: int) -> str:
    return f"clips-{index:05d}-of-{count:05d}.array_record"


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def prepare_shard(task: tuple[str, str, list[VideoItem], PrepareSettings]) -> dict[str, Any]:
    """Writes one shard (temp file, then rename) and its report (the 'done' mark); in a worker."""
    out, shard_name, items, settings = task
    # Per process: a worker orphaned by a killed run never writes into the file of a resumed one.
    tmp_path = os.path.join(out, f".tmp-{shard_name}.{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(
        tmp_path, WRITER_OPTIONS["uncompressed" if settings.codec == "jpeg" else "zstd"]
    )
    # Set in a worker process only: a nohup'ed single-process run must survive its shell.
    parent = multiprocessing.parent_process()
    num_clips, skipped = 0, []
    for item in items:
        if parent is not None and not parent.is_alive():  # Killed (SIGKILL): stop writing into --out.
            writer.close()
            os.remove(tmp_path)
            print(f"[prepare] worker {os.getpid()}: parent {parent.pid} died, stopping", file=sys.stderr)
            os._exit(1)  # Nobody is left to take an exception, and the pool's queue would block.
        records, skip = prepare_video(item, settings)
        for record in records:
            writer.write(record)
        num_clips += len(records)
        skipped += [skip] if skip else []
    writer.close()
    os.replace(tmp_path, os.path.join(out, shard_name))
    report = {
        "file": shard_name,
        "num_examples": num_clips,
        "num_videos": len(items),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    _write_json_atomic(os.path.join(out, shard_name + ".report.json"), report)
    return report


def _write_manifest(
    out: str,
    *,
    settings: PrepareSettings,
    classes: Sequence[str],
    reports: Sequence[dict[str, Any]],
    **extra,
) -> dict[str, Any]:
    """Writes labels.json and, last (its presence means "complete"), manifest.json."""
    skipped = [s for r in reports for s in r.get("skipped", [])]
    manifest = {
        "kind": "clips",
        "format": "eflow_jax.clips/v1",
        "num_examples": sum(r["num_examples"] for r in reports),
        **extra,
        "num_skipped": len(skipped),
        "skipped_by_category": dict(Counter(s["category"] for s in skipped)),
        "num_classes": len(classes),
        "classes": list(classes),
        "clip_shape": [settings.frames, settings.size, settings.size, 3],
        "fps": settings.fps,
        "settings": dataclasses.asdict(settings),
        # Shards without clips (every video skipped) are left out: readers cannot open empty files.
        "shards": [
            {"file": r["file"], "num_examples": r["num_examples"]}
            for r in reports
            if r["num_examples"]
        ],
        "skipped": skipped,
    }
    labels = {name: i for i, name in enumerate(classes)}
    _write_json_atomic(os.path.join(out, "labels.json"), labels)
    _write_json_atomic(os.path.join(out, MANIFEST_NAME), manifest)
    return manifest


def _load_done_report(out: str, shard_name: str) -> dict[str, Any] | None:
    report_path = os.path.join(out, shard_name + ".report.json")
    if os.path.exists(report_path) and os.path.exists(os.path.join(out, shard_name)):
        with open(report_path) as f:
            return json.load(f)
    return None


def _check_plan(out: str, fingerprint: str, settings: PrepareSettings) -> None:
    """Refuses to resume into `out` when it was started with other inputs or settings."""
    os.makedirs(out, exist_ok=True)
    plan_path = os.path.join(out, "plan.json")
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old_hash = json.load(f)["source_hash"]
        if old_hash != fingerprint:
            raise ValueError(
                f"{out} holds a preparation of different videos or settings (hash "
                f"{old_hash[:12]} vs {fingerprint[:12]}); use a new --out or delete {out}"
            )
    plan = {"source_hash": fingerprint, "settings": dataclasses.asdict(settings)}
    _write_json_atomic(plan_path, plan)


class Stopped(Exception):
    """SIGTERM / SIGHUP during preparation: workers were stopped; rerunning resumes."""


def _raise_stopped(signum, frame):
    raise Stopped(f"stopped by {signal.Signals(signum).name}")


def _stop_workers(pool: futures.ProcessPoolExecutor, out: str) -> None:
    """Kills the workers (their current shards are redone on resume) and removes their temp files."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)
    for process in processes:
        for tmp in glob.glob(os.path.join(glob.escape(out), f".tmp-*.{process.pid}")):
            os.remove(tmp)


def _run_shards(todo: list, workers: int, log: Callable[[str], None],
                work: Callable[[Any], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Runs `work` (prepare_shard) over `todo` (in `workers` processes), logging one line each.

    On SIGTERM/SIGHUP or any error the worker processes are killed before this returns: left
    running, they would keep writing into --out after the parent died.
    """
    work = work or prepare_shard
    pool, previous = None, {}
    if workers > 1 and len(todo) > 1:
        # 'spawn': decoders start threads, and forking a threaded parent is unsafe. An executor (not
        # a Pool) fails loudly if a worker dies (e.g. a decoder crash) instead of waiting forever.
        context = multiprocessing.get_context("spawn")
        pool = futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context)
        if threading.current_thread() is threading.main_thread():
            previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
        submitted = [pool.submit(work, task) for task in todo]
        results = (future.result() for future in futures.as_completed(submitted))
    else:
        results = map(work, todo)
    total_videos = sum(len(task[2]) for task in todo)
    reports, videos_done, started, finished = [], 0, time.time(), False
    try:
        for report in results:
            reports.append(report)
            videos_done += report["num_videos"]
            rate = videos_done / max(time.time() - started, 1e-9)
            log(
                f"[prepare] {len(reports)}/{len(todo)} shards: {report['file']} "
                f"{report['num_examples']} clips, {report['num_skipped']} skipped | "
                f"{rate:.1f} videos/s, eta {(total_videos - videos_done) / rate:.0f} s"
            )
        finished = True
    finally:
        if pool is not None:
            if finished:
                pool.shutdown()
            else:
                _stop_workers(pool, todo[0][0])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return reports


def prepare_dataset(
    src: str,
    out: str,
    *,
    annotations: str | None = None,
    settings: PrepareSettings = PrepareSettings(),
    workers: int = 1,
    videos_per_shard: int = 256,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Prepares (or resumes preparing) a clip dataset; returns the manifest it writes.

    Args:
        src: video directory.
        out: output directory (created).
        annotations: a Kinetics CSV, caption annotations (CSV or JSON lines), or None for the
          src/<class>/<video> layout.
        settings: clip shape, fps, codec.
        workers: processes decoding videos (1: in this process).
        videos_per_shard: videos per shard: the unit of parallel work and of resumption.
        log: where progress lines go.
    """
    if settings.codec not in ("jpeg", "raw"):
        raise ValueError(f"codec must be 'jpeg' or 'raw', got {settings.codec!r}")
    check_numeric_args(dict(dataclasses.asdict(settings), workers=workers, videos_per_shard=videos_per_shard))
    videos = list_videos(src, annotations, out)
    items, classes = videos.items, videos.classes
    fingerprint = source_hash(items, settings, classes)
    _check_plan(out, fingerprint, settings)

    num_shards = -(-len(items) // videos_per_shard)
    names = [_shard_name(i, num_shards) for i in range(num_shards)]
    reports = {name: _load_done_report(out, name) for name in names}
    todo = [
        (out, name, items[i * videos_per_shard : (i + 1) * videos_per_shard], settings)
        for i, name in enumerate(names)
        if reports[name] is None
    ]
    if videos.duplicates:
        relabelled = (f", {videos.relabelled} of them under another label (the first row's label is kept)"
                      if videos.relabelled else "")
        log(f"[prepare] warning: {len(videos.duplicates)} rows of {annotations} list a video again{relabelled}; "
            f"kept the first row of each (e.g. {videos.duplicates[0]}; all in manifest.json)")
    if videos.skipped_out:
        log(f"[prepare] --out={out} is inside --src: left out of the listing")
    log(
        f"[prepare] {len(items)} videos, "
        + ("captioned" if videos.captioned else f"{len(classes)} classes")
        + f", {num_shards} shards "
        f"({num_shards - len(todo)} already done), {workers} worker(s)"
        + (f"; ignored {sum(videos.ignored.values())} files that are not videos "
           f"({', '.join(VIDEO_EXTENSIONS)}): {videos.ignored}" if videos.ignored else "")
    )
    reports.update({report["file"]: report for report in _run_shards(todo, workers, log)})

    ordered = [reports[name] for name in names]
    num_skipped = sum(r["num_skipped"] for r in ordered)
    manifest = _write_manifest(
        out,
        settings=settings,
        classes=classes,
        reports=ordered,
        num_videos=len(items),
        num_videos_used=len(items) - num_skipped,
        ignored_files=videos.ignored,
        source={"src": os.path.abspath(src), "annotations": annotations, "hash": fingerprint},
        **(_caption_fields(videos) if videos.captioned else _duplicate_fields(videos) if videos.duplicates else {}),
    )
    log(
        f"[prepare] done: {manifest['num_examples']} clips from {manifest['num_videos_used']} "
        f"videos; skipped {num_skipped} {manifest['skipped_by_category'] or ''} "
        + (f"; {len(videos.duplicates)} duplicate annotation rows dropped " if videos.duplicates else "")
        + f"(listed in {out}/manifest.json)"
    )
    return manifest


def _caption_fields(videos) -> dict[str, Any]:
    """Manifest fields of a captioned dataset: the flag readers check, and the dropped duplicate rows."""
    return {"captioned": True, **_duplicate_fields(videos)}


def _duplicate_fields(videos) -> dict[str, Any]:
    """The dropped duplicate annotation rows (counted; listed up to MAX_LISTED_DUPLICATES)."""
    fields = {"num_duplicate_rows": len(videos.duplicates), "duplicate_rows": videos.duplicates[:MAX_LISTED_DUPLICATES]}
    if videos.relabelled:
        fields["num_relabelled_rows"] = videos.relabelled
    return fields


def write_clips(
    out: str,
    examples: Iterable[dict[str, Any]],
    *,
    settings: PrepareSettings,
    classes: Sequence[str],
    examples_per_shard: int = 256,
) -> dict[str, Any]:
    """Writes in-memory clips ({'video': uint8 [T,H,W,3], 'label': int, optional 'caption': str}) as a
    prepared dataset (captioned when the first example has a caption; then all must).

    For clips that exist as arrays already (synthetic data, benchmarks, tests); videos go through
    prepare_dataset. Reads back with sources.ArrayRecordClipSource.
    """
    os.makedirs(out, exist_ok=True)
    options = WRITER_OPTIONS["uncompressed" if settings.codec == "jpeg" else "zstd"]
    shards, writer, captioned = [], None, None
    for i, example in enumerate(examples):
        if captioned is None:
            captioned = "caption" in example
        if captioned and caption_problem(example.get("caption")):
            raise ValueError(f"clip {i}: {caption_problem(example.get('caption'))[1]}")
        if not captioned and "caption" in example:
            raise ValueError(f"clip {i} has a caption but clip 0 has none: caption every clip or none")
        if writer is None or shards[-1]["num_examples"] == examples_per_shard:
            if writer is not None:
                writer.close()
            shards.append({"file": f"clips-{len(shards):05d}.array_record", "num_examples": 0})
            writer = array_record_module.ArrayRecordWriter(
                os.path.join(out, shards[-1]["file"]), options
            )
        video = np.asarray(example["video"], np.uint8)
        if video.shape != (settings.frames, settings.size, settings.size, 3):
            raise ValueError(
                f"clip {i} is {video.shape}, settings say "
                f"{(settings.frames, settings.size, settings.size, 3)}"
            )
        meta = {"label": int(example["label"]), "source": f"example-{i}"}
        if captioned:
            meta["caption"] = example["caption"].strip()
        writer.write(encode_clip(video, settings=settings, meta=meta))
        shards[-1]["num_examples"] += 1
    if writer is not None:
        writer.close()
    return _write_manifest(out, settings=settings, classes=classes, reports=shards,
                           **({"captioned": True} if captioned else {}))


_FLAGS = [  # (flag, argparse keywords); the PrepareSettings fields are filled from the same names.
    ("--src", dict(required=True, help="Directory of videos.")),
    ("--annotations", dict(help="Kinetics CSV, or captions (CSV with video + caption columns, or JSON "
                                "lines); omit for the src/<class>/<video> layout.")),
    ("--out", dict(required=True, help="Output directory (rerun to resume).")),
    ("--frames", dict(type=int, default=17, help="Frames per clip.")),
    ("--fps", dict(type=float, default=8.0, help="Clip frame rate.")),
    ("--size", dict(type=int, default=128, help="Clip height = width (short-side resize, crop).")),
    ("--clips_per_video", dict(type=int, default=1, help="Non-overlapping clips per video.")),
    ("--codec", dict(choices=["jpeg", "raw"], default="jpeg", help="See docs/DATA.md.")),
    ("--jpeg_quality", dict(type=int, default=2, help="JPEG quantiser scale, 1 (best) to 31.")),
    ("--max_seconds", dict(type=float, default=60.0, help="Decode at most this much per video.")),
    ("--workers", dict(type=int, default=os.cpu_count() or 1, help="Decoding processes.")),
    ("--videos_per_shard", dict(type=int, default=256, help="Unit of work and of resumption.")),
    ("--tfds_name", dict(help="Also write a TF-free TFDS copy with this name under OUT/tfds.")),
]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eflow_jax.data.prepare", description=__doc__.split("\n\n")[0]
    )
    for flag, kwargs in _FLAGS:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    fields = [f.name for f in dataclasses.fields(PrepareSettings)]
    settings = PrepareSettings(**{name: getattr(args, name) for name in fields})
    try:
        manifest = prepare_dataset(
            args.src,
            args.out,
            annotations=args.annotations,
            settings=settings,
            workers=args.workers,
            videos_per_shard=args.videos_per_shard,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except Stopped as e:
        sys.exit(f"[prepare] {e}; workers stopped. Rerun the same command to resume.")
    except ValueError as e:  # Bad arguments or annotations: the message names the fix.
        sys.exit(f"[prepare] {e}")
    if args.tfds_name:
        print(f"[prepare] TFDS copy: {export_tfds(args.out, args.tfds_name)}", file=sys.stderr)
    if not manifest["num_examples"]:
        sys.exit("[prepare] no clips were produced: see 'skipped' in manifest.json")


if __name__ == "__main__":
    main()
