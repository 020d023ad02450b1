r"""Inference latency: few-step EFlow sampling vs 50-step Euler with CFG or path-drop guidance.

    python -m eflow_jax.bench.latency --variant=B --video_shape=16,128,128,3 --patch=2,8,8 \
        --batch=1,8
    python -m eflow_jax.bench.latency ... --baseline_mode=full  # Euler rows on a full-attention DiT
    python -m eflow_jax.bench.latency --tiny                    # CPU smoke run (seconds)

One model size, random params in --param_dtype, compute in --dtype, dense at inference (no token
drop). Methods per batch size (docs/METHOD.md section 9):
  eflow_{N}step   SoFlow's renoise sampler, N NFE (no CFG: guidance is trained in);
  euler{S}_cfg    S Euler steps with classifier-free guidance, cond/uncond batched: 2S NFE;
  euler{S}_pdg    S Euler steps with path-drop guidance: the weak path (middle blocks skipped) at
                  the null label is the reference, so S full + S weak evaluations.
Each sampler is one jitted program, compiled once; warm-up runs are excluded; the row reports the
median (and 10th/90th percentiles) of --runs timed calls ending in block_until_ready. Only the
denoiser is timed (inputs are made beforehand). For pixel-space shapes (C = 3) there is no decoder,
so end_to_end_ms = median_ms; for latents it is null (add the VAE decode).

Stdout carries one JSON line per row and nothing else:
  {variant, shape, batch, method, nfe, median_ms, p10_ms, p90_ms, speedup_vs_cfg50, ...}
`speedup_vs_cfg50` is the CFG row's median over this row's (same batch); with --euler_steps other
than 50 it compares with that CFG row. `dispatch_ms`: median time for the call to return before the
result is ready (host work per call); each row records the XLA_FLAGS it ran under.

Batch-1 latency (docs/BENCHMARKS.md, "Batch-1 latency"): a 1-step EFlow-B sample is one network
pass of ~366 GFLOP (2048 tokens), so at batch 1 the GPU runs hundreds of small kernels per pass.
Per-call overheads to test, each a flag here (rows of one process share one setting; compare runs):
  --command_buffers=default|off|loops   XLA's CUDA graphs: off, the default set, or the default set
                                        plus WHILE/CONDITIONAL (the N-step sampler loop in the graph)
                                        and graphs of any size (--xla_gpu_graph_min_graph_size=1);
  --profile=K                           trace K calls of each EFlow row (bench/profile.py): device
                                        time by op family, kernels per call, and busy_frac (device
                                        time / wall time: gaps between kernels are what is left).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from eflow_jax.flow import samplers
from eflow_jax.flow.condition import Condition
from eflow_jax.models import dit

TINY = dict(variant="tiny", video_shape="4,16,16,3", patch="1,4,4", tile="2,4,4", cell="1,2,2",
            batch="1", steps="1", euler_steps=2, runs=3, warmup=1, dtype="float32",
            param_dtype="float32", num_classes=4, fast_compile=True)
# XLA CPU compile options for the smoke run: halves compile time, irrelevant for a smoke timing.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# XLA_FLAGS for --command_buffers (read when the backend starts: set before any device is used).
_DEFAULT_COMMANDS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
COMMAND_BUFFER_FLAGS = {
    "default": "",
    "off": "--xla_gpu_enable_command_buffer=",
    "loops": f"--xla_gpu_enable_command_buffer={_DEFAULT_COMMANDS},WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
}


def set_command_buffers(mode: str) -> str:
    """Appends --command_buffers' XLA flags to XLA_FLAGS (before the backend starts); returns XLA_FLAGS."""
    flags = COMMAND_BUFFER_FLAGS[mode]
    if flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    return os.environ.get("XLA_FLAGS", "")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def model_config(args, mode: str):
    """The model section for this benchmark; tile/cell default to the model's own defaults."""
    overrides = dict(video_shape=_ints(args.video_shape), patch=_ints(args.patch), mode=mode,
                     num_classes=args.num_classes, dtype=args.dtype,
                     attention_impl=args.attention_impl)
    if args.tile:
        overrides["tile"] = _ints(args.tile)
    if args.cell:
        overrides["cell"] = _ints(args.cell)
    cfg = dit.model_config(args.variant, **overrides)
    dit.layout_of(cfg)  # Geometry errors name the field to change before anything is built.
    return cfg


