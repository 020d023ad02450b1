"""Sampling from a run: pick the sampler for the run's objective, restore EMA params, export videos.

Used by the train loop (periodic samples), `--mode=sample` / `--mode=export` and FVD (one
generator, `generate_batches`, for all of them). Sampling
needs only the params (EMA by default), so it runs on any mesh / device count.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from eflow_jax import checkpoint, config_file, rundir, sharding, text
from eflow_jax import state as state_lib
from eflow_jax.flow import objectives, samplers
from eflow_jax.flow.condition import Condition
from eflow_jax.flow.network import Network
from eflow_jax.models import dit
from eflow_jax.progress import Progress

SOLUTION_SAMPLERS = ("renoise", "chain")
ITERATIVE_SAMPLERS = ("euler", "heun")


def sample_config() -> ml_collections.ConfigDict:
    """Sampling settings: a run config's `sample` section and the --sample.* flags of `--mode=sample`."""
    return ml_collections.ConfigDict(dict(
        num_steps=2,
        sampler="renoise",  # 'renoise' | 'chain' (solution flow); 'euler' | 'heun' (flow matching).
        guidance="cfg",  # Flow-matching runs only: 'cfg' | 'path_drop' | 'none'.
        guidance_scale=3.0,
        labels="",  # Comma-separated class ids; empty = 0..num-1 modulo num_classes.
        prompt="",  # Text runs: one prompt (clips cycle over the prompts).
        prompts="",  # Text runs: a UTF-8 file of prompts, one per line.
        num=8,
        seed=0,
        batch_size=8,
        use_ema=True,
        step=-1,  # Checkpoint step; -1 = latest.
        fps=8,
    ))


def apply_sample_flags(config: ml_collections.ConfigDict, given: dict) -> ml_collections.ConfigDict:
    """The --sample.* flags typed on the command line over the run's `sample` section (in place; a
    snapshot older than a field gets its default first): what --mode=sample and the eval sampler use.

    Args:
      given: dotted field -> value of the typed flags only (`config_flags.get_override_values`).
    Returns:
      config.sample.
    """
    with config.unlocked():
        if "sample" not in config:
            config.sample = sample_config()
    return config_file.apply_given(config.sample, sample_config(), given)


def check_sample_flags(config, sample_cfg) -> None:
    """Sampling settings that cannot work, as a ConfigError naming the flag (before anything loads)."""
    s = sample_cfg
    for field in ("num", "batch_size", "num_steps"):
        if int(s[field]) < 1:
            raise rundir.ConfigError(f"--sample.{field}={s[field]}: it must be >= 1; give a positive number.")
    if not s.fps > 0:
        raise rundir.ConfigError(f"--sample.fps={s.fps}: it must be > 0 (frames per second of the videos).")
    if s.labels and not config.model.num_classes:
        raise rundir.ConfigError(f"--sample.labels={s.labels!r} given, but this run takes no class labels "
                                 f"(model.num_classes=0): give --sample.prompt='...' or --sample.prompts=FILE.")
    if config.model.num_classes:
        parse_labels(s.labels, int(s.num), config.model.num_classes)


def sampler_name(config: ml_collections.ConfigDict, sample_cfg=None) -> str:
    """The sampler a run uses: few-step solution maps for solution-flow runs, ODE solvers else."""
    sampler = (sample_cfg or config.sample).sampler
    few_step = objectives.objective(config.objective.name).few_step_sampler
    if few_step is not None:
        return sampler if sampler in SOLUTION_SAMPLERS else few_step
    return sampler if sampler in ITERATIVE_SAMPLERS else "euler"


def make_sample_fn(config: ml_collections.ConfigDict, net: Network, num_steps: int, sample_cfg=None):
    """A jitted fn(params, noise, cond, rng) -> videos for the run's objective.

    Solution-flow runs ('eflow', 'solution_flow') use the few-step solution-map samplers (no CFG:
    guidance is trained in); flow-matching runs use Euler/Heun with CFG or path-drop guidance.
    The jitted function is cached per (net, steps, sampler, guidance), so repeated calls (periodic
    samples in the train loop, batches of an FVD run) compile once per input shape/sharding.
    """
    sample_cfg = sample_cfg or config.sample
    sampler = sampler_name(config, sample_cfg)
    if sampler in SOLUTION_SAMPLERS:  # Guidance is baked in: keep it out of the cache key.
        return _jitted_sampler(net, int(num_steps), sampler, 1.0, "none")
    return _jitted_sampler(net, int(num_steps), sampler, float(sample_cfg.guidance_scale),
                           str(sample_cfg.guidance))


