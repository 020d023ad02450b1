"""The training loop, top to bottom: mesh -> data -> model & objective -> state -> step -> loop."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from eflow_jax import checkpoint, compile_cache, loop, monitor, optim, rundir, sample, sharding, writers
from eflow_jax import state as state_lib
from eflow_jax import text as text_lib
from eflow_jax.data import pipeline
from eflow_jax.flow import condition, cost, objectives
from eflow_jax.models import dit

# The first of either saves at the next step boundary and exits 0; a second SIGINT quits at once.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
DENSE_COMPILE = ("background", "at_switch")


def train_config() -> ml_collections.ConfigDict:
    """A run config's `train` section: how the loop runs (not what it computes)."""
    return ml_collections.ConfigDict(dict(
        skip_nonfinite=False,  # True: skip updates with a non-finite loss/grad instead of stopping.
        check_memory=True,  # Print the compiled step's memory analysis before step 1.
        stop_at_step=0,  # > 0: save and exit cleanly after this step (time-limited jobs); resume later.
        inject_nan_at_step=-1,  # Debug only: make the loss NaN at this step (tests the NaN stop).
        # Compiled programs kept across restarts (eflow_jax/compile_cache.py): a restart loads the
        # train step instead of tracing and compiling it (~2 min for EFlow-B on a GPU). 'auto':
        # $JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME/eflow_jax/xla (~/.cache/eflow_jax/xla);
        # '' turns it off.
        compile_cache_dir="auto",
        device_prefetch=2,  # Batches put on the device ahead of the step (host->device overlaps it).
        # The dense fine-tune's program (objective.dense_finetune_frac): 'background' compiles it in a
        # thread once the first step is dispatched, so the run does not pause at the switch;
        # 'at_switch' compiles it when the switch comes (the run pauses for one compile there).
        dense_compile="background",
    ))


def checkpoint_config() -> ml_collections.ConfigDict:
    """A run config's `checkpoint` section (the loop builds its Checkpointer from it)."""
    return ml_collections.ConfigDict(dict(
        save_every=2_000, keep_last=3, keep_every=50_000, async_save=True,
        init_from="",  # Another run's workdir/ckpt (or a step dir): params + EMA only.
        # -1: the latest; else resume from this committed step (later ones are set aside). Acts once: a
        # requeue that repeats it resumes from the newest step (checkpoint.restore_or_init).
        restore_step=-1,
    ))


