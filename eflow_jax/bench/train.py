r"""Training-throughput benchmark: one JSON line per (setting), measured in one process on one card.

    python -m eflow_jax.bench.train --suite=kinetics      # EFlow-B vs standard solution flow, 16x64x64 video
    python -m eflow_jax.bench.train --suite=imagenet      # one-frame 32x32x4 latents (SoFlow's workload)
    python -m eflow_jax.bench.train --suite=model         # EFlow-B forward+backward, drop 0 vs 0.75
    python -m eflow_jax.bench.train --suite=tiny          # CPU smoke run
    python -m eflow_jax.bench.train --suite=ablation,ablation_L --profile=abl0_soflow_dense,abl5_mva_eflow \
        --budget_s=480 --md=ablation.md                  # SoFlow -> EFlow one switch at a time, B then L

`--suite=ablation` (ABLATION_ROWS) times the rows from the dense full-attention SoFlow DiT to EFlow,
one switch per row, and prints per row the cost model's prediction in the same unit: row 0's
measured examples/s x (row 0's FLOPs per example / this row's), and measured / predicted (the cost
model's target: within 10%). `--profile` traces the named rows after timing them (bench/profile.py).
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
import sys
import time

import jax
import jax.numpy as jnp

from eflow_jax import config_file, train, writers
from eflow_jax import text as text_lib
from eflow_jax.flow import cost
from eflow_jax.models import dit

# name -> (objective, objective overrides, model overrides). 'soflow_dense' is standard solution flow on
# a dense DiT with full attention and joint conditioning: the baseline of the 2.5x claim. Overrides are
# dotted config paths ('mva.enabled'), applied on top of objectives.default_objective_config(objective).
DENSE_JOINT = dict(mode="full", keep_per_group=4, decoupled=False)
SETTINGS = {
    "soflow_dense": ("solution_flow", {}, DENSE_JOINT),
    "eflow": ("eflow", {}, {}),
    "eflow_no_mva": ("eflow", {"mva.enabled": False}, {}),
    "flow_matching_dense": ("flow_matching", {}, DENSE_JOINT),
}

# From standard solution flow to EFlow, one switch per row (`--suite=ablation`; rows are data so that
# they follow the objective config as it changes). Row k differs from row k-1 by the switch in its
# name; every row is a config objectives.validate_config accepts. solution_flow refuses token drop,
# so from row 2 on the objective is 'eflow' set up as SoFlow-with-token-drop (CFG target whose
# unconditional pass is token-dropped too, no weak sub-batch, no MVA); rows 2 and 3 keep joint
# conditioning (the trunk sees s), so every decoder query is a whole token-dropped pass.
# (name, objective, objective overrides, model overrides)
ABLATION_ROWS = (
    ("abl0_soflow_dense", "solution_flow", {}, DENSE_JOINT),
    ("abl1_glga", "solution_flow", {}, dict(mode="glga", keep_per_group=4, decoupled=False)),
    ("abl2_token_drop", "eflow", {"guidance": "cfg", "weak_ratio": 0.0, "cfg_uncond_dropped": True,
                                  "mva.enabled": False}, dict(mode="glga", keep_per_group=1, decoupled=False)),
    ("abl3_path_drop", "eflow", {"mva.enabled": False}, dict(mode="glga", keep_per_group=1, decoupled=False)),
    ("abl4_decoupled", "eflow", {"mva.enabled": False}, dict(mode="glga", keep_per_group=1, decoupled=True)),
    ("abl5_mva_eflow", "eflow", {}, dict(mode="glga", keep_per_group=1, decoupled=True)),
)
SETTINGS |= {name: (objective, obj, model) for name, objective, obj, model in ABLATION_ROWS}
ABLATION = tuple(row[0] for row in ABLATION_ROWS)
# Every ablation row's objective without the dense fine-tune (bench rows time the token-dropped step).
NO_FINETUNE = {"dense_finetune_frac": 0.0}

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
# The ablation at the kinetics geometry (2048 tokens, batch 32): EFlow-B (2/8/2 blocks), and EFlow-L
# (2/20/2: a deeper token-dropped middle, where the paper's 2.5x should show). Both time the two ends
# first, so that a time budget (--budget_s) still leaves the EFlow / SoFlow ratio.
_GEOMETRY = {k: v for k, v in SUITES["kinetics"].items() if k not in ("variant", "settings")}
SUITES |= {
    "ablation": dict(_GEOMETRY, variant="B", settings=(ABLATION[0], ABLATION[-1], *ABLATION[1:-1])),
    "ablation_L": dict(_GEOMETRY, variant="L", settings=(ABLATION[0], ABLATION[-1], *ABLATION[1:-1])),
    "ablation_tiny": dict(SUITES["tiny"], settings=ABLATION),  # CPU smoke run of the rows.
}


@functools.lru_cache(maxsize=1)
def _common():
    """configs/common.py of this checkout, by path (the library does not import configs/)."""
    return config_file.load_module(config_file.in_repo("common.py"))


def build(suite: dict, setting: str, dtype: str, remat: str, text_len: int = 0, text_dim: int = 4096):
    objective, obj_overrides, overrides = SETTINGS[setting]
    c = _common().base_config(suite["variant"], objective)
    c.batch_size = suite["batch"]
    c.total_steps = 100_000
    c.model.update(video_shape=suite["video_shape"], patch=suite["patch"], tile=suite["tile"],
                   cell=suite["cell"], num_classes=1000, dtype=dtype, remat=remat, **overrides)
    for field, value in (obj_overrides | (NO_FINETUNE if setting in ABLATION else {})).items():
        config_file.override(c.objective, f"{field}={value!r}")
    t, h, _, ch = suite["video_shape"]  # train.setup validates that the data can feed the model.
    c.data.update(source="synthetic", num_frames=t, resolution=h, channels=ch, num_classes=1000)
    if text_len:  # Text-conditioned: cross-attention to text_len tokens of a text_dim-wide encoder.
        c.model.update(num_classes=0, context_len=text_len, context_dim=text_dim)
        # The data the step is validated against: the captioned set, encoded by the tiny random encoder when
        # its width is asked for (the encoder's width only sizes the text projection: 0.5 GFLOP per sample
        # at 4096 against ~370 for the network).
        c.data.update(synthetic_kind="captions", num_classes=0)
        c.text.encoder = text_lib.TINY_RANDOM if text_dim == text_lib.TINY_RANDOM_WIDTH else "/path/to/encoder"
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


def time_train_step(c, iters: int, profile_steps: int = 0) -> dict:
    """Times the step `train.setup` compiles: the program the training CLI runs for config `c`.

    With profile_steps > 0, also traces that many steps (bench/profile.py): the report is under
    'profile' in the returned dict.
    """
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
    out = dict(step_ms=1e3 * med, examples_per_s=c.batch_size / med, pipelined_step_ms=1e3 * pipelined,
               pipelined_examples_per_s=c.batch_size / pipelined, compile_s=prog.compile_s,
               lower_s=prog.lower_s, compile_source=prog.compile_source, forward_equivalents=fe["per_example"],
               gflop_per_example=fe["flops_per_example"] / 1e9,
               model_tflops_per_device=tflops, mfu=tflops * 1e12 / peak if peak else None,
               cudnn_attention_calls=prog.step.as_text().count("__cudnn$fmha"), loss=float(m["loss"]))
    if profile_steps:
        from eflow_jax.bench import profile

        state, out["profile"] = profile.profile_program(prog, state, batch, profile_steps)
        out["profile"]["summary"]["step_ms"] = out["step_ms"]
    return out


def predictions(rows: list[dict], reference: str) -> None:
    """Adds to each timed row the cost model's examples/s: the reference row's measured examples/s
    scaled by its cost per example over this row's (flow/cost.py, absolute FLOPs per example, so
    rows of different attention modes compare), and measured / predicted (awaited and back to back)."""
    ref = next((r for r in rows if r["setting"] == reference and "examples_per_s" in r), None)
    for r in rows:
        if ref is None or "examples_per_s" not in r:
            continue
        scale = ref["gflop_per_example"] / r["gflop_per_example"]
        r["predicted_examples_per_s"] = ref["examples_per_s"] * scale
        r["measured_over_predicted"] = r["examples_per_s"] / r["predicted_examples_per_s"]
        r["pipelined_measured_over_predicted"] = r["pipelined_examples_per_s"] / (
            ref["pipelined_examples_per_s"] * scale)
        r["speedup_vs_reference"] = r["examples_per_s"] / ref["examples_per_s"]
        r["cost_model_speedup_vs_reference"] = scale


def ablation_markdown(rows: list[dict], title: str) -> str:
    order = {name: i for i, name in enumerate(ABLATION)}
    rows = sorted(rows, key=lambda r: order.get(r["setting"], len(order)))
    out = [f"### {title}", "",
           "| row | objective | mode | decoupled | ex/s | predicted ex/s | measured / predicted | back-to-back "
           "ex/s (ratio) | GFLOP / example | F / example | MFU | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "examples_per_s" not in r:
            out.append(f"| {r['setting']} | {r.get('objective', '')} | | | {r.get('error') or r.get('skipped')} "
                       "| | | | | | | |")
            continue
        pred = r.get("predicted_examples_per_s")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        out.append(f"| {r['setting']} | {r.get('objective', '')} | {r.get('mode', '')} | {r.get('decoupled', '')} | "
                   f"{r['examples_per_s']:.1f} | {pred or 0:.1f} | {r.get('measured_over_predicted', 0):.3f} | "
                   f"{r['pipelined_examples_per_s']:.1f} ({r.get('pipelined_measured_over_predicted', 0):.3f}) | "
                   f"{r['gflop_per_example']:.4g} | {r.get('forward_equivalents', 0):.2f} | {mfu} | "
                   f"{r.get('compile_s', 0):.0f} |")
    timed = [r for r in rows if "examples_per_s" in r]
    if len(timed) >= 2 and timed[0].get("speedup_vs_reference") is not None:
        last = max(timed, key=lambda r: ABLATION.index(r["setting"]) if r["setting"] in ABLATION else -1)
        out += ["", f"{last['setting']} / {timed[0]['setting']}: measured {last['speedup_vs_reference']:.2f}x, "
                    f"cost model {last['cost_model_speedup_vs_reference']:.2f}x"]
    return "\n".join(out + [""])


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
    p.add_argument("--suite", default="kinetics", help=f"One of {[*SUITES, 'model']}, or several comma-separated.")
    p.add_argument("--settings", default="", help="Comma-separated subset of the suite's settings.")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--remat", default="none")
    p.add_argument("--batch", type=int, default=0, help="Override the suite's global batch.")
    p.add_argument("--text_len", type=int, default=0,
                   help="> 0: text-conditioned rows (cross-attention to this many tokens) instead of labels.")
    p.add_argument("--text_dim", type=int, default=4096, help="Text-encoder width (4096: UMT5-XXL, Wan 2.1's).")
    p.add_argument("--variant", default="", help="Override the suite's model variant (e.g. L).")
    p.add_argument("--profile", default="", help="Settings to trace after timing them (comma-separated, or"
                   " 'all'): bench/profile.py's device-time breakdown, printed as JSON lines + markdown.")
    p.add_argument("--profile_steps", type=int, default=3)
    p.add_argument("--profile_ops", default="", help="Per-instruction totals of the profiled rows (.json.gz).")
    p.add_argument("--md", default="", help="Write the markdown tables (ablation, profiles) here too.")
    p.add_argument("--budget_s", type=float, default=0.0, help="Skip rows that would end after this many"
                   " seconds from the start (estimated from the compile times seen); 0 = no limit.")
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
    start, tables, profiles, reports = time.perf_counter(), {}, [], {}
    compile_seen: dict[str, float] = {}  # variant -> its longest compile so far (for the budget)

    def report_so_far(final: bool) -> None:
        """The markdown of the rows so far: rewritten after every row, so a run cut short keeps it."""
        text = "\n".join([*tables.values(), *profiles])
        if final and text:
            print(text, file=sys.stderr, flush=True)
        if a.md:
            with open(a.md, "w") as f:
                f.write(text)
        if a.profile_ops and reports:
            from eflow_jax.bench import profile

            profile.write_ops(a.profile_ops, reports)

    for suite_name in a.suite.split(","):
        suite = dict(SUITES[suite_name])
        if a.batch:
            suite["batch"] = a.batch
        if a.variant:
            suite["variant"] = a.variant
        chosen = [s for s in (a.settings.split(",") if a.settings else suite["settings"]) if s]
        profiled = set(chosen if a.profile == "all" else a.profile.split(",")) if a.profile else set()
        title = f"{suite_name}: {suite['variant']}, {device}, batch {suite['batch']}, {list(suite['video_shape'])}"
        rows = []
        for setting in chosen:
            c = build(suite, setting, a.dtype, a.remat, a.text_len, a.text_dim)
            row = dict(bench="train_step", suite=suite_name, setting=setting, device=device,
                       devices=jax.device_count(), variant=c.model.variant, batch=c.batch_size,
                       shape=list(c.model.video_shape), objective=c.objective.name, mode=c.model.mode,
                       decoupled=c.model.decoupled, token_drop=c.objective.token_drop,
                       guidance=c.objective.guidance, mva=c.objective.mva.enabled, dtype=a.dtype, remat=a.remat,
                       text_len=a.text_len, text_dim=a.text_dim if a.text_len else 0)
            need = _row_estimate_s(compile_seen, c.model.variant, setting in profiled)
            if a.budget_s and time.perf_counter() - start + need > a.budget_s:
                row["skipped"] = f"budget: {time.perf_counter() - start:.0f}s used, ~{need:.0f}s needed"
            else:
                try:
                    row |= time_train_step(c, a.iters, a.profile_steps if setting in profiled else 0)
                    compile_seen[c.model.variant] = max(compile_seen.get(c.model.variant, 0.0), row["compile_s"])
                except Exception as e:  # noqa: BLE001 (report OOM etc. as a row, keep going)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if "profile" in row:
                from eflow_jax.bench import profile

                report = reports[f"{suite_name}/{setting}"] = row.pop("profile")
                for line in profile.json_rows(report, suite=suite_name, setting=setting, variant=c.model.variant):
                    print(json.dumps(line), flush=True)
                profiles.append(profile.markdown(report, f"{suite_name} / {setting} ({c.objective.name}, "
                                                         f"{c.model.variant}, batch {c.batch_size}, {device})"))
            rows.append(row)
            row["elapsed_s"] = round(time.perf_counter() - start, 1)
            print(json.dumps(row), flush=True)
            if suite_name.startswith("ablation"):
                predictions(rows, ABLATION[0])
                tables[suite_name] = ablation_markdown(rows, title)
            report_so_far(final=False)
        if suite_name.startswith("ablation"):
            for r in rows:
                if "predicted_examples_per_s" in r:
                    print(json.dumps(dict(bench="ablation", **{k: r[k] for k in _ABLATION_KEYS if k in r})),
                          flush=True)
    report_so_far(final=True)


_ABLATION_KEYS = ("suite", "setting", "variant", "objective", "mode", "decoupled", "token_drop", "guidance", "mva",
                  "examples_per_s", "predicted_examples_per_s", "measured_over_predicted",
                  "pipelined_examples_per_s", "pipelined_measured_over_predicted", "speedup_vs_reference",
                  "cost_model_speedup_vs_reference", "gflop_per_example", "forward_equivalents", "mfu", "step_ms")


def _row_estimate_s(compile_seen: dict[str, float], variant: str, profiled: bool) -> float:
    """Seconds a row will take: the longest compile of its variant (else of another, scaled by depth),
    plus timing and, if traced, profiling."""
    if variant in compile_seen:
        compile_s = compile_seen[variant]
    elif compile_seen:
        other, seconds = next(iter(compile_seen.items()))
        compile_s = seconds * sum(dit.VARIANTS[variant][2]) / sum(dit.VARIANTS[other][2])
    else:
        compile_s = 0.0  # Nothing measured yet: always try the first row.
    return compile_s + 15.0 + (25.0 if profiled else 0.0)


if __name__ == "__main__":
    main()
