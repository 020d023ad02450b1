"""The command line: typed flags win, and every user mistake ends in one `error:` line naming the fix.

The subprocess tests start from a workdir holding only config.json (or a tiny checkpoint made
without training), so each costs the CLI's start-up, not a compile.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from eflow_jax import checkpoint, evaluate, rundir, sample, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
    return subprocess.run([sys.executable, "-m", "eflow_jax.main", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_with_config(path, config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config.to_json(indent=2))
    return path


def one_device_mesh():
    return sharding.make_mesh(sharding.mesh_config(), devices=jax.devices()[:1])


def random_params(config, mesh, seed):
    rng = np.random.default_rng(seed)

    def leaf(abstract):
        value = rng.normal(size=abstract.shape) / np.sqrt(max(1, np.prod(abstract.shape[:-1])))
        return jax.device_put(value.astype(abstract.dtype), abstract.sharding)

    return jax.tree.map(leaf, sample.abstract_params(config, mesh))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A workdir with checkpoints of steps 10 and 12 (other random params each; no training) and config.json."""
    config = demo.get_config("test=1")
    workdir = tmp_path_factory.mktemp("main") / "run"
    ckpt = checkpoint.Checkpointer(rundir.ckpt_dir(str(workdir)), save_every=1, async_save=False)
    for step in (10, 12):
        params = random_params(config, one_device_mesh(), seed=step)
        ckpt.save(step, {"step": np.int32(step), "params": params, "ema_params": params}, force=True)
    ckpt.close()
    return config, run_with_config(workdir, config)