@functools.lru_cache(maxsize=32)
def _jitted_sampler(net: Network, num_steps: int, sampler: str, guidance_scale: float, guidance: str):
    if sampler == "renoise":
        fn = lambda p, z, c, r: samplers.renoise_sample(net, p, z, c, num_steps, r)  # noqa: E731
    elif sampler == "chain":
        fn = lambda p, z, c, r: samplers.chain_sample(net, p, z, c, num_steps)  # noqa: E731
    else:
        solve = samplers.euler_sample if sampler == "euler" else samplers.heun_sample
        fn = lambda p, z, c, r: solve(net, p, z, c, num_steps, guidance_scale, guidance)  # noqa: E731
    return jax.jit(fn)


def clip_inputs(shape, seed: int, start: int, count: int, out_sharding=None) -> tuple[jax.Array, jax.Array]:
    """(noise [count, *shape], renoise keys [count]) of clips start..start+count.

    Everything a clip draws comes from its own key fold_in(key(seed), clip index), so a clip is the
    same whatever the batch size and whichever path (train-time samples, --mode=sample, FVD) asks.
    out_sharding: made split over it (also across processes: every process runs the same program).
    """
    fn = _clip_inputs if out_sharding is None else _sharded_clip_inputs(out_sharding)
    return fn(tuple(int(d) for d in shape), int(count), jax.random.key(seed), jnp.int32(start))


@functools.lru_cache(maxsize=8)
def _sharded_clip_inputs(out_sharding):
    return jax.jit(_clip_inputs_impl, static_argnums=(0, 1), out_shardings=(out_sharding, out_sharding))


def _clip_inputs_impl(shape, count, key, start):
    clip_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(start + jnp.arange(count, dtype=jnp.int32))
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(clip_keys)
    return noise, jax.vmap(lambda k: jax.random.fold_in(k, 1))(clip_keys)


_clip_inputs = jax.jit(_clip_inputs_impl, static_argnums=(0, 1))


