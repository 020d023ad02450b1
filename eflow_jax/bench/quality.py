r"""Learning-curve benchmark: few-step sample quality against training examples, per objective.

    python -m eflow_jax.bench.quality --size=32 --objectives=flow_matching,solution_flow,eflow \
        --steps=3000 --eval_at=500,1000,2000,3000
    python -m eflow_jax.bench.quality --objectives=eflow --set=objective.mva.weighting=adaptive  # ablation

Every objective trains the same network size (configs/shapes.py, variant S) from the same init seed
on the same data order. At each eval point one JSON line is printed: examples seen, the seconds
spent in train steps so far (evals excluded), the held-out probe (flow/probe.py: the same dense
velocity error for every objective) and the shapes gauge (eval/shapes.py: class accuracy, motion
consistency, Frechet distance on the gauge classifier's features, with real and noise references)
on samples from the EMA params: 1-, 2- and 4-step solution maps for the few-step objectives;
50-step Euler with and without CFG (w = 3) for flow matching. docs/QUALITY.md reads these lines.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import ml_collections
import numpy as np

from configs import shapes as shapes_config
from eflow_jax import optim, sample, sharding, train
from eflow_jax import state as state_lib
from eflow_jax.data import pipeline
from eflow_jax.flow import objectives, probe
from eflow_jax.models import dit


def _override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """'objective.mva.weighting=adaptive' -> config.objective.mva.weighting = 'adaptive' (typed)."""
    key, _, text = assignment.partition("=")
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    old = node[leaf]
    if isinstance(old, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {assignment}: {key} is a bool; use true or false.")
        node[leaf] = text.lower() in ("true", "1")
    else:
        node[leaf] = type(old)(text) if old is not None else text


def sample_settings(config: ml_collections.ConfigDict) -> list[tuple[str, int, ml_collections.ConfigDict]]:
    """(name, steps, sample config) of the samplers scored for this objective."""
    out = []
    if config.objective.name == "flow_matching":
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


def run_objective(config: ml_collections.ConfigDict, eval_at: list[int], num_clips: int, tag: str,
                  gauge: bool = True):
    """Trains `config` and yields one result dict per eval step (gauge=False: the probe only)."""
    mesh = sharding.make_mesh(config.mesh)
    train.validate(config, mesh)
    model, net = dit.make_network(config.model)
    tx = optim.make_optimizer(config.optim, config.total_steps)
    loss_fn = objectives.make_loss(config.objective, net, config.total_steps)
    _, state_shardings = state_lib.state_shardings(model, tx, mesh, config.seed)
    state = state_lib.create_state(model, tx, mesh, config.seed, state_shardings)
    batch_shardings = {"video": sharding.batch_sharding(mesh), "label": sharding.batch_sharding(mesh)}
    step_fn = jax.jit(train.make_train_step(config, net, tx, loss_fn),
                      in_shardings=(state_shardings, batch_shardings), donate_argnums=(0,))
    data = pipeline.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed)
    clips, labels = pipeline.heldout_clips(config.data, 64)
    fixed = probe.make_probe(clips, labels)
    probe_fn = jax.jit(lambda p: probe.probe_metrics(net, p, fixed))
    if gauge:
        from eflow_jax.eval import shapes

        gauge = shapes.ShapesGauge.for_data(config.data)
    gen_labels = [i % config.model.num_classes for i in range(num_clips)]

    train_s, compile_s = 0.0, None
    for step in range(1, config.total_steps + 1):
        batch = sharding.to_global_batch(next(data), mesh)
        start = time.perf_counter()
        state, metrics = step_fn(state, batch)
        if step == 1 or step in eval_at:
            jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - start
        if step == 1:
            compile_s = elapsed  # The first call compiles; its time is reported, not counted.
        else:
            train_s += elapsed
        if step not in eval_at:
            continue
        row = dict(bench="quality", tag=tag, objective=config.objective.name, step=step,
                   examples=step * config.batch_size, train_s=round(train_s, 2),
                   compile_s=round(compile_s, 1), device=jax.devices()[0].device_kind,
                   loss=float(metrics["loss"]))
        row |= {k: float(v) for k, v in probe_fn(state.ema_params).items()}
        for name, n, scfg in sample_settings(config) if gauge else ():
            videos = sample.generate(config, net, state.ema_params, gen_labels, n, seed=1,
                                     batch_size=num_clips, sample_cfg=scfg)
            row |= {f"{name}/{k}": v for k, v in gauge.score(videos, np.asarray(gen_labels)).items()}
        yield row


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
    p.add_argument("--tag", default="")
    p.add_argument("--out", default="", help="Also append the JSON lines to this file.")
    a = p.parse_args()
    eval_at = sorted({int(v) for v in a.eval_at.split(",") if v} | {a.steps})
    for objective in a.objectives.split(","):
        config = shapes_config.get_config(f"objective={objective},size={a.size},variant={a.variant},"
                                          f"steps={a.steps},batch={a.batch}")
        for assignment in a.set:
            _override(config, assignment)
        for row in run_objective(config, eval_at, a.num_clips, a.tag or objective, a.gauge == "true"):
            line = json.dumps(row)
            print(line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")


if __name__ == "__main__":
    main()
