r"""Learning-curve benchmark: few-step sample quality against training examples, per objective.

    python -m eflow_jax.bench.quality --size=32 --objectives=flow_matching,solution_flow,eflow \
        --steps=3000 --eval_at=500,1000,2000,3000
    python -m eflow_jax.bench.quality --objectives=eflow --set=objective.mva.weighting=adaptive  # ablation
    python -m eflow_jax.bench.quality --hard=true  # the hard set: one colour, its gauge sees blur

Every objective trains the same network size (configs/shapes.py, variant S) from the same init seed
on the same data order. At each eval point one JSON line is printed: examples seen, the seconds
spent in train steps so far (evals excluded; when several runs share the card, the
`quality_step_time` line gives each one's step time measured alone afterwards), the held-out
probe (flow/probe.py: the same dense velocity error for every objective) and the shapes gauge
(eval/shapes.py: class accuracy, motion consistency, Frechet distance on the gauge classifier's
features, with real and noise references) on samples from the EMA params: 1-, 2- and 4-step
solution maps for the few-step objectives; 50-step Euler with and without CFG (w = 3) for flow
matching. docs/QUALITY.md reads these lines.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np

from eflow_jax import config_file, loop, sample, sharding, text, train
from eflow_jax.bench import train as bench_train
from eflow_jax.data import pipeline
from eflow_jax.flow import condition, objectives, probe


def sample_settings(config: ml_collections.ConfigDict) -> list[tuple[str, int, ml_collections.ConfigDict]]:
    """(name, steps, sample config) of the samplers scored for this objective."""
    out = []
    if objectives.objective(config.objective.name).few_step_sampler is None:  # Iterative: ODE + guidance.
        for guidance in ("cfg", "none"):
            s = ml_collections.ConfigDict(config.sample.to_dict())
            s.update(sampler="euler", guidance=guidance, guidance_scale=3.0)
            out.append((f"euler50_{guidance}", 50, s))
    else:
        for n in (1, 2, 4):
            s = ml_collections.ConfigDict(config.sample.to_dict())
            s.update(sampler="renoise")
            out.append((f"renoise{n}", n, s))
    return out


def _scorer(config: ml_collections.ConfigDict, num_clips: int):
    """score(prog, params, num_steps, sample_cfg) -> scalars of the gauge config.eval.metric names: the
    shapes gauges score `num_clips` clips cycling over the classes; a text run (the captioned set) half
    prompts of seen and half of held-back attribute combinations, with the caption gauge."""
    if config.model.context_dim:
        from eflow_jax.eval import captions

        gauge = captions.CaptionGauge.for_geometry(config.data.num_frames, config.data.resolution)
        seen, unseen = captions.prompts("train"), captions.prompts("unseen")
        picks = [(g, i % len(g[0])) for g, n in ((seen, num_clips - num_clips // 2), (unseen, num_clips // 2))
                 for i in range(n)]
        prompts = [g[0][i] for g, i in picks]
        attributes = np.stack([g[2][i] for g, i in picks])
        emb, mask = text.encode_prompts(config, prompts)
        requests = sample.Requests(text=emb, text_mask=mask, prompts=tuple(prompts))

        def score(prog, params, n, scfg):
            videos = sample.generate(config, prog.net, params, requests, n, seed=1, batch_size=num_clips,
                                     sample_cfg=scfg, mesh=prog.mesh)
            return captions.scalars(gauge.report(videos, attributes), prefix="captions")

        return score
    from eflow_jax.eval import shapes

    gauge = shapes.ShapesGauge.for_config(config)
    labels = [i % config.model.num_classes for i in range(num_clips)]

    def score(prog, params, n, scfg):
        videos = sample.generate(config, prog.net, params, labels, n, seed=1, batch_size=num_clips,
                                 sample_cfg=scfg, mesh=prog.mesh)
        return gauge.score(videos, np.asarray(labels))

    return score


def run_objective(config: ml_collections.ConfigDict, eval_at: list[int], num_clips: int, tag: str,
                  gauge: bool = True, timing_dir: str = "", parallel: int = 1):
    """Trains `config` with the CLI's program (train.setup) and yields one result dict per eval step.

    gauge=False scores only the probe. timing_dir: after training, wait until `parallel` runs
    sharing the card are done, then time 50 more steps alone (under a file lock), so step times are
    comparable even when the learning curves were trained side by side.
    """
    prog = train.setup(config)
    state = prog.init_state(config.seed)
    data = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                        float_video=False, text=text.caption_encoder(config))
    batches = loop.DevicePrefetcher(data, lambda b: sharding.to_global_batch(b, prog.mesh))
    held = pipeline.heldout_batch(config.data, 64, text.caption_encoder(config))
    fixed = probe.make_probe(held["video"], condition.from_batch(held, labels=config.model.num_classes > 0,
                                                                 text=config.model.context_dim > 0))
    probe_fn = jax.jit(lambda p: probe.probe_metrics(prog.net, p, fixed))
    score = _scorer(config, num_clips) if gauge else None

    train_s, started = 0.0, time.perf_counter()
    print(f"{tag}: compiled in {prog.compile_s:.0f}s", file=sys.stderr, flush=True)
    for step in range(1, config.total_steps + 1):
        batch = next(batches)
        step_fn = prog.step_for(step)  # Compiles the dense fine-tune's step at the switch: not timed.
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if step in eval_at:
            jax.block_until_ready(metrics)
        train_s += time.perf_counter() - start  # Async dispatch: settled at every eval step.
        if step % 100 == 0 or step == 1:  # On stderr: a run that is slow says where it is.
            print(f"{tag}: step {step}, {time.perf_counter() - started:.0f}s since start", file=sys.stderr, flush=True)
        if step not in eval_at:
            continue
        row = dict(bench="quality", tag=tag, objective=config.objective.name, gauge=config.eval.metric, step=step,
                   examples=step * config.batch_size, train_s=round(train_s, 2),
                   compile_s=round(prog.compile_s, 1), parallel=parallel,
                   device=jax.devices()[0].device_kind, loss=float(metrics["loss"]))
        row |= {k: float(v) for k, v in probe_fn(state.params).items()}
        for name, n, scfg in sample_settings(config) if score else ():
            row |= {f"{name}/{k}": v for k, v in score(prog, state.ema_params, n, scfg).items()}
        yield row
    if timing_dir:
        yield dict(bench="quality_step_time", tag=tag, objective=config.objective.name, batch=config.batch_size,
                   step_ms=_time_alone(prog, state, batches, timing_dir, tag, parallel),
                   device=jax.devices()[0].device_kind)
    batches.close()


def _time_alone(prog, state, batches, timing_dir: str, tag: str, parallel: int, steps: int = 50) -> float:
    """Median step time (ms) of the token-dropped phase's program, once every run sharing the card
    has finished training, one at a time."""
    os.makedirs(timing_dir, exist_ok=True)
    open(os.path.join(timing_dir, f"{tag}.done"), "w").close()
    while len([f for f in os.listdir(timing_dir) if f.endswith(".done")]) < parallel:
        time.sleep(1.0)
    # One device-resident batch, as bench/train.py times the step: with the input pipeline in the
    # loop, every objective timed the same ~96 ms on an H200 (the host's clip drawing, not the step).
    batch = next(batches)
    with open(os.path.join(timing_dir, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state, _, _ = bench_train.median_step_s(prog.step, state, lambda: batch, 5)  # Warm-up.
        _, _, step_s = bench_train.median_step_s(prog.step, state, lambda: batch, steps)
    return round(1e3 * step_s, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objectives", default="flow_matching,solution_flow,eflow")
    p.add_argument("--size", type=int, default=32, choices=(32, 64))
    p.add_argument("--variant", default="S")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval_at", default="500,1000,2000,3000")
    p.add_argument("--num_clips", type=int, default=200, help="Generated clips scored per sampler.")
    p.add_argument("--set", action="append", default=[], help="Config override, e.g. objective.mva.beta=0.5.")
    p.add_argument("--gauge", default="true", choices=("true", "false"), help="Score samples (false: probe only).")
    p.add_argument("--timing_dir", default="", help="Time 50 steps alone after training (see run_objective).")
    p.add_argument("--parallel", type=int, default=1, help="Runs sharing the card (with --timing_dir).")
    p.add_argument("--hard", default="false", choices=("true", "false"),
                   help="The hard set (configs/shapes.py:hard=1): classes differ by shape and motion only.")
    p.add_argument("--t2v", default="false", choices=("true", "false"),
                   help="Text-to-video on the captioned set (configs/t2v.py:data=shapes), scored by the caption gauge.")
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="", help="Also append the JSON lines to this file.")
    a = p.parse_args()
    eval_at = sorted({int(v) for v in a.eval_at.split(",") if v} | {a.steps})
    for objective in a.objectives.split(","):
        if a.t2v == "true":
            config = config_file.load(config_file.in_repo("t2v.py"), f"data=shapes,objective={objective},"
                                      f"variant={a.variant},steps={a.steps},batch={a.batch}")
        else:
            config = config_file.load(config_file.in_repo("shapes.py"), f"objective={objective},size={a.size},"
                                      f"variant={a.variant},steps={a.steps},batch={a.batch},hard={a.hard}")
        for assignment in a.set:
            config_file.override(config, assignment)
        for row in run_objective(config, eval_at, a.num_clips, a.tag or objective, a.gauge == "true",
                                 a.timing_dir, a.parallel):
            line = json.dumps(row)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
