"""Compiled programs that outlive the process, so a restart or a resume does not compile the step again.

Two layers, one directory (`train.compile_cache_dir`):

  xla/ entries   jax's persistent compilation cache, keyed on the lowered program. It skips XLA's
                 compile but not the Python tracing and lowering in front of it, which is 11-12 s for
                 the eflow step (its objective calls the network several times).
  executables/   the train step's whole executable (jax.experimental.serialize_executable), keyed
                 on everything that decides what tracing would produce: the run config, this
                 package's source, the jax/flax/optax versions, jax's flags, XLA_FLAGS, the devices
                 and the input shapes and shardings. A hit loads in about a second, with no tracing.
                 Any change to those misses and compiles (then through the XLA layer, if only
                 Python changed that the program does not see). A file that fails to load is
                 deleted and the step compiled: a bad entry costs a compile, never a run. Only
                 fresh compiles are saved (XLA:CPU re-serializes an executable it loaded from
                 jax's layer without its kernels), so after an edit that leaves the program as it
                 was, restarts trace and load XLA's compile until jax's entry is evicted.

Both layers hold programs that run, and jax's serialized executable is a pickle: loading a planted
entry runs its code. So nothing is loaded from a directory that anyone else can write to (another
owner, or group/world-writable: both layers are off there, with one warning), an executable whose
file is not yours is skipped, and every executable is signed (HMAC-SHA256 over its name and bytes) with
a key that only you can read ($XDG_CACHE_HOME/eflow_jax/executables.key, made on first use): an entry
that does not verify is never unpickled. A cache is an optimisation, never a reason to stop: any error
in it (a full disk, a read-only directory, a missing key) warns once, naming the directory and the
fix, and the run compiles and trains on.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import hmac
import importlib.metadata
import json
import os
import pickle
import secrets
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

MAX_BYTES = 32 * 2**30  # jax's layer: least recently used entries go first past this size.
KEEP_EXECUTABLES = 8  # Our layer: the most recently used executables kept (EFlow-B's is ~100 MB).
_PACKAGE_DIR = Path(__file__).resolve().parent

# ---- jax's persistent compilation cache ----

# Per thread: jax reports a hit on the thread that compiles, and other threads compile beside the step
# (the dense fine-tune's program in the background, the data workers' first batch): a process-wide count
# mislabelled a fresh step compile as a cache hit under load, so its executable was never saved.
_CACHE_HITS: collections.Counter = collections.Counter()


def _count_cache_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _CACHE_HITS[threading.get_ident()] += 1


jax.monitoring.register_event_listener(_count_cache_hits)


def cache_hits() -> int:
    """jax persistent-cache hits on this thread so far (compare before and after a compile)."""
    return _CACHE_HITS[threading.get_ident()]


def default_dir() -> str:
    """jax's own setting if any (JAX_COMPILATION_CACHE_DIR), else $XDG_CACHE_HOME/eflow_jax/xla."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eflow_jax", "xla")


def configure(path: str) -> str:
    """Turns jax's persistent compilation cache on at `path` ('auto': the default, '': off).

    Must run before the compiles it should cover. jax opens its cache once per process, so a
    change of directory (or of on/off) resets it. Entries are kept for compiles of at least
    jax_persistent_cache_min_compile_time_secs (1 s by default; env
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS): the train step is far above it, and the many tiny
    helper jits stay out of the cache. Returns the directory in use ('' when off).

    Never raises: a directory that cannot be made, or that anyone else could write to, turns both layers
    off; one that cannot be written turns jax's layer off (saved executables still load). Each warns once.
    """
    path = default_dir() if path == "auto" else os.path.expanduser(path)
    path = os.path.normpath(path) if path else ""
    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    jax_layer = bool(path)
    if path:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            problem = _untrusted_dir(path)
        except OSError as e:
            problem = f"cannot be created or read ({_oserror(e)})"
        if problem:
            _warn_once(("configure", path), "compile cache: %s %s; both layers are off for this run (every start "
                       "compiles). Fix: %s", path, problem, _FIX)
            path, jax_layer = "", False
        elif (error := _write_probe(path)) is not None:
            # jax's LRU mode must write its lock file even to read: its layer is off; ours still loads.
            _warn_once(("write", path), "compile cache: %s is not writable (%s); programs compiled now are not "
                       "saved there, saved executables still load. Fix: %s", path, error, _FIX)
            jax_layer = False
    if jax_layer:
        jax.config.update("jax_compilation_cache_dir", path)
        # Without a size limit jax writes entries in place with no lock, so two runs sharing the
        # directory (a sweep on one host) could read a half-written executable. A limit turns on its
        # LRU mode, which takes a file lock around every read and write.
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", jax_layer)
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != before:
        compilation_cache.reset_cache()
    return path


