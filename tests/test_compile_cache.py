"""Compiled programs across restarts: the executable layer skips tracing, misses on any change, survives bad files."""

import builtins
import errno
import json
import os
import pickle
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
    cold, cold_log = _run_cli(tmp_path / "a", cache)
    announce = cold_log.index("compiling the first train step (up to minutes the first time; later starts load it")
    assert announce < cold_log.index("compiled the first train step in")  # Said before the silent compile.
    assert os.listdir(compile_cache.executables_dir(str(cache)))
    assert [p for p in os.listdir(cache) if p.endswith("-cache")], "nothing in jax's own layer"
    warm, log = _run_cli(tmp_path / "b", cache)
    assert (cold["trace_skipped"], cold["compile_cache_hit"]) == (0.0, 0.0)
    assert (warm["trace_skipped"], warm["compile_cache_hit"], warm["lower_s"]) == (1.0, 1.0, 0.0)
    assert "loaded the first train step" in log and "compiling the first train step" not in log
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


# ---- trouble in the cache directory: warn once, keep training ----


@pytest.fixture(autouse=True)
def fresh_warnings_and_key(tmp_path_factory, monkeypatch):
    """Each test warns afresh, and signs with its own key (not the user's in ~/.cache)."""
    monkeypatch.setattr(compile_cache, "_WARNED", set(), raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))


@pytest.fixture
def restore_jax_cache():
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    yield
    compile_cache.configure(before[0] if before[1] else "")


class _FullDisk:
    """A file opened for writing on a full disk: open works, every write fails with ENOSPC."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _fail_writes_under(monkeypatch, root, err: int) -> None:
    """Every write under `root` fails as on a full disk (ENOSPC: opening works, writing does not) or a
    read-only mount (EROFS: nothing can be made, changed, touched or removed there). Tests run as root,
    for whom chmod blocks nothing, hence the patches."""
    root = os.path.abspath(root)
    real_open = builtins.open

    def under(p) -> bool:
        return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)

    def refuse(p):
        raise OSError(err, os.strerror(err), os.fsdecode(p))

    def open_(file, mode="r", *args, **kwargs):
        if under(file) and any(c in mode for c in "wax+"):
            if err == errno.ENOSPC:
                return _FullDisk(real_open(file, mode, *args, **kwargs))
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    if err == errno.ENOSPC:
        return
    for name in ("utime", "mkdir", "remove", "unlink", "rmdir"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda p, *a, _real=real, **k: refuse(p) if under(p) else _real(p, *a, **k))
    real_replace, real_os_open = os.replace, os.open
    monkeypatch.setattr(os, "replace", lambda a, b, **k: refuse(b) if under(b) else real_replace(a, b, **k))
    monkeypatch.setattr(os, "open", lambda p, flags, *a, **k: refuse(p) if under(p) and flags & (
        os.O_WRONLY | os.O_RDWR | os.O_CREAT) else real_os_open(p, flags, *a, **k))


def _cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "compile cache" in r.getMessage()]


def test_a_full_disk_warns_once_and_training_goes_on(tmp_path, caplog):
    """Issue 25.1: ENOSPC at the executable's write ended the run after the compile."""
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING"):
        _fail_writes_under(mp, tmp_path, errno.ENOSPC)
        for scale in (2.0, 3.0):  # The train step, then (say) the dense fine-tune's program.
            key = compile_cache.program_key("{}", f"step{scale}", INPUTS)
            compiled, facts = compile_cache.compile_or_load(_program(scale, []), str(tmp_path), key)
            assert facts["source"] == "compiled"
            np.testing.assert_array_equal(_run(compiled)[0], scale * np.arange(4.0) + 6.0)
    (warning,) = _cache_warnings(caplog)
    assert "No space left on device" in warning and str(tmp_path) in warning
    assert "compile_cache_dir" in warning  # The fix.
    assert not os.listdir(compile_cache.executables_dir(str(tmp_path)))  # No half-written file left.


def test_a_read_only_warm_cache_loads_and_warns_once(tmp_path, caplog, restore_jax_cache):
    """Issue 25.1: os.utime on a read-only warm cache raised a bare EROFS at the start."""
    key = compile_cache.program_key("{}", "step", INPUTS)
    compile_cache.compile_or_load(_program(2.0, []), str(tmp_path), key)  # Warm, while it was writable.
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING"):
        _fail_writes_under(mp, tmp_path, errno.EROFS)
        assert compile_cache.configure(str(tmp_path)) == str(tmp_path)
        traces = []
        compiled, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
        assert (facts["source"], len(traces)) == ("executable", 0)
        assert not jax.config.jax_enable_compilation_cache  # jax's layer must write its lock even to read.
        np.testing.assert_array_equal(_run(compiled)[0], [6.0, 8.0, 10.0, 12.0])
    (warning,) = _cache_warnings(caplog)
    assert "Read-only file system" in warning and str(tmp_path) in warning and "compile_cache_dir" in warning


def test_a_read_only_cold_cache_compiles_and_warns_once(tmp_path, caplog, restore_jax_cache):
    """Issue 25.1: a read-only cold cache failed after the compile (saving the executable)."""
    with pytest.MonkeyPatch.context() as mp, caplog.at_level("WARNING"):
        _fail_writes_under(mp, tmp_path, errno.EROFS)
        assert compile_cache.configure(str(tmp_path / "missing")) == ""  # Cannot even be made: both layers off.
        cache = str(tmp_path)
        assert compile_cache.configure(cache) == cache
        for scale in (2.0, 3.0):
            key = compile_cache.program_key("{}", f"step{scale}", INPUTS)
            compiled, facts = compile_cache.compile_or_load(_program(scale, []), cache, key)
            assert facts["source"] == "compiled"
            np.testing.assert_array_equal(_run(compiled)[0], scale * np.arange(4.0) + 6.0)
    missing, read_only = _cache_warnings(caplog)
    assert str(tmp_path / "missing") in missing and "both layers are off" in missing
    assert "not writable" in read_only and "Read-only file system" in read_only and cache in read_only


