r"""FVD of a run (`--mode=eval`): few-step samples vs cached real statistics, pinned protocol.

`run` dispatches on config.eval.metric: 'fvd' (below) or 'shapes' / 'shapes_hard' (`run_shapes`,
synthetic data: eflow_jax/eval/shapes.py, no I3D weights needed).

    python -m eflow_jax.main --mode=eval --workdir=/ckpt/run1 --config=configs/kinetics.py \
        --config.eval.fvd.i3d_path=/models/i3d.npz --config.eval.fvd.num_steps=2

Steps: check the I3D weights -> real statistics (computed once from `config.data` through
`pipeline.make_eval_iterator`, cached beside the data or in `eval.fvd.stats_dir`, named and
stamped with the protocol) -> EMA params of the run -> `num_gen_clips` clips from the run's
sampler, in batches that never all sit in memory -> I3D features -> Frechet distance.
Writes `out_dir/eval.json` and TensorBoard scalars in `out_dir`, and prints the number together
with `fvd.format_protocol(protocol)` (docs/EVAL.md says why every number carries it).

Latent runs (video channels != 3) need a `decoder` (latents -> RGB in [-1, 1]); both the
generated clips and, when the data are latents too, the real ones go through it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eflow_jax import checkpoint, config_file, rundir, sample, sharding
from eflow_jax.data import pipeline
from eflow_jax.eval import fvd, i3d
from eflow_jax.models import dit
from eflow_jax.progress import Progress

# videos in model space [B, T, H, W, C] (numpy) -> RGB videos [B, T', H', W', 3] in [-1, 1].
Decoder = Callable[[np.ndarray], np.ndarray]
CONVERT_HINT = ("python -m eflow_jax.eval.convert_i3d --src=rgb_imagenet.pt --out=i3d.npz "
                "(see docs/EVAL.md), then pass --eval.fvd.i3d_path=i3d.npz")


def eval_config() -> ml_collections.ConfigDict:
    """Evaluation settings: a run config's `eval` section and the --eval.* flags of `--mode=eval`."""
    return ml_collections.ConfigDict(dict(
        # 'fvd' (I3D, any RGB data) | 'shapes' | 'shapes_hard' (data.synthetic_kind 'colour' | 'hard':
        # eflow_jax/eval/shapes.py).
        metric="fvd",
        fvd=ml_collections.ConfigDict(dict(
            i3d_path="",  # Converted I3D weights (python -m eflow_jax.eval.convert_i3d).
            num_gen_clips=2048, num_real_clips=2048, batch_size=32, num_steps=2, seed=0,
            num_frames=16, resolution=224,  # I3D input: first 16 frames, resized to 224^2 (docs/EVAL.md).
            stats_dir="",  # Where real statistics are cached; default: beside the data.
        )),
        shapes=ml_collections.ConfigDict(dict(
            num_clips=256,  # Generated clips per num_steps (labels cycle over the classes).
            num_steps=(1, 2),  # Sampler steps to score.
            seed=1,  # Sampling noise and the gauge's held-out clips; not 0 (the training data's seed).
            batch_size=32,
            cache_dir="",  # Trained gauge classifiers + references; default ~/.cache/eflow_jax/shapes_gauge.
        )),
    ))


