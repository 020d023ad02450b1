r"""Prepared clips -> normalised VAE latents, once: the step after `python -m eflow_jax.data.prepare`.

  python -m eflow_jax.data.encode_latents --vae=/models/Wan2.1-T2V-1.3B-Diffusers/vae \
      --data=/data/kinetics700_17x256 --out=/data/kinetics700_17x256_latents --batch=16

Reads the clips (`sources.ArrayRecordClipSource`, JPEG decode in threads), scales uint8 to
[-1, 1] as training does, encodes them with the Wan 2.1 VAE (`models.wan_vae`, batches split
over the local devices) and writes `latents-XXXXX-of-YYYYY.array_record` shards that
`sources.LatentSource` (data.source='latents') reads: one record per clip with the latent
[T', h, w, 16] (float16 by default), its label, and its caption when the clip record has one.

Resumable: clip i goes to shard i // examples_per_shard; a shard is written to a temp name,
renamed, then marked done by `<shard>.report.json`. A rerun keeps finished shards and redoes the
rest; `plan.json` pins the VAE digest, the clips and the settings, so a rerun with another VAE or
other clips is refused. `manifest.json` is written last (its presence: complete) and records the
VAE (dir, sha256 of config.json + weights, latents_mean/std), the clip and latent shapes.
Training checks it with `check_latents_match_vae(manifest, vae_dir)`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from typing import Any

import numpy as np
from array_record.python import array_record_module

from eflow_jax.data import sources
from eflow_jax.data.sources import MANIFEST_NAME, WRITER_OPTIONS, pack_record
from eflow_jax.progress import format_progress

FORMAT = "eflow_jax.latents/v1"
STORE_DTYPES = ("float16", "float32")  # bfloat16 has no portable numpy dtype string.


@dataclasses.dataclass(frozen=True)
class EncodeSettings:
    """What the latents depend on (in plan.json: a rerun with other values is refused)."""

    examples_per_shard: int = 1024  # Clips per shard: the unit of resumption.
    dtype: str = "float16"  # Stored latent dtype: float16 (half the disk; rounding ~5e-4 relative) | float32.
    compute_dtype: str = "bfloat16"  # The VAE's conv dtype: bfloat16 | float32.


def _shard_name(index: int, count: int) -> str:
    return f"latents-{index:05d}-of-{count:05d}.array_record"


def _write_json_atomic(path: str, value: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class _ClipsWithMeta(sources.ArrayRecordClipSource):
    """Prepared clips plus the record meta the latents keep (caption, source file, clip start)."""

    def _decode(self, data: bytes) -> dict[str, Any]:
        example = sources.decode_clip_record(data)
        meta = sources.unpack_record(data)["meta"]
        example["meta"] = {k: meta[k] for k in ("caption", "source", "clip_start") if k in meta}
        return example


def _check_clip_shape(clip_shape: Sequence[int], data_dir: str, spatial: int, temporal: int) -> None:
    t, h, w = clip_shape[:3]
    if (t - 1) % temporal or h % spatial or w % spatial:
        raise ValueError(
            f"clips in {data_dir} are {list(clip_shape)}: the VAE needs 1 + {temporal}k frames and sides "
            f"that are multiples of {spatial} (e.g. prepare with --frames=17 --size=256)")


def _read_ahead(source, indices: Sequence[int], batch: int, pool: futures.Executor, ahead: int = 2):
    """Yields lists of examples (None for corrupt ones), `ahead` batches decoded in advance."""
    groups = [indices[i : i + batch] for i in range(0, len(indices), batch)]
    pending: collections.deque = collections.deque()
    for group in groups[:ahead]:
        pending.append([pool.submit(source.__getitem__, i) for i in group])
    for next_group in range(ahead, len(groups) + ahead):
        done = pending.popleft()
        if next_group < len(groups):
            pending.append([pool.submit(source.__getitem__, i) for i in groups[next_group]])
        yield [f.result() for f in done]


def encode_shard(vae, source, out_dir: str, name: str, indices: Sequence[int], *, batch: int,
                 dtype: str, pool: futures.Executor, progress: Callable[[int], None]) -> dict:
    """Encodes clips `indices` into shard `name` (temp file, rename, report = done mark)."""
    tmp_path = os.path.join(out_dir, f".tmp-{name}.{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(tmp_path, WRITER_OPTIONS["uncompressed"])
    written, corrupt, previous = 0, [], None

    def flush(item):
        nonlocal written
        examples, latents = item
        for (index, example), latent in zip(examples, np.asarray(latents)[: len(examples)].astype(dtype), strict=True):
            meta = {"label": int(example["label"]), "clip_index": int(index), **example["meta"]}
            writer.write(pack_record(meta=meta, arrays={"latent": latent}))
        written += len(examples)

    batches = _read_ahead(source, list(indices), batch, pool)
    for group_start, examples in zip(range(0, len(indices), batch), batches, strict=True):
        good = [(indices[group_start + j], e) for j, e in enumerate(examples) if e is not None]
        corrupt += [int(indices[group_start + j]) for j, e in enumerate(examples) if e is None]
        if good:
            videos = np.stack([e["video"] for _, e in good])
            if len(good) < batch:  # Full batches only: one compiled program.
                videos = np.concatenate([videos, np.repeat(videos[-1:], batch - len(good), axis=0)])
            # Dispatch this batch before writing the last one: the device works while we write.
            current = (good, vae.encode(videos))
            if previous is not None:
                flush(previous)
            previous = current
        progress(len(examples))
    if previous is not None:
        flush(previous)
    writer.close()
    final = os.path.join(out_dir, name)
    if written:
        os.replace(tmp_path, final)
    else:  # Readers cannot open an empty shard; the report alone marks it done.
        os.remove(tmp_path)
    report = {"file": name, "num_examples": written, "num_clips": len(indices), "corrupt_clips": corrupt}
    _write_json_atomic(os.path.join(out_dir, name + ".report.json"), report)
    return report


def _done_report(out_dir: str, name: str) -> dict | None:
    path = os.path.join(out_dir, name + ".report.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return report if not report["num_examples"] or os.path.exists(os.path.join(out_dir, name)) else None


def _check_plan(out_dir: str, plan: dict) -> None:
    """Refuses to resume into `out_dir` when it was started with another VAE, clips or settings."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = [k for k in plan if old.get(k) != plan[k]]
        if changed:
            raise ValueError(
                f"{out_dir} holds latents made with another {', '.join(changed)} "
                f"({', '.join(f'{k}: {old.get(k)} -> {plan[k]}' for k in changed)}); use a new --out "
                f"or delete {out_dir}")
    _write_json_atomic(path, plan)