def random_params(model, param_dtype: str, seed: int = 0):
    """Random weights built on the host (no init program to compile): kernels ~ N(0, 1/fan_in),
    norm scales ~ 1, other vectors ~ N(0, 0.02^2). Timing does not depend on the values, but
    zero-initialised output layers would make every sample trivially zero."""
    abstract = jax.eval_shape(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))
    rng = np.random.default_rng(seed)

    def leaf(path, a):
        value = rng.standard_normal(a.shape, np.float32)
        if a.ndim >= 2:
            value /= math.sqrt(math.prod(a.shape[:-1]))
        else:
            value = value * 0.02 + ("scale" in jax.tree_util.keystr(path))
        return jnp.asarray(value, param_dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract)


def few_step_fns(net, num_steps: tuple[int, ...]) -> dict[str, tuple]:
    """method -> (fn(params, noise, condition, rng), nfe, weak_nfe, sampler, guidance)."""
    def renoise(n):
        return lambda p, z, y, r: samplers.renoise_sample(net, p, z, y, n, r)

    return {f"eflow_{n}step": (renoise(n), n, 0, "renoise", "trained-in") for n in num_steps}


def euler_fns(net, steps: int, scale: float) -> dict[str, tuple]:
    """CFG and path-drop-guided Euler baselines, in the few_step_fns format."""
    def euler(guidance):
        return lambda p, z, y, r: samplers.euler_sample(net, p, z, y, steps, scale, guidance)

    return {f"euler{steps}_cfg": (euler("cfg"), 2 * steps, 0, "euler", "cfg"),
            f"euler{steps}_pdg": (euler("path_drop"), 2 * steps, steps, "euler", "path_drop")}


def time_fn(fn: Callable, args: tuple, runs: int, warmup: int, compiler_options=None,
            profile_calls: int = 0) -> dict:
    """Compiles once, runs `warmup` untimed calls, then `runs` timed calls (block_until_ready).

    profile_calls > 0: then traces that many calls (bench/profile.py); the report is under 'profile'."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times, dispatch = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = compiled(*args)
        dispatch.append(1e3 * (time.perf_counter() - start))
        jax.block_until_ready(out)
        times.append(1e3 * (time.perf_counter() - start))
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    row = dict(median_ms=round(float(median), 3), p10_ms=round(float(p10), 3),
               p90_ms=round(float(p90), 3), runs=runs, compile_s=round(compile_s, 2),
               dispatch_ms=round(float(np.median(dispatch)), 3),
               cudnn_attention_calls=compiled.as_text().count("__cudnn$fmha"))
    if profile_calls:
        from eflow_jax.bench import profile

        row["profile"] = profile.profile_compiled(compiled, lambda: compiled(*args), profile_calls)
        row["profile"]["summary"]["step_ms"] = row["median_ms"]
    return row


def flops_per_sample(flops: dit.FlopCount, nfe: int, weak_nfe: int) -> float:
    """Analytic forward FLOPs of one sample's whole sampling run (weak passes at their own cost)."""
    return (nfe - weak_nfe) * flops.full + weak_nfe * flops.weak