def run_fvd(config: ml_collections.ConfigDict, workdir: str, out_dir: str,
            mesh: jax.sharding.Mesh, *, decoder: Decoder | None = None,
            step: int | None = None) -> dict:
    """Computes the FVD of a run's EMA params and writes eval.json + TensorBoard scalars.

    Args:
      config: the run config; reads model, data, sample (sampler settings) and eval.fvd
        (i3d_path, num_gen_clips, num_real_clips, batch_size, num_steps, seed, stats_dir, and
        optionally num_frames / resolution, which default to the pinned 16 / 224).
      workdir: a training run's workdir (orbax checkpoints) or an export directory.
      out_dir: where eval.json and the TensorBoard events go.
      mesh: devices to sample and extract features on (batches split over data x fsdp).
      decoder: latents -> RGB in [-1, 1]; required when the model's videos are not RGB (for
        RGB runs it post-processes the generated clips only).
      step: checkpoint step; the latest when None.
    Returns:
      The eval.json contents: fvd, protocol, clip counts, sampler, steps, checkpoint step.
    """
    cfg = config.eval.fvd
    i3d_path = check_i3d_path(cfg.i3d_path)
    decode = resolve_decoder(decoder, config.model.video_shape[-1])
    num_frames = int(cfg.get("num_frames", fvd.FVD_NUM_FRAMES))
    resolution = int(cfg.get("resolution", fvd.FVD_RESOLUTION))
    batch_size = int(cfg.batch_size)
    if step is None:
        step = latest_checkpoint_step(workdir)

    i3d_params = jax.device_put(i3d.load_i3d_params(i3d_path), NamedSharding(mesh, P()))
    protocol = protocol_for(config, i3d.weights_sha256(i3d_path), num_frames, resolution)

    def features(videos: np.ndarray) -> np.ndarray:
        return i3d_features_on_mesh(i3d_params, videos, mesh, batch_size, num_frames, resolution)

    mu_real, sigma_real, stats_path, cached = real_statistics(
        config, protocol, workdir, features, decode if config.data.channels != 3 else None)

    params = sample.load_params(workdir, config, mesh, use_ema=True, step=step)
    net = network_for(config.model.to_json())
    num_steps = int(cfg.num_steps)
    acc = fvd.StatsAccumulator()
    for videos in generate_batches(config, net, params, mesh, num_clips=int(cfg.num_gen_clips),
                                   num_steps=num_steps, seed=int(cfg.seed), batch_size=batch_size):
        acc.update(features(decode(videos)))
    mu_gen, sigma_gen = acc.finalize()
    value = fvd.frechet_distance(mu_gen, sigma_gen, mu_real, sigma_real)

    result = dict(fvd=value, num_steps=num_steps, sampler=sample.sampler_name(config),
                  checkpoint_step=step, params="ema", num_gen_clips=acc.count,
                  num_real_clips=protocol["num_real_clips"], real_stats=stats_path,
                  real_stats_cached=cached, workdir=os.path.abspath(workdir), protocol=protocol)
    if jax.process_index() == 0:
        write_results(out_dir, result)
        print(f"FVD {value:.2f} ({num_steps}-step {result['sampler']}, checkpoint step {step}) "
              + fvd.format_protocol(protocol), flush=True)
    return result


def run(config: ml_collections.ConfigDict, workdir: str, out_dir: str, mesh: jax.sharding.Mesh, *,
        decoder: Decoder | None = None, step: int | None = None) -> dict:
    """`--mode=eval`: the metric named by config.eval.metric ('fvd', 'shapes', 'shapes_hard') for a run."""
    from eflow_jax.eval import shapes

    metric = config.eval.get("metric", "fvd")
    if metric == "fvd":
        return run_fvd(config, workdir, out_dir, mesh, decoder=decoder or sample.pixel_decoder(config), step=step)
    if metric in shapes.METRICS:
        return run_shapes(config, workdir, out_dir, mesh, step=step)
    raise ValueError(f"eval.metric must be 'fvd' or one of {tuple(shapes.METRICS)}, got {metric!r}")


def apply_eval_flags(config: ml_collections.ConfigDict, given: dict) -> None:
    """The --eval.* flags typed on the command line override the run's config (in place), each one
    whatever its value (one equal to its default too); a run snapshot older than a field gets its
    default first.

    Args:
      given: dotted field -> value of the typed flags only, e.g. {'metric': 'fvd', 'fvd.i3d_path': 'i3d.npz'}
        (main.py reads them with `config_flags.get_override_values`).
    """
    config_file.apply_given(config.eval, eval_config(), given)


def run_shapes(config: ml_collections.ConfigDict, workdir: str, out_dir: str, mesh: jax.sharding.Mesh,
               *, step: int | None = None) -> dict:
    """Shapes-gauge scores (eval/shapes.py) of a run's EMA params for each eval.shapes.num_steps.

    Prints one table (with the real and noise references) and writes out_dir/eval_shapes.json.
    """
    from eflow_jax.eval import shapes

    cfg = config.eval.shapes
    if config.data.source != "synthetic":
        raise ValueError(f"eval.metric={config.eval.metric!r} scores against the synthetic moving-shapes ground "
                         f"truth, but "
                         f"data.source={config.data.source!r}. Use FVD for this run: --eval.metric=fvd "
                         f"--eval.fvd.i3d_path=i3d.npz ({CONVERT_HINT}).")
    gauge = shapes.ShapesGauge.for_config(config)
    if step is None:
        step = latest_checkpoint_step(workdir)
    params = sample.load_params(workdir, config, mesh, use_ema=True, step=step)
    net = network_for(config.model.to_json())
    scores = shapes.score_params(config, net, params, gauge=gauge, mesh=mesh)
    g = gauge.geometry
    result = dict(metric=config.eval.metric, scores={str(k): v for k, v in scores.items()},
                  sampler=sample.sampler_name(config), checkpoint_step=step, params="ema",
                  num_clips=int(cfg.num_clips), seed=int(cfg.seed), gauge=gauge.cache_path,
                  gauge_version=g.version, geometry=dataclasses.asdict(g),
                  workdir=os.path.abspath(workdir))
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "eval_shapes.json"), "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)
        print(f"shapes gauge: checkpoint step {step}, EMA params, {result['sampler']} sampler, "
              f"{cfg.num_clips} clips of {g.num_frames}x{g.resolution}x{g.resolution}x{g.channels}, "
              f"{g.num_classes} classes\n{shapes.format_table(scores)}", flush=True)
    return result