# ---- trouble in the cache: warn once, never stop the run ----

_FIX = ("free space there, make it writable by you alone (chmod go-w), or set --config.train.compile_cache_dir "
        "to such a directory ('' turns the cache off)")
_WARNED: set = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(key: tuple, message: str, *args) -> None:
    """One warning per kind of trouble and directory for the whole process (the dense program and
    later compiles of the run would repeat it)."""
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    logging.warning(message, *args)


def _oserror(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _untrusted_dir(path: str) -> str:
    """Why entries of the directory `path` could have been planted by someone else ('' if they cannot)."""
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"can be written by others (mode {stat.filemode(st.st_mode)}): they could plant programs that run"
    return ""


def _write_probe(path: str) -> str | None:
    """None if a file can be made in `path`, else the OS error (a read-only mount, no permission, full)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return _oserror(e)
    return None


# ---- whole executables, keyed on what tracing depends on ----


def source_digest() -> str:
    """sha256 of every .py file of this package (the code that tracing runs)."""
    h = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        h.update(str(path.relative_to(_PACKAGE_DIR)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _versions() -> dict:
    out = {}
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def program_key(config_json: str, name: str, abstract_inputs: Any) -> str:
    """The executable's file name: a digest of everything that decides the traced program.

    Args:
      config_json: the whole run config (ConfigDict.to_json_best_effort(sort_keys=True)); fields
        the step does not read (log cadence, say) miss too: a wasted compile, never a wrong program.
      name: which program of the run ('train_step', 'train_step_dense').
      abstract_inputs: the step's ShapeDtypeStructs (shapes, dtypes, shardings, hence the mesh).
    """
    flags = {k: repr(v) for k, v in sorted(jax.config.values.items())
             if "cache" not in k and "log" not in k}  # Where and whether to cache is not the program.
    devices = [(d.id, d.process_index, d.platform, getattr(d, "device_kind", "")) for d in jax.devices()]
    facts = dict(config=config_json, name=name, source=source_digest(), versions=_versions(), flags=flags,
                 xla_flags=os.environ.get("XLA_FLAGS", ""), devices=devices,
                 platform_version=jax.devices()[0].client.platform_version,
                 inputs=repr(jax.tree.map(lambda a: (a.shape, a.dtype, a.sharding), abstract_inputs)))
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def executables_dir(cache_dir: str) -> str:
    return os.path.join(cache_dir, "executables")


# An entry: MAGIC, then HMAC-SHA256(key, name + NUL + body), then body = pickle of (serialized executable,
# its in/out pytree defs, device ids). The body is unpickled only once the MAC verifies: a file nobody with
# the key wrote (planted, copied from elsewhere, an older unsigned format) is never unpickled.
MAGIC = b"eflow_jax executable v2\n"
_MAC_BYTES = 32


def key_path() -> str:
    """The file with this user's key for signing executables ($XDG_CACHE_HOME/eflow_jax/executables.key).

    Outside the cache directory on purpose: a cache copied or shared from elsewhere carries no key that
    makes its entries load.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "eflow_jax", "executables.key")


_KEYS: dict[str, bytes] = {}
_KEYS_LOCK = threading.Lock()