# ---- a cache directory is not a place to take code from ----


class _Planted:
    """Unpickling this runs a shell command (what a planted entry did at training start)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("form", ["bare_pickle", "forged_signature"])
def test_a_planted_pickle_never_runs_and_the_step_compiles(tmp_path, caplog, form):
    """Issue 25.2: a pickle planted under an entry's name ran at training start."""
    key = compile_cache.program_key("{}", "step", INPUTS)
    path = os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe")
    os.makedirs(os.path.dirname(path), mode=0o700)
    marker = tmp_path / "planted_code_ran"
    evil = pickle.dumps(_Planted(marker))
    open(path, "wb").write(evil if form == "bare_pickle" else compile_cache.MAGIC + b"\0" * 32 + evil)
    traces = []
    with caplog.at_level("WARNING"):
        compiled, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
    assert not marker.exists(), "the planted pickle ran"
    assert facts["source"] == "compiled" and len(traces) == 1
    np.testing.assert_array_equal(_run(compiled)[0], [6.0, 8.0, 10.0, 12.0])
    (warning,) = _cache_warnings(caplog)
    assert path in warning and ("not a signed entry" in warning or "signature does not match" in warning)
    assert compile_cache.load_executable(path) is not None  # Replaced by the run's own signed executable.


def test_entries_that_others_could_have_planted_are_not_loaded(tmp_path, caplog, monkeypatch, restore_jax_cache):
    """Issue 25.2: an entry owned by someone else, or in a directory others can write, is refused in one line."""
    key = compile_cache.program_key("{}", "step", INPUTS)
    path = os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe")
    compile_cache.compile_or_load(_program(2.0, []), str(tmp_path), key)
    assert oct(os.stat(compile_cache.executables_dir(str(tmp_path))).st_mode & 0o777) == "0o700"

    real_stat = os.stat

    def stat_as_if_another_user_wrote(p, *a, **k):
        st = real_stat(p, *a, **k)
        if os.fspath(p) != path:
            return st
        return os.stat_result((st.st_mode, st.st_ino, st.st_dev, st.st_nlink, os.getuid() + 1, st.st_gid,
                               st.st_size, st.st_atime, st.st_mtime, st.st_ctime))

    with caplog.at_level("WARNING"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "stat", stat_as_if_another_user_wrote)
            traces = []
            _, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
            assert facts["source"] == "compiled" and len(traces) == 1
        (owner,) = _cache_warnings(caplog)
        assert path in owner and "not to you" in owner
        caplog.clear()

        os.chmod(compile_cache.executables_dir(str(tmp_path)), 0o777)  # Anyone could plant an entry here.
        traces = []
        _, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
        assert facts["source"] == "compiled" and len(traces) == 1
        shared = tmp_path / "shared"
        shared.mkdir(mode=0o775)
        os.chmod(shared, 0o775)  # Group-writable (the umask may have cut it).
        assert compile_cache.configure(str(shared)) == ""  # jax's layer would run what others put there.
        assert not jax.config.jax_enable_compilation_cache
    writable, group = _cache_warnings(caplog)
    assert "can be written by others" in writable and compile_cache.executables_dir(str(tmp_path)) in writable
    assert "can be written by others" in group and str(shared) in group and "chmod go-w" in group


def test_the_signing_key_is_the_users_alone(tmp_path, caplog):
    key = compile_cache.program_key("{}", "step", INPUTS)
    compile_cache.compile_or_load(_program(2.0, []), str(tmp_path), key)
    key_file = compile_cache.key_path()
    assert not key_file.startswith(str(tmp_path))  # Not in the cache: a copied cache carries no key.
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    compile_cache._KEYS.clear()
    os.chmod(key_file, 0o644)  # Readable by others: they could sign entries.
    with caplog.at_level("WARNING"):
        traces = []
        _, facts = compile_cache.compile_or_load(_program(2.0, traces), str(tmp_path), key)
    assert facts["source"] == "compiled" and len(traces) == 1
    (warning,) = _cache_warnings(caplog)
    assert key_file in warning and "only you" in warning


def test_a_line_says_what_compiles_before_the_compile_starts(tmp_path, caplog):
    """Issue 25.11: the train step's compile (40-77 s on a CPU) was silent until it ended."""
    key = compile_cache.program_key("{}", "step", INPUTS)
    program = _program(2.0, [])
    said_before_lowering = []

    def lower():
        said_before_lowering.append([r.getMessage() for r in caplog.records if "compiling" in r.getMessage()])
        return program()

    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # Another test may have left absl at WARNING.
    with caplog.at_level("INFO"):
        compile_cache.compile_or_load(lower, str(tmp_path), key, what="the test step")
        os.remove(os.path.join(compile_cache.executables_dir(str(tmp_path)), f"{key}.exe"))  # Compiles again.
        compile_cache.compile_or_load(lower, str(tmp_path), key, what="the test step")
        compile_cache.compile_or_load(lower, str(tmp_path), key, what="the test step")  # Loaded: no line.
        compile_cache.compile_or_load(lower, "", key, what="the test step")
    absl_logging.set_verbosity(verbosity)
    first, again, off = said_before_lowering
    assert first == ["compiling the test step (up to minutes the first time; later starts load it from the "
                     "cache) ..."]
    assert again[-1].startswith("compiling the test step (~0 s, as its last fresh compile here; later starts")
    assert len(off) == 3 and "the compile cache is off (train.compile_cache_dir='')" in off[-1]
