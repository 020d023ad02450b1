"""Test setup: 8 fake CPU devices (must happen before jax initialises), float32 matmuls."""
import os

# Optimisation level 0 cuts XLA:CPU compile time ~5x for these small graphs (and runs no slower).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Many tests compile the same small programs (and subprocesses recompile what the parent did):
# a persistent compilation cache keyed by the HLO keeps the CPU suite within budget.
jax.config.update("jax_compilation_cache_dir", os.environ.get("EFLOW_JAX_TEST_CACHE", "/tmp/eflow_jax_xla_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