# ---- checks ----


def check_i3d_path(path: str) -> str:
    """The I3D weights path, or an error naming the converter command."""
    if not path:
        raise ValueError(f"config.eval.fvd.i3d_path is empty: FVD needs converted I3D weights. "
                         f"Make them with {CONVERT_HINT}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config.eval.fvd.i3d_path={path!r} does not exist. Make it with "
                                f"{CONVERT_HINT}.")
    return path


def resolve_decoder(decoder: Decoder | None, channels: int) -> Decoder:
    """Identity for RGB runs; latent runs must bring their own decoder."""
    if decoder is not None:
        return lambda videos: np.asarray(decoder(videos), np.float32)
    if channels != 3:
        raise ValueError(
            f"model.video_shape has {channels} channels (latents): FVD needs RGB clips. Call "
            f"evaluate.run_fvd(..., decoder=fn) with fn mapping latents [B, T, h, w, {channels}] "
            f"to RGB [B, T', H, W, 3] in [-1, 1] (the VAE decoder the latents were made with).")
    return lambda videos: videos


# ---- protocol and the real-statistics cache ----


def real_source_name(data_cfg: ml_collections.ConfigDict) -> str:
    """A stable dataset name for the protocol: TFDS name, data folder name, or 'synthetic_...'."""
    if data_cfg.source == "synthetic":  # The hard set is other data: its real statistics differ.
        kind = data_cfg.get("synthetic_kind", "colour")
        textured = "_textured" if data_cfg.get("synthetic_textured", False) else ""
        return "synthetic_moving_shapes" + ("" if kind == "colour" else f"_{kind}{textured}")
    if data_cfg.source == "tfds":
        return data_cfg.tfds_name
    return os.path.basename(os.path.normpath(data_cfg.path)) or data_cfg.source


def protocol_for(config, i3d_sha256: str, num_frames: int, resolution: int) -> dict:
    """`fvd.fvd_protocol` for this run, plus how the real clips were cut (that moves FVD too)."""
    cfg, data = config.eval.fvd, config.data
    num_real = min(int(cfg.num_real_clips), len(pipeline.make_source(data)))
    protocol = fvd.fvd_protocol(
        num_gen_clips=int(cfg.num_gen_clips), num_real_clips=num_real,
        real_source=real_source_name(data), real_split=data.split, seed=int(cfg.seed),
        i3d_weights_sha256=i3d_sha256, num_frames=num_frames, resolution=resolution)
    protocol["real_clips"] = (f"{data.num_frames} frames (stride {data.frame_stride}) at "
                              f"{data.resolution}x{data.resolution}, central crop, "
                              f"evenly spaced examples")
    if data.channels != 3:
        protocol["real_clips"] += ", decoded from latents by the eval decoder"
    return protocol


def stats_filename(protocol: dict) -> str:
    """`fvd.real_stats_filename` plus a hash of every real-side protocol key (no silent reuse)."""
    real_side = {k: v for k, v in protocol.items() if k not in ("num_gen_clips", "seed")}
    digest = hashlib.sha256(json.dumps(real_side, sort_keys=True).encode()).hexdigest()[:8]
    return fvd.real_stats_filename(protocol).removesuffix(".npz") + f"_p{digest}.npz"


def stats_dirs(config, workdir: str) -> list[str]:
    """Where real statistics live, most preferred first: eval.fvd.stats_dir, else beside the data,
    else (synthetic data, or a read-only data folder) the run's workdir."""
    if config.eval.fvd.stats_dir:
        return [config.eval.fvd.stats_dir]
    dirs = []
    path = config.data.path
    if path and os.path.isdir(path):
        dirs.append(path)
    return dirs + [rundir.fvd_stats_dir(workdir)]


