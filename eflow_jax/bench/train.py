r"""Training-throughput benchmark: one JSON line per (setting), measured in one process on one card.

    python -m eflow_jax.bench.train --suite=kinetics      # EFlow-B vs standard solution flow, 16x64x64 video
    python -m eflow_jax.bench.train --suite=imagenet      # one-frame 32x32x4 latents (SoFlow's workload)
    python -m eflow_jax.bench.train --suite=model         # EFlow-B forward+backward, drop 0 vs 0.75
    python -m eflow_jax.bench.train --suite=tiny          # CPU smoke run

Each row: the step `train.setup` compiles (the program the training CLI runs: same shardings,
donation, uint8 batch), warm-up excluded, median of `--iters` timed steps (block_until_ready).
bench/cli.py times this beside the real training loop.
The cost-model forward-equivalents (flow/cost.py) print beside the measured examples/s, and
`cudnn_attention_calls` counts cuDNN fused-attention custom calls in the compiled HLO.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from eflow_jax import config_file, train, writers
from eflow_jax.flow import cost
from eflow_jax.models import dit

# name -> (objective, model overrides). 'soflow' is standard solution flow on a dense DiT with full
# attention and joint conditioning: the baseline of the 2.5x claim.
SETTINGS = {
    "soflow_dense": ("solution_flow", dict(mode="full", keep_per_group=4, decoupled=False)),
    "eflow": ("eflow", dict()),
    "eflow_no_mva": ("eflow", dict()),
    "flow_matching_dense": ("flow_matching", dict(mode="full", keep_per_group=4, decoupled=False)),
}

SUITES = {
    # 16x64x64 pixels, patch (2,4,4): 8x16x16 = 2048 tokens.
    "kinetics": dict(variant="B", video_shape=(16, 64, 64, 3), patch=(2, 4, 4), tile=(4, 4, 4),
                     cell=(2, 4, 4), batch=32, settings=("soflow_dense", "eflow", "eflow_no_mva",
                                                         "flow_matching_dense")),
    # SoFlow's ImageNet workload: 32x32x4 latents, patch 2: 256 tokens (ANCHORS.md table).
    "imagenet": dict(variant="B", video_shape=(1, 32, 32, 4), patch=(1, 2, 2), tile=(1, 8, 8),
                     cell=(1, 2, 2), batch=256, settings=("soflow_dense", "eflow", "flow_matching_dense")),
    "tiny": dict(variant="tiny", video_shape=(4, 16, 16, 3), patch=(1, 4, 4), tile=(2, 4, 4),
                 cell=(1, 4, 4), batch=16, settings=("soflow_dense", "eflow")),
}


@functools.lru_cache(maxsize=1)
def _common():
    """configs/common.py of this checkout, by path (the library does not import configs/)."""
    return config_file.load_module(config_file.in_repo("common.py"))


def build(suite: dict, setting: str, dtype: str, remat: str, text_len: int = 0, text_dim: int = 4096):
    objective, overrides = SETTINGS[setting]
    c = _common().base_config(suite["variant"], objective)
    c.batch_size = suite["batch"]
    c.total_steps = 100_000
    c.model.update(video_shape=suite["video_shape"], patch=suite["patch"], tile=suite["tile"],
                   cell=suite["cell"], num_classes=1000, dtype=dtype, remat=remat, **overrides)
    if setting == "eflow_no_mva":
        c.objective.mva.enabled = False
    if text_len:  # Text-conditioned: cross-attention to text_len tokens of a text_dim-wide encoder.
        c.model.update(num_classes=0, context_len=text_len, context_dim=text_dim)
    t, h, _, ch = suite["video_shape"]  # train.setup validates that the data can feed the model.
    c.data.update(source="synthetic", num_frames=t, resolution=h, channels=ch, num_classes=1000)
    return c


def random_batch(prog: train.Program, num_classes: int, seed: int = 0) -> dict:
    """A global batch of the dtypes, shapes and shardings the compiled step takes."""
    spec = prog.batch_spec
    keys = jax.random.split(jax.random.key(seed), 4)
    video, label = spec["video"], spec["label"]
    if video.dtype == jnp.uint8:
        pixels = jax.random.randint(keys[0], video.shape, 0, 256).astype(jnp.uint8)
    else:
        pixels = jax.random.normal(keys[0], video.shape, video.dtype)
    batch = {"video": jax.device_put(pixels, video.sharding),
             "label": jax.device_put(jax.random.randint(keys[1], label.shape, 0, max(num_classes, 1)), label.sharding)}
    if "text_embedding" in spec:  # Captions of random lengths (at least one token), padded at the end.
        text, mask = spec["text_embedding"], spec["text_mask"]
        lengths = jax.random.randint(keys[3], mask.shape[:1], 1, mask.shape[1] + 1)
        batch["text_embedding"] = jax.device_put(jax.random.normal(keys[2], text.shape, text.dtype), text.sharding)
        batch["text_mask"] = jax.device_put(jnp.arange(mask.shape[1])[None] < lengths[:, None], mask.sharding)
    return batch


def median_step_s(step, state, next_batch, iters: int):
    """(state, metrics, median seconds) of `iters` awaited calls of `step` (it donates the state)."""
    times, metrics = [], None
    for _ in range(iters):
        batch = next_batch()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return state, metrics, statistics.median(times)


def pipelined_step_s(step, state, batch, iters: int):
    """(state, metrics, seconds per step) of `iters` back-to-back calls, awaited once at the end:
    the throughput ceiling of a loop that never waits (median_step_s adds a dispatch gap per step)."""
    start = time.perf_counter()
    for _ in range(iters):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    return state, metrics, (time.perf_counter() - start) / iters


def time_train_step(c, iters: int) -> dict:
    """Times the step `train.setup` compiles: the program the training CLI runs for config `c`."""
    prog = train.setup(c)
    state = prog.init_state(c.seed)
    batch = random_batch(prog, c.model.num_classes)
    state, m = prog.step(state, batch)  # Warm-up (first-run allocations), excluded.
    jax.block_until_ready(m)
    state, m, med = median_step_s(prog.step, state, lambda: batch, iters)
    state, m, pipelined = pipelined_step_s(prog.step, state, batch, iters)
    flops = dit.count_flops(c.model).as_dict()
    fe = cost.forward_equivalents(c.objective, flops, c.batch_size, c.model.decoupled)
    tflops = prog.flops_per_step / med / jax.device_count() / 1e12
    peak = writers.peak_flops_per_device()
    return dict(step_ms=1e3 * med, examples_per_s=c.batch_size / med, pipelined_step_ms=1e3 * pipelined,
                pipelined_examples_per_s=c.batch_size / pipelined, compile_s=prog.compile_s,
                lower_s=prog.lower_s, compile_source=prog.compile_source, forward_equivalents=fe["per_example"],
                model_tflops_per_device=tflops, mfu=tflops * 1e12 / peak if peak else None,
                cudnn_attention_calls=prog.step.as_text().count("__cudnn$fmha"), loss=float(m["loss"]))


def time_model(c, drop: bool, iters: int) -> dict:
    """Forward+backward of the network alone (token-dropped or dense) on a batch."""
    model, net = dit.make_network(c.model)
    import flax.linen as nn

    params = jax.jit(lambda: nn.meta.unbox(dit.init_params(model, jax.random.key(0))))()
    b = c.batch_size
    x = jax.random.normal(jax.random.key(1), (b, *c.model.video_shape))
    t = jnp.full((b,), 0.5)
    y = dit.dummy_condition(c.model, b)
    keep = net.sample_keep(jax.random.key(2), b) if drop else None

    def loss(p):
        return jnp.mean(net(p, x, t, t * 0.5, y, keep) ** 2)

    fn = jax.jit(jax.grad(loss)).lower(params).compile()
    jax.block_until_ready(fn(params))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(params))
        times.append(time.perf_counter() - start)
    med = statistics.median(times)
    flops = dit.count_flops(c.model)
    fwd = flops.dropped if drop else flops.full
    return dict(fwd_bwd_ms=1e3 * med, samples_per_s=b / med, fwd_gflops_per_sample=fwd / 1e9,
                tflops_per_s=3 * fwd * b / med / 1e12, cudnn_attention_calls=fn.as_text().count("__cudnn$fmha"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="kinetics", choices=[*SUITES, "model"])
    p.add_argument("--settings", default="", help="Comma-separated subset of the suite's settings.")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--batch", type=int, default=0, help="Override the suite's global batch.")
    p.add_argument("--text_len", type=int, default=0,
                   help="> 0: text-conditioned rows (cross-attention to this many tokens) instead of labels.")
    p.add_argument("--text_dim", type=int, default=4096, help="Text-encoder width (4096: UMT5-XXL, Wan 2.1's).")
    a = p.parse_args()
    device = getattr(jax.devices()[0], "device_kind", jax.default_backend())
    if a.suite == "model":
        suite = dict(SUITES["kinetics"], batch=a.batch or 32)
        c = build(suite, "eflow", a.dtype, a.remat)
        for drop in (False, True):
            row = dict(bench="model_fwd_bwd", device=device, variant=c.model.variant, batch=suite["batch"],
                       shape=list(c.model.video_shape), drop_ratio=0.75 if drop else 0.0)
            print(json.dumps(row | time_model(c, drop, a.iters)), flush=True)
        return
    suite = dict(SUITES[a.suite])
    if a.batch:
        suite["batch"] = a.batch
    chosen = [s for s in (a.settings.split(",") if a.settings else suite["settings"]) if s]
    for setting in chosen:
        c = build(suite, setting, a.dtype, a.remat, a.text_len, a.text_dim)
        row = dict(bench="train_step", suite=a.suite, setting=setting, device=device, devices=jax.device_count(),
                   variant=c.model.variant, batch=c.batch_size, shape=list(c.model.video_shape),
                   objective=c.objective.name, mode=c.model.mode, dtype=a.dtype, remat=a.remat,
                   text_len=a.text_len, text_dim=a.text_dim if a.text_len else 0)
        try:
            row |= time_train_step(c, a.iters)
        except Exception as e:  # noqa: BLE001 (report OOM etc. as a row, keep going)
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
