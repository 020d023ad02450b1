r"""XLA:CPU backend optimisation level for CLI runs: compile seconds against step speed, one JSON line each.

    python -m eflow_jax.bench.cpu_opt_level                       # the demo config, 300 steps, levels 0 and 3
    python -m eflow_jax.bench.cpu_opt_level --levels=0,1,3 --steps=100

Each level runs `python -m eflow_jax.main` in its own process (XLA_FLAGS is read once, when jax starts)
on configs/demo.py with the persistent compile cache and the gauge off, and reports the compile time
of the train step, the steps/s of the last log window and the process's wall time. main.py leaves
the level at XLA's default (3) and tests/conftest.py sets 0: this benchmark is why (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_level(level: int, steps: int, config: str, root: str) -> dict:
    workdir = os.path.join(root, f"level{level}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_backend_optimization_level={level}")
    cmd = [sys.executable, "-m", "eflow_jax.main", f"--config={config}:steps={steps}", f"--workdir={workdir}",
           "--config.train.compile_cache_dir=", "--config.eval.metric=none",
           f"--config.log.every_steps={max(1, steps // 3)}", "--config.log.sample_every=0",
           f"--config.checkpoint.save_every={steps}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall_s = time.perf_counter() - start
    if done.returncode:
        return dict(level=level, error=done.stderr[-1500:])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return dict(level=level, steps=steps, compile_s=rows[0]["compile_s"], lower_s=rows[0]["lower_s"],
                steps_per_s=rows[-1]["steps_per_s"], wall_s=round(wall_s, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="0,3")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "demo.py"))
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="eflow_bench_opt_level_")
    for level in (int(v) for v in a.levels.split(",")):
        print(json.dumps(dict(bench="cpu_opt_level", config=os.path.basename(a.config),
                              **run_level(level, a.steps, a.config, root))), flush=True)


if __name__ == "__main__":
    main()
