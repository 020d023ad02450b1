"""The sections every run config has; variants in configs/*.py are small deltas on these."""

import ml_collections

from eflow_jax import optim, sharding
from eflow_jax.data import pipeline
from eflow_jax.flow import objectives
from eflow_jax.models import dit


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'variant=L,objective=solution_flow,runlocal' -> ConfigDict with typed defaults."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(out)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("", "1", "true", "yes")) if kind is bool else kind(value)
    return out


def base_config(variant: str = "B", objective: str = "eflow") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 400_000
    c.batch_size = 256  # Global batch over all devices.
    c.model = dit.model_config(variant)
    c.data = pipeline.default_data_config()
    c.objective = objectives.default_objective_config(objective)
    c.optim = optim.optim_config()
    c.mesh = sharding.mesh_config()
    c.checkpoint = ml_collections.ConfigDict(dict(
        save_every=2_000, keep_last=3, keep_every=50_000, async_save=True,
        init_from="",  # Another run's workdir/ckpt (or a step dir): params + EMA only.
        restore_step=-1,  # -1: the latest; else resume from this committed step (later ones are set aside).
    ))
    c.log = ml_collections.ConfigDict(dict(
        every_steps=100,
        sample_every=10_000,  # 0 = only at the end.
        eval_every=0,  # > 0: score EMA samples with eval.metric's in-loop gauge every this many steps; 0 = off.
        # Held-out clips of the probe logged every log step (eflow_jax/monitor.py): the same dense
        # velocity error for every objective, so their curves line up. 0 = off.
        probe_clips=32,
        sample_steps=(1, 2),  # Few-step samplers written as mp4/gif + TensorBoard strips.
        num_samples=8,
        fps=8,
        profile_start=0,  # > 0: trace `profile_steps` steps from this step (compile steps excluded).
        profile_steps=5,
    ))
    c.train = ml_collections.ConfigDict(dict(
        skip_nonfinite=False,  # True: skip updates with a non-finite loss/grad instead of stopping.
        check_memory=True,  # Print the compiled step's memory analysis before step 1.
        stop_at_step=0,  # > 0: save and exit cleanly after this step (time-limited jobs); resume later.
        inject_nan_at_step=-1,  # Debug only: make the loss NaN at this step (tests the NaN stop).
        # jax's persistent compilation cache: a restart loads the compiled step instead of
        # recompiling it (minutes for EFlow-B on a GPU). 'auto': $JAX_COMPILATION_CACHE_DIR if set,
        # else $XDG_CACHE_HOME/eflow_jax/xla (~/.cache/eflow_jax/xla); '' turns it off.
        compile_cache_dir="auto",
        device_prefetch=2,  # Batches put on the device ahead of the step (host->device overlaps it).
    ))
    c.sample = sample_config()
    c.eval = eval_config()
    return c


def eval_config() -> ml_collections.ConfigDict:
    """Evaluation settings (also the --eval.* flags of `--mode=eval`): FVD, or the shapes gauge."""
    return ml_collections.ConfigDict(dict(
        metric="fvd",  # 'fvd' (I3D, any RGB data) | 'shapes' (synthetic data only: eflow_jax/eval/shapes.py).
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


def sample_config() -> ml_collections.ConfigDict:
    """Sampling settings (also the --sample.* flags of `--mode=sample`)."""
    return ml_collections.ConfigDict(dict(
        num_steps=2,
        sampler="renoise",  # 'renoise' | 'chain' (solution flow); 'euler' | 'heun' (flow matching).
        guidance="cfg",  # Flow-matching runs only: 'cfg' | 'path_drop' | 'none'.
        guidance_scale=3.0,
        labels="",  # Comma-separated class ids; empty = 0..num-1 modulo num_classes.
        num=8,
        seed=0,
        batch_size=8,
        use_ema=True,
        step=-1,  # Checkpoint step; -1 = latest.
        fps=8,
    ))