def parse_labels(spec: str, num: int, num_classes: int) -> list[int]:
    if not spec:
        return [i % num_classes for i in range(num)]
    try:
        labels = [int(v) for v in str(spec).split(",") if v.strip()]
    except ValueError:
        raise rundir.ConfigError(f"--sample.labels={spec!r} is not a list of class ids: give comma-separated integers "
                                 f"in [0, {num_classes}), e.g. --sample.labels=0,1.") from None
    bad = [v for v in labels if not 0 <= v < num_classes]
    if bad:
        raise ValueError(f"--sample.labels {bad} outside [0, {num_classes}); this run has {num_classes} classes.")
    return (labels * ((num + len(labels) - 1) // len(labels)))[:num] if num > len(labels) else labels


@dataclasses.dataclass(frozen=True)
class Requests:
    """What each clip to generate is conditioned on: class labels and/or caption embeddings.

    Attributes:
      labels: int32 [N] or None. text: text-encoder states [N, L, D] or None; text_mask: bool [N, L].
      prompts: the N captions (names and grids show them), when the clips were asked for by text.
    """

    labels: np.ndarray | None = None
    text: np.ndarray | None = None
    text_mask: np.ndarray | None = None
    prompts: tuple[str, ...] = ()
    prompt_ids: np.ndarray | None = None  # int [N]: each clip's prompt (an index into `prompts`).

    @classmethod
    def of(cls, what) -> Requests:
        """`what` itself, or Requests for a sequence of class labels."""
        return what if isinstance(what, Requests) else cls(labels=np.asarray([int(v) for v in what], np.int32))

    def __len__(self) -> int:
        return len(self.labels if self.labels is not None else self.text)

    def condition(self, start: int, count: int, size: int) -> Condition:
        """Clips start..start+count as a numpy Condition of `size` rows (padded with the first row)."""
        rows = np.arange(start, start + count)
        rows = np.concatenate([rows, np.full(size - count, start)])
        pick = lambda a: None if a is None else np.asarray(a)[rows]  # noqa: E731
        return Condition(np.zeros(size, bool), label=pick(self.labels), text=pick(self.text),
                         text_mask=pick(self.text_mask))


def generate_batches(config, net, params, requests: Requests | Sequence[int], num_steps: int, seed: int,
                     batch_size: int, sample_cfg=None, mesh=None, *, what: str = "sampling",
                     log: Callable[[str], None] | None = None) -> Iterator[np.ndarray]:
    """Yields videos [b, T, H, W, C] (model space, numpy) for `requests` (or a list of labels), batch by batch.

    The one sampling path: clip i is drawn from fold_in(key(seed), i) whatever the batching. One
    compiled sampler (the last batch is padded with real clips' noise); batches are split over the
    mesh's data axes when batch_size divides evenly. Logs progress (clips, rate, ETA).
    """
    fn = make_sample_fn(config, net, num_steps, sample_cfg)
    shard = mesh is not None and batch_size % sharding.data_parallel_size(mesh) == 0
    requests = Requests.of(requests)
    progress = Progress(what, len(requests), log=log)
    for start in range(0, len(requests), batch_size):
        count = min(batch_size, len(requests) - start)
        cond = requests.condition(start, count, batch_size)
        if shard:  # Made straight into the split (a device_put cannot reach other processes' devices).
            out = sharding.batch_sharding(mesh)
            z, keys = clip_inputs(config.model.video_shape, seed, start, batch_size, out)
            cond = jax.tree.map(functools.partial(_global_array, out), cond)
        else:
            z, keys = clip_inputs(config.model.video_shape, seed, start, batch_size)
            cond = jax.tree.map(jnp.asarray, cond)
        videos = to_host(fn(params, z, cond, keys))[:count]
        progress.update(count)
        yield videos


def _global_array(out_sharding, a: np.ndarray) -> jax.Array:
    """A host array every process holds, as one array split over `out_sharding`."""
    return jax.make_array_from_callback(a.shape, out_sharding, lambda index: a[index])


def generate(config, net, params, requests: Requests | Sequence[int], num_steps: int, seed: int, batch_size: int,
             sample_cfg=None, mesh=None, *, log: Callable[[str], None] | None = None) -> np.ndarray:
    """Videos [N, T, H, W, C] (model space) for `requests`: generate_batches, concatenated."""
    return np.concatenate(list(generate_batches(config, net, params, requests, num_steps, seed, batch_size,
                                                sample_cfg, mesh, log=log)))


def to_host(x: jax.Array) -> np.ndarray:
    """The whole array on every process (a multi-host batch spans other hosts' devices)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def write_videos(out_dir: str, videos: np.ndarray, labels, seed: int, num_steps: int, fps: int,
                 log: Callable[[str], None] | None = None, prompts: Sequence[str] | None = None,
                 train_step: int | None = None) -> list[str]:
    """mp4 + gif per clip (named by clip index, label (or prompt index), seed, sampler steps and the
    training step of the params: repeats never collide) and a grid, via eval.export (pixels in [-1, 1] assumed).
    Returns the files written."""
    from eflow_jax.eval import export

    os.makedirs(out_dir, exist_ok=True)
    n = len(labels)
    progress = Progress("writing videos", n, log=log)
    return [str(p) for p in export.save_samples(out_dir, np.clip(videos, -1, 1), list(labels), [seed] * n,
                                                num_steps, fps, indices=range(n),
                                                on_written=lambda: progress.update(1), prompts=prompts,
                                                train_step=train_step)]


def requests_for(config, sample_cfg, num: int, prompts: Sequence[str] = ()) -> Requests:
    """`num` clips' conditions for a run: labels from `sample_cfg.labels` (cycling over the classes),
    and for text runs the prompts of --sample.prompt/--sample.prompts (else `prompts`), cycled over
    the clips and encoded with the run's text encoder."""
    labels = parse_labels(sample_cfg.labels, num, config.model.num_classes) if config.model.num_classes else None
    labels = None if labels is None else np.asarray(labels, np.int32)
    if not config.model.context_dim:
        if sample_cfg.prompt or sample_cfg.prompts:
            raise ValueError("--sample.prompt(s) given, but this run is class-conditional (model.context_dim=0); "
                             "use --sample.labels.")
        return Requests(labels=labels)
    prompts = text.read_prompts(sample_cfg) or list(prompts)
    if not prompts:
        raise ValueError("this run is text-conditioned: give --sample.prompt='...' or --sample.prompts=FILE "
                         "(one prompt per line).")
    ids = np.arange(num) % len(prompts)
    emb, mask = text.encode_prompts(config, prompts)
    return Requests(labels=labels, text=emb[ids], text_mask=mask[ids], prompts=tuple(prompts), prompt_ids=ids)


def vae_dir(config) -> str:
    """The VAE of a latent run: data.vae, else the one its latents' manifest records."""
    if config.data.get("vae"):
        return os.path.expanduser(config.data.vae)
    from eflow_jax.data import sources

    recorded = sources.load_manifest(config.data.path).get("vae") if config.data.path else None
    if not recorded:
        raise ValueError(f"this run trains on latents (data.source='latents') but names no VAE to decode them "
                         f"with, and {config.data.path or 'data.path'} records none: set --config.data.vae=DIR.")
    return recorded["dir"]


def pixel_decoder(config) -> Callable[[np.ndarray], np.ndarray] | None:
    """What turns the model's samples into RGB in [-1, 1]: None for pixel runs, the run's VAE decoder
    (in chunks, loaded once) for latent runs."""
    if config.data.source != "latents":
        return None
    return _vae_decoder(vae_dir(config))


@functools.lru_cache(maxsize=2)
def _vae_decoder(directory: str):
    from eflow_jax.models import wan_vae

    vae = wan_vae.VideoVAE.load(directory)
    return functools.partial(wan_vae.decode_to_pixels, vae, chunk=4)


def write_requests(out_dir: str, videos: np.ndarray, requests: Requests, seed: int, num_steps: int, fps: int,
                   log: Callable[[str], None] | None = None, *, train_step: int | None = None,
                   record: dict | None = None) -> list[str]:
    """write_videos for `requests`: named by prompt index (and a prompt sheet) for text runs. `record`
    (samples_record) is written to the folder's samples.json first."""
    if record is not None:
        write_samples_record(out_dir, record)
    if requests.prompt_ids is not None:
        return write_videos(out_dir, videos, requests.prompt_ids, seed, num_steps, fps, log, prompts=requests.prompts,
                            train_step=train_step)
    return write_videos(out_dir, videos, requests.labels, seed, num_steps, fps, log, train_step=train_step)


# ---- one folder, one run, step and settings ----

SAMPLE_FILES = (".mp4", ".gif", ".png")  # What a sample folder holds (and prompts.txt): another run's, if unrecorded.
RECORD_FREE_KEYS = ("num",)  # More or fewer clips of the same settings are the same clips (clip i: key i).


def samples_record(config, run_dir: str, train_step: int | None, sample_cfg, requests: Requests, *,
                   kind: str = "sample", num_steps=None) -> dict:
    """What makes a folder's clips: the run, the training step of the params and every setting a clip
    depends on (samples.json)."""
    s = sample_cfg
    sampler = sampler_name(config, s)
    record = dict(kind=kind, run=os.path.abspath(run_dir), step=train_step,
                  params="ema" if s.use_ema else "raw", sampler=sampler,
                  num_steps=int(s.num_steps) if num_steps is None else [int(n) for n in num_steps],
                  seed=int(s.seed), fps=s.fps, num=len(requests))
    if sampler in ITERATIVE_SAMPLERS:  # Solution samplers have guidance trained in.
        record.update(guidance=s.guidance, guidance_scale=float(s.guidance_scale))
    if requests.prompts:  # Clip i is conditioned on prompt i mod len(prompts) ...
        record["prompts"] = list(requests.prompts)
    else:  # ... or on label i mod len(labels) of this list (empty: the classes in turn).
        record["labels"] = str(s.labels)
    return record


def default_samples_dir(run_dir: str, record: dict) -> str:
    """--mode=sample's default output: run_dir/samples/step_<n>/<sampler>_<k>steps_seed<s>[_raw]/."""
    name = f"{record['sampler']}_{record['num_steps']}steps_seed{record['seed']}"
    return os.path.join(rundir.samples_dir(run_dir, record["step"]),
                        name + ("_raw" if record["params"] == "raw" else ""))


def samples_dir_for(out_dir: str, record: dict, *, fresh_if_taken: bool) -> str:
    """`out_dir`, unless it holds samples of another run, step or settings: then a fresh sibling
    (`<out_dir>_2`, ...) when `fresh_if_taken` (the default folder), else a RunError naming the
    difference. Read-only: the record is written with the samples (write_requests)."""
    candidate, n = out_dir, 1
    while (problem := _samples_conflict(candidate, record)) is not None:
        if not fresh_if_taken:
            raise rundir.RunError(f"--out={out_dir} {problem}; writing these samples there would mix them with no "
                                  f"way to tell them apart: pass another --out, or delete that folder to replace them.")
        n += 1
        candidate = f"{out_dir}_{n}"
    if candidate != out_dir:
        logging.warning("%s %s: writing to %s instead.", out_dir, _samples_conflict(out_dir, record), candidate)
    return candidate


def _samples_conflict(out_dir: str, record: dict) -> str | None:
    """Why `record`'s clips cannot go into out_dir, or None."""
    path = rundir.samples_record_path(out_dir)
    if os.path.exists(path):
        try:
            with open(path) as f:
                held = json.load(f)
        except ValueError:
            return f"has an unreadable {os.path.basename(path)}"
        keys = [k for k in {**held, **record} if k not in RECORD_FREE_KEYS]
        diff = [f"{k}: {held.get(k, '<absent>')!r} there, {record.get(k, '<absent>')!r} now" for k in keys
                if held.get(k, "<absent>") != record.get(k, "<absent>")]
        return f"holds other samples ({'; '.join(diff)})" if diff else None
    if os.path.isdir(out_dir) and any(name.endswith(SAMPLE_FILES) or name == "prompts.txt"
                                      for name in os.listdir(out_dir)):
        return (f"holds sample files but no {os.path.basename(path)} saying which run, checkpoint step and "
                f"settings made them")
    return None


def write_samples_record(out_dir: str, record: dict) -> None:
    """samples.json of out_dir; `num` is the most clips written there (a prefix of the same clips)."""
    os.makedirs(out_dir, exist_ok=True)
    path = rundir.samples_record_path(out_dir)
    record = dict(record)
    if os.path.exists(path):
        try:
            with open(path) as f:
                record["num"] = max(record["num"], int(json.load(f).get("num", 0)))
        except (ValueError, TypeError):
            pass
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def run_sample_mode(config, workdir: str, out_dir: str | None, sample_cfg, mesh) -> list[str]:
    """--mode=sample: `sample_cfg.num` clips of `sample_cfg.labels` (or prompts, for text runs) from a
    run's (EMA) params, written to out_dir (default: default_samples_dir). Returns the files written
    (every process generates; process 0 writes).

    A folder holds the clips of one run, checkpoint step and settings (samples.json): an --out holding
    others is refused before any work; the default folder moves to a fresh sibling instead.
    """
    from eflow_jax.models import dit

    s = sample_cfg
    check_sample_flags(config, s)
    requests = requests_for(config, s, s.num)
    step = checkpoint_step(workdir, None if s.step < 0 else s.step)
    record = samples_record(config, workdir, step, s, requests)
    out_dir = samples_dir_for(out_dir or default_samples_dir(workdir, record), record, fresh_if_taken=not out_dir)
    _, net = dit.make_network(config.model)
    params = load_params(workdir, config, mesh, use_ema=s.use_ema, step=step)
    videos = generate(config, net, params, requests, s.num_steps, s.seed, s.batch_size, s, mesh)
    if (decode := pixel_decoder(config)) is not None:  # Latent runs: watchable videos, via the run's VAE.
        videos = decode(videos)
    if jax.process_index() != 0:
        return []
    paths = write_requests(out_dir, videos, requests, s.seed, s.num_steps, s.fps, train_step=step, record=record)
    written = sorted({p for p in paths if os.path.isfile(p)})
    logging.info("wrote %d files (%d clips as mp4 + gif, and a grid) of checkpoint step %s to %s", len(written),
                 len(requests), step, out_dir)
    return written


# ---- loading a run for sampling ----


def abstract_params(config, mesh):
    """Shapes + shardings of the model params on `mesh` (nothing allocated).

    The params of the train state's abstract form: one place decides how params are sharded, so
    what sampling loads matches what training saved. optax.identity() has no state: no optimizer
    shapes are built.
    """
    abstract, _ = state_lib.state_shardings(dit.EFlowDiT(config.model), optax.identity(), mesh)
    return abstract.params


def checkpoint_step(run_dir: str, step: int | None = None) -> int | None:
    """The training step of the params `load_params(run_dir, step=step)` loads: `step`, else the
    latest checkpoint; for an export, the step it recorded (None if it predates export.json).

    An export holds one set of params: another step asked of it is refused (it would be ignored).
    """
    if rundir.is_export(run_dir):
        record = rundir.read_export_record(run_dir)
        recorded = record.get("checkpoint_step")
        if step is not None and step != recorded:
            held = f"step {recorded}" if recorded is not None else "one step"
            source = f" ({record['source']})" if record.get("source") else ""
            raise rundir.RunError(f"{run_dir} is an export: it holds the params of {held} only, so "
                                  f"--sample.step={step} cannot be honoured; drop --sample.step, or pass the "
                                  f"training run's workdir{source} as --workdir to use step {step}.")
        return recorded
    if step is not None:
        return step
    latest = checkpoint.latest_step(rundir.ckpt_dir(run_dir)) if rundir.has_checkpoint(run_dir) else None
    if latest is None:
        raise rundir.RunError(f"{run_dir} has no checkpoint (no ckpt/<step>/) and is no export (no params/): "
                              f"--workdir must be a training run's workdir or an export directory.")
    return latest


def load_params(run_dir: str, config, mesh, *, use_ema: bool = True, step: int | None = None):
    """EMA (or raw) params from a run's checkpoints or an export dir, onto `mesh`."""
    target = abstract_params(config, mesh)
    if rundir.is_export(run_dir):  # An export: params only, no optimizer state.
        checkpoint_step(run_dir, step)  # Refuses a step it does not hold.
        return checkpoint.restore_saved_params(rundir.params_dir(run_dir), target)
    ckpt_dir = rundir.ckpt_dir(run_dir)
    logging.info("restoring %s params from %s", "EMA" if use_ema else "raw", ckpt_dir)
    return checkpoint.restore_params(ckpt_dir, target, step=step, which="ema" if use_ema else "params")


def export(run_dir: str, out_dir: str, mesh, *, use_ema: bool = True, step: int | None = None) -> str:
    """Writes params (EMA by default), config.json and export.json (which step, which params, where
    from) to out_dir: small, loadable by `load_params`. Refuses an out_dir that is a training run's
    workdir (its own included): params/ there would turn that run into an export."""
    if os.path.realpath(out_dir) == os.path.realpath(run_dir) or rundir.has_checkpoint(out_dir):
        which = "this run's own workdir" if os.path.realpath(out_dir) == os.path.realpath(run_dir) else \
            "a training run's workdir"
        raise rundir.RunError(f"--out={out_dir} is {which}: params/ written there would turn it into an export "
                              f"(its checkpoints and --sample.step ignored from then on); use another --out "
                              f"(the default is {rundir.export_dir(run_dir)}).")
    config = rundir.read_config(run_dir)
    step = checkpoint_step(run_dir, step)
    params = load_params(run_dir, config, mesh, use_ema=use_ema, step=step)
    os.makedirs(out_dir, exist_ok=True)
    checkpoint.save_params(rundir.params_dir(out_dir), params)
    if jax.process_index() == 0:
        with open(rundir.config_path(out_dir), "w") as f:
            f.write(config.to_json(indent=2))
        record = rundir.read_export_record(run_dir) if rundir.is_export(run_dir) else dict(
            checkpoint_step=step, params="ema" if use_ema else "raw", source=os.path.abspath(run_dir))
        with open(rundir.export_record_path(out_dir), "w") as f:
            json.dump(record, f, indent=2)
    return out_dir