def signing_key() -> bytes:
    """This user's secret (32 random bytes), made on first use, readable and writable by the user alone.

    Raises OSError (cannot be made or read) or PermissionError (it is not the user's alone).
    """
    path = key_path()
    with _KEYS_LOCK:
        if path in _KEYS:
            return _KEYS[path]
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        if not os.path.lexists(path):
            tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_bytes(32))
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # Whole or absent; another process's key, made first, wins.
            except FileExistsError:
                pass
            except OSError:  # A filesystem without hard links: the last writer wins (costs a compile).
                os.replace(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(tmp)
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
            raise PermissionError(errno.EPERM, f"not a file that only you can read and write (mode "
                                  f"{stat.filemode(st.st_mode)}, uid {st.st_uid}); delete it and a new one is made",
                                  path)
        with open(path, "rb") as f:
            key = f.read()
        if len(key) < 32:
            raise PermissionError(errno.EINVAL, "shorter than 32 bytes; delete it and a new one is made", path)
        _KEYS[path] = key
        return key


def _cache_root(path: str) -> str:
    """The cache directory of an executable's path (warnings about it are keyed on this)."""
    return os.path.dirname(os.path.dirname(path))


def _mac(key: bytes, name: str, body: bytes) -> bytes:
    return hmac.new(key, name.encode() + b"\0" + body, hashlib.sha256).digest()


class _Rejected(Exception):
    """An entry that is not loaded (and why), before anything in it is unpickled."""


def _verified_body(blob: bytes, key: bytes, name: str) -> bytes:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _MAC_BYTES:
        raise _Rejected("it is not a signed entry (planted, or written by an older eflow_jax)")
    mac, body = blob[len(MAGIC):len(MAGIC) + _MAC_BYTES], blob[len(MAGIC) + _MAC_BYTES:]
    if not hmac.compare_digest(mac, _mac(key, name, body)):
        raise _Rejected(f"its signature does not match your key {key_path()} (planted, damaged, or made "
                        f"by another user or machine)")
    return body


def _key_or_warn(directory: str) -> bytes | None:
    try:
        return signing_key()
    except OSError as e:
        _warn_once(("key", key_path()), "compile cache: no key to sign executables (%s); executables in %s are "
                   "neither loaded nor saved this run (jax's layer still works). Fix: make %s a file that only "
                   "you can read (it is made when missing), or set --config.train.compile_cache_dir=''",
                   _oserror(e), directory, key_path())
        return None


def _trusted(directory: str) -> bool:
    """Whether executables in `directory` may be loaded (missing: yes, it is made private when saving)."""
    try:
        problem = _untrusted_dir(directory)
    except FileNotFoundError:
        return True
    except OSError as e:
        problem = f"cannot be read ({_oserror(e)})"
    if problem:
        _warn_once(("untrusted", directory), "compile cache: %s %s; its executables are neither loaded nor "
                   "saved (compiling instead). Fix: %s", directory, problem, _FIX)
    return not problem


def load_executable(path: str):
    """The jax.stages.Compiled saved at `path`, or None: missing, refused (the directory or the file is not
    yours alone, or the signature does not verify: nothing in it is unpickled), or failed to load (then
    deleted). Never raises: a bad entry costs a compile."""
    directory = os.path.dirname(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn_once(("read", directory), "compile cache: cannot read %s (%s); compiling instead. Fix: %s",
                   path, _oserror(e), _FIX)
        return None
    if not _trusted(directory) or (key := _key_or_warn(directory)) is None:
        return None
    if st.st_uid != os.getuid():
        logging.warning("compile cache: %s belongs to uid %d, not to you: not loaded (compiling instead)",
                        path, st.st_uid)
        return None
    try:
        with open(path, "rb") as f:
            body = _verified_body(f.read(), key, os.path.basename(path))
        payload, in_tree, out_tree, device_ids = pickle.loads(body)
        by_id = {d.id: d for d in jax.devices()}
        compiled = serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:  # noqa: BLE001 - any bad entry (unsigned, truncated, other jaxlib): compile instead.
        why = str(e) if isinstance(e, _Rejected) else _oserror(e)
        logging.warning("compile cache: not loading %s: %s; deleting it and compiling.", path, why)
        with contextlib.suppress(OSError):  # A read-only cache: it stays, the compile happens anyway.
            os.remove(path)
        return None
    try:
        os.utime(path)  # Most recently used: pruned last.
    except OSError as e:
        _warn_once(("write", _cache_root(path)), "compile cache: cannot write to %s (%s); saved executables "
                   "still load, new ones are not saved. Fix: %s", directory, _oserror(e), _FIX)
    return compiled


def save_executable(path: str, compiled) -> None:
    """Writes `compiled`, signed, atomically (a reader never sees half a file); keeps the newest few.

    Never raises: a cache that cannot be written (full disk, read-only) warns once and the run goes on.
    """
    directory = os.path.dirname(path)
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (ValueError, NotImplementedError) as e:  # A backend without serialization: nothing to save.
        _warn_once(("serialize",), "compile cache: this executable cannot be serialized (%s)", e)
        return
    # The devices it runs on, in the executable's order (its mesh may use some, or reorder them).
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    if not _trusted(directory) or (key := _key_or_warn(directory)) is None:
        return
    body = pickle.dumps((payload, in_tree, out_tree, device_ids), protocol=pickle.HIGHEST_PROTOCOL)
    tmp = f"{path}.tmp.{os.getpid()}.{threading.get_ident()}"
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + _mac(key, os.path.basename(path), body) + body)
            os.replace(tmp, path)
        finally:  # A failed write (disk full) leaves no partial file behind.
            with contextlib.suppress(OSError):
                os.remove(tmp)
        _prune(directory, KEEP_EXECUTABLES)
    except OSError as e:
        _warn_once(("write", _cache_root(path)), "compile cache: cannot save %s (%s); training goes on, the next "
                   "start compiles again. Fix: %s", path, _oserror(e), _FIX)


def _prune(directory: str, keep: int) -> None:
    def mtime(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except OSError:  # Pruned by another run meanwhile.
            return 0.0

    entries = sorted(Path(directory).glob("*.exe"), key=mtime, reverse=True)
    for stale in entries[keep:]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # Another run may have pruned it already.


def compile_or_load(lower: Callable[[], Any], cache_dir: str, key: str, what: str = "") -> tuple[Any, dict]:
    """The compiled program: our executable cache, else lower() + compile (through jax's cache).

    Args:
      lower: () -> jax.stages.Lowered (traced and lowered only on a miss).
      cache_dir: configure()'s directory ('' off).
      key: program_key() of the program.
      what: the program in words ('the first train step'): when given, a line says that it compiles,
        and about how long that took the last time, before the compile starts (tens of seconds to
        minutes of silence otherwise).

    Returns (compiled, facts) with facts = compile_s (wall, all of it), lower_s (tracing and
    lowering; 0 on an executable hit), save_s (writing our executable; part of compile_s) and
    source: 'executable' (loaded whole), 'xla_cache' (traced,
    XLA's compile skipped) or 'compiled'. With cache_dir '' or several processes (each would need its
    own entry; jax's layer still serves them) only the second and third happen.
    """
    start = time.perf_counter()
    use_executables = bool(cache_dir) and jax.process_count() == 1
    path = os.path.join(executables_dir(cache_dir), f"{key}.exe") if use_executables else ""
    compiled = load_executable(path) if path else None
    if compiled is not None:
        return compiled, dict(compile_s=time.perf_counter() - start, lower_s=0.0, save_s=0.0,
                              source="executable")
    if what:
        _announce_compile(what, cache_dir)
    hits = cache_hits()
    lowered = lower()
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    source = "xla_cache" if cache_hits() > hits else "compiled"
    saved = time.perf_counter()
    if path and source == "compiled":
        # Only fresh compiles: XLA:CPU re-serializes an executable loaded from jax's cache without its
        # kernels ("Function multiply_power_fusion not found" when the copy runs). The next restart
        # then traces and hits jax's layer again, which is all this one did.
        save_executable(path, compiled)
    end = time.perf_counter()
    if what and cache_dir and source == "compiled":
        _remember_compile_s(cache_dir, what, saved - start)
    return compiled, dict(compile_s=end - start, lower_s=lower_s, save_s=end - saved, source=source)


# ---- how long the last fresh compile took, for the line before the next one ----

_TIMES_NAME = "compile_seconds.json"  # {what: seconds}: a number for a log line, nothing that runs.


def _compile_times(cache_dir: str) -> dict:
    try:
        with open(os.path.join(cache_dir, _TIMES_NAME)) as f:
            times = json.load(f)
    except (OSError, ValueError):
        return {}
    return times if isinstance(times, dict) else {}


def _remember_compile_s(cache_dir: str, what: str, seconds: float) -> None:
    times = _compile_times(cache_dir) | {what: round(seconds, 1)}
    tmp = os.path.join(cache_dir, f"{_TIMES_NAME}.tmp.{os.getpid()}.{threading.get_ident()}")
    try:  # Trouble writing here is the executable's save's to report (it warns once).
        with open(tmp, "w") as f:
            json.dump(times, f)
        os.replace(tmp, os.path.join(cache_dir, _TIMES_NAME))
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def _announce_compile(what: str, cache_dir: str) -> None:
    last = _compile_times(cache_dir).get(what) if cache_dir else None
    took = (f"~{last:.0f} s, as its last fresh compile here" if isinstance(last, (int, float))
            else "up to minutes the first time")
    later = ("later starts load it from the cache" if cache_dir else
             "the compile cache is off (train.compile_cache_dir=''): every start compiles it")
    logging.info("compiling %s (%s; %s) ...", what, took, later)
