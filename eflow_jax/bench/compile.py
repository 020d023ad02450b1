r"""Compile cost of the train step per model option: one JSON line per setting, caches off.

    python -m eflow_jax.bench.compile                                   # EFlow-B, kinetics CLI shape
    python -m eflow_jax.bench.compile --variant=S --shape=8,32,32 --batch=4   # CPU-sized
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python -m eflow_jax.bench.compile --scan=0
    python -m eflow_jax.bench.compile --scan=0 --cache_dir=$(mktemp -d)   # as the CLI compiles: caches on
    python -m eflow_jax.bench.compile --scan=0 --cache_dir=<that dir> --set=objective.mva.beta=0.5
                                         # an edited program: XLA compiles, its autotune results cached

Settings: scan_layers off/on (--scan; x remat none/block with --remat). XLA flags are per process:
run once per XLA_FLAGS value (each row records it). Each row: trace+lower seconds, compile seconds,
optimised-HLO line count (and StableHLO's with --stablehlo, one more lowering), step time (median
of --iters), and the loss of one step; with both scan settings the scanned run starts from the
unrolled run's weights stacked into its layout, so scan_layers can be checked to change the
compile, not the maths.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from eflow_jax import config_file, train
from eflow_jax.bench import train as bench_train


def stack_layers(tree):
    """Unrolled Stack params {block_0, block_1, ...} -> scanned {blocks: leading layer axis}."""
    def is_stack(x):
        return isinstance(x, dict) and "block_0" in x

    def stack(d):
        return {"blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[d[f"block_{i}"] for i in range(len(d))])}

    return jax.tree.map(lambda x: stack(x) if is_stack(x) else x, tree, is_leaf=is_stack)


def build(a, scan: bool, remat: str):
    c = config_file.load(config_file.in_repo("kinetics.py"), f"variant={a.variant},objective={a.objective}")
    t, h, w = a.shape
    c.model.update(video_shape=(t, h, w, 3), scan_layers=scan, remat=remat)
    if a.patch:
        c.model.patch = tuple(a.patch)
    c.data.update(source="synthetic", path="", num_frames=t, resolution=h, worker_count=0)
    c.batch_size = a.batch
    # Cold compiles only: no cache, or (--cache_dir, a new directory) the caches the CLI writes as it compiles.
    c.train.update(compile_cache_dir=a.cache_dir, check_memory=False)
    for item in a.set:
        config_file.override(c, item)
    return c


def measure(c, iters: int, init_state, stablehlo: bool) -> dict:
    prog = train.setup(c)
    row = dict(lower_s=prog.lower_s, compile_s=prog.compile_s, save_s=prog.save_s,
               compile_source=prog.compile_source, hlo_lines=prog.step.as_text().count("\n"))
    if stablehlo:
        loss_fn = train.objectives.make_loss(c.objective, prog.net, c.total_steps)
        text = jax.jit(train.make_train_step(c, prog.net, prog.tx, loss_fn)).lower(
            prog.abstract_state, prog.batch_spec).as_text()
        row["stablehlo_lines"] = text.count("\n")
    state, batch = init_state(prog), bench_train.random_batch(prog, c.model.num_classes)
    state, m = prog.step(state, batch)
    loss = float(m["loss"])
    _, _, step_s = bench_train.median_step_s(prog.step, state, lambda: batch, iters)
    return dict(row, step_ms=1e3 * step_s, first_loss=loss)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B")
    p.add_argument("--objective", default="eflow")
    p.add_argument("--shape", default="16,128,128", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--patch", default="", type=lambda s: [int(v) for v in s.split(",")] if s else [])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--remat", action="store_true", help="Also remat='block' rows.")
    p.add_argument("--scan", default="0,1", help="scan_layers settings to measure: 0, 1 or 0,1.")
    p.add_argument("--stablehlo", action="store_true", help="Also count StableHLO lines (one more lowering).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default="", help="train.compile_cache_dir ('' = off); pass a new directory.")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="Config overrides (Python literals). With --cache_dir of an earlier run and a"
                        " changed constant (objective.mva.beta=0.5), the compile after an edit.")
    a = p.parse_args()
    device = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    for remat in ("none", "block") if a.remat else ("none",):
        unrolled = {}

        def init_unrolled(prog, unrolled=unrolled):
            unrolled["prog"] = prog
            return prog.init_state(a.seed)

        def init_stacked(prog, unrolled=unrolled):  # The unrolled run's initial weights in the scanned layout.
            if "prog" not in unrolled:
                return prog.init_state(a.seed)
            state = stack_layers(unrolled["prog"].init_state(a.seed))
            return jax.device_put(state, prog.state_shardings)

        for scan in (bool(int(v)) for v in a.scan.split(",")):
            row = measure(build(a, scan, remat), a.iters, init_stacked if scan else init_unrolled, a.stablehlo)
            print(json.dumps(dict(bench="compile", device=device, variant=a.variant, objective=a.objective,
                                  shape=a.shape, batch=a.batch, scan_layers=scan, remat=remat,
                                  xla_flags=os.environ.get("XLA_FLAGS", ""), cache_dir=a.cache_dir,
                                  overrides=a.set,
                                  xla_caches=jax.config.jax_persistent_cache_enable_xla_caches, **row)),
                  flush=True)


if __name__ == "__main__":
    main()