def real_statistics(config, protocol: dict, workdir: str,
                    features: Callable[[np.ndarray], np.ndarray],
                    decode: Decoder | None) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(mu, sigma, path, was_cached): the cached real statistics, or computed and cached now."""
    name = stats_filename(protocol)
    candidates = [os.path.join(d, name) for d in stats_dirs(config, workdir)]
    for path in candidates:
        if os.path.exists(path):
            mu, sigma = fvd.load_stats(path, expect_protocol=protocol)
            logging.info("FVD: real statistics from cache %s", path)
            return mu, sigma, path, True

    cfg = config.eval.fvd
    logging.info("FVD: computing real statistics over %d clips", protocol["num_real_clips"])
    acc = fvd.StatsAccumulator()
    # Every process reads every real clip (same order), so features can be split over the mesh;
    # this runs once per protocol.
    batches = pipeline.make_eval_iterator(config.data, batch_size=int(cfg.batch_size),
                                          num_examples=protocol["num_real_clips"])
    progress = Progress("FVD real clips", protocol["num_real_clips"])
    for batch in batches:
        videos = batch["video"]
        acc.update(features(decode(videos) if decode is not None else videos))
        progress.update(len(videos))
    if acc.count != protocol["num_real_clips"]:
        raise RuntimeError(f"read {acc.count} real clips, expected {protocol['num_real_clips']} "
                           f"(corrupt records skipped?); set data.on_corrupt='fail' to find them")
    mu, sigma = acc.finalize()
    path = next((p for p in candidates if _writable(os.path.dirname(p))), candidates[-1])
    if jax.process_index() == 0:
        fvd.save_stats(path, mu, sigma, acc.count, protocol)
        logging.info("FVD: cached real statistics in %s", path)
    return mu, sigma, path, False


def _writable(directory: str) -> bool:
    while directory and not os.path.exists(directory):  # It will be created: check the parent.
        directory = os.path.dirname(directory)
    return os.access(directory or ".", os.W_OK)


# ---- generated clips and features ----


@functools.lru_cache(maxsize=4)
def network_for(model_json: str):
    """One Network per model config, so repeated evaluations reuse the compiled sampler."""
    return dit.make_network(ml_collections.ConfigDict(json.loads(model_json)))[1]


def generate_batches(config, net, params, mesh, *, num_clips: int, num_steps: int, seed: int,
                     batch_size: int):
    """Yields model-space videos [b, T, H, W, C] (numpy), labels cycling over all classes.

    `sample.generate_batches`, the path --mode=sample and training samples take: a seed gives the
    same clips there and here, whatever the batch size.
    """
    labels = sample.parse_labels("", num_clips, config.model.num_classes)
    return sample.generate_batches(config, net, params, labels, num_steps, seed, batch_size, mesh=mesh,
                                   what="FVD generated clips")


def i3d_features_on_mesh(params, videos: np.ndarray, mesh, batch_size: int, num_frames: int,
                         resolution: int) -> np.ndarray:
    """I3D FVD features [n, 400] of RGB videos [n <= batch_size, T, H, W, 3] in [-1, 1].

    Pads to batch_size (one compiled shape) and splits the batch over the mesh's data axes.
    """
    videos = np.asarray(videos, np.float32)
    n = videos.shape[0]
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"FVD needs RGB clips [B, T, H, W, 3], got {videos.shape}; the decoder "
                         f"must return RGB in [-1, 1].")
    if videos.shape[1] < num_frames:
        raise ValueError(f"clips have {videos.shape[1]} frames but the FVD protocol takes the "
                         f"first {num_frames}; use longer clips or set config.eval.fvd.num_frames.")
    if n < batch_size:
        pad = np.zeros((batch_size - n, *videos.shape[1:]), videos.dtype)
        videos = np.concatenate([videos, pad])
    x = jnp.asarray(videos)
    if batch_size % sharding.data_parallel_size(mesh) == 0:
        x = jax.device_put(videos, sharding.batch_sharding(mesh))
    out = fvd.i3d_features(params, x, num_frames=num_frames, resolution=resolution)
    return sample.to_host(out)[:n]


# ---- outputs ----


def latest_checkpoint_step(workdir: str) -> int | None:
    """The newest committed checkpoint step (read-only: a running job may own it), or None for an
    export directory."""
    if rundir.is_export(workdir):
        return None
    ckpt_dir = rundir.ckpt_dir(workdir)
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{workdir} has no ckpt/ or params/: --workdir must be a training "
                                f"run's workdir or an export directory (--mode=export).")
    step = checkpoint.latest_step(ckpt_dir)
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {ckpt_dir}: --workdir must be a training run's "
                                f"workdir or an export directory.")
    return step


def write_results(out_dir: str, result: dict) -> None:
    """eval.json, plus the TensorBoard scalar `fvd_{clips}/{n}_step` and the protocol as text."""
    from tensorboardX import SummaryWriter

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2, sort_keys=True)
    writer = SummaryWriter(out_dir)
    tag = f"fvd_{result['num_gen_clips']}/{result['num_steps']}_step"
    tb_step = result["checkpoint_step"] or 0
    writer.add_scalar(tag, result["fvd"], tb_step)
    writer.add_text(f"{tag}_protocol", fvd.format_protocol(result["protocol"]), tb_step)
    writer.close()
