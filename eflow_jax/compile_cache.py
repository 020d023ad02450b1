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

Only point the directory at a place you alone can write to: both layers run what they find there.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import json
import os
import pickle
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
    """
    path = default_dir() if path == "auto" else os.path.expanduser(path)
    before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    if path:
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        # Without a size limit jax writes entries in place with no lock, so two runs sharing the
        # directory (a sweep on one host) could read a half-written executable. A limit turns on its
        # LRU mode, which takes a file lock around every read and write.
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    jax.config.update("jax_enable_compilation_cache", bool(path))
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != before:
        compilation_cache.reset_cache()
    return path


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


def load_executable(path: str):
    """The jax.stages.Compiled saved at `path`, or None (missing, or failed to load: then deleted)."""
    if not os.path.exists(path):
        return None
    try:
        with open(path, "rb") as f:
            payload, in_tree, out_tree, device_ids = pickle.load(f)
        by_id = {d.id: d for d in jax.devices()}
        compiled = serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
    except Exception as e:  # noqa: BLE001 - any bad entry (truncated, other jaxlib): compile instead.
        logging.warning("compile cache: could not load %s (%s: %s); deleting it and compiling.",
                        path, type(e).__name__, e)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return None
    os.utime(path)  # Most recently used: pruned last.
    return compiled


def save_executable(path: str, compiled) -> None:
    """Writes `compiled` atomically (a reader never sees half a file); keeps the newest few."""
    try:
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    except (ValueError, NotImplementedError) as e:  # A backend without serialization: nothing to save.
        logging.warning("compile cache: this executable cannot be serialized (%s)", e)
        return
    # The devices it runs on, in the executable's order (its mesh may use some, or reorder them).
    device_ids = [d.id for d in compiled.runtime_executable().local_devices()]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            pickle.dump((payload, in_tree, out_tree, device_ids), f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    finally:  # A failed write (disk full) leaves no partial file behind.
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    _prune(os.path.dirname(path), KEEP_EXECUTABLES)


def _prune(directory: str, keep: int) -> None:
    entries = sorted(Path(directory).glob("*.exe"), key=lambda p: p.stat().st_mtime, reverse=True)
    for stale in entries[keep:]:
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()  # Another run may have pruned it already.


def compile_or_load(lower: Callable[[], Any], cache_dir: str, key: str) -> tuple[Any, dict]:
    """The compiled program: our executable cache, else lower() + compile (through jax's cache).

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
    return compiled, dict(compile_s=end - start, lower_s=lower_s, save_s=end - saved, source=source)
