"""The training loop, top to bottom: mesh -> data -> model & objective -> state -> step -> loop."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics

from eflow_jax import checkpoint, optim, rundir, sample, sharding, writers
from eflow_jax import state as state_lib
from eflow_jax.data import pipeline
from eflow_jax.flow import cost, objectives
from eflow_jax.models import dit


# The first of either saves at the next step boundary and exits 0; a second SIGINT quits at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(rundir.RunError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is left in place."""


def validate(config: ml_collections.ConfigDict, mesh) -> None:
    """Config errors before the workdir is touched or anything compiles, each naming the field to change."""
    for field in ("total_steps", "checkpoint.save_every", "checkpoint.keep_last", "log.every_steps"):
        value = functools.reduce(getattr, field.split("."), config)
        if value < 1:
            raise ValueError(f"{field}={value}: it must be >= 1; set --config.{field} to a positive number.")
    if config.checkpoint.restore_step < -1:
        raise ValueError(f"checkpoint.restore_step={config.checkpoint.restore_step}: use -1 (the latest "
                         f"checkpoint) or a committed step of the workdir.")
    dit.layout_of(config.model)
    objectives.validate_config(config.objective)
    optim.validate_config(config.optim)
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                         f"(mesh data x fsdp = {dict(mesh.shape)}); change batch_size or config.mesh.")
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size={config.batch_size} is not divisible by {jax.process_count()} processes.")
    objectives.split_sizes(config.objective, config.batch_size)
    t, h, w, c = config.model.video_shape
    if config.data.num_classes != config.model.num_classes:
        raise ValueError(f"data.num_classes={config.data.num_classes} != model.num_classes="
                         f"{config.model.num_classes}; set both to the dataset's class count.")
    if h != w:
        raise ValueError(f"model.video_shape={tuple(config.model.video_shape)}: the data pipeline makes square "
                         f"clips; set H == W.")
    pipeline.validate_data_config(config.data, model_frames=t, model_size=h, model_channels=c)


