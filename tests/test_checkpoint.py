"""Checkpoints: bitwise round trips, resharding, retention, kill -9, preemption, init_from."""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eflow_jax.checkpoint import (
    Checkpointer,
    CheckpointError,
    PreemptionGuard,
    restore_or_init,
    restore_params,
)

logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How each named param is laid out; optimizer moments follow their param, the rest is replicated.
SPECS = {"kernel": P("fsdp", "data"), "embed": P("data", "fsdp"), "bias": P("fsdp")}


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    ema_params: dict
    opt_state: optax.OptState
    rng: jax.Array


def _mesh(data: int, fsdp: int) -> jax.sharding.Mesh:
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto)


def _shardings(tree, mesh):
    def spec(path, _):
        return NamedSharding(mesh, SPECS.get(getattr(path[-1], "key", None), P()))

    return jax.tree_util.tree_map_with_path(spec, tree)


def _abstract(tree, mesh):
    def leaf(x, sharding):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree, _shardings(tree, mesh))


def _params(seed: int) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jax.random.normal(k2, (8,))},
        "embed": jax.random.normal(k3, (32, 16)),
    }


def _fresh_state(seed: int = 0) -> TrainState:
    params = _params(seed)
    ema = jax.tree.map(lambda p: 0.5 * p, params)
    opt_state = optax.adamw(1e-3).init(params)
    return TrainState(jnp.int32(0), params, ema, opt_state, jax.random.key(seed))


def _trained_state(mesh, seed: int = 0, steps: int = 3) -> TrainState:
    """A state whose optimizer moments, step and rng all differ from a fresh one."""
    state = _fresh_state(seed)
    tx = optax.adamw(1e-3)
    for _ in range(steps):
        grads = jax.tree.map(jnp.sin, state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)
        rng = jax.random.split(state.rng)[0]
        state = TrainState(state.step + 1, params, ema, opt_state, rng)
    return jax.device_put(state, _shardings(state, mesh))


def _host(tree):
    """Host copy that compares bitwise; typed keys become their uint32 key data."""

    def leaf(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(jax.device_get(x))

    return jax.tree.map(leaf, tree)


def _assert_bitwise_equal(actual, expected):
    a_leaves, a_def = jax.tree.flatten(_host(actual))
    e_leaves, e_def = jax.tree.flatten(_host(expected))
    assert a_def == e_def
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert a.dtype == e.dtype
        np.testing.assert_array_equal(a, e)


def _assert_shardings(tree, abstract):
    for x, ax in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract), strict=True):
        assert x.sharding == ax.sharding, (x.sharding, ax.sharding)


def _data_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4).to_iter_dataset())


def test_round_trip_is_bitwise_and_resumes_the_data_iterator(tmp_path):
    mesh = _mesh(4, 2)
    state = _trained_state(mesh)
    expected = _host(state)
    data_iter = _data_iter()
    for _ in range(3):
        next(data_iter)
    ckpt = Checkpointer(tmp_path, save_every=5)
    assert ckpt.save(5, state, data_iter)
    next_batch = next(data_iter)  # advancing after save() must not leak into the checkpoint
    # The train loop donates the state right after an async save: the write must not see it.
    jax.jit(lambda s: jax.tree.map(lambda p: p * 0 - 1, s.params), donate_argnums=0)(state)
    ckpt.close()

    resumed_iter = _data_iter()
    restored = Checkpointer(tmp_path, save_every=5).restore(_abstract(state, mesh), resumed_iter)
    assert isinstance(restored, TrainState)
    assert jax.dtypes.issubdtype(restored.rng.dtype, jax.dtypes.prng_key)
    _assert_bitwise_equal(restored, expected)
    np.testing.assert_array_equal(next(resumed_iter), next_batch)


