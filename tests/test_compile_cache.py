"""Compiled programs across restarts: the executable layer skips tracing, misses on any change, survives bad files."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eflow_jax import compile_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUTS = (jax.ShapeDtypeStruct((4,), jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))


def _program(scale: float, traces: list):
    def step(state, batch):
        traces.append(1)  # Runs once per trace, never when an executable is loaded.
        return state * scale + batch.sum(), {"loss": jnp.sum(batch**2)}

    f = jax.jit(step, donate_argnums=(0,))
    return lambda: f.lower(*INPUTS)


def _run(compiled):
    state, metrics = compiled(jnp.arange(4.0), jnp.array([1.0, 2.0, 3.0]))
    return np.asarray(state), float(metrics["loss"])


def test_second_load_skips_tracing_and_runs_the_same_program(tmp_path):
    traces = []
    key = compile_cache.program_key("{}", "step", INPUTS)
    first, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
    assert facts["source"] == "compiled" and facts["lower_s"] > 0 and len(traces) == 1
    assert os.path.exists(os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe"))
    second, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
    assert (facts["source"], facts["lower_s"], len(traces)) == ("executable", 0.0, 1)
    want = _run(first)
    np.testing.assert_array_equal(want[0], [6.0, 8.0, 10.0, 12.0])
    got = _run(second)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1] == 14.0


@pytest.fixture
def jax_layer(tmp_path):
    """jax's persistent cache at a fresh tmp dir, storing every compile; the session's restored after."""
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    yield compile_cache.configure(str(tmp_path / "jax_layer"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compile_cache.configure(before[0])


def test_an_executable_loaded_from_jax_layer_is_not_saved_again(tmp_path, jax_layer):
    key = compile_cache.program_key("{}", "step", INPUTS)
    path = os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe")
    _, facts = compile_cache.compile_or_load(_program(5.0, []), str(tmp_path), key)
    assert facts["source"] == "compiled" and os.path.exists(path)
    os.remove(path)  # E.g. pruned, or a key change (log cadence) over the same program.
    traces = []
    compiled, facts = compile_cache.compile_or_load(_program(5.0, traces), str(tmp_path), key)
    assert facts["source"] == "xla_cache" and len(traces) == 1
    assert not os.path.exists(path)  # XLA:CPU's copy of a loaded executable lacks its kernels.
    np.testing.assert_array_equal(_run(compiled)[0], [6.0, 11.0, 16.0, 21.0])


def test_cache_off_or_several_processes_always_trace(tmp_path, monkeypatch):
    traces = []
    for _ in range(2):
        compile_cache.compile_or_load(_program(2.0, traces), "", "k")
    assert len(traces) == 2
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # Each process would need its own entry.
    for _ in range(2):
        _, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), "k")
    assert len(traces) == 4 and facts["source"] != "executable"
    assert not os.path.exists(compile_cache.executables_dir(str(tmp_path)))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_bad_entry_costs_a_compile_not_the_run(tmp_path, damage):
    key = compile_cache.program_key("{}", "step", INPUTS)
    path = os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe")
    compile_cache.compile_or_load(_program(2.0, []), str(tmp_path), key)
    blob = open(path, "rb").read()
    open(path, "wb").write({"truncate": blob[: len(blob) // 2], "garbage": b"\x80not a pickle" * 99,
                            "empty": b""}[damage])
    traces = []
    compiled, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
    assert facts["source"] == "compiled" and len(traces) == 1
    np.testing.assert_array_equal(_run(compiled)[0], [6.0, 8.0, 10.0, 12.0])
    assert open(path, "rb").read() != b"" and compile_cache.load_executable(path) is not None  # Rewritten whole.


def test_the_key_changes_with_everything_that_decides_the_program(monkeypatch):
    base = compile_cache.program_key('{"lr": 1}', "train_step", INPUTS)
    assert compile_cache.program_key('{"lr": 1}', "train_step", INPUTS) == base
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharded = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    changed = {
        "config": compile_cache.program_key('{"lr": 2}', "train_step", INPUTS),
        "program": compile_cache.program_key('{"lr": 1}', "train_step_dense", INPUTS),
        "shape": compile_cache.program_key('{"lr": 1}', "train_step", (INPUTS[0], INPUTS[0])),
        "sharding": compile_cache.program_key('{"lr": 1}', "train_step", (sharded, INPUTS[1])),
    }
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    changed["source"] = compile_cache.program_key('{"lr": 1}', "train_step", INPUTS)
    monkeypatch.undo()
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_math=false")
    changed["xla_flags"] = compile_cache.program_key('{"lr": 1}', "train_step", INPUTS)
    monkeypatch.undo()
    with jax.default_matmul_precision("bfloat16"):
        changed["jax_flags"] = compile_cache.program_key('{"lr": 1}', "train_step", INPUTS)
    assert len(set(changed.values()) | {base}) == len(changed) + 1, changed


def test_source_digest_follows_every_package_file(tmp_path, monkeypatch):
    (tmp_path / "flow").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "flow" / "b.py").write_text("y = 1\n")
    monkeypatch.setattr(compile_cache, "_PACKAGE_DIR", tmp_path)
    before = compile_cache.source_digest()
    (tmp_path / "flow" / "b.py").write_text("y = 2\n")
    assert compile_cache.source_digest() != before
    assert len(compile_cache.source_digest()) == 64
    assert compile_cache.source_digest() == compile_cache.source_digest()


def test_only_the_most_recently_used_executables_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(compile_cache, "KEEP_EXECUTABLES", 3)
    path = {}
    for i, scale in enumerate((1.0, 2.0, 3.0)):
        path[scale] = os.path.join(compile_cache.executables_dir(str(tmp_path)), f"k{scale}.exe")
        compile_cache.compile_or_load(_program(scale, []), str(tmp_path), f"k{scale}")
        os.utime(path[scale], (1000 + i, 1000 + i))
    monkeypatch.setattr(compile_cache, "KEEP_EXECUTABLES", 2)
    compile_cache.load_executable(path[1.0])  # A load counts as a use (the oldest becomes the newest).
    compile_cache.compile_or_load(_program(4.0, []), str(tmp_path), "k4.0")
    kept = sorted(os.listdir(compile_cache.executables_dir(str(tmp_path))))
    assert kept == ["k1.0.exe", "k4.0.exe"]


def _run_cli(workdir, cache_dir):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")  # The tiny step compiles in < 1 s.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "eflow_jax.main",
           "--config=configs/demo.py:steps=2,objective=eflow,test=1,batch=16",
           f"--config.train.compile_cache_dir={cache_dir}", f"--workdir={workdir}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline()), proc.stderr


def test_a_restart_loads_the_train_step_without_tracing(tmp_path):
    cache = tmp_path / "cache"
    cold, _ = _run_cli(tmp_path / "a", cache)
    assert os.listdir(compile_cache.executables_dir(str(cache)))
    assert [p for p in os.listdir(cache) if p.endswith("-cache")], "nothing in jax's own layer"
    warm, log = _run_cli(tmp_path / "b", cache)
    assert (cold["trace_skipped"], cold["compile_cache_hit"]) == (0.0, 0.0)
    assert (warm["trace_skipped"], warm["compile_cache_hit"], warm["lower_s"]) == (1.0, 1.0, 0.0)
    assert "loaded the first train step" in log
    assert warm["compile_s"] < cold["compile_s"]
    assert warm["loss"] == cold["loss"] and warm["grad_norm"] == cold["grad_norm"]  # The same program, bit for bit.


def test_cache_hits_on_another_thread_do_not_count_for_this_one():
    """A compile on another thread (the background dense program) that hits jax's cache must not make this
    thread's fresh compile look like a hit (its executable would then never be saved)."""
    import threading

    before = compile_cache.cache_hits()
    other = threading.Thread(target=lambda: compile_cache._count_cache_hits("/jax/compilation_cache/cache_hits"))
    other.start()
    other.join()
    assert compile_cache.cache_hits() == before
    compile_cache._count_cache_hits("/jax/compilation_cache/cache_hits")
    assert compile_cache.cache_hits() == before + 1
