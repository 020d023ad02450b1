r"""Tiny EFlow model on the embedded moving-shapes dataset: a few minutes on a laptop CPU.

    python -m eflow_jax.main --config=configs/demo.py --workdir=/tmp/eflow_demo

Writes checkpoints, TensorBoard events, metrics.jsonl and 1-/2-step sample videos to the workdir.
Args (`--config=configs/demo.py:steps=50,objective=solution_flow`): steps, objective, batch,
test (the smaller clip shape the test suite trains on).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, steps=400, objective="eflow", batch=16, test=False)
    c = common.base_config("tiny", a.objective)
    c.total_steps = a.steps
    c.batch_size = a.batch
    # 4x32x32 clips, patch (1,4,4): 4x8x8 = 256 tokens of 48 values (< width 64, so the network can
    # carry the noise through at t = 1), ~6 GFLOP per step (~0.5 s on 2 CPU cores).
    c.model.update(video_shape=(4, 32, 32, 3), patch=(1, 4, 4), tile=(2, 4, 4), cell=(1, 4, 4),
                   drop_group=(1, 2, 2), num_classes=4, dtype="float32")
    c.data.update(source="synthetic", num_frames=4, resolution=32, num_classes=4, num_examples=4096)
    c.optim.update(lr=2e-3, warmup_steps=50, ema_decay=0.999, ema_warmup=True, grad_clip=1.0)
    c.objective.r0, c.objective.r1 = 0.1, 0.01
    c.checkpoint.update(save_every=100, keep_every=0)
    c.log.update(every_steps=50, sample_every=0, num_samples=4)
    c.eval.fvd.update(num_gen_clips=64, num_real_clips=64, batch_size=16)
    c.eval.metric = "shapes"  # The synthetic data know their ground truth: no I3D weights needed.
    if a.test:  # 4x16x16 clips, 64 tokens: the shape tests/ train on (fast to compile on CPU).
        c.model.update(video_shape=(4, 16, 16, 3), patch=(1, 4, 4), tile=(2, 4, 4), cell=(1, 4, 4))
        c.data.update(num_frames=4, resolution=16, num_examples=64)
        c.checkpoint.update(save_every=2)
        c.log.update(every_steps=1, sample_steps=(), num_samples=2)
        c.train.check_memory = False
        c.eval.shapes.update(num_clips=32, num_steps=(1,), batch_size=16)
    return c