@pytest.mark.parametrize("target", [(2, 4), (1, 8)])
def test_restore_onto_another_mesh(tmp_path, target):
    state = _trained_state(_mesh(4, 2))
    assert state.params["dense"]["kernel"].sharding.spec == P("fsdp", "data")
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(3, state)
    abstract = _abstract(state, _mesh(*target))
    restored = Checkpointer(tmp_path, save_every=1).restore(abstract)
    _assert_shardings(restored, abstract)
    _assert_bitwise_equal(restored, state)


def test_save_cadence_and_retention(tmp_path):
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer(tmp_path, save_every=3, async_save=False)
    assert [ckpt.should_save(s) for s in (1, 2, 3, 4, 6)] == [False, False, True, False, True]
    assert not ckpt.save(4, state)
    assert ckpt.save(4, state, force=True)
    assert not ckpt.save(4, state, force=True)  # already there: e.g. final save on the grid
    ckpt.close()

    keep = tmp_path / "keep"
    ckpt = Checkpointer(keep, save_every=1, keep_last=2, keep_every=4, async_save=False)
    for step in range(1, 11):
        assert ckpt.save(step, {"w": jnp.full(4, float(step))})
    ckpt.close()
    assert Checkpointer(keep, save_every=1).all_steps() == [4, 8, 9, 10]
    assert sorted(os.listdir(keep)) == ["10", "4", "8", "9"]


_KILLED_MID_SAVE = """
import numpy as np, jax.numpy as jnp
from eflow_jax.checkpoint import Checkpointer
ckpt = Checkpointer({directory!r}, save_every=1, keep_last=1)
ckpt.save(1, {{"w": jnp.ones({size}, jnp.float32)}})
ckpt.wait()
ckpt.save(2, {{"w": jnp.asarray(np.random.default_rng(0).random({size}, np.float32))}})
print("saving", flush=True)  # the write of step 2 is now running in the background
ckpt.wait()
print("saved", flush=True)
"""


def _spawn(script: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO_ROOT,
    )


def _read_until(proc: subprocess.Popen, prefix: str) -> str:
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"child exited ({proc.wait()}) before printing {prefix!r}")


def test_kill_during_save_keeps_the_previous_checkpoint(tmp_path):
    size = 16 * 2**20  # 64 MiB of incompressible floats: the write takes a while
    proc = _spawn(_KILLED_MID_SAVE.format(directory=str(tmp_path), size=size))
    _read_until(proc, "saving")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL

    ckpt = Checkpointer(tmp_path, save_every=1)  # cleans up a half-written step 2
    abstract = {
        "w": jax.ShapeDtypeStruct(
            (size,), jnp.float32, sharding=NamedSharding(_mesh(8, 1), P("data"))
        )
    }
    if ckpt.latest_step() == 2:  # the write won the race: step 2 must then be whole
        expected = np.random.default_rng(0).random(size, np.float32)
    else:
        assert ckpt.latest_step() == 1
        expected = np.ones(size, np.float32)
    assert not [name for name in os.listdir(tmp_path) if "tmp" in name]
    np.testing.assert_array_equal(np.asarray(ckpt.restore(abstract)["w"]), expected)


