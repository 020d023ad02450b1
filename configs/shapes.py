r"""Class-conditional moving shapes (10 classes) at 16x32x32 or 16x64x64: the quality gauge's data.

The data knows its ground truth (shape, colour and direction of motion per class), so samples can
be scored without any pretrained network (eflow_jax/eval/shapes.py): a run logs the gauge every
log.eval_every steps and at its end. This is the setting of `python -m eflow_jax.bench.quality`
(docs/QUALITY.md), variant S by default; on one H200, `:steps=2000` (about 2 minutes of steps after a
~100 s compile) gives 2-step class accuracy 0.985 and Frechet 6.8:

    python -m eflow_jax.main --config=configs/shapes.py --workdir=/tmp/shapes_eflow
    python -m eflow_jax.main --config=configs/shapes.py:objective=flow_matching,size=64 --workdir=...

`:hard=1` trains on the hard set instead (one colour for every class; a class is a shape kind x a
direction of motion) and scores it with the 'shapes_hard' gauge, whose Frechet distance sees blur:

    python -m eflow_jax.main --config=configs/shapes.py:hard=1 --workdir=/tmp/shapes_hard_eflow

Args (comma separated): variant, objective, size (32 | 64), steps, batch, hard, textured (hard set
with a static grating behind the shapes).
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, variant="S", objective="eflow", size=32, steps=3000, batch=128, hard=False,
                         textured=False)
    c = common.base_config(a.variant, a.objective)
    c.total_steps, c.batch_size = a.steps, a.batch
    # patch (2,4,4): 8x8x8 = 512 tokens at 32^2, 8x16x16 = 2048 at 64^2.
    c.model.update(video_shape=(16, a.size, a.size, 3), patch=(2, 4, 4), tile=(4, 4, 4), cell=(2, 4, 4),
                   drop_group=(1, 2, 2), num_classes=10)
    # No flips: the direction of motion is part of each class's signature.
    c.data.update(source="synthetic", num_frames=16, resolution=a.size, num_classes=10,
                  num_examples=200_000, random_flip=False,
                  # In-process, drawing clips took ~96 ms per batch of 128 on the H200 host: slower than the
                  # 56 ms step. With 6 worker processes the CLI waits on data ~9% of the time (docs/BENCHMARKS.md).
                  worker_count=6)
    c.optim.update(lr=3e-4, warmup_steps=200, ema_decay=0.999, ema_warmup=True, grad_clip=1.0)
    c.objective.r0, c.objective.r1 = 0.1, 0.01  # A short run: the l schedule ends at 1% of t - s.
    c.checkpoint.update(save_every=1000, keep_every=0)
    c.log.update(every_steps=100, sample_every=0, eval_every=1000)
    c.eval.metric = "shapes"  # Scored by the gauge every log.eval_every steps and at the end.
    if a.hard or a.textured:
        c.data.update(synthetic_kind="hard", synthetic_textured=a.textured)
        c.eval.metric = "shapes_hard"
    return c
