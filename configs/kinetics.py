r"""Class-conditional Kinetics-700 video (METHOD.md section 10), EFlow-B by default.

Prepare the data once (see docs/DATA.md), then:

    python -m eflow_jax.main --config=configs/kinetics.py --workdir=/ckpt/run1
    python -m eflow_jax.main --config=configs/kinetics.py:variant=L --config.optim.lr=2e-4 --workdir=...
    python -m eflow_jax.main --config=configs/kinetics.py:objective=solution_flow,baseline=1 --workdir=...

Args (comma separated): variant (tiny|S|B|L|XL), objective (eflow|solution_flow|flow_matching),
baseline (dense full-attention SoFlow DiT: no drop, joint conditioning), data (pixels|latents),
runlocal (a few steps on small clips with synthetic data, for smoke tests; with data=latents a tiny model on
the 5x8x8x4 latents a tiny random VAE makes of 17x64x64 clips, at --config.data.path), short (a run or
fine-tune of `steps` steps, default 20k: EMA 0.999 with warmup, lr warmup, denser checkpoints),
flip (random horizontal flips; turn off when direction carries the class, as in configs/shapes.py).

The defaults are for the full 400k-step run: EMA 0.9999 without warmup averages over ~10k steps
and still holds 74% of the initial weights after 3k steps, so shorter runs take `short=1`:

    python -m eflow_jax.main --config=configs/kinetics.py:short=1,steps=5000 --workdir=...
    python -m eflow_jax.main --config=configs/kinetics.py:short=1 \
        --config.checkpoint.init_from=/ckpt/run1/ckpt --workdir=/ckpt/finetune1
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, variant="B", objective="eflow", baseline=False, data="pixels",
                         runlocal=False, short=False, steps=20_000, flip=True)
    c = common.base_config(a.variant, a.objective)
    c.data.update(source="arrayrecord", path="/data/kinetics700_17x128", num_classes=700,
                  num_frames=16, resolution=128, worker_count=8, random_flip=a.flip)
    c.model.update(num_classes=700, video_shape=(16, 128, 128, 3), patch=(2, 8, 8), tile=(4, 4, 4),
                   cell=(2, 4, 4), drop_group=(1, 2, 2))
    # model.scan_layers=True gives the same losses with half the HLO and ~1/4-1/3 less compile time,
    # but on an H200 its step is 2.4x slower (docs/BENCHMARKS.md), and it stores the blocks' params in
    # another layout (a run cannot switch mid-way): opt-in, for compile-bound CPU runs.
    if a.data == "latents":  # 17x256^2 through a 4x8x8, 16-channel VAE: 5x32x32x16 latents.
        c.data.update(source="latents", path="/data/kinetics700_latents", num_frames=5,
                      resolution=32, channels=16)
        c.model.update(video_shape=(5, 32, 32, 16), patch=(1, 2, 2), tile=(5, 4, 4), cell=(1, 4, 4))
    if a.baseline:  # Standard solution flow on a dense DiT (the 2.5x throughput baseline).
        c.model.update(mode="full", keep_per_group=4, decoupled=False)
        c.objective.dense_finetune_frac = 0.0  # Nothing is dropped, so there is no dense phase.
    if a.short:  # The EMA and lr warmups scale with the run; train.validate warns when they do not fit.
        c.total_steps = a.steps
        c.optim.update(ema_decay=0.999, ema_warmup=True, warmup_steps=min(1_000, a.steps // 20))
        c.checkpoint.update(save_every=max(1, min(2_000, a.steps // 10)), keep_every=0)
        c.log.update(sample_every=max(1, a.steps // 4))
    if a.runlocal:
        c.total_steps, c.batch_size = 20, 8
        c.optim.ema_warmup = True  # 20 steps: a fixed 0.9999 EMA would stay at the init.
        c.log.update(every_steps=5, sample_every=0, num_samples=2)
        c.checkpoint.update(save_every=10)
        if a.data == "latents":  # Latents of 17x64x64 clips by a tiny random 4-channel VAE (tests): 5x8x8x4.
            c.model.update(variant="tiny", video_shape=(5, 8, 8, 4), patch=(1, 2, 2), tile=(5, 4, 4),
                           cell=(1, 4, 4), dtype="float32")
            c.data.update(num_frames=5, resolution=8, channels=4, worker_count=0)
            c.objective.dense_finetune_frac = 0.0
            c.batch_size = 16
        else:
            c.data.update(source="synthetic", path="", num_examples=256, worker_count=0)
    c.data.num_classes = c.model.num_classes
    return c
