r"""eflow_jax command line: train, sample, export, eval.

    python -m eflow_jax.main --config=configs/kinetics.py --workdir=/ckpt/run1
    python -m eflow_jax.main --mode=sample --workdir=/ckpt/run1 --sample.num_steps=2 \
        --sample.labels=0,5,17 --sample.num=16 --out=samples/
    python -m eflow_jax.main --mode=sample --workdir=/ckpt/t2v --sample.prompt="a red circle moving left"
    python -m eflow_jax.main --mode=export --workdir=/ckpt/run1 --out=/ckpt/run1_ema
    python -m eflow_jax.main --mode=eval --workdir=/ckpt/run1 --eval.fvd.i3d_path=/models/i3d.npz
    python -m eflow_jax.main --mode=eval --workdir=/tmp/eflow_demo --eval.metric=shapes

`sample`, `export` and `eval` read the run's config snapshot (workdir/config.json) unless
--config is given, and load only the params they need onto the current devices. --config is a file
path, valid from any working directory (eflow_jax/config_file.py: how its imports resolve).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from eflow_jax import config_file, distributed, evaluate, rundir, sample
from eflow_jax.models import dit

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py[:args]), a path from any "
                                "working directory.", lock_config=True)


def _define_config_dict(name: str, make, help_string: str) -> None:
    """config_flags.DEFINE_config_dict; it parses sys.argv's --<name>.* overrides at once, so a field the
    section lacks fails here, at import: as one `error:` line naming the closest fields."""
    try:
        config_flags.DEFINE_config_dict(name, make(), help_string)
    except (AttributeError, KeyError):
        problem = config_file.unknown_field(sys.argv, {name: make})
        if problem is None:
            raise
        raise SystemExit(f"error: {problem}") from None


_define_config_dict("sample", sample.sample_config, "Sampling settings (--mode=sample, and the sampler of "
                    "--mode=eval); given --sample.* flags override the run config's sample section.")
_define_config_dict("eval", evaluate.eval_config, "Eval settings (--mode=eval); given --eval.* flags override the "
                    "run config's eval section.")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "export", "eval"], "What to do.")
flags.DEFINE_string("out", "", "Output directory for sample/export/eval (default: under workdir).")
flags.DEFINE_bool("multiprocess", None, "Call jax.distributed.initialize() (default: auto on multi-host "
                  "platforms: GCE/GKE TPU pods, SLURM, JAX_COORDINATOR_ADDRESS; see eflow_jax/distributed.py).")


def _quiet_libraries(record) -> bool:
    """orbax and grain log every file at INFO through absl: keep only their warnings."""
    noisy = ("/orbax/", "/grain/")
    return record.levelno >= 30 or not any(n in record.pathname for n in noisy)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().addFilter(_quiet_libraries)
    distributed.maybe_initialize(FLAGS.multiprocess)
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required (the run directory).")

    if FLAGS.mode == "train" and FLAGS.config is None:
        raise app.UsageError("--config is required to train, e.g. --config=configs/demo.py")
    try:
        if FLAGS.mode == "train":
            from eflow_jax import train

            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        else:
            _use_run(FLAGS.mode)
    except rundir.RunError as e:  # Its message says what to do; a traceback would bury it.
        raise SystemExit(f"error: {rundir.one_line(e)}") from None
    except (ValueError, FileNotFoundError) as e:
        if FLAGS.mode == "train":  # Training turns bad input into RunErrors: anything else is a bug.
            raise
        raise SystemExit(f"error: {rundir.one_line(e)}") from None  # Bad --sample.*/--eval.* flags, missing files.


def _use_run(mode: str) -> None:
    """sample / export / eval: a trained run (or an export) on the current devices."""
    from eflow_jax import sharding

    config = FLAGS.config if FLAGS.config is not None else rundir.read_config(FLAGS.workdir)
    # Every --sample.* / --eval.* flag typed wins over the run's config, also one equal to its default.
    sample_cfg = sample.apply_sample_flags(config, config_flags.get_override_values(FLAGS["sample"]))
    step = None if sample_cfg.step < 0 else sample_cfg.step
    mesh = sharding.make_mesh(sharding.mesh_config())  # All local devices, whatever training used.
    logging.info("topology: %s", sharding.describe(mesh))
    if mode == "export":
        out = sample.export(FLAGS.workdir, FLAGS.out or rundir.export_dir(FLAGS.workdir), mesh,
                            use_ema=sample_cfg.use_ema, step=step)
        logging.info("exported params + config to %s", out)
    elif mode == "sample":
        sample.run_sample_mode(config, FLAGS.workdir, FLAGS.out or None, sample_cfg, mesh)
    else:
        evaluate.apply_eval_flags(config, config_flags.get_override_values(FLAGS["eval"]))
        evaluate.run(config, FLAGS.workdir, FLAGS.out or rundir.eval_dir(FLAGS.workdir), mesh, step=step)


# Fields people look for that the model config spells otherwise.
MODEL_HINTS = {f"config.model.{name}": "the width, depth and heads come from --config.model.variant (one of "
               f"{', '.join(dit.VARIANTS)})" for name in ("width", "depth", "heads", "num_heads", "hidden_size")}


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but a --config.* field the config file lacks (ml_collections raises a bare
    KeyError for it) is one `error:` line naming the closest fields (--sample.* / --eval.*: at import)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        spec = config_file.config_spec_in_argv(argv)
        if spec is None:
            raise
        problem = config_file.unknown_field(argv, {"config": lambda: config_file.load(*spec)}, MODEL_HINTS)
        if problem is None:  # Something else (a config file's own bug): its traceback helps.
            raise
        raise SystemExit(f"error: {problem}") from None


if __name__ == "__main__":
    # The config file is loaded while flags are parsed; its package must be importable by then.
    if (path := config_file.config_path_in_argv(sys.argv)) is not None:
        config_file.make_importable(path)
    app.run(main, flags_parser=parse_flags)
