r"""Text-to-video: captioned clips (or VAE latents) with precomputed caption embeddings, EFlow-B by default.

Prepare captioned clips and embed their captions once (docs/T2V.md), then train and sample by prompt:

    python -m eflow_jax.data.prepare --src=/data/webvid/videos --annotations=/data/webvid/train.csv \
        --out=/data/webvid_17x128 --frames=17 --fps=8 --size=128
    python -m eflow_jax.data.embed_text --encoder=/models/wan21 --data=/data/webvid_17x128 --max_len=77
    python -m eflow_jax.main --config=configs/t2v.py --config.text.encoder=/models/wan21 --workdir=/ckpt/t2v
    python -m eflow_jax.main --mode=sample --workdir=/ckpt/t2v --sample.prompt="a dog running on a beach"

Args (comma separated): data (pixels | latents | shapes), variant, objective, steps, batch, runlocal.
  pixels   prepared 16x128x128 clips (data.path) + their text embeddings (data.text_embeddings).
  latents  5x32x32x16 Wan-VAE latents of 17x256x256 clips (`python -m eflow_jax.data.encode_latents`),
           embedded the same way; samples are decoded with the VAE the latents record (data.vae overrides).
  shapes   the synthetic captioned set (no download): moving shapes whose captions state size, colour, shape
           and direction, 20% of the combinations never seen in training, a frozen random tiny encoder
           ('tiny-random'), variant S at 16x32x32; scored by the caption gauge (eflow_jax/eval/captions.py).
  runlocal a few CPU steps of a tiny model on the captioned set; with data=pixels on prepared 4x16x16
           captioned clips (--config.data.path) and a 64-wide encoder (tests, the README's T2V commands).
The encoder is UMT5-XXL-sized (4096 wide) for pixels/latents: set text.encoder to the checkpoint the
embeddings were made with; its width must equal model.context_dim.
"""

from configs import common


def get_config(arg=None):
    a = common.parse_arg(arg, data="", variant="B", objective="eflow", steps=400_000, batch=256,
                         runlocal=False)
    a.data = a.data or ("shapes" if a.runlocal else "pixels")  # runlocal alone: the captioned set, no files.
    if a.runlocal and a.data == "pixels":
        return _local_pixels(a)
    if a.runlocal or a.data == "shapes":
        return _synthetic(a)
    c = common.base_config(a.variant, a.objective)
    c.total_steps, c.batch_size = a.steps, a.batch
    c.model.update(num_classes=0, context_dim=4096, context_len=77, video_shape=(16, 128, 128, 3), patch=(2, 8, 8),
                   tile=(4, 4, 4), cell=(2, 4, 4), drop_group=(1, 2, 2))
    c.data.update(source="arrayrecord", path="/data/webvid_17x128", num_frames=16, resolution=128, num_classes=0,
                  worker_count=8, random_flip=False)  # A flip turns "left" into "right" in a caption.
    if a.data == "latents":
        c.data.update(source="latents", path="/data/webvid_latents", num_frames=5, resolution=32, channels=16)
        c.model.update(video_shape=(5, 32, 32, 16), patch=(1, 2, 2), tile=(5, 4, 4), cell=(1, 4, 4))
    elif a.data != "pixels":
        raise ValueError(f"t2v data={a.data!r}: use pixels, latents or shapes.")
    return c


def _local_pixels(a):
    """CPU smoke runs on prepared captioned clips (4x16x16) and a small encoder (64 wide, e.g. the
    tiny random one): --config.data.path and --config.text.encoder name them."""
    c = _synthetic(a)
    c.model.update(video_shape=(4, 16, 16, 3))
    c.data.update(source="arrayrecord", path="", num_frames=4, resolution=16, synthetic_kind="colour")
    return c


def _synthetic(a):
    """The captioned moving shapes with the tiny random encoder: GPU-sized (data=shapes) or CPU (runlocal)."""
    c = common.base_config("tiny" if a.runlocal else a.variant if a.variant != "B" else "S", a.objective)
    size, frames = (32, 4) if a.runlocal else (32, 16)
    c.model.update(num_classes=0, context_dim=64, context_len=16, video_shape=(frames, size, size, 3),
                   patch=(1, 4, 4) if a.runlocal else (2, 4, 4), tile=(2, 4, 4) if a.runlocal else (4, 4, 4),
                   cell=(1, 4, 4) if a.runlocal else (2, 4, 4), drop_group=(1, 2, 2))
    c.text.encoder = "tiny-random"
    c.data.update(source="synthetic", synthetic_kind="captions", caption_split="train", num_frames=frames,
                  resolution=size, num_classes=0, num_examples=200_000, random_flip=False)
    c.optim.update(lr=3e-4, warmup_steps=200, ema_decay=0.999, ema_warmup=True, grad_clip=1.0)
    c.objective.r0, c.objective.r1 = 0.1, 0.01
    c.total_steps, c.batch_size = (a.steps, a.batch) if a.steps != 400_000 else (3000, 128)
    c.checkpoint.update(save_every=1000, keep_every=0)
    c.log.update(every_steps=100, sample_every=0, num_samples=8)
    if a.runlocal:
        c.model.dtype = "float32"
        c.total_steps, c.batch_size = (a.steps, a.batch) if a.steps != 400_000 else (20, 16)
        c.optim.update(lr=2e-3, warmup_steps=5)
        c.objective.dense_finetune_frac = 0.0
        c.data.update(num_examples=256, worker_count=0)
        c.checkpoint.update(save_every=10)
        c.log.update(every_steps=5, num_samples=4, sample_steps=(1, 2))
        c.train.check_memory = False
    return c