def log_config() -> ml_collections.ConfigDict:
    """A run config's `log` section: what the loop logs, samples and gauges, and how often."""
    return ml_collections.ConfigDict(dict(
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


class NonFiniteError(rundir.RunError):
    """The loss or a gradient became NaN/inf; the last good checkpoint is left in place."""


# A logged param_norm this many times the run's first logged one: the weights have exploded (healthy runs
# stay within a few times their initial norm; lr=1e6 on the demo goes from 47 to 1e6 in one step).
PARAM_NORM_BLOWUP = 10.0
_SANITY_KEYS = ("loss", "grad_norm", "param_norm", "update_norm")


def divergence_sign(row: dict, reference: dict | None) -> str:
    """Why a logged row shows a state that has already diverged ('' when it looks healthy): a non-finite
    loss, norm or probe value, or a param norm PARAM_NORM_BLOWUP times the reference row's."""
    for k in (*_SANITY_KEYS, *sorted(k for k in row if k.startswith("probe_"))):
        if k in row and not math.isfinite(row[k]):
            return f"{k}={row[k]}"
    norm, ref = row.get("param_norm"), (reference or {}).get("param_norm")
    if norm is not None and ref and norm > PARAM_NORM_BLOWUP * ref:
        return f"param_norm {norm:.3g}, {norm / ref:.0f}x the {ref:.3g} of step {reference['step']}"
    return ""


def last_sane_checkpoint(rows: list[dict], saved: list[int]) -> tuple[int | None, int | None, str]:
    """The newest saved step that the logged metrics vouch for, and where divergence shows first.

    Args:
      rows: logged rows in step order (metrics.jsonl's: step, loss, grad_norm, param_norm, probe_*...).
      saved: the committed checkpoint steps.

    Returns:
      (good, first_bad, why): `good` is the newest saved step at or before the last row of the healthy
      prefix (any saved step when no row looks diverged: the loss and grads were finite up to each save),
      or None; `first_bad` is the step of the first row that looks diverged (None if none), `why` its sign.
    """
    reference = next((r for r in rows if math.isfinite(r.get("param_norm", math.nan))), None)
    healthy_until, first_bad, why = None, None, ""
    for row in rows:
        if why := divergence_sign(row, reference):
            first_bad = row["step"]
            break
        healthy_until = row["step"]
    if first_bad is None:
        return (max(saved) if saved else None), None, ""
    vouched = [s for s in saved if healthy_until is not None and s <= healthy_until]
    return (max(vouched) if vouched else None), first_bad, why


def nonfinite_message(step: int, rows: list[dict], saved: list[int], directory: str) -> str:
    """The NaN stop's one line: the step, and the last checkpoint worth resuming from (not merely the last)."""
    good, first_bad, why = last_sane_checkpoint(rows, saved)
    fix = "lower optim.lr, set optim.grad_clip, or set train.skip_nonfinite=True to skip such updates"
    head = f"non-finite loss or gradient at step {step}"
    if first_bad is not None:
        head += f", but the divergence began earlier: step {first_bad} logged {why}"
    if good is None:
        where = f"no checkpoint in {directory} precedes it" + (f" (it has steps {saved})" if saved else "")
        return f"{head}; {where}: start again in a new --workdir and {fix}."
    if good == max(saved):
        return f"{head}; the last good checkpoint is step {good} in {directory}. {fix[0].upper()}{fix[1:]}."
    return (f"{head}; the last good checkpoint is step {good} in {directory} (later ones are not): rerun with "
            f"--config.checkpoint.restore_step={good} (later steps are set aside, not deleted) and {fix}.")


def _logged_rows(workdir: str, upto: int) -> list[dict]:
    """The rows of metrics.jsonl up to step `upto` (the history before this run), [] if unreadable."""
    try:
        with open(rundir.metrics_path(workdir)) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        return []
    return [r for r in rows if isinstance(r, dict) and r.get("step", upto + 1) <= upto]


def validate(config: ml_collections.ConfigDict, mesh) -> None:
    """Config errors before the workdir is touched or anything compiles, each naming the field to change."""
    for field in ("total_steps", "checkpoint.save_every", "checkpoint.keep_last", "log.every_steps"):
        value = functools.reduce(getattr, field.split("."), config)
        if value < 1:
            raise ValueError(f"{field}={value}: it must be >= 1; set --config.{field} to a positive number.")
    if config.log.eval_every < 0 or config.log.eval_every % config.log.every_steps:
        raise ValueError(f"log.eval_every={config.log.eval_every}: use 0 (off) or a multiple of log.every_steps="
                         f"{config.log.every_steps}, so the gauge's scores join a log row.")
    if config.checkpoint.restore_step < -1:
        raise ValueError(f"checkpoint.restore_step={config.checkpoint.restore_step}: use -1 (the latest "
                         f"checkpoint) or a committed step of the workdir.")
    if config.train.dense_compile not in DENSE_COMPILE:
        raise ValueError(f"train.dense_compile={config.train.dense_compile!r}; use one of {DENSE_COMPILE}.")
    dit.layout_of(config.model)
    m = config.model
    if m.num_classes < 0 or (not m.num_classes and not m.context_dim):
        raise ValueError(f"model.num_classes={m.num_classes} and model.context_dim={m.context_dim}: the model "
                         f"would take neither class labels nor text; set --config.model.num_classes to the data's "
                         f"class count (data.num_classes={config.data.num_classes}), or train a text config "
                         f"(configs/t2v.py).")
    if not m.num_classes and config.data.num_classes:
        raise ValueError(f"model.num_classes=0 but data.num_classes={config.data.num_classes}: the model would "
                         f"ignore the data's labels; set --config.model.num_classes={config.data.num_classes} "
                         f"(or --config.data.num_classes=0 for a text run).")
    objectives.validate_config(config.objective)
    optim.validate_config(config.optim)
    if (ema_warning := optim.ema_horizon_warning(config.optim, config.total_steps)) is not None:
        _warn_once(ema_warning)
    dp = sharding.data_parallel_size(mesh)
    if config.batch_size % dp:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by the data-parallel size {dp} "
                         f"(mesh data x fsdp = {dict(mesh.shape)}); change batch_size or config.mesh.")
    if config.data.source == "latents" and config.data.vae:  # Samples decode with it: the latents must be its.
        from eflow_jax.data import encode_latents

        encode_latents.check_latents_match_vae(config.data.path, config.data.vae)
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size={config.batch_size} is not divisible by {jax.process_count()} processes.")
    objectives.batch_split(config.objective, config.batch_size)
    if config.objective.dense_finetune_frac > 0 and drop_ratio(config, dense=False) == 0:
        raise ValueError(f"objective.dense_finetune_frac={config.objective.dense_finetune_frac} but the model drops "
                         f"no tokens (model.keep_per_group={config.model.keep_per_group} of drop_group "
                         f"{tuple(config.model.drop_group)}); set dense_finetune_frac=0 or keep fewer tokens.")
    t, h, w, c = config.model.video_shape
    if config.model.num_classes and config.data.num_classes != config.model.num_classes:
        raise ValueError(f"data.num_classes={config.data.num_classes} != model.num_classes="
                         f"{config.model.num_classes}; set both to the dataset's class count.")
    if h != w:
        raise ValueError(f"model.video_shape={tuple(config.model.video_shape)}: the data pipeline makes square "
                         f"clips; set H == W.")
    pipeline.validate_data_config(config.data, model_frames=t, model_size=h, model_channels=c,
                                  text_shape=(m.context_len, m.context_dim) if m.context_dim else None,
                                  text=text_lib.caption_encoder(config))


@functools.lru_cache(maxsize=16)
def _warn_once(message: str) -> None:
    """train_and_evaluate validates before the lock and again in setup: say it once."""
    logging.warning("%s", message)


def to_model_input(video: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] (on the device: 4x less to transfer); floats as they are."""
    if video.dtype == jnp.uint8:
        return video.astype(jnp.float32) * (2.0 / 255.0) - 1.0
    return video.astype(jnp.float32)


def drop_ratio(config, dense: bool) -> float:
    """The share of tokens the middle skips in the token-dropped (dense=False) or dense-fine-tune phase."""
    if dense or not config.objective.token_drop:
        return 0.0
    return dit.layout_of(config.model).drop_ratio


def make_train_step(config, net, tx, loss_fn, drop_ratio: float = 0.0):
    """One update: objective, grads, optimizer, EMA, norms, non-finite guard; pure in (state, batch).

    drop_ratio is only logged (metric `drop_ratio`: which phase of the run the step belongs to).
    """

    def train_step(state: state_lib.TrainState, batch: dict):
        rng = jax.random.fold_in(state.rng, state.step)
        video = to_model_input(batch["video"])

        def loss_of(params):
            cond = condition.from_batch(batch, labels=config.model.num_classes > 0, text=config.model.context_dim > 0)
            loss, metrics = loss_fn(params, video, cond, rng, state.step)
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
                       param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates),
                       drop_ratio=jnp.float32(drop_ratio))
        return new_state, metrics

    return train_step


def train_flops_per_step(config, dense: bool = False) -> float:
    """Forward+backward FLOPs of one step from the cost model (for TFLOP/s and MFU), in the
    token-dropped phase or (dense=True) the dense fine-tune."""
    flops = dit.count_flops(config.model).as_dict()
    obj = objectives.dense_phase(config.objective) if dense else config.objective
    fe = cost.forward_equivalents(obj, flops, config.batch_size, config.model.decoupled)
    return fe["flops_per_example"] * config.batch_size


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything `setup` builds: what the loop runs, and what bench/train.py times."""

    mesh: jax.sharding.Mesh
    model: dit.EFlowDiT
    net: Any  # flow.network.Network
    tx: optax.GradientTransformation
    abstract_state: state_lib.TrainState  # ShapeDtypeStructs with shardings.
    state_shardings: Any
    batch_spec: dict  # ShapeDtypeStructs (with shardings) of a global batch: uint8 pixels, float32 latents.
    step: Any  # The AOT-compiled train step (state, batch) -> (state, metrics); donates the state.
    compile_s: float  # Trace + lower + compile, or the load from the compile cache.
    lower_s: float  # Tracing and lowering (0 when the whole executable was loaded).
    compile_source: str  # 'executable' (loaded whole), 'xla_cache' (traced, XLA skipped) or 'compiled'.
    save_s: float  # Writing the fresh executable to the compile cache (part of compile_s).
    flops_per_step: float  # Of `step` (the token-dropped phase when there is a dense fine-tune).
    # SPRINT's dense fine-tune (objective.dense_finetune_frac): loop steps > dense_from run the dense program.
    # The loop starts its compile in a background thread once the first step is dispatched
    # (compile_dense_in_background, train.dense_compile='background'), so the run does not pause at the
    # switch; otherwise the first step_for past the switch compiles it. Either way it is the same
    # program (compile_step(dense=True), through the compile cache), so the losses do not change.
    dense_from: int = 0  # = total_steps when there is no dense phase.
    dense_flops_per_step: float = 0.0
    compile_dense: Any = None  # () -> compiled dense step; None without a dense phase.
    _compiled: dict = dataclasses.field(default_factory=dict)
    _background: dict = dataclasses.field(default_factory=dict)  # thread, started, result or error

    def init_state(self, seed: int) -> state_lib.TrainState:
        return state_lib.create_state(self.model, self.tx, self.mesh, seed, self.state_shardings)

    def step_for(self, step: int):
        """The compiled program of loop step `step` (1-based: the update that makes state.step == step)."""
        if step <= self.dense_from or self.compile_dense is None:
            return self.step
        if "dense" not in self._compiled:
            if self._background:
                waited = self.wait_background(why="the dense fine-tune starts")
                if waited > 1.0:
                    logging.info("the dense fine-tune's program was still compiling: the switch waited %.1fs",
                                 waited)
            if "result" in self._background:
                self._compiled["dense"] = self._background["result"]
            else:  # No background compile, or it failed (beside a running step, e.g. out of memory for
                # XLA's autotuning): compile now, between steps, as without one.
                if "error" in self._background:
                    logging.warning("compiling the dense fine-tune's program in the background failed (%s: %s); "
                                    "compiling it now", type(self._background["error"]).__name__,
                                    self._background["error"])
                self._compiled["dense"] = self.compile_dense()
        return self._compiled["dense"]

    def compile_dense_in_background(self) -> bool:
        """Starts compiling (or loading) the dense program in a daemon thread; False if there is none
        or it is already compiled or started. step_for past the switch waits for it (and compiles
        again there if it failed); train_and_evaluate waits for it before returning (wait_background)."""
        if self.compile_dense is None or "dense" in self._compiled or self._background:
            return False

        def run():
            try:
                self._background["result"] = self.compile_dense()
            except BaseException as e:  # noqa: BLE001 - raised at the switch (step_for), logged at exit.
                self._background["error"] = e

        thread = threading.Thread(target=run, name="compile-dense-program", daemon=True)
        self._background.update(thread=thread, started=time.perf_counter())
        thread.start()
        logging.info("compiling the dense fine-tune's program (steps > %d) in the background", self.dense_from)
        return True

    def wait_background(self, why: str = "the run ends") -> float:
        """Waits for a background compile still running (XLA cannot stop one); returns seconds waited."""
        thread = self._background.get("thread")
        if thread is None or not thread.is_alive():
            return 0.0
        start = time.perf_counter()
        logging.info("%s while the dense fine-tune's program compiles in the background (started %.0fs ago): "
                     "waiting for it", why, start - self._background["started"])
        try:
            thread.join()
        except KeyboardInterrupt:  # Ctrl-C during the wait: leave now. Unwinding with the compile in flight
            # would crash the interpreter's exit; what the run had to save is saved (train_and_evaluate).
            logging.warning("interrupted while the dense program compiles: exiting without waiting for it")
            logging.flush()
            os._exit(128 + signal.SIGINT)
        return time.perf_counter() - start

    def mean_flops_per_step(self, after: int, upto: int) -> float:
        """Mean FLOPs of loop steps after+1..upto (a log window may straddle the switch)."""
        n = max(upto - after, 1)
        dense = max(0, upto - max(after, self.dense_from)) if self.compile_dense else 0
        return ((n - dense) * self.flops_per_step + dense * self.dense_flops_per_step) / n


def setup(config: ml_collections.ConfigDict) -> Program:
    """Mesh, validation, model, objective, optimizer, shardings and the compiled step.

    The CLI (train_and_evaluate) and bench/train.py both call this, so the benchmark times the
    program training runs: same shardings, donation, batch dtypes and compile options.
    """
    cache_dir = compile_cache.configure(config.train.compile_cache_dir)  # Before anything compiles.
    mesh = sharding.make_mesh(config.mesh)
    logging.info("topology: %s", sharding.describe(mesh))
    validate(config, mesh)

    model, net = dit.make_network(config.model)
    tx = optim.make_optimizer(config.optim, config.total_steps)
    abstract_state, state_shardings = state_lib.state_shardings(model, tx, mesh, config.seed)
    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abstract_state.params))
    logging.info("model %s: %.2fM params", config.model.variant, n_params / 1e6)

    # One jit per phase, explicit shardings, donated state; compiled ahead of time, once each.
    batch_spec = _batch_spec(config, sharding.batch_sharding(mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    config_json = config.to_json_best_effort(sort_keys=True)

    def compile_step(dense: bool):
        obj = objectives.dense_phase(config.objective) if dense else config.objective
        loss_fn = objectives.make_loss(obj, net, config.total_steps)
        step_fn = jax.jit(make_train_step(config, net, tx, loss_fn, drop_ratio(config, dense)),
                          in_shardings=(state_shardings, jax.tree.map(lambda a: a.sharding, batch_spec)),
                          out_shardings=(state_shardings, replicated), donate_argnums=(0,))
        name = "train_step_dense" if dense else "train_step"
        key = compile_cache.program_key(config_json, name, (abstract_state, batch_spec))
        what = f"the {'dense fine-tune' if dense else 'first'} train step"
        compiled, facts = compile_cache.compile_or_load(lambda: step_fn.lower(abstract_state, batch_spec),
                                                        cache_dir, key, what=what)
        logging.info("%s %s in %.1fs (%.1fs tracing and lowering)", _HOW[facts["source"]], what,
                     facts["compile_s"], facts["lower_s"])
        if config.train.check_memory:
            _log_memory(compiled)
        return compiled, facts

    compiled, facts = compile_step(dense=False)
    dense_from = objectives.dense_from_step(config.objective, config.total_steps)
    has_dense = dense_from < config.total_steps
    return Program(mesh, model, net, tx, abstract_state, state_shardings, batch_spec, compiled,
                   facts["compile_s"], facts["lower_s"], facts["source"], facts["save_s"],
                   train_flops_per_step(config),
                   dense_from=dense_from, dense_flops_per_step=train_flops_per_step(config, dense=True),
                   compile_dense=(lambda: compile_step(dense=True)[0]) if has_dense else None)


_HOW = dict(executable="loaded", xla_cache="traced (XLA compile from the persistent cache)", compiled="compiled")


def _batch_spec(config, batch_sharding) -> dict:
    # Pixels travel as uint8 (4x less host->device traffic; to_model_input scales them on the
    # device); the pipeline hands latents over as float32.
    dtype = jnp.float32 if config.data.source == "latents" else jnp.uint8
    b, m = config.batch_size, config.model
    spec = {"video": jax.ShapeDtypeStruct((b, *m.video_shape), dtype, sharding=batch_sharding),
            "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=batch_sharding)}
    if m.context_dim:  # Precomputed text-encoder states, stored (and sent) as bf16.
        spec["text_embedding"] = jax.ShapeDtypeStruct((b, m.context_len, m.context_dim), jnp.bfloat16,
                                                      sharding=batch_sharding)
        spec["text_mask"] = jax.ShapeDtypeStruct((b, m.context_len), jnp.bool_, sharding=batch_sharding)
    return spec


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> state_lib.TrainState:
    """Trains from the workdir's latest checkpoint (or init_from, or scratch) to config.total_steps.

    Bad input raises a one-line `rundir.RunError` before the workdir is touched; a second run on the
    same workdir fails at once; stop signals (also during the compile) save and return; every exit
    closes what was opened.
    """
    try:
        validate(config, sharding.make_mesh(config.mesh))
    except (ValueError, FileNotFoundError) as e:
        raise rundir.ConfigError(str(e)) from e
    rundir.check_model_config(workdir, config)
    prog = None
    try:
        # Unwound in reverse on any exit: writers, checkpointer (awaits its save), signal handlers, lock.
        with contextlib.ExitStack() as closing:
            closing.enter_context(rundir.WorkdirLock(workdir, enabled=jax.process_index() == 0))
            guard = closing.enter_context(checkpoint.PreemptionGuard(STOP_SIGNALS))
            # ---- Input: uint8 batches; its worker processes start while the step compiles ----
            data_iter = pipeline.make_train_iterator(
                config.data, global_batch_size=config.batch_size, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count(), float_video=False,
                text=text_lib.caption_encoder(config))
            closing.callback(getattr(data_iter, "close", lambda: None))
            with loop.workers_started_early(data_iter, enabled=pipeline.worker_count(config.data) > 0):
                prog = setup(config)
            return _train(config, workdir, prog, data_iter, guard, closing)
    finally:
        # A run that stops before the switch (stop signal, stop_at_step, an error) while the dense
        # program still compiles: everything above is saved and closed (the lock too); XLA cannot stop
        # a compile, and jax's exit handler would end a process whose compile is running with status -1,
        # so the process waits for it here (at most one compile; a second Ctrl-C still quits at once).
        if prog is not None:
            prog.wait_background()


def _train(config, workdir: str, prog: Program, data_iter, guard, closing: contextlib.ExitStack
           ) -> state_lib.TrainState:
    # ---- Shard & restore (workdir -> init_from -> scratch) ----
    ckpt = checkpoint.Checkpointer(
        rundir.ckpt_dir(workdir), save_every=config.checkpoint.save_every,
        keep_last=config.checkpoint.keep_last, keep_every=config.checkpoint.keep_every or None,
        async_save=config.checkpoint.async_save)
    closing.callback(ckpt.close)
    state, start_step, source = checkpoint.restore_or_init(
        ckpt, prog.abstract_state, lambda: prog.init_state(config.seed),
        data_iter, init_from=config.checkpoint.init_from or None,
        restore_step=None if config.checkpoint.restore_step < 0 else config.checkpoint.restore_step)
    logging.info("starting at step %d (%s)", start_step, source)
    # Only now does this run own the workdir's record: a failed restore leaves the old one as it was.
    if jax.process_index() == 0:
        rundir.write_config_snapshot(workdir, config)
        rundir.trim_metrics(workdir, start_step)
    writer = writers.MetricWriter(workdir)
    closing.callback(writer.close)
    # Wrapped after the restore: the prefetcher reads ahead from the restored position.
    batches = loop.DevicePrefetcher(data_iter, lambda b: sharding.to_global_batch(b, prog.mesh),
                                    size=config.train.device_prefetch)
    closing.enter_context(contextlib.closing(batches))

    peak = writers.peak_flops_per_device()
    quality = monitor.QualityMonitor(config, prog.net, prog.mesh)
    requests = None  # Made at the first samples: text runs encode their prompts then.

    def write_samples(step: int):
        nonlocal requests
        if requests is None:  # Text runs: the run's --config.sample.prompt(s), else held-out captions.
            n = config.log.num_samples
            captions = pipeline.heldout_captions(config.data, n) if config.model.context_dim else ()
            requests = sample.requests_for(config, config.sample, config.log.num_samples, captions)
        decode = sample.pixel_decoder(config)
        for n in config.log.sample_steps:
            videos = sample.generate(config, prog.net, state.ema_params, requests, n, seed=0,
                                     batch_size=len(requests))
            if decode is not None:  # Latent runs: the run's VAE makes them watchable.
                videos = decode(videos)
            if jax.process_index() == 0:  # One folder per step; its samples.json says what made the files.
                record = sample.samples_record(config, workdir, step, config.sample, requests, kind="train",
                                               num_steps=config.log.sample_steps)
                record.update(seed=0, fps=config.log.fps, params="ema")
                sample.write_requests(rundir.samples_dir(workdir, step), videos, requests, 0, n, config.log.fps,
                                      train_step=step, record=record)
                from eflow_jax.eval import export

                writer.video_strip(step, f"samples/{n}_step", export.image_strip(videos[0], 8))

    # ---- Loop: nothing below waits for the device except at log and save steps ----
    sums, clock = loop.MetricSums(), loop.Clock()
    last_saved, window_start, step = ckpt.latest_step(), start_step, start_step
    # What the NaN stop judges checkpoints by: the logged rows, this run's and those before it.
    history = _logged_rows(workdir, start_step)
    # The first logged row also says how long the step took to compile, and if the cache had it.
    startup = dict(compile_s=prog.compile_s, lower_s=prog.lower_s, compile_save_s=prog.save_s,
                   compile_cache_hit=float(prog.compile_source != "compiled"),  # XLA's compile skipped.
                   trace_skipped=float(prog.compile_source == "executable"))  # Tracing skipped too.
    # A stop signal during setup or the compile: leave before step one (nothing new to save).
    if not guard.should_stop(start_step):
        for step in range(start_step + 1, config.total_steps + 1):
            if config.log.profile_start and step == config.log.profile_start:
                jax.profiler.start_trace(rundir.profile_dir(workdir))
            with clock.wait("data"):
                batch = next(batches)
            with clock.wait("device"):  # Returns at once unless the device queue is full.
                state, metrics = prog.step_for(step)(state, batch)  # The dense fine-tune past the switch.
            if step == start_step + 1 and _compiles_dense_ahead(config, prog, step):
                prog.compile_dense_in_background()  # After the first dispatch: step 1 is not delayed.
            sums.add(metrics)
            if config.log.profile_start and step == config.log.profile_start + config.log.profile_steps:
                jax.profiler.stop_trace()

            is_last = step == config.total_steps
            stop_here = step == config.train.stop_at_step or guard.should_stop(step)
            must_save = ckpt.should_save(step) or is_last or stop_here
            if step % config.log.every_steps == 0 or must_save:
                # Never checkpoint a non-finite state: the sums hold the window's first bad step.
                with clock.wait("device"):
                    bad = sums.first_nonfinite()
                if bad is not None and not config.train.skip_nonfinite:
                    saved = sorted(set(ckpt.all_steps()) | ({last_saved} - {None}))
                    raise NonFiniteError(nonfinite_message(window_start + 1 + bad, history, saved, ckpt.directory))
            if step % config.log.every_steps == 0 or is_last:
                with clock.wait("device"):
                    values = sums.means()
                values |= clock.fractions() | startup
                values |= loop.throughput(step - window_start, clock.elapsed(), config.batch_size,
                                          prog.mean_flops_per_step(window_start, step), peak)
                values["lr"] = float(optim.learning_rate(config.optim, config.total_steps)(step))
                values |= quality.probe(state.params)
                if quality.gauge_due(step, is_last):  # Sampling time falls in no window: the clock resets below.
                    values |= quality.gauge(step, state.ema_params)
                writer.scalars(step, values)
                history.append({k: v for k, v in values.items() if k in _SANITY_KEYS or k.startswith("probe_")}
                               | {"step": step})
                eta = (config.total_steps - step) / max(values["steps_per_s"], 1e-9)
                logging.info("step %d | loss %.4f | probe %s | %.2f steps/s | %.1f ex/s | %.1f TFLOP/s/dev | "
                             "MFU %s | data wait %.0f%% | host %.0f%% | ETA %.0fs",
                             step, values["loss"], _fmt(values.get("probe_vel_err"), "{:.4f}"),
                             values["steps_per_s"], values["examples_per_s"], values["tflops_per_device"],
                             _fmt(values.get("mfu")), 100 * values["data_wait_frac"], 100 * values["host_frac"], eta)
                window_start, startup = step, {}
                clock.reset()
            if must_save and ckpt.save(step, state, batches, force=is_last or stop_here):
                last_saved = step
            if stop_here:
                ckpt.wait()  # Committed before anything else runs or the job's grace period ends.
                logging.warning("stopping early (preemption or train.stop_at_step): saved step %d", step)
                break
            if config.log.sample_every and step % config.log.sample_every == 0 and not is_last:
                write_samples(step)
    ckpt.wait()
    if step == config.total_steps and config.log.sample_steps:
        write_samples(step)
    if quality.last_summary:  # The run's result, as its last line (the demo's README points to it).
        logging.info("%s", quality.last_summary)
    return state


def _compiles_dense_ahead(config, prog: Program, step: int) -> bool:
    """Whether to compile the dense program ahead: there is a dense phase still to come, this run
    reaches it (train.stop_at_step), and train.dense_compile asks for it."""
    if config.train.dense_compile != "background" or prog.compile_dense is None or step > prog.dense_from:
        return False
    return not (0 < config.train.stop_at_step <= prog.dense_from)


def _fmt(v, spec: str = "{:.1%}") -> str:
    return "n/a" if v is None else spec.format(v)


def _log_memory(compiled) -> None:
    """The compiled step's memory analysis (config.train.check_memory), where the backend has one."""
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = lambda n: n / 2**30  # noqa: E731
        logging.info("compiled step memory per device: args %.2f GiB, outputs %.2f GiB, temps %.2f GiB, "
                     "code %.2f GiB", gib(mem.argument_size_in_bytes), gib(mem.output_size_in_bytes),
                     gib(mem.temp_size_in_bytes), gib(mem.generated_code_size_in_bytes))