def encode_dataset(
    vae_dir: str,
    data_dir: str,
    out_dir: str,
    *,
    settings: EncodeSettings = EncodeSettings(),
    batch: int = 8,
    latents_per_step: int = 1,
    read_threads: int = 8,
    log: Callable[[str], None] = print,
    vae=None,
) -> dict[str, Any]:
    """Encodes (or resumes encoding) a prepared clip dataset; returns the manifest it writes.

    Args:
        vae_dir: the VAE checkpoint dir (config.json + diffusion_pytorch_model.safetensors).
        data_dir: clips made by `python -m eflow_jax.data.prepare`.
        out_dir: latents output dir (created; rerun to resume).
        settings: shard size and dtypes (pinned in plan.json).
        batch: clips per encode call (split over the local devices).
        latents_per_step: latents per scan step of the VAE (speed/memory only).
        read_threads: threads reading and JPEG-decoding clips ahead of the device.
        log: where progress lines go.
        vae: an already loaded VideoVAE of `vae_dir` (tests); loaded here when None.
    """
    from eflow_jax.models import wan_vae  # jax is only needed once there is work to do.

    if settings.dtype not in STORE_DTYPES:
        raise ValueError(f"--dtype must be one of {STORE_DTYPES}, got {settings.dtype!r}")
    if settings.compute_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"--compute_dtype must be bfloat16 or float32, got {settings.compute_dtype!r}")
    for flag, value in (("batch", batch), ("examples_per_shard", settings.examples_per_shard),
                        ("read_threads", read_threads), ("latents_per_step", latents_per_step)):
        if value < 1:
            raise ValueError(f"--{flag} must be >= 1, got {value}")
    record = wan_vae.vae_record(vae_dir)
    source = _ClipsWithMeta(data_dir, on_corrupt="skip")
    clip_shape = list(source.clip_shape)
    _check_clip_shape(clip_shape, data_dir, record["spatial_factor"], record["temporal_factor"])
    t, h, w = clip_shape[:3]
    latent_shape = [1 + (t - 1) // record["temporal_factor"], h // record["spatial_factor"],
                    w // record["spatial_factor"], record["z_dim"]]
    data_manifest = os.path.join(data_dir, MANIFEST_NAME)
    plan = {"vae_digest": record["digest"], "clips_manifest_sha256": _file_sha256(data_manifest),
            "settings": dataclasses.asdict(settings)}
    _check_plan(out_dir, plan)
    for stale in glob.glob(os.path.join(glob.escape(out_dir), ".tmp-*")):  # A killed run's partial shards.
        os.remove(stale)

    total, per_shard = len(source), settings.examples_per_shard
    count = -(-total // per_shard)
    names = [_shard_name(i, count) for i in range(count)]
    reports = {name: _done_report(out_dir, name) for name in names}
    todo = [i for i, name in enumerate(names) if reports[name] is None]
    todo_clips = sum(len(range(i * per_shard, min(total, (i + 1) * per_shard))) for i in todo)
    log(f"[encode_latents] {total} clips {clip_shape} -> latents {latent_shape} ({settings.dtype}); "
        f"{count} shards ({count - len(todo)} already done); VAE {record['dir']} "
        f"(sha256 {record['digest'][:12]})")

    if todo:
        if vae is None:
            vae = wan_vae.VideoVAE.load(vae_dir, dtype=settings.compute_dtype, latents_per_step=latents_per_step)
        if batch % vae.batch_multiple:  # Every device gets a full share (the VAE would pad anyway).
            batch += vae.batch_multiple - batch % vae.batch_multiple
            log(f"[encode_latents] --batch rounded up to {batch}, a multiple of the {vae.batch_multiple} devices")
        started, done, last_log = time.perf_counter(), 0, [0.0]

        def progress(n: int) -> None:
            nonlocal done
            done += n
            now = time.perf_counter() - started
            if done >= todo_clips or now - last_log[0] >= 10.0:
                last_log[0] = now
                log("[encode_latents] " + format_progress("encoded", done, todo_clips, now))

        with futures.ThreadPoolExecutor(read_threads) as pool:
            for i in todo:
                indices = range(i * per_shard, min(total, (i + 1) * per_shard))
                reports[names[i]] = encode_shard(vae, source, out_dir, names[i], indices, batch=batch,
                                                 dtype=settings.dtype, pool=pool, progress=progress)

    ordered = [reports[name] for name in names]
    corrupt = [c for r in ordered for c in r["corrupt_clips"]]
    with open(data_manifest) as f:
        clips = json.load(f)
    manifest = {
        "kind": "latents",
        "format": FORMAT,
        "num_examples": sum(r["num_examples"] for r in ordered),
        "latent_shape": latent_shape,
        "dtype": settings.dtype,
        "normalized": "z = (mu - latents_mean) / latents_std, mu the posterior mean",
        "clip_shape": clip_shape,
        "fps": clips.get("fps"),
        "num_classes": clips.get("num_classes"),
        "classes": clips.get("classes"),
        "vae": dict(record, compute_dtype=settings.compute_dtype),
        "source": {"data": os.path.abspath(data_dir), "num_clips": total,
                   "manifest_sha256": plan["clips_manifest_sha256"]},
        "settings": dataclasses.asdict(settings),
        "num_corrupt_skipped": len(corrupt),
        "corrupt_clips": corrupt,
        "shards": [{"file": r["file"], "num_examples": r["num_examples"]} for r in ordered if r["num_examples"]],
    }
    _write_json_atomic(os.path.join(out_dir, MANIFEST_NAME), manifest)
    log(f"[encode_latents] done: {manifest['num_examples']} latents in {out_dir}"
        + (f"; skipped {len(corrupt)} corrupt clips (listed in manifest.json)" if corrupt else ""))
    return manifest


def check_latents_match_vae(latents_manifest: Mapping[str, Any] | str | os.PathLike,
                            vae_dir: str | os.PathLike) -> dict:
    """Raises ValueError (one line, naming both VAEs and the fix) unless `vae_dir` made the latents.

    Args:
        latents_manifest: a latents manifest dict, or the latents dir (or its manifest.json).
        vae_dir: the VAE the run will decode with.

    Returns:
        the manifest's VAE record.
    """
    from eflow_jax.models import wan_vae

    where = "the latents"
    if not isinstance(latents_manifest, Mapping):
        path = os.fspath(latents_manifest)
        path = os.path.dirname(path) if path.endswith(".json") else path
        where = f"latents in {path}"
        latents_manifest = sources.load_manifest(path)
    vae_dir = os.fspath(vae_dir)
    recorded = latents_manifest.get("vae")
    data = (latents_manifest.get("source") or {}).get("data", "CLIPS_DIR")
    fix = f"python -m eflow_jax.data.encode_latents --vae={vae_dir} --data={data} --out=NEW_LATENTS_DIR"
    if not recorded:
        raise ValueError(f"{where} do not record the VAE that made them (not written by encode_latents), so "
                         f"they cannot be checked against the VAE {vae_dir}; re-encode them with: {fix}")
    digest = wan_vae.vae_digest(vae_dir)
    if digest != recorded["digest"]:
        raise ValueError(
            f"{where} were encoded by the VAE {recorded['dir']} (sha256 {recorded['digest'][:12]}), not by "
            f"the VAE {vae_dir} (sha256 {digest[:12]}): use {recorded['dir']} as the run's VAE, or "
            f"re-encode with: {fix}")
    return recorded


_FLAGS = [
    ("--vae", dict(required=True, help="VAE dir: config.json + diffusion_pytorch_model.safetensors.")),
    ("--data", dict(required=True, help="Clips made by python -m eflow_jax.data.prepare.")),
    ("--out", dict(required=True, help="Latents output dir (rerun to resume).")),
    ("--batch", dict(type=int, default=8, help="Clips per encode call (split over the local devices).")),
    ("--examples_per_shard", dict(type=int, default=1024, help="Clips per shard: unit of resumption.")),
    ("--dtype", dict(choices=STORE_DTYPES, default="float16", help="Stored latent dtype.")),
    ("--compute_dtype", dict(choices=["bfloat16", "float32"], default="bfloat16", help="VAE conv dtype.")),
    ("--latents_per_step", dict(type=int, default=1, help="Latents per VAE time step (speed/memory).")),
    ("--read_threads", dict(type=int, default=8, help="Threads decoding clips ahead of the device.")),
]


def main(argv: Sequence[str] | None = None) -> None:
    from eflow_jax.models.pretrained import CheckpointDirError

    parser = argparse.ArgumentParser(prog="python -m eflow_jax.data.encode_latents",
                                     description=__doc__.split("\n\n")[0])
    for flag, kwargs in _FLAGS:
        parser.add_argument(flag, **kwargs)
    args = parser.parse_args(argv)
    settings = EncodeSettings(examples_per_shard=args.examples_per_shard, dtype=args.dtype,
                              compute_dtype=args.compute_dtype)
    try:
        encode_dataset(args.vae, args.data, args.out, settings=settings, batch=args.batch,
                       latents_per_step=args.latents_per_step, read_threads=args.read_threads,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    except (CheckpointDirError, FileNotFoundError, ValueError) as e:  # The message names the fix.
        sys.exit(f"[encode_latents] error: {e}")


if __name__ == "__main__":
    main()
