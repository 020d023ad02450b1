"""Assembles a run config from the sections the library defines; configs/*.py are small deltas on it.

Each section's defaults live beside the code that reads them (dit.model_config, sample.sample_config,
...): this file only puts them together, and the library never imports configs/.
"""

import ml_collections

from eflow_jax import evaluate, optim, sample, sharding, text, train
from eflow_jax.data import pipeline
from eflow_jax.flow import objectives
from eflow_jax.models import dit

_TRUE = ("", "1", "true", "yes")  # '' : a bare flag-style name ('runlocal') means True.
_FALSE = ("0", "false", "no")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'variant=L,objective=solution_flow,runlocal' -> ConfigDict with typed defaults.

    Booleans are strict: a typo ('ture') is an error, not a silent False.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(out)}")
        kind = type(defaults[key])
        out[key] = _parse_bool(key, value) if kind is bool else kind(value)
    return out


def _parse_bool(key: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"config arg {key}={value!r} is not a boolean; use one of true/false, 1/0, yes/no "
                     f"(or a bare '{key}' for true).")


def base_config(variant: str = "B", objective: str = "eflow") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 400_000
    c.batch_size = 256  # Global batch over all devices.
    c.model = dit.model_config(variant)
    c.data = pipeline.default_data_config()
    c.objective = objectives.default_objective_config(objective)
    if c.objective.token_drop:
        # SPRINT's recipe: train token-dropped, then dense for the last 10% of the steps. Sampling is
        # dense, and without this phase the few-step samples lag far behind (docs/QUALITY.md).
        c.objective.dense_finetune_frac = 0.1
    c.optim = optim.optim_config()
    c.mesh = sharding.mesh_config()
    c.checkpoint = train.checkpoint_config()
    c.log = train.log_config()
    c.train = train.train_config()
    c.sample = sample.sample_config()
    c.text = text.text_config()
    c.eval = evaluate.eval_config()
    return c
