"""Orbax checkpoints that never lose work: train state + data iterator, resume, preemption.

One checkpoint step directory holds two items:
  ``state``  the train state pytree (PyTreeSave: sharded arrays written by every process, OCDBT),
  ``data``   the grain iterator state (one JSON file per process, grain's own orbax handler).

Usage in a train loop::

    ckpt = Checkpointer(rundir.ckpt_dir(workdir), save_every=1000, keep_last=3, keep_every=10_000)
    state, start_step, source = restore_or_init(ckpt, abstract_state, init_fn, data_iter,
                                                init_from=config.init_from)
    with PreemptionGuard() as guard:
        for step in range(start_step + 1, total_steps + 1):
            state = train_step(state, next(data_iter))         # state.step == step afterwards
            ckpt.save(step, state, data_iter)                   # async; only every `save_every`
            if guard.should_stop(step):                         # SIGTERM: save now and leave
                break
        ckpt.save(step, state, data_iter, force=True)            # no-op if `step` is saved already
    ckpt.close()                                                 # waits for the async write

Conventions:
  * ``step`` is the number of finished updates; a checkpoint at step N resumes at step N + 1.
  * Restores go INTO the caller's abstract state (a pytree of ``jax.ShapeDtypeStruct`` with
    ``.sharding``), so a run saved on one mesh resumes on another one.
  * Typed PRNG keys (``jax.random.key``) and raw uint32 key data are both stored as they are.
  * Resume order (`restore_or_init`): latest checkpoint in the workdir → ``init_from`` (another
    run's checkpoint directory, or one of its step directories: params and ema_params only, fresh
    optimizer, step 0) → scratch.
  * Async saves copy device arrays to host before `save` returns, so the caller may donate the
    state to the next jitted step right away. The grain iterator state is written synchronously.

Failures are one line (`CheckpointError`): a save names the step and the OS error; a restore that
fails names the step and the previous committed one, which ``restore_step`` resumes from (the later
steps are moved to ``<directory>.set_aside/``, not deleted). ``restore_step`` acts once: it is recorded
in ``<directory>.restore_step.json``, and a later run given the same step (a requeue that kept the flag)
resumes from the newest step instead of setting aside what was trained since.

Why work is never lost: orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and renames it on
commit, so a kill during a save leaves a tmp directory that `latest_step`/`restore` ignore and the
next `Checkpointer` deletes (``cleanup_tmp_directories``); old steps are only deleted after the
new one has committed. A kill -9 between saves loses only the steps since the last commit.

orbax logs a lot at INFO under absl; entry points should call
``absl.logging.set_verbosity(absl.logging.WARNING)`` (this library does not touch global logging).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from eflow_jax.preemption import PreemptionGuard  # noqa: F401  (part of this module's API)
from eflow_jax.rundir import RunError

PyTree = Any

_STATE = "state"  # item names inside one step directory
_DATA = "data"
_WHICH_TO_FIELD = {"ema": "ema_params", "params": "params"}


class CheckpointError(RunError):
    """A save or restore failed; the message names the step, the cause and what to do."""


def _os_error(err: BaseException) -> BaseException:
    """The OSError behind `err` (orbax wraps them), else `err` itself."""
    seen, cause = set(), err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return err


def _one_line(err: BaseException, limit: int = 300) -> str:
    err = _os_error(err)
    text = (str(err).strip().splitlines() or [""])[0]
    text = text.split(" [tensorstore_spec")[0]  # tensorstore appends kilobytes of JSON spec
    return f"{type(err).__name__}: {text if len(text) <= limit else text[:limit] + '...'}"


def _retention_options(keep_last: int, keep_every: int | None) -> dict[str, Any]:
    """Keep the newest `keep_last` steps plus every step divisible by `keep_every`."""
    policies = getattr(ocp, "checkpoint_managers", None)
    if policies is not None and hasattr(policies, "AnyPreservationPolicy"):
        keep = [policies.LatestN(n=keep_last)]
        if keep_every:
            keep.append(policies.EveryNSteps(interval_steps=keep_every))
        return {"preservation_policy": policies.AnyPreservationPolicy(policies=keep)}
    # Older orbax: the same rule through the (later deprecated) options.
    return {"max_to_keep": keep_last, "keep_period": keep_every}


def _local_path(directory: str | os.PathLike) -> str:
    """orbax wants absolute paths; leave remote URIs (gs://...) alone."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
    """Saves and restores (train state, grain iterator) with an orbax `CheckpointManager`.

    Args:
      directory: where step directories live (created if missing).
      save_every: `save`/`should_save` act every this many steps (others need `force`).
      keep_last: number of newest checkpoints kept.
      keep_every: additionally keep every step divisible by this forever (None: keep none).
      async_save: write in a background thread; `wait`/`close` block until it is done.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}.")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest step resumes), got {keep_last}.")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be None or >= 1, got {keep_every}.")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_every,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # half-written steps of a killed run
            create=True,
            **_retention_options(keep_last, keep_every),
        )
        self.directory = _local_path(directory)
        self._save_every = save_every
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # the step of the async save not yet awaited

    def latest_step(self) -> int | None:
        """Newest committed step, or None when there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """All committed steps, ascending."""
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        """True on `save_every` boundaries past the latest step, or at a jax preemption sync point.

        Decided here rather than by orbax, whose default policy also saves a run's first step.
        """
        step = int(step)
        latest = self.latest_step()
        if latest is not None and step <= latest:
            return False
        return step % self._save_every == 0 or self._manager.reached_preemption(step)

    def save(self, step: int, state: PyTree, data_iter: Any = None, *, force: bool = False) -> bool:
        """Starts saving `state` (and the iterator state) as `step` if due.

        Args:
          step: number of finished updates that `state` reflects.
          state: pytree of jax.Arrays (typed PRNG keys allowed).
          data_iter: a grain iterator (DatasetIterator or DataLoaderIterator) or None.
          force: save even off the `save_every` grid (end of training, preemption).

        Returns:
          Whether a save was started (False when not due or when `step` is saved already).
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        if not force and not self.should_save(step):
            return False
        items = {_STATE: ocp.args.PyTreeSave(state)}
        if data_iter is not None:
            import grain  # only needed with a data iterator (absent on some GPU hosts)

            items[_DATA] = grain.checkpoint.CheckpointSave(data_iter)
        try:  # Also raises the error of the previous async save, if it failed.
            # force: the decision was made above; orbax must not apply its own policy on top.
            started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:
            raise self._save_error(self._in_flight or step, e) from e
        self._in_flight = step if started else self._in_flight
        return started

    def _save_error(self, step: int, err: BaseException) -> CheckpointError:
        return CheckpointError(
            f"saving step {step} to {self.directory} failed: {_one_line(err)}; free space or fix the "
            f"directory's permissions, then rerun: it resumes from step {self.latest_step()}.")

    def restore(
        self, abstract_state: PyTree, data_iter: Any = None, step: int | None = None
    ) -> PyTree:
        """Restores a step into `abstract_state`'s shardings; also rewinds `data_iter` in place.

        Args:
          abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` (e.g. from
            `jax.eval_shape` plus the run's shardings) with the saved state's structure.
          data_iter: the grain iterator to set to the saved position, or None.
          step: which step; the latest one when None.

        Returns:
          The state with the structure of `abstract_state`.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None or step not in self._manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else f'for step {step} '}in {self.directory} "
                f"(committed steps: {self.all_steps()}); use restore_or_init to start from scratch."
            )
        items = {_STATE: _pytree_restore_args(abstract_state)}
        if data_iter is not None:
            data_dir = os.path.join(self.directory, str(step), _DATA)
            if os.path.isdir(data_dir) and os.path.exists(os.path.join(data_dir, _data_file_name())):
                import grain

                items[_DATA] = grain.checkpoint.CheckpointRestore(data_iter)
            elif os.path.isdir(data_dir):
                _restore_data_from_other_process_count(data_iter, data_dir)
            else:
                logging.warning(
                    "Step %d in %s has no data iterator state; the iterator "
                    "starts from its current position.",
                    step,
                    self.directory,
                )
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored[_STATE]

    def wait(self) -> None:
        """Blocks until the in-flight async save (if any) has committed."""
        step, self._in_flight = self._in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e

    def close(self) -> None:
        """Waits for pending saves and deletions, then releases the manager (also when the wait fails)."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def set_aside_after(self, step: int) -> list[int]:
        """Moves committed steps after `step` to `<directory>.set_aside/` so that `step` is the latest.

        Resuming from an earlier step must not leave later ones: they would be restored next time, and
        `should_save` skips every step up to the latest. Process 0 moves; all processes reload.
        """
        later = [s for s in self.all_steps() if s > step]
        if later and jax.process_index() == 0:
            aside = f"{self.directory.rstrip('/')}.set_aside"
            os.makedirs(aside, exist_ok=True)
            for s in later:
                # Not over an earlier one (a container's pid is often the same from run to run).
                name, n = f"{s}.{os.getpid()}", 0
                while os.path.lexists(os.path.join(aside, name)):
                    n += 1
                    name = f"{s}.{os.getpid()}.{n}"
                os.replace(os.path.join(self.directory, str(s)), os.path.join(aside, name))
            logging.warning("Moved steps %s to %s to resume from step %d.", later, aside, step)
        if later:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("set_aside_after")
            self._manager.reload()
        return later

    @property
    def _restore_record(self) -> str:
        return f"{self.directory.rstrip('/')}.restore_step.json"

    def applied_restore_step(self) -> int | None:
        """The restore_step last applied to this directory (None: never, or the record is unreadable)."""
        try:
            with open(self._restore_record) as f:
                return int(json.load(f)["restore_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def record_restore_step(self, step: int, set_aside: list[int]) -> None:
        """Notes that resuming from `step` was applied (process 0 writes)."""
        if jax.process_index() != 0:
            return
        record = dict(restore_step=int(step), set_aside=[int(s) for s in set_aside],
                      time=time.strftime("%Y-%m-%d %H:%M:%S"))
        tmp = f"{self._restore_record}.tmp"
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.replace(tmp, self._restore_record)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# orbax warnings that every read-only load prints and that read like a broken checkpoint: a manager
# opened read-only says so, and an item directory has no _CHECKPOINT_METADATA of its own (the step has it).
_BENIGN_ON_READ = ("Given directory is read only", "Metadata file does not exist")


class _BenignOrbaxReadWarnings(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return not ("orbax" in record.pathname and str(record.msg).startswith(_BENIGN_ON_READ))


@contextlib.contextmanager
def _quiet_reads():
    """Drops _BENIGN_ON_READ while a params-only load runs (orbax logs through absl's logger)."""
    quiet, logger = _BenignOrbaxReadWarnings(), std_logging.getLogger("absl")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _pytree_restore_args(abstract: PyTree, partial: bool = False) -> ocp.args.PyTreeRestore:
    kwargs = {"partial_restore": True} if partial else {}
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), **kwargs
    )


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _leaf_paths(tree: PyTree) -> set[tuple[str, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(_key_name(k) for k in path) for path, _ in leaves}


def _resolve_step(directory: str, step: int | None) -> tuple[str, int | None]:
    """Accepts a checkpoint directory, or one step directory inside it (…/ckpt/5000)."""
    base = os.path.basename(directory.rstrip("/"))
    if step is None and base.isdigit() and os.path.isdir(os.path.join(directory, _STATE)):
        return os.path.dirname(directory.rstrip("/")), int(base)
    return directory, step


def _restore_subtrees(
    directory: str | os.PathLike, abstract_subtrees: Mapping[str, PyTree], step: int | None
) -> tuple[dict[str, PyTree], int]:
    """Reads only the named top-level fields of a saved state (nothing else is read).

    orbax's partial restore silently returns the abstract leaf for a path it does not find, so the
    requested paths are checked against the checkpoint's metadata first.
    """
    with _quiet_reads():
        return _restore_subtrees_loudly(directory, abstract_subtrees, step)


def _restore_subtrees_loudly(
    directory: str | os.PathLike, abstract_subtrees: Mapping[str, PyTree], step: int | None
) -> tuple[dict[str, PyTree], int]:
    directory, step = _resolve_step(_local_path(directory), step)
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with ocp.CheckpointManager(
        directory, item_handlers={_STATE: ocp.PyTreeCheckpointHandler()}, options=options
    ) as manager:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise FileNotFoundError(
                f"No checkpoint {'' if step is None else f'for step {step} '}in {directory} "
                f"(committed steps: {sorted(manager.all_steps())}); pass a run's checkpoint dir."
            )
    # Only the state item is opened: the manager's metadata/restore would visit the saved data
    # iterator too and warn that it "could not be restored" on every params-only load.
    item_dir = os.path.join(directory, str(step), _STATE)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as item_checkpointer:
        metadata = item_checkpointer.metadata(item_dir)
        metadata = getattr(metadata, "item_metadata", None) or metadata
        saved = getattr(metadata, "tree", metadata)
        for field, abstract in abstract_subtrees.items():
            if field not in saved:
                raise KeyError(
                    f"Checkpoint {directory}/{step} has no '{field}'; it has {sorted(saved)}."
                )
            missing = _leaf_paths(abstract) - _leaf_paths(saved[field])
            extra = _leaf_paths(saved[field]) - _leaf_paths(abstract)
            if missing or extra:
                raise ValueError(
                    f"'{field}' in {directory}/{step} does not match the model: missing "
                    f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]} (up to 5 each); "
                    "check the model config matches the one of the checkpoint."
                )
        args = _pytree_restore_args(dict(abstract_subtrees), partial=True)
        restored = item_checkpointer.restore(item_dir, args=args)
    return dict(restored), step


def restore_params(
    directory: str | os.PathLike,
    abstract_params: PyTree,
    *,
    step: int | None = None,
    which: str = "ema",
) -> PyTree:
    """Loads only `params` or `ema_params` of a saved train state (for sampling / evaluation).

    No optimizer state is read and no optimizer shapes are needed.

    Args:
      directory: a Checkpointer directory, or one step directory inside it.
      abstract_params: pytree of jax.ShapeDtypeStruct with the target shardings.
      step: which step; the latest one when None (or the step of a step directory).
      which: 'ema' (ema_params) or 'params'.

    Returns:
      The params pytree, sharded as `abstract_params` asks.
    """
    if which not in _WHICH_TO_FIELD:
        raise ValueError(f"which must be one of {sorted(_WHICH_TO_FIELD)}, got {which!r}.")
    field = _WHICH_TO_FIELD[which]
    restored, _ = _restore_subtrees(directory, {field: abstract_params}, step)
    return restored[field]


def _field(tree: PyTree, name: str) -> Any:
    return tree[name] if isinstance(tree, Mapping) else getattr(tree, name, None)


def _replace(tree: PyTree, **fields: Any) -> PyTree:
    if isinstance(tree, Mapping):
        return {**tree, **fields}
    return dataclasses.replace(tree, **fields)


def restore_or_init(
    checkpointer: Checkpointer,
    abstract_state: PyTree,
    init_fn: Callable[[], PyTree],
    data_iter: Any = None,
    init_from: str | os.PathLike | None = None,
    restore_step: int | None = None,
) -> tuple[PyTree, int, str]:
    """Resumes from the workdir, else warm-starts from `init_from`, else initialises.

    Args:
      checkpointer: this run's Checkpointer.
      abstract_state: the sharded abstract train state (has `params` and `ema_params` fields).
      init_fn: () -> a freshly initialised, sharded train state (step 0).
      data_iter: grain iterator to rewind when resuming (left untouched otherwise).
      init_from: another run's checkpoint directory (or step directory) to take params from.
      restore_step: resume from this committed step instead of the latest (later ones are set aside).
        Applied once per step value: a later run given the same value (a requeue whose command kept
        the flag) resumes from the newest step, keeping what was trained since; it rewinds again only
        if that newest step cannot be restored and no other step lies between.

    Returns:
      (state, start_step, source) with source one of 'workdir', 'init_from', 'scratch'; the loop
      continues with step `start_step + 1`.
    """
    steps = checkpointer.all_steps()
    if restore_step is not None:
        if restore_step not in steps:
            raise CheckpointError(f"checkpoint.restore_step={restore_step} is not a committed step in "
                                  f"{checkpointer.directory} (it has {steps}); pick one of them or -1 (the latest).")
        since = [s for s in steps if s > restore_step]
        if since and checkpointer.applied_restore_step() == restore_step:
            # The flag did its job in an earlier run; these steps were trained after it. Setting them
            # aside again would retrain them on every requeue.
            logging.warning("checkpoint.restore_step=%d was applied to %s by an earlier run; steps %s trained "
                            "since are kept and the run resumes from step %d. Drop the flag (to rewind to "
                            "step %d again, delete %s first).", restore_step, checkpointer.directory, since,
                            since[-1], restore_step, checkpointer._restore_record)
            try:
                return _restore_latest(checkpointer, abstract_state, data_iter, steps)
            except CheckpointError:
                if since != [steps[-1]]:  # Another step lies between: the error offers it.
                    raise
                logging.warning("step %d cannot be restored: resuming from checkpoint.restore_step=%d as the "
                                "flag asks.", steps[-1], restore_step)
        checkpointer.record_restore_step(restore_step, checkpointer.set_aside_after(restore_step))
    if checkpointer.latest_step() is not None:
        return _restore_latest(checkpointer, abstract_state, data_iter, checkpointer.all_steps())
    state = init_fn()
    if not init_from:
        return state, 0, "scratch"
    subtrees = {"params": _field(abstract_state, "params")}
    if _field(abstract_state, "ema_params") is not None:
        subtrees["ema_params"] = _field(abstract_state, "ema_params")
    restored, step = _restore_subtrees(init_from, subtrees, step=None)
    logging.info("Initialised %s from %s step %d.", sorted(restored), init_from, step)
    # Fresh optimizer state and step 0 come from init_fn; only the weights are taken over.
    return _replace(state, **restored), 0, "init_from"


def _restore_latest(checkpointer: Checkpointer, abstract_state: PyTree, data_iter: Any, steps: list[int]
                    ) -> tuple[PyTree, int, str]:
    latest = checkpointer.latest_step()
    logging.info("Resuming from %s step %d.", checkpointer.directory, latest)
    try:
        return checkpointer.restore(abstract_state, data_iter, step=latest), latest, "workdir"
    except Exception as e:
        earlier = [s for s in steps if s < latest]
        offer = (f"to resume from the previous committed step, rerun with --config.checkpoint.restore_step="
                 f"{earlier[-1]} (step {latest} is moved aside, not deleted)" if earlier else
                 "there is no earlier step; use a new --workdir")
        raise CheckpointError(f"cannot restore step {latest} from {checkpointer.directory} "
                              f"({_one_line(e)}); {offer}.") from e


def _data_file_name() -> str:
    """grain's name for this process's iterator state (its handler's convention)."""
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _restore_data_from_other_process_count(data_iter: Any, data_dir: str) -> None:
    """A checkpoint saved by a different number of processes: every process's train iterator is
    at global position next_index * process_count (each takes an equal block of every global batch,
    data/pipeline.py), so this process's position is that global position over its own count."""
    import json
    import re

    saved = sorted(f for f in os.listdir(data_dir) if re.fullmatch(r"process_\d+-of-\d+\.json", f))
    state = None
    if saved:
        with open(os.path.join(data_dir, saved[0])) as f:
            state = json.loads(f.read())
    if not isinstance(state, dict) or set(state) != {"next_index"}:
        logging.warning("%s holds no iterator state this topology can use (%s); the iterator starts from "
                        "its current position.", data_dir, saved)
        return
    old_count = int(re.fullmatch(r"process_\d+-of-(\d+)\.json", saved[0]).group(1))
    position = int(state["next_index"]) * old_count
    if position % jax.process_count():
        logging.warning("%s: global position %d does not split over %d processes; the iterator starts "
                        "from its current position.", data_dir, position, jax.process_count())
        return
    logging.warning("%s was saved by %d processes; resuming this process at global position %d.",
                    data_dir, old_count, position)
    data_iter.set_state({"next_index": position // jax.process_count()})


# ---- params-only loads: exports, and the latest step of a run being evaluated ----


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest committed step of a checkpoint directory (None if it has none).

    A read-only manager: reading beside a running job must not touch its files.
    """
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
    with _quiet_reads(), ocp.CheckpointManager(_local_path(directory), options=options) as manager:
        return manager.latest_step()


def save_params(directory: str | os.PathLike, params: PyTree) -> None:
    """Writes a params pytree alone (an export: no optimizer state, no data iterator)."""
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(_local_path(directory), params, force=True)


def restore_saved_params(directory: str | os.PathLike, abstract_params: PyTree) -> PyTree:
    """Reads params written by `save_params` into `abstract_params`' shapes and shardings."""
    with _quiet_reads(), ocp.PyTreeCheckpointer() as ckptr:
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_params)
        return ckptr.restore(_local_path(directory), item=abstract_params, restore_args=restore_args)