def run(args) -> list[dict]:
    """All rows, in print order (per batch: EFlow rows, then the Euler baselines)."""
    device = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    modes = {"few_step": args.mode, "baseline": args.baseline_mode or args.mode}
    built = {}
    for _role, mode in modes.items():
        if mode not in built:
            cfg = model_config(args, mode)
            model, net = dit.make_network(cfg)
            built[mode] = (cfg, net, random_params(model, args.param_dtype))
    options = FAST_COMPILE if args.fast_compile else None
    rows = []
    for batch in _ints(args.batch):
        batch_rows = []
        for role, steps in (("few_step", _ints(args.steps)), ("baseline", ())):
            cfg, net, params = built[modes[role]]
            shape = tuple(cfg.video_shape)
            noise = jax.random.normal(jax.random.key(1), (batch, *shape), jnp.float32)
            labels = Condition.of_labels(jax.random.randint(jax.random.key(2), (batch,), 0, cfg.num_classes))
            if role == "few_step":
                fns = few_step_fns(net, steps)
            else:
                fns = euler_fns(net, args.euler_steps, args.guidance_scale)
            flops = dit.count_flops(cfg)
            for method, (fn, nfe, weak_nfe, sampler, guidance) in fns.items():
                pixels = shape[-1] == 3
                gflop = flops_per_sample(flops, nfe, weak_nfe) / 1e9
                row = dict(variant=cfg.variant, shape=list(shape), patch=list(cfg.patch),
                           batch=batch, method=method, sampler=sampler, guidance=guidance,
                           attention=cfg.mode, nfe=nfe, weak_nfe=weak_nfe,
                           gflop_per_sample=round(gflop, 3), dtype=args.dtype,
                           param_dtype=args.param_dtype, device=device, token_drop=False,
                           end_to_end=("= denoise: pixel space, no decoder" if pixels
                                       else "not timed: add the VAE decode to median_ms"))
                row["xla_flags"] = os.environ.get("XLA_FLAGS", "")
                try:
                    inputs = (params, noise, labels, jax.random.key(3))
                    traced = args.profile if role == "few_step" else 0
                    timing = time_fn(fn, inputs, args.runs, args.warmup, options, traced)
                except Exception as e:  # noqa: BLE001 (an OOM becomes a row, not a crash)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    batch_rows.append(row)
                    continue
                if "profile" in timing:
                    _print_profile(timing.pop("profile"), row)
                row |= timing
                row["end_to_end_ms"] = timing["median_ms"] if pixels else None
                row["tflops_per_s"] = round(gflop * batch / max(timing["median_ms"], 1e-6), 3)
                batch_rows.append(row)
        cfg_ms = next((r.get("median_ms") for r in batch_rows
                       if r["method"] == f"euler{args.euler_steps}_cfg"), None)
        for row in batch_rows:
            ok = cfg_ms is not None and "median_ms" in row
            row["speedup_vs_cfg50"] = round(cfg_ms / max(row["median_ms"], 1e-6), 2) if ok else None
            print(json.dumps(row), flush=True)
        rows += batch_rows
    return rows


def _print_profile(report: dict, row: dict) -> None:
    """The traced calls' breakdown: JSON lines on stdout, markdown on stderr."""
    from eflow_jax.bench import profile

    tags = dict(method=row["method"], batch=row["batch"], variant=row["variant"])
    for line in profile.json_rows(report, **tags):
        print(json.dumps(line), flush=True)
    print(profile.markdown(report, f"{row['method']}, batch {row['batch']}, {row['variant']}, {row['device']}"),
          file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="B", choices=sorted(dit.VARIANTS))
    p.add_argument("--video_shape", default="16,128,128,3", help="T,H,W,C of clips or latents.")
    p.add_argument("--patch", default="2,8,8")
    p.add_argument("--tile", default="", help="Local-attention tile in tokens (default: model's).")
    p.add_argument("--cell", default="", help="Global pooling cell in tokens (default: model's).")
    p.add_argument("--batch", default="1,8", help="Comma-separated batch sizes.")
    p.add_argument("--steps", default="1,2,4", help="EFlow sampler steps to time.")
    p.add_argument("--euler_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--num_classes", type=int, default=700)
    p.add_argument("--mode", default="glga", help="Attention of the EFlow network (model.mode).")
    p.add_argument("--baseline_mode", default="",
                   help="Attention of the network behind the Euler rows; default: --mode. "
                        "'full' = the dense full-attention DiT of docs/METHOD.md section 9.")
    p.add_argument("--attention_impl", default="auto")
    p.add_argument("--dtype", default="bfloat16", help="Compute dtype (model.dtype).")
    p.add_argument("--param_dtype", default="bfloat16", help="Dtype of the stored weights.")
    p.add_argument("--runs", type=int, default=20, help="Timed runs per row (>= 20 to report).")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fast_compile", action="store_true", help="XLA CPU low-optimisation compile.")
    p.add_argument("--command_buffers", default="default", choices=sorted(COMMAND_BUFFER_FLAGS),
                   help="XLA CUDA graphs: 'off', XLA's 'default', or 'loops' (+ WHILE/CONDITIONAL, any size).")
    p.add_argument("--profile", type=int, default=0, help="Trace this many calls of each EFlow row.")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke run: tiny model, few runs (overrides the other flags).")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    set_command_buffers(args.command_buffers)  # Before the backend starts (run() asks for devices).
    return run(args)


if __name__ == "__main__":
    main()