def listing(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---- typed flags win ----


def test_typed_eval_and_sample_flags_win_even_at_their_defaults():
    config = demo.get_config("test=1")  # eval.metric='shapes', eval.shapes.num_clips=32
    config.eval.fvd.i3d_path = "/models/i3d.npz"
    config.sample.sampler = "chain"
    evaluate.apply_eval_flags(config, {"metric": "fvd", "shapes.num_clips": 256, "fvd.i3d_path": ""})
    assert (config.eval.metric, config.eval.shapes.num_clips, config.eval.fvd.i3d_path) == ("fvd", 256, "")
    assert config.eval.shapes.num_steps == (1,)  # Not typed: the run's value stays.
    # --sample.* flags layer over the run's sample section the same way.
    assert sample.apply_sample_flags(config, {}).sampler == "chain"
    assert sample.apply_sample_flags(config, {"sampler": "renoise", "num": 8}).sampler == "renoise"


@pytest.mark.slow
def test_cli_eval_follows_its_own_advice_on_an_arrayrecord_run(tmp_path):
    # The run's config scores the shapes gauge (synthetic data only) on prepared clips; the error
    # says --eval.metric=fvd, the default value: typing it must switch to FVD, and typing the
    # default (empty) i3d_path must win over the run's.
    config = demo.get_config("test=1")
    config.data.update(source="arrayrecord", path=str(tmp_path / "clips"))
    config.eval.fvd.i3d_path = str(tmp_path / "i3d.npz")
    workdir = run_with_config(tmp_path / "run", config)
    done = cli("--mode=eval", f"--workdir={workdir}", "--eval.metric=fvd", "--eval.fvd.i3d_path=")
    assert done.returncode != 0
    assert "Use FVD for this run" not in done.stderr
    assert "config.eval.fvd.i3d_path is empty" in done.stderr, done.stderr[-2000:]


# ---- exports ----


def test_export_refuses_the_runs_own_workdir_and_an_export_refuses_another_step(tiny_run, tmp_path):
    config, workdir = tiny_run
    mesh, before = one_device_mesh(), listing(workdir)
    with pytest.raises(rundir.RunError, match=r"is this run's own workdir: .* use another --out"):
        sample.export(str(workdir), str(workdir), mesh)
    assert listing(workdir) == before and not rundir.is_export(str(workdir))

    out = sample.export(str(workdir), str(tmp_path / "export"), mesh, step=10)
    assert rundir.read_export_record(out) == dict(checkpoint_step=10, params="ema", source=str(workdir))
    with pytest.raises(rundir.RunError, match=r"holds the params of step 10 only, so --sample.step=12"):
        sample.load_params(out, config, mesh, step=12)
    held = sample.load_params(out, config, mesh, step=10)  # The step it holds: fine.
    ten = checkpoint.restore_params(rundir.ckpt_dir(str(workdir)), sample.abstract_params(config, mesh), step=10)
    for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(ten), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(rundir.RunError, match="is a training run's workdir"):  # Another run's workdir too.
        sample.export(out, str(workdir), mesh)


@pytest.mark.slow
def test_cli_export_into_the_run_itself_is_one_line(tiny_run):
    _, workdir = tiny_run
    done = cli("--mode=export", f"--workdir={workdir}", f"--out={workdir}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: --out={workdir} is this run's own workdir")
    assert not rundir.is_export(str(workdir))


# ---- a sample folder holds one run, step and settings ----


def sample_settings(**flags):
    return sample.apply_sample_flags(demo.get_config("test=1"), flags)


def clip_names(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.startswith("clip") and n.endswith(".mp4"))


def test_samples_of_another_step_never_share_a_folder(tiny_run, tmp_path):
    config, workdir = tiny_run
    mesh = one_device_mesh()

    def run(out=None, **flags):
        sample.run_sample_mode(config, str(workdir), out and str(out), sample_settings(**flags), mesh)

    # An --out holding step 10's clips refuses step 12's, before any work, touching nothing.
    out = tmp_path / "mine"
    run(out, step=10, num=4)
    assert clip_names(out) == [f"clip{i:05d}_label{i:04d}_seed0_steps2_trainstep10.mp4" for i in range(4)]
    before = {p: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(rundir.RunError, match=r"--out=.*mine holds other samples \(step: 10 there, 12 now\); "
                                              r".*pass another --out"):
        run(out, step=12, num=2)
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    run(out, step=10, num=2)  # Fewer clips of the same settings: the same clips (a prefix).
    assert {p: p.read_bytes() for p in out.iterdir() if p.suffix == ".mp4" and "clip0000" in p.name} == {
        p: b for p, b in before.items() if p.suffix == ".mp4" and "clip0000" in p.name}
    # Unrecorded sample files (another tool's, or written before samples.json): refused too.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "clip00000_label0000_seed0_steps2.mp4").write_bytes(b"")
    with pytest.raises(rundir.RunError, match="holds sample files but no samples.json"):
        run(legacy, step=12)

    # The default folder is per step and settings; one holding other labels moves to a fresh sibling.
    run(step=12, num=2)
    run(step=10, num=2)
    default = workdir / "samples" / "step_12" / "renoise_2steps_seed0"
    assert clip_names(default) == [f"clip{i:05d}_label{i:04d}_seed0_steps2_trainstep12.mp4" for i in range(2)]
    assert json.loads((default / "samples.json").read_text())["step"] == 12
    assert clip_names(workdir / "samples" / "step_10" / "renoise_2steps_seed0")[0].endswith("_trainstep10.mp4")
    run(step=12, num=2, labels="3")
    assert clip_names(f"{default}_2") == [f"clip{i:05d}_label0003_seed0_steps2_trainstep12.mp4" for i in range(2)]


# ---- one `error:` line per mistake ----


@pytest.mark.parametrize("flags,message", [
    (dict(num=0), r"^--sample.num=0: it must be >= 1"),
    (dict(num=-3), r"^--sample.num=-3: it must be >= 1"),
    (dict(batch_size=0), r"^--sample.batch_size=0: it must be >= 1"),
    (dict(labels="cat"), r"^--sample.labels='cat' is not a list of class ids: give comma-separated integers in "
                         r"\[0, 4\), e.g. --sample.labels=0,1.$"),
], ids=["num0", "num-3", "batch0", "labels"])
def test_sample_flags_that_cannot_work_name_the_flag(flags, message):
    config = demo.get_config("test=1")
    with pytest.raises(rundir.ConfigError, match=message):
        sample.check_sample_flags(config, sample_settings(**flags))
    text_run = demo.get_config("test=1")
    text_run.model.update(num_classes=0, context_dim=16)
    with pytest.raises(rundir.ConfigError, match="takes no class labels .* give --sample.prompt"):
        sample.check_sample_flags(text_run, sample_settings(labels="1"))


def test_an_unknown_field_names_the_closest_ones():
    from eflow_jax import config_file, main

    sections = {"config": lambda: demo.get_config("test=1"), "sample": sample.sample_config}

    def problem(*argv):
        return config_file.unknown_field(["prog", "--workdir=w", *argv], sections, main.MODEL_HINTS)

    assert problem("--config.model.mlp_ratio=2", "--sample.num=3") is None
    assert problem("--config.model.mlp_ration=2") == ("--config.model.mlp_ration: config.model has no field "
                                                      "'mlp_ration'; did you mean --config.model.mlp_ratio?")
    assert problem("--config.model.widht=32").endswith("the width, depth and heads come from --config.model."
                                                       "variant (one of tiny, S, B, L, XL).")
    assert problem("--sample.nmu=3") == "--sample.nmu: sample has no field 'nmu'; did you mean --sample.num?"
    assert problem("--config.optim.lr.x=1") == ("--config.optim.lr.x: --config.optim.lr is a value, not a "
                                                "section; set --config.optim.lr=VALUE.")


@pytest.mark.slow
@pytest.mark.parametrize("args,line", [
    (["--config=configs/demo.py:test=1", "--config.model.widht=32"],
     "error: --config.model.widht: config.model has no field 'widht'; the width, depth and heads come from"),
    (["--mode=sample", "--sample.nmu=3"], "error: --sample.nmu: sample has no field 'nmu'; did you mean --sample.num?"),
    (["--config=configs/demo.py:test=1", "--config.model.video_shape=(4,16,16)"],
     "error: model.video_shape=(4, 16, 16): give 4 positive sizes (frames, height, width, channels)"),
    (["--mode=sample", "--sample.labels=cat"], "error: --sample.labels='cat' is not a list of class ids"),
    (["--mode=eval", "CUT"], "error: {workdir}/config.json is not valid JSON"),
], ids=["unknown_config_field", "unknown_sample_field", "video_shape", "labels", "cut_config_json"])
def test_cli_mistakes_are_one_error_line(tiny_run, tmp_path, args, line):
    _, workdir = tiny_run
    if "CUT" in args:  # A copy whose config.json a full disk cut short.
        shutil.copytree(workdir, tmp_path / "run")
        workdir = tmp_path / "run"
        text = (workdir / "config.json").read_text()
        (workdir / "config.json").write_text(text[: len(text) // 2])
        args = [a for a in args if a != "CUT"]
    fresh = tmp_path / "fresh"
    done = cli(*args, f"--workdir={fresh if args[0].startswith('--config') else workdir}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1].startswith(line.format(workdir=workdir)), done.stderr[-2000:]
    assert not fresh.exists()  # Nothing written for a run that never started.