_PREEMPTED_LOOP = """
import signal, time, jax, jax.numpy as jnp
from eflow_jax.checkpoint import Checkpointer, PreemptionGuard
ckpt = Checkpointer({directory!r}, save_every=1000)
update = jax.jit(lambda s: {{"step": s["step"] + 1, "w": s["w"] + 1.0}})
state = {{"step": jnp.int32(0), "w": jnp.zeros(4)}}
with PreemptionGuard() as guard:
    print("ready", flush=True)
    for step in range(1, 100_000):
        state = update(state)
        time.sleep(0.002)
        ckpt.save(step, state)
        if guard.should_stop(step):
            ckpt.save(step, state, force=True)
            print(f"stopped {{step}}", flush=True)
            break
ckpt.close()
assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
"""


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path):
    proc = _spawn(_PREEMPTED_LOOP.format(directory=str(tmp_path)))
    _read_until(proc, "ready")
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    stopped = int(_read_until(proc, "stopped").split()[1])
    assert proc.wait(timeout=30) == 0
    assert stopped > 1
    ckpt = Checkpointer(tmp_path, save_every=1000)
    assert ckpt.all_steps() == [stopped]
    restored = ckpt.restore(
        {"step": jax.ShapeDtypeStruct((), jnp.int32), "w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    )
    assert int(restored["step"]) == stopped
    np.testing.assert_array_equal(restored["w"], np.full(4, stopped, np.float32))


def test_preemption_guard_second_signal_and_handler_restore():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        with PreemptionGuard(signals=(signal.SIGUSR1,)) as guard:
            assert not guard.should_stop(1)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert guard.should_stop(2) and seen == []
            os.kill(os.getpid(), signal.SIGUSR1)  # second one reaches the earlier handler
            assert seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] * 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_restore_params_reads_only_the_requested_subtree(tmp_path):
    state = _trained_state(_mesh(4, 2))
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(3, state)
        ckpt.save(6, state.replace(ema_params=jax.tree.map(lambda p: p + 1, state.ema_params)))
    # Only params shapes are given: no optimizer state, rng or step is needed (nor read).
    abstract = _abstract(state.params, _mesh(1, 8))
    ema = restore_params(tmp_path, abstract)
    _assert_shardings(ema, abstract)
    _assert_bitwise_equal(ema, jax.tree.map(lambda p: p + 1, state.ema_params))
    _assert_bitwise_equal(restore_params(tmp_path, abstract, step=3), state.ema_params)
    _assert_bitwise_equal(restore_params(tmp_path / "3", abstract, which="params"), state.params)

    with pytest.raises(ValueError, match="which must be one of"):
        restore_params(tmp_path, abstract, which="opt_state")
    del abstract["embed"]
    with pytest.raises(ValueError, match="missing .*unexpected .*embed"):
        restore_params(tmp_path, abstract)
    with pytest.raises(FileNotFoundError):
        restore_params(tmp_path / "nothing", abstract)


def test_resume_order_workdir_then_init_from_then_scratch(tmp_path):
    mesh = _mesh(4, 2)
    source = _trained_state(mesh, seed=1, steps=7)
    with Checkpointer(tmp_path / "other_run", save_every=1) as ckpt:
        ckpt.save(7, source)
    abstract = _abstract(_fresh_state(), mesh)

    def init_fn():
        state = _fresh_state(seed=0)
        return jax.device_put(state, _shardings(state, mesh))

    ckpt = Checkpointer(tmp_path / "run", save_every=1)
    state, start, where = restore_or_init(ckpt, abstract, init_fn)
    assert (start, where) == (0, "scratch")
    _assert_bitwise_equal(state, init_fn())

    state, start, where = restore_or_init(ckpt, abstract, init_fn, init_from=tmp_path / "other_run")
    assert (start, where) == (0, "init_from")
    _assert_bitwise_equal(state.params, source.params)
    _assert_bitwise_equal(state.ema_params, source.ema_params)
    fresh = init_fn()
    _assert_bitwise_equal(
        (state.step, state.opt_state, state.rng), (fresh.step, fresh.opt_state, fresh.rng)
    )
    _assert_shardings(state, abstract)

    ckpt.save(2, state.replace(step=jnp.int32(2)))
    ckpt.wait()
    state, start, where = restore_or_init(ckpt, abstract, init_fn, init_from=tmp_path / "other_run")
    assert (start, where, int(state.step)) == (2, "workdir", 2)
    ckpt.close()


def test_restore_params_is_quiet_about_the_data_iterator_item(tmp_path, caplog):
    # Sampling restores params only: orbax must not warn that the saved data iterator "could not
    # be restored" (it is not wanted), which it did on every sample / eval run.
    state = _trained_state(_mesh(4, 2))
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        ckpt.save(1, state, _data_iter())
    with caplog.at_level("WARNING"):
        ema = restore_params(tmp_path, _abstract(state.params, _mesh(1, 8)))
    _assert_bitwise_equal(ema, state.ema_params)
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


def test_repeated_sigterm_is_ignored_and_a_second_sigint_quits_at_once():
    """timeout/SLURM may send TERM twice: the repeat must not kill a save. Ctrl-C twice must quit."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not under `&`
    with PreemptionGuard((signal.SIGTERM, signal.SIGINT)) as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # would kill this process if it were not ignored
        assert guard.should_stop(1)
        assert signal.getsignal(signal.SIGINT) == guard._handle
        os.kill(os.getpid(), signal.SIGINT)  # the first one saves and stops, no KeyboardInterrupt
        # The next SIGINT is the OS default (immediate exit), not Python's KeyboardInterrupt, which
        # would wait for the main thread to leave a C call such as a compile.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job (`cmd &`): Ctrl-C is not for it
    with PreemptionGuard((signal.SIGTERM, signal.SIGINT)):
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    signal.signal(signal.SIGINT, previous)


def _small_ckpt(directory, steps):
    with Checkpointer(directory, save_every=1) as ckpt:
        for step in steps:
            ckpt.save(step, {"w": jnp.full(1000, float(step))})


def _abstract_w():
    return {"w": jax.ShapeDtypeStruct((1000,), jnp.float32, sharding=NamedSharding(_mesh(8, 1), P()))}


def test_corrupt_latest_checkpoint_names_the_step_and_restore_step_resumes_before_it(tmp_path):
    _small_ckpt(tmp_path, [1, 2, 3])
    data = tmp_path / "3" / "state" / "d"
    for name in os.listdir(data):  # half of every array file of step 3 is lost
        os.truncate(data / name, os.path.getsize(data / name) // 2)
    ckpt = Checkpointer(tmp_path, save_every=1)
    with pytest.raises(CheckpointError) as err:
        restore_or_init(ckpt, _abstract_w(), lambda: None)
    message = str(err.value)
    assert message.startswith(f"cannot restore step 3 from {tmp_path} (")
    assert "--config.checkpoint.restore_step=2" in message and "\n" not in message and len(message) < 700
    with pytest.raises(CheckpointError, match=r"restore_step=5 is not a committed step .*\[1, 2, 3\]"):
        restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=5)

    state, start, source = restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=2)
    assert (start, source) == (2, "workdir")
    np.testing.assert_array_equal(state["w"], np.full(1000, 2.0))
    assert ckpt.all_steps() == [1, 2] and ckpt.should_save(3)  # step 3 no longer shadows new saves
    assert len(os.listdir(f"{tmp_path}.set_aside")) == 1  # moved, not deleted
    ckpt.close()


def _truncate_arrays(step_dir):
    data = step_dir / "state" / "d"
    for name in os.listdir(data):
        os.truncate(data / name, os.path.getsize(data / name) // 2)


def test_restore_step_left_in_a_requeue_command_acts_once(tmp_path, caplog):
    """Issue 25.6: a requeue that kept --config.checkpoint.restore_step set the newer steps aside and retrained
    them on every restart. It acts once; the steps trained since are kept."""
    directory = tmp_path / "ckpt"
    _small_ckpt(directory, [1, 2, 3])
    ckpt = Checkpointer(directory, save_every=1, keep_last=10)
    _, start, _ = restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=2)  # The rewind asked for.
    assert start == 2 and ckpt.all_steps() == [1, 2]
    for step in (3, 4):  # Trained after the rewind, then the job is preempted and requeued as it was.
        ckpt.save(step, {"w": jnp.full(1000, 10.0 * step)})
    ckpt.wait()

    with caplog.at_level("WARNING"):
        state, start, source = restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=2)
    assert (start, source) == (4, "workdir") and ckpt.all_steps() == [1, 2, 3, 4]
    np.testing.assert_array_equal(state["w"], np.full(1000, 40.0))
    assert any("restore_step=2 was applied" in r.getMessage() and "resumes from step 4" in r.getMessage()
               for r in caplog.records)
    assert os.listdir(f"{directory}.set_aside") == [f"3.{os.getpid()}"]  # Only the first rewind's step.

    _truncate_arrays(directory / "4")  # The newest step breaks: the error offers step 3, not the flag's 2.
    with pytest.raises(CheckpointError, match=r"cannot restore step 4 .*restore_step=3 "):
        restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=2)
    _, start, _ = restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=3)  # Another step: applied.
    assert start == 3 and ckpt.all_steps() == [1, 2, 3]
    ckpt.save(4, {"w": jnp.full(1000, 41.0)})
    ckpt.wait()
    _truncate_arrays(directory / "4")  # Nothing between the flag's step and a broken newest: it rewinds.
    state, start, _ = restore_or_init(ckpt, _abstract_w(), lambda: None, restore_step=3)
    assert start == 3 and ckpt.all_steps() == [1, 2, 3]
    np.testing.assert_array_equal(state["w"], np.full(1000, 30.0))
    ckpt.close()


def test_params_only_loads_print_no_orbax_warnings_that_read_like_a_broken_checkpoint(tmp_path, caplog):
    """Issue 25.11: --mode=sample/export/eval printed orbax's 'Metadata file does not exist ...
    _CHECKPOINT_METADATA' and 'Given directory is read only' on every healthy load."""
    from eflow_jax.checkpoint import latest_step, restore_saved_params, save_params

    w = {"w": jnp.arange(8.0)}
    with Checkpointer(tmp_path / "ckpt", save_every=1, async_save=False) as ckpt:
        ckpt.save(3, {"params": w, "ema_params": w})
    save_params(tmp_path / "export" / "params", w)
    abstract = {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(_mesh(8, 1), P()))}
    with caplog.at_level("INFO"):
        assert latest_step(tmp_path / "ckpt") == 3  # --mode=eval
        ema = restore_params(tmp_path / "ckpt", abstract, which="ema")  # --mode=sample / export
        exported = restore_saved_params(tmp_path / "export" / "params", abstract)  # sampling an export
    np.testing.assert_array_equal(ema["w"], np.arange(8.0))
    np.testing.assert_array_equal(exported["w"], np.arange(8.0))
    noisy = [r.getMessage() for r in caplog.records if r.levelno >= 30]
    assert not noisy, noisy
    with caplog.at_level("WARNING"):  # Only those two are dropped, and only during the loads.
        logging.warning("Given directory is read only=%s", "elsewhere")
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == ["Given directory is read only=elsewhere"]


def test_save_errors_are_one_line_with_the_step_and_the_os_error(tmp_path, monkeypatch):
    ckpt = Checkpointer(tmp_path, save_every=1)
    assert ckpt.save(1, {"w": jnp.ones(4)})

    def disk_full(*args, **kwargs):
        raise RuntimeError("orbax wrapper") from OSError(errno.ENOSPC, "No space left on device", str(tmp_path))

    monkeypatch.setattr(ckpt._manager, "wait_until_finished", disk_full)
    with pytest.raises(CheckpointError) as err:  # an async write fails: reported when awaited
        ckpt.wait()
    assert str(err.value) == (f"saving step 1 to {tmp_path} failed: OSError: [Errno 28] No space left on device: "
                              f"'{tmp_path}'; free space or fix the directory's permissions, then rerun: it "
                              f"resumes from step 1.")
    monkeypatch.undo()
    monkeypatch.setattr(ckpt._manager, "save", disk_full)
    with pytest.raises(CheckpointError, match=r"^saving step 2 to .* No space left on device"):
        ckpt.save(2, {"w": jnp.ones(4)})
    ckpt.close()