def make_train_step(config, net, tx, loss_fn):
    """One update: objective, grads, optimizer, EMA, norms, non-finite guard; pure in (state, batch)."""

    def train_step(state: state_lib.TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_of(params):
            loss, metrics = loss_fn(params, batch["video"], batch["label"], rng, state.step)
            if config.train.inject_nan_at_step >= 0:  # Debug hook for the NaN-stop test.
                loss = jnp.where(state.step + 1 == config.train.inject_nan_at_step, jnp.nan, loss)
            return loss, metrics

        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if config.train.skip_nonfinite:  # Keep the old state; the step still counts.
            keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
            params, opt_state = keep_old(params, state.params), keep_old(opt_state, state.opt_state)
        decay = optim.ema_decay(config.optim, state.step)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, params)
        new_state = state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
        metrics = dict(metrics, loss=loss, grad_norm=grad_norm, finite=finite.astype(jnp.float32),
                       param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
        return new_state, metrics

    return train_step


def average(metrics: dict) -> clu_metrics.Collection:
    """A clu Collection averaging every scalar metric (merged across steps on device)."""
    return _averages_of(tuple(sorted(metrics))).single_from_model_output(**metrics)


@functools.lru_cache(maxsize=8)
def _averages_of(names: tuple[str, ...]) -> type[clu_metrics.Collection]:
    # Built once per set of metric names, not once per step: the loop calls `average` every step.
    return clu_metrics.Collection.create(**{k: clu_metrics.Average.from_output(k) for k in names})


def train_flops_per_step(config) -> float:
    """Forward+backward FLOPs of one step from the cost model (for TFLOP/s and MFU)."""
    flops = dit.count_flops(config.model).as_dict()
    fe = cost.forward_equivalents(config.objective, flops, config.batch_size, config.model.decoupled)
    return fe["flops_per_example"] * config.batch_size


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
    """Trains from the workdir's latest checkpoint (or init_from, or scratch) to config.total_steps.

    Bad input raises a one-line `rundir.RunError` before the workdir is touched; a second run on the
    same workdir fails at once; stop signals save and return; every exit closes what was opened.
    """
    # ---- Mesh and validation ----
    mesh = sharding.make_mesh(config.mesh)
    logging.info("topology: %s", sharding.describe(mesh))
    try:
        validate(config, mesh)
    except (ValueError, FileNotFoundError) as e:
        raise rundir.ConfigError(str(e)) from e
    rundir.check_model_config(workdir, config)
    # Unwound in reverse on any exit: writers, checkpointer (awaits its save), signal handlers, lock.
    with contextlib.ExitStack() as closing:
        closing.enter_context(rundir.WorkdirLock(workdir, enabled=jax.process_index() == 0))
        guard = closing.enter_context(checkpoint.PreemptionGuard(STOP_SIGNALS))
        return _train(config, workdir, mesh, guard, closing)


def _train(config, workdir: str, mesh, guard, closing: contextlib.ExitStack) -> state_lib.TrainState:
    # ---- Input ----
    data_iter = pipeline.make_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count())

    # ---- Model, objective, optimizer ----
    model, net = dit.make_network(config.model)
    tx = optim.make_optimizer(config.optim, config.total_steps)
    loss_fn = objectives.make_loss(config.objective, net, config.total_steps)
    abstract_state, state_shardings = state_lib.state_shardings(model, tx, mesh, config.seed)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_state.params))
    logging.info("model %s: %.2fM params", config.model.variant, n_params / 1e6)

    # ---- Shard & restore (workdir -> init_from -> scratch) ----
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "ckpt"), save_every=config.checkpoint.save_every,
        keep_last=config.checkpoint.keep_last, keep_every=config.checkpoint.keep_every or None,
        async_save=config.checkpoint.async_save)
    closing.callback(ckpt.close)
    state, start_step, source = checkpoint.restore_or_init(
        ckpt, abstract_state, lambda: state_lib.create_state(model, tx, mesh, config.seed, state_shardings),
        data_iter, init_from=config.checkpoint.init_from or None,
        restore_step=None if config.checkpoint.restore_step < 0 else config.checkpoint.restore_step)
    logging.info("starting at step %d (%s)", start_step, source)
    # Only now does this run own the workdir's record: a failed restore leaves the old one as it was.
    if jax.process_index() == 0:
        rundir.write_config_snapshot(workdir, config)
        rundir.trim_metrics(workdir, start_step)
    writer = writers.MetricWriter(workdir)
    closing.callback(writer.close)

    # ---- Update step: one jit, explicit shardings, donated state ----
    batch_shardings = {"video": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_fn = jax.jit(make_train_step(config, net, tx, loss_fn),
                      in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    step_fn = _compile(step_fn, abstract_state, batch_shardings, config)  # AOT once, reused below.

    flops_per_step = train_flops_per_step(config)
    peak = writers.peak_flops_per_device()
    sample_labels = sample.parse_labels("", config.log.num_samples, config.model.num_classes)

    def write_samples(step: int):
        for n in config.log.sample_steps:
            videos = sample.generate(config, net, state.ema_params, sample_labels, n, seed=0,
                                     batch_size=len(sample_labels))
            if jax.process_index() == 0:
                sample.write_videos(os.path.join(workdir, "samples", f"step_{step}"), videos,
                                    sample_labels, 0, n, config.log.fps)
                from eflow_jax.eval import export

                writer.video_strip(step, f"samples/{n}_step", export.image_strip(videos[0], 8))

    # ---- Loop ----
    pending, window, finite_flags = None, [], []
    last_good = ckpt.latest_step()
    t0, steps_timed, step = time.perf_counter(), 0, start_step
    # A stop signal during setup or the compile: leave before step one (nothing new to save).
    if not guard.should_stop(start_step):
        for step in range(start_step + 1, config.total_steps + 1):
            if config.log.profile_start and step == config.log.profile_start:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
            batch = sharding.to_global_batch(next(data_iter), mesh)
            state, metrics = step_fn(state, batch)
            finite_flags.append(metrics["finite"])
            # Metrics stay on device; merging is lazy, so no host sync per step.
            pending = average(metrics) if pending is None else pending.merge(average(metrics))
            window.append(step)
            if config.log.profile_start and step == config.log.profile_start + config.log.profile_steps:
                jax.profiler.stop_trace()

            is_last = step == config.total_steps
            stop_here = step == config.train.stop_at_step or guard.should_stop(step)
            must_save = ckpt.should_save(step) or is_last or stop_here
            if step % config.log.every_steps == 0 or must_save:
                # Never checkpoint a non-finite state: check every flag since the last check.
                bad = np.flatnonzero(np.asarray(jax.device_get(finite_flags)) == 0)
                if bad.size and not config.train.skip_nonfinite:
                    first_bad = step - len(finite_flags) + 1 + int(bad[0])
                    raise NonFiniteError(
                        f"non-finite loss or gradient at step {first_bad}; the last good checkpoint is "
                        f"step {last_good} in {ckpt.directory}. Lower optim.lr, set optim.grad_clip, or set "
                        f"train.skip_nonfinite=True to skip such updates.")
                finite_flags = []
            if step % config.log.every_steps == 0 or is_last:
                values = {k: float(v) for k, v in pending.compute().items()}
                dt = time.perf_counter() - t0
                steps_timed = len(window)
                values |= _throughput(steps_timed, dt, config, flops_per_step, peak)
                values["lr"] = float(optim.learning_rate(config.optim, config.total_steps)(step))
                writer.scalars(step, values)
                eta = (config.total_steps - step) / max(values["steps_per_s"], 1e-9)
                logging.info("step %d | loss %.4f | %.2f steps/s | %.1f ex/s | %.1f TFLOP/s/dev | MFU %s | ETA %.0fs",
                             step, values["loss"], values["steps_per_s"], values["examples_per_s"],
                             values["tflops_per_device"], _fmt(values.get("mfu")), eta)
                pending, window, t0 = None, [], time.perf_counter()
            if must_save and ckpt.save(step, state, data_iter, force=is_last or stop_here):
                last_good = step
            if stop_here:
                ckpt.wait()  # Committed before anything else runs or the job's grace period ends.
                logging.warning("stopping early (preemption or train.stop_at_step): saved step %d", step)
                break
            if config.log.sample_every and step % config.log.sample_every == 0 and not is_last:
                write_samples(step)
    ckpt.wait()
    if step == config.total_steps and config.log.sample_steps:
        write_samples(step)
    return state


def _throughput(steps: int, seconds: float, config, flops_per_step: float, peak) -> dict:
    steps_per_s = steps / max(seconds, 1e-9)
    tflops = steps_per_s * flops_per_step / jax.device_count() / 1e12
    return dict(steps_per_s=steps_per_s, examples_per_s=steps_per_s * config.batch_size,
                tflops_per_device=tflops, mfu=tflops * 1e12 / peak if peak else None)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _compile(step_fn, abstract_state, batch_shardings, config):
    """Lowers and compiles the step once, printing its memory analysis (config.train.check_memory)."""
    t, h, w, c = config.model.video_shape
    b = config.batch_size
    batch = {"video": jax.ShapeDtypeStruct((b, t, h, w, c), jnp.float32, sharding=batch_shardings["video"]),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_shardings["label"])}
    start = time.perf_counter()
    compiled = step_fn.lower(abstract_state, batch).compile()
    logging.info("compiled the train step in %.1fs", time.perf_counter() - start)
    mem = compiled.memory_analysis() if config.train.check_memory else None
    if mem is not None:
        gib = lambda n: n / 2**30  # noqa: E731
        logging.info("compiled step memory per device: args %.2f GiB, outputs %.2f GiB, temps %.2f GiB, "
                     "code %.2f GiB", gib(mem.argument_size_in_bytes), gib(mem.output_size_in_bytes),
                     gib(mem.temp_size_in_bytes), gib(mem.generated_code_size_in_bytes))
    return compiled
